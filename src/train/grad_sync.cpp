#include "train/grad_sync.h"

#include <algorithm>
#include <cmath>

namespace ssd {

GradSync::GradSync(Mamba2LM& model, Backend& be, ProcessGrid& grid, const ParallelConfig& pc,
                   double weight_decay)
    : model_(model), be_(be), grid_(grid), comm_(grid.dev(Group::DpCp)),
      group_(comm_.size()), rank_(comm_.rank()), zero_(pc.zero == 1) {
  const auto& table = model_.table();
  const int64_t total = model_.grad_buffer().numel();
  SSD_CHECK(total % group_ == 0, "flat buffers of ", total, " for a group of ", group_);
  // Parameters in flat order, then buckets of about bucket_mb cut at parameter boundaries.
  std::vector<int> order(table.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return model_.flat_offset(a) < model_.flat_offset(b); });
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(pc.bucket_mb * 1e6 / 4));
  for (size_t k = 0; k < order.size(); ++k) {
    const int i = order[k];
    const int64_t end = k + 1 < order.size() ? model_.flat_offset(order[k + 1]) : total;
    if (buckets_.empty() || buckets_.back().len >= cap) {
      Bucket b;
      b.lo = model_.flat_offset(i);
      b.stage = model_.ready_stage(i);
      buckets_.push_back(b);
    }
    Bucket& b = buckets_.back();
    b.len = end - b.lo;
    // Ready when its last-finished parameter is (stages grow along the flat order).
    b.stage = std::max(b.stage, model_.ready_stage(i));
  }
  for (auto& b : buckets_) SSD_CHECK(b.len % group_ == 0, "bucket of ", b.len);

  // The shard buffers: this rank's parts of every bucket (zero=1), or everything (zero=0).
  shard_len_ = 0;
  if (zero_)
    for (auto& b : buckets_) b.shard_pos = shard_len_, shard_len_ += part(b);
  else
    shard_len_ = total;
  SSD_CHECK(zero_ == model_.master_in_shards(), "internal: parallel.zero=", zero_ ? 1 : 0,
            " needs a model made with master_in_shards=", zero_ ? "true" : "false");
  m_ = be_.alloc({std::max<int64_t>(shard_len_, 1)}, be_.accum_dtype());
  v_ = be_.alloc({std::max<int64_t>(shard_len_, 1)}, be_.accum_dtype());
  be_.zero(m_);
  be_.zero(v_);
  if (zero_) {
    master_ = be_.alloc({std::max<int64_t>(shard_len_, 1)}, be_.accum_dtype());
    be_.zero(master_);
  }
  build_pieces();
  // The optimizer's slots: the pieces (whole parameters with zero=0).
  Tensor& P = master();
  Tensor& G = model_.grad_buffer();
  for (const Piece& pc : pieces_) {
    const double wd = table[pc.param].weight_decay ? weight_decay : 0.0;
    slots_.push_back({P.rows(pc.at, pc.len), G.rows(pc.lo, pc.len), m_.rows(pc.at, pc.len),
                      v_.rows(pc.at, pc.len), wd});
  }
  norm_groups_ = counted_tensors(false);
  param_groups_ = counted_tensors(true);
  model_.set_ready_hook([this](int stage) { on_ready(stage); });
  if (zero_)
    model_.set_master_loader([this](const std::vector<std::vector<float>>& v) { load_master(v); });
}

std::vector<GradSync::Part> GradSync::parts(int q) const {
  if (!zero_) return {{0, model_.grad_buffer().numel(), 0}};
  std::vector<Part> out;
  for (const auto& b : buckets_) out.push_back({own_lo(b, q), part(b), b.shard_pos});
  return out;
}

void GradSync::pieces_of(const std::vector<Part>& ps, int i, std::vector<Piece>& out) const {
  const int64_t off = model_.flat_offset(i);
  const int64_t n = shape_numel(model_.shard(i).local_shape);
  for (const Part& p : ps) {
    const int64_t lo = std::max(off, p.lo), hi = std::min(off + n, p.lo + p.len);
    if (hi > lo) out.push_back({i, lo, hi - lo, p.at + (lo - p.lo)});
  }
}

void GradSync::build_pieces() {
  const auto own = parts(rank_);
  for (size_t i = 0; i < model_.table().size(); ++i) pieces_of(own, static_cast<int>(i), pieces_);
}

