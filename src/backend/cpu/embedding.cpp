// Token embedding lookup and its (deterministic) backward. The weight holds rows
// [row0, row0 + rows) of a vocabulary of `vocab` tokens (the whole of it without tensor
// parallelism): tokens outside those rows give zero rows and no gradient.
#include <algorithm>
#include <cstring>

#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {

namespace {
void check_tokens(const int32_t* tokens, int64_t ntok, int64_t vocab) {
  for (int64_t t = 0; t < ntok; ++t)
    SSD_CHECK(tokens[t] >= 0 && tokens[t] < vocab, "token ", tokens[t], " at position ", t,
              " outside the vocabulary [0, ", vocab, ")");
}
}  // namespace

template <class T>
void embedding_fwd(const int32_t* tokens, int64_t ntok, const T* weight, int64_t vocab,
                   int64_t row0, int64_t rows, int64_t dim, T* out) {
  check_tokens(tokens, ntok, vocab);
#pragma omp parallel for schedule(static) if (ntok * dim > 32768)
  for (int64_t t = 0; t < ntok; ++t) {
    const int64_t j = static_cast<int64_t>(tokens[t]) - row0;
    if (j >= 0 && j < rows)
      std::memcpy(out + t * dim, weight + j * dim, sizeof(T) * static_cast<size_t>(dim));
    else
      std::fill(out + t * dim, out + (t + 1) * dim, T(0));
  }
}

// dweight[tokens[t], :] += dout[t, :]. Threads own disjoint column blocks and walk the tokens
// in order, so repeated tokens never race and the result does not depend on the thread count.
template <class T>
void embedding_bwd(const int32_t* tokens, int64_t ntok, const T* dout, int64_t vocab,
                   int64_t row0, int64_t rows, int64_t dim, T* dweight) {
  check_tokens(tokens, ntok, vocab);
  constexpr int64_t CB = 256;
  const int64_t nblk = (dim + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (ntok * dim > 32768 && nblk > 1)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t c0 = b * CB, c1 = std::min(dim, c0 + CB);
    for (int64_t t = 0; t < ntok; ++t) {
      const int64_t j = static_cast<int64_t>(tokens[t]) - row0;
      if (j < 0 || j >= rows) continue;
      const T* src = dout + t * dim;
      T* dst = dweight + j * dim;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

template void embedding_fwd<float>(const int32_t*, int64_t, const float*, int64_t, int64_t,
                                   int64_t, int64_t, float*);
template void embedding_fwd<double>(const int32_t*, int64_t, const double*, int64_t, int64_t,
                                    int64_t, int64_t, double*);
template void embedding_bwd<float>(const int32_t*, int64_t, const float*, int64_t, int64_t,
                                   int64_t, int64_t, float*);
template void embedding_bwd<double>(const int32_t*, int64_t, const double*, int64_t, int64_t,
                                    int64_t, int64_t, double*);

}  // namespace ssd::cpu
