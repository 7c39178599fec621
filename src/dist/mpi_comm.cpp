#include "dist/mpi_comm.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include <unistd.h>

#include "dist/watchdog.h"

namespace ssd {
namespace {

int64_t g_chunk = int64_t{1} << 30;  // elements per MPI call (counts are int)

MPI_Datatype mpi_type(DType dt) {
  switch (dt) {
    case DType::F32: return MPI_FLOAT;
    case DType::F64: return MPI_DOUBLE;
    case DType::I32: return MPI_INT32_T;
    case DType::BF16: return MPI_UINT16_T;  // moved, never reduced
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return MPI_SUM;
    case ReduceOp::Max: return MPI_MAX;
    case ReduceOp::Min: return MPI_MIN;
  }
  return MPI_SUM;
}

void check(int rc, const char* what, const std::string& group) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    watchdog::abort_job(std::string(what) + " on group " + group + " failed: " + std::string(msg, len));
  }
}

void no_bf16_reduce(DType dt, const std::string& group) {
  if (dt == DType::BF16) fail("internal: reduction of bf16 data on MPI group ", group);
}

// Calls fn(offset, n) for consecutive chunks of at most the chunk limit covering [0, count).
template <class F>
void for_chunks(int64_t count, F fn) {
  for (int64_t off = 0; off < count; off += g_chunk)
    fn(off, static_cast<int>(std::min(g_chunk, count - off)));
}

}  // namespace

void MpiComm::set_chunk_limit(int64_t elements) { g_chunk = std::max<int64_t>(1, elements); }
int64_t MpiComm::chunk_limit() { return g_chunk; }

MpiComm::MpiComm(MPI_Comm comm, std::string name) : comm_(comm), name_(std::move(name)) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  // "dp [ranks 0, 1 on n1; 2, 3 on n2]": who a stuck collective was waiting for.
  int wrank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &wrank);
  char host[64] = {0};
  gethostname(host, sizeof host - 1);
  std::vector<int> ranks(size_);
  std::vector<char> hosts(64 * size_);
  MPI_Allgather(&wrank, 1, MPI_INT, ranks.data(), 1, MPI_INT, comm_);
  MPI_Allgather(host, 64, MPI_CHAR, hosts.data(), 64, MPI_CHAR, comm_);
  what_ = name_ + " [ranks ";
  for (int r = 0; r < size_; ++r) {
    const std::string h(hosts.data() + 64 * r);
    const bool new_host = r == 0 || h != std::string(hosts.data() + 64 * (r - 1));
    if (r > 0) what_ += new_host ? "; " : ", ";
    what_ += std::to_string(ranks[r]);
    if (r + 1 == size_ || h != std::string(hosts.data() + 64 * (r + 1))) what_ += " on " + h;
  }
  what_ += "]";
}

MpiComm::~MpiComm() {
  int fin = 0;
  MPI_Finalized(&fin);
  if (!fin && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_SELF) MPI_Comm_free(&comm_);
}

void MpiComm::all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) {
  if (size_ == 1 || count == 0) return;
  no_bf16_reduce(dt, name_);
  watchdog::Scope w(what_, "all_reduce", count);
  char* p = static_cast<char*>(buf);
  const size_t es = dtype_size(dt);
  for_chunks(count, [&](int64_t off, int n) {
    check(MPI_Allreduce(MPI_IN_PLACE, p + off * es, n, mpi_type(dt), mpi_op(op), comm_),
          "all_reduce", name_);
  });
}

void MpiComm::reduce_scatter(const void* send, void* recv, int64_t count, DType dt) {
  no_bf16_reduce(dt, name_);
  const size_t es = dtype_size(dt);
  if (size_ == 1) {
    std::memmove(recv, send, count * es);
    return;
  }
  watchdog::Scope w(what_, "reduce_scatter", count * size_);
  const char* s = static_cast<const char*>(send);
  char* r = static_cast<char*>(recv);
  // In place (recv is this rank's block of send): receive into a copy, MPI forbids aliasing.
  std::vector<char> out;
  char* const r_user = r;
  if (r + count * es > s && r < s + count * size_ * es) {
    out.resize(count * es);
    r = out.data();
  }
  // One chunk of every rank's block at a time: pack the chunk's pieces contiguously.
  std::vector<char> pack;
  for (int64_t off = 0; off < count; off += g_chunk) {
    const int64_t n = std::min(g_chunk, count - off);
    const char* src = s + off * es;
    if (n != count) {
      pack.resize(static_cast<size_t>(n * size_) * es);
      for (int b = 0; b < size_; ++b)
        std::memcpy(pack.data() + b * n * es, s + (b * count + off) * es, n * es);
      src = pack.data();
    }
    check(MPI_Reduce_scatter_block(src, r + off * es, static_cast<int>(n), mpi_type(dt), MPI_SUM,
                                   comm_),
          "reduce_scatter", name_);
  }
  if (r != r_user) std::memcpy(r_user, r, count * es);
}

void MpiComm::all_gather(const void* send, void* recv, int64_t count, DType dt) {
  const size_t es = dtype_size(dt);
  if (size_ == 1) {
    std::memmove(recv, send, count * es);
    return;
  }
  watchdog::Scope w(what_, "all_gather", count * size_);
  const char* s = static_cast<const char*>(send);
  char* r = static_cast<char*>(recv);
  // In place: send is this rank's block of recv.
  const bool in_place = s == r + rank_ * count * es;
  std::vector<char> unpack;
  for (int64_t off = 0; off < count; off += g_chunk) {
    const int64_t n = std::min(g_chunk, count - off);
    char* dst = r;
    if (n != count) {
      unpack.resize(static_cast<size_t>(n * size_) * es);
      dst = unpack.data();
    }
    const void* src = in_place && n == count ? MPI_IN_PLACE : s + off * es;
    check(MPI_Allgather(src, static_cast<int>(n), mpi_type(dt), dst, static_cast<int>(n),
                        mpi_type(dt), comm_),
          "all_gather", name_);
    if (n != count)
      for (int b = 0; b < size_; ++b)
        std::memcpy(r + (b * count + off) * es, unpack.data() + b * n * es, n * es);
  }
}

void MpiComm::broadcast(void* buf, int64_t count, DType dt, int root) {
  if (size_ == 1 || count == 0) return;
  watchdog::Scope w(what_, "broadcast", count);
  char* p = static_cast<char*>(buf);
  const size_t es = dtype_size(dt);
  for_chunks(count, [&](int64_t off, int n) {
    check(MPI_Bcast(p + off * es, n, mpi_type(dt), root, comm_), "broadcast", name_);
  });
}

void MpiComm::send(const void* buf, int64_t count, DType dt, int peer) {
  watchdog::Scope w(what_, "send", count);
  const char* p = static_cast<const char*>(buf);
  const size_t es = dtype_size(dt);
  for_chunks(count, [&](int64_t off, int n) {
    check(MPI_Send(p + off * es, n, mpi_type(dt), peer, 0, comm_), "send", name_);
  });
}

void MpiComm::recv(void* buf, int64_t count, DType dt, int peer) {
  watchdog::Scope w(what_, "recv", count);
  char* p = static_cast<char*>(buf);
  const size_t es = dtype_size(dt);
  for_chunks(count, [&](int64_t off, int n) {
    check(MPI_Recv(p + off * es, n, mpi_type(dt), peer, 0, comm_, MPI_STATUS_IGNORE), "recv", name_);
  });
}

void MpiComm::barrier() {
  if (size_ == 1) return;
  watchdog::Scope w(what_, "barrier", 0);
  check(MPI_Barrier(comm_), "barrier", name_);
}

}  // namespace ssd