std::map<int64_t, std::vector<Tensor>> GradSync::counted_tensors(bool of_master) {
  Tensor& src = of_master ? master() : model_.grad_buffer();
  auto piece = [&](int64_t lo, int64_t len, int64_t at) {
    return of_master ? src.rows(at, len) : src.rows(lo, len);
  };
  std::map<int64_t, std::vector<Tensor>> groups;
  const TpDims& d = model_.tp_dims();
  if (d.tp == 1) {
    for (const Piece& pc : pieces_) groups[1].push_back(piece(pc.lo, pc.len, pc.at));
    return groups;
  }
  // Under tensor parallelism some values are on several ranks of the tp group: the replicated
  // parameters' (norms) on all tp of them, the shared B/C rows' on span of them. Sums count
  // each once: the values held here, grouped by how many ranks hold them.
  const auto own = parts(rank_);
  for (size_t i = 0; i < model_.table().size(); ++i) {
    const int64_t off = model_.flat_offset(static_cast<int>(i));
    for (const auto& r : model_.shard(static_cast<int>(i)).counted_ranges(d.span))
      for (const Part& p : own) {
        const int64_t a = std::max(off + r.offset, p.lo);
        const int64_t b = std::min(off + r.offset + r.length, p.lo + p.len);
        if (b > a) groups[r.copies].push_back(piece(a, b - a, p.at + (a - p.lo)));
      }
  }
  return groups;
}

int64_t GradSync::unsharded_moment_bytes() const { return 2 * model_.grad_buffer().numel() * 4; }

int64_t GradSync::unsharded_master_bytes() const {
  return model_.grad_buffer().numel() * static_cast<int64_t>(dtype_size(be_.accum_dtype()));
}

void GradSync::before_micro_batch(bool last) {
  armed_ = last;
  model_.set_reduce_shared_grads(last);
  if (last)
    for (auto& b : buckets_) b.launched = false;
}

void GradSync::on_ready(int stage) {
  if (!armed_) return;
  for (auto& b : buckets_)
    if (!b.launched && b.stage <= stage) launch(b);
}

void GradSync::launch(Bucket& b) {
  b.launched = true;
  if (comm_.trivial()) return;
  Tensor& G = model_.grad_buffer();
  char* base = static_cast<char*>(G.data);
  const size_t es = dtype_size(G.dtype);
  if (zero_)  // in place: this rank's part of the bucket receives the sum
    comm_.reduce_scatter(base + b.lo * es, base + own_lo(b, rank_) * es, part(b), G.dtype);
  else
    comm_.all_reduce(base + b.lo * es, b.len, G.dtype, ReduceOp::Sum);
}

void GradSync::finish_backward() {
  armed_ = true;
  for (auto& b : buckets_)
    if (!b.launched) launch(b);
  armed_ = false;
  comm_.join();
}

double GradSync::sum_squares(const std::map<int64_t, std::vector<Tensor>>& groups) {
  double ss = 0;
  for (const auto& [copies, ts] : groups) ss += be_.sum_squares(ts) / double(copies);
  if (zero_) grid_.host(Group::DpCp).all_reduce(&ss, 1, DType::F64, ReduceOp::Sum);
  if (model_.tp_dims().tp > 1) grid_.host(Group::Tp).all_reduce(&ss, 1, DType::F64, ReduceOp::Sum);
  return ss;
}

double GradSync::grad_norm() { return std::sqrt(sum_squares(norm_groups_)); }

double GradSync::param_sumsq() { return sum_squares(param_groups_); }

void GradSync::step(const AdamWHyper& h) {
  be_.adamw_step(slots_, h);
  if (!zero_) {
    model_.refresh_compute_weights();
    return;
  }
  // This rank's updated parts into the compute buffer's same ranges, then every rank's parts
  // gathered there (bf16 on CUDA: half the bytes of gathering fp32).
  Tensor& C = model_.compute_buffer();
  for (const Part& p : parts(rank_)) {
    Tensor dst = C.rows(p.lo, p.len);
    be_.convert(master_.rows(p.at, p.len), dst);
  }
  const bool gather = !comm_.trivial();
  if (gather) {
    char* base = static_cast<char*>(C.data);
    const size_t es = dtype_size(C.dtype);
    for (const auto& b : buckets_)
      comm_.all_gather(base + own_lo(b, rank_) * es, base + b.lo * es, part(b), C.dtype);
  }
  // The non-GEMM parameters' full accum-dtype copies (the kernels read them; their parts of C
  // are not read). The pieces of a rank's parts do not line up with an even split of their
  // compact buffer, so no all-gather: each rank writes its pieces into zeros and the sum over
  // the group is every value exactly (x + 0; only a -0 would become +0).
  Tensor& S = model_.accum_weights_buffer();
  be_.zero(S);
  for (const Piece& pc : pieces_) {
    Tensor& w = model_.params()[pc.param];
    if (!w.defined()) continue;  // a GEMM weight: in C
    Tensor dst = w.view({w.numel()}).rows(pc.lo - model_.flat_offset(pc.param), pc.len);
    be_.convert(master_.rows(pc.at, pc.len), dst);
  }
  if (gather) comm_.all_reduce(S);
  comm_.join();
}

void GradSync::load_master(const std::vector<std::vector<float>>& local) {
  std::vector<float> shard(shard_len_, 0.f);
  for (const Piece& pc : pieces_) {
    const float* src = local[pc.param].data() + (pc.lo - model_.flat_offset(pc.param));
    std::copy(src, src + pc.len, shard.begin() + pc.at);
  }
  upload_range(master_, 0, shard.data(), shard_len_);
}

std::vector<float> GradSync::download_range(const Tensor& flat, int64_t lo, int64_t len) {
  std::vector<float> out(len);
  download_into(flat, lo, len, out.data());
  return out;
}

void GradSync::download_into(const Tensor& flat, int64_t lo, int64_t len, float* out) {
  if (len == 0) return;
  Tensor piece = flat.rows(lo, len);
  if (piece.dtype == DType::F32) {
    be_.download(out, piece);
  } else {
    std::vector<double> tmp(len);
    be_.download(tmp.data(), piece);
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(tmp[i]);
  }
}

void GradSync::upload_range(Tensor& flat, int64_t lo, const float* src, int64_t len) {
  if (len == 0) return;
  Tensor piece = flat.rows(lo, len);
  if (piece.dtype == DType::F32) {
    be_.upload(piece, src);
  } else {
    std::vector<double> tmp(src, src + len);
    be_.upload(piece, tmp.data());
  }
}

std::vector<std::vector<float>> GradSync::tensor_to_root(int i,
                                                         const std::vector<const Tensor*>& bufs) {
  const int64_t off = model_.flat_offset(i);
  const int64_t n = shape_numel(model_.shard(i).local_shape);
  const size_t K = bufs.size();
  std::vector<std::vector<float>> out(K);
  if (!zero_) {  // every rank holds the full flat buffers
    if (rank_ == 0)
      for (size_t k = 0; k < K; ++k) out[k] = download_range(*bufs[k], off, n);
    return out;
  }
  Communicator& host = grid_.host(Group::DpCp);
  if (rank_ == 0)
    for (auto& o : out) o.resize(n);
  int64_t placed = 0;
  std::vector<Piece> ps;
  std::vector<float> buf;
  for (int q = 0; q < group_; ++q) {
    if (rank_ != 0 && rank_ != q) continue;
    ps.clear();
    pieces_of(parts(q), i, ps);
    int64_t len = 0;
    for (const Piece& p : ps) len += p.len;
    if (len == 0) continue;  // rank q holds nothing of this tensor (both sides know it)
    // Rank q's pieces of the tensor, buffer after buffer, in one message.
    buf.resize(K * len);
    if (rank_ == q) {
      int64_t pos = 0;
      for (size_t k = 0; k < K; ++k)
        for (const Piece& p : ps) {
          download_into(*bufs[k], p.at, p.len, buf.data() + pos);
          pos += p.len;
        }
      if (q != 0) {
        host.send(buf.data(), static_cast<int64_t>(buf.size()), DType::F32, 0);
        continue;
      }
    } else {
      host.recv(buf.data(), static_cast<int64_t>(buf.size()), DType::F32, q);
    }
    int64_t pos = 0;
    for (size_t k = 0; k < K; ++k)
      for (const Piece& p : ps) {
        std::copy_n(buf.begin() + pos, p.len, out[k].begin() + (p.lo - off));
        pos += p.len;
      }
    placed += len;
  }
  // The parts cover every bucket, and the buckets every parameter: each value came once.
  if (rank_ == 0)
    SSD_CHECK(placed == n, model_.table()[i].name, ": ", placed, " of ", n, " values");
  return out;
}

GradSync::TensorState GradSync::tensor_to_root(int i) {
  auto got = tensor_to_root(i, {&master(), &m_, &v_});
  return {std::move(got[0]), std::move(got[1]), std::move(got[2])};
}

void GradSync::shards_from_root(std::vector<std::vector<float>>& full,
                                const std::vector<Tensor*>& bufs) {
  Communicator& host = grid_.host(Group::DpCp);
  const int64_t total = model_.grad_buffer().numel();
  if (!zero_) {
    for (size_t k = 0; k < bufs.size(); ++k) {
      if (rank_ != 0) full[k].resize(total);
      host.broadcast(full[k].data(), total, DType::F32, 0);
      upload_range(*bufs[k], 0, full[k].data(), total);
    }
    return;
  }
  std::vector<float> shard(shard_len_);
  for (int q = 0; q < group_; ++q)
    for (size_t k = 0; k < bufs.size(); ++k) {
      if (rank_ == 0) {
        for (const Part& p : parts(q))
          std::copy_n(full[k].begin() + p.lo, p.len, shard.begin() + p.at);
        if (q == 0)
          upload_range(*bufs[k], 0, shard.data(), shard_len_);
        else
          host.send(shard.data(), shard_len_, DType::F32, q);
      } else if (rank_ == q) {
        host.recv(shard.data(), shard_len_, DType::F32, 0);
        upload_range(*bufs[k], 0, shard.data(), shard_len_);
      }
    }
}

std::vector<std::vector<float>> GradSync::by_param(const std::vector<float>& flat) const {
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < model_.table().size(); ++i) {
    const int64_t off = model_.flat_offset(static_cast<int>(i));
    const int64_t n = shape_numel(model_.shard(static_cast<int>(i)).local_shape);
    out.emplace_back(flat.begin() + off, flat.begin() + off + n);
  }
  return out;
}

std::vector<float> GradSync::to_flat(const std::vector<std::vector<float>>& per_param) const {
  std::vector<float> flat(model_.grad_buffer().numel(), 0.f);
  for (size_t i = 0; i < per_param.size(); ++i)
    std::copy(per_param[i].begin(), per_param[i].end(),
              flat.begin() + model_.flat_offset(static_cast<int>(i)));
  return flat;
}

void GradSync::moments_to_root(std::vector<std::vector<float>>& m,
                               std::vector<std::vector<float>>& v) {
  m.clear();
  v.clear();
  for (size_t i = 0; i < model_.table().size(); ++i) {
    auto got = tensor_to_root(static_cast<int>(i), {&m_, &v_});
    if (rank_ != 0) continue;
    m.push_back(std::move(got[0]));
    v.push_back(std::move(got[1]));
  }
}

void GradSync::moments_from_root(const std::vector<std::vector<float>>& m,
                                 const std::vector<std::vector<float>>& v) {
  std::vector<std::vector<float>> full(2);
  if (rank_ == 0) full[0] = to_flat(m), full[1] = to_flat(v);
  shards_from_root(full, {&m_, &v_});
}

std::vector<std::vector<float>> GradSync::params_to_root() {
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < model_.table().size(); ++i) {
    auto got = tensor_to_root(static_cast<int>(i), {&master()});
    if (rank_ == 0) out.push_back(std::move(got[0]));
  }
  return out;
}

std::vector<std::vector<float>> GradSync::gathered_grads() {
  const int64_t total = model_.grad_buffer().numel();
  std::vector<float> full = download_range(model_.grad_buffer(), 0, total);
  if (zero_ && group_ > 1) {
    // Each rank's parts hold the reduced sums; the rest of its buffer is its local gradient.
    Communicator& host = grid_.host(Group::DpCp);
    for (const auto& b : buckets_) {
      std::vector<float> mine(full.begin() + own_lo(b, rank_),
                              full.begin() + own_lo(b, rank_) + part(b));
      host.all_gather(mine.data(), full.data() + b.lo, part(b), DType::F32);
    }
  }
  return by_param(full);
}

}  // namespace ssd
