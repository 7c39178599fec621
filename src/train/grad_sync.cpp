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

  // The optimizer's slots: whole parameters, or the pieces of them in this rank's parts.
  const int64_t len_full = total;
  shard_len_ = 0;
  if (zero_)
    for (auto& b : buckets_) b.shard_pos = shard_len_, shard_len_ += part(b);
  else
    shard_len_ = len_full;
  m_ = be_.alloc({std::max<int64_t>(shard_len_, 1)}, be_.accum_dtype());
  v_ = be_.alloc({std::max<int64_t>(shard_len_, 1)}, be_.accum_dtype());
  be_.zero(m_);
  be_.zero(v_);
  Tensor& P = model_.param_buffer();
  Tensor& G = model_.grad_buffer();
  for (size_t i = 0; i < table.size(); ++i) {
    const Shape& sh = model_.params()[i].shape;  // this rank's part (tensor parallelism)
    const int64_t off = model_.flat_offset(static_cast<int>(i)), n = shape_numel(sh);
    const double wd = table[i].weight_decay ? weight_decay : 0.0;
    if (!zero_) {
      slots_.push_back({model_.params()[i], model_.grads()[i], m_.rows(off, n).view(sh),
                        v_.rows(off, n).view(sh), wd});
      continue;
    }
    for (const auto& b : buckets_) {
      const int64_t lo = std::max(off, own_lo(b, rank_));
      const int64_t hi = std::min(off + n, own_lo(b, rank_) + part(b));
      if (hi <= lo) continue;
      const int64_t at = b.shard_pos + (lo - own_lo(b, rank_));
      slots_.push_back({P.rows(lo, hi - lo), G.rows(lo, hi - lo), m_.rows(at, hi - lo),
                        v_.rows(at, hi - lo), wd});
    }
  }
  for (auto& s : slots_) slot_grads_.push_back(s.grad);
  if (model_.tp_dims().tp > 1) build_norm_groups();
  model_.set_ready_hook([this](int stage) { on_ready(stage); });
}

void GradSync::build_norm_groups() {
  // Under tensor parallelism some gradients are on several ranks of the tp group: the
  // replicated parameters' (norms) on all tp of them, the shared B/C rows' on span of them.
  // The norm counts each once: the gradients held here, grouped by how many ranks hold them.
  const TpDims& d = model_.tp_dims();
  std::vector<std::pair<int64_t, int64_t>> owned;  // flat ranges whose reduced sums are here
  if (zero_)
    for (const auto& b : buckets_) owned.push_back({own_lo(b, rank_), part(b)});
  else
    owned.push_back({0, model_.grad_buffer().numel()});
  Tensor& G = model_.grad_buffer();
  auto add = [&](int64_t lo, int64_t len, int64_t copies) {
    for (auto [olo, olen] : owned) {
      const int64_t a = std::max(lo, olo), b = std::min(lo + len, olo + olen);
      if (b > a) norm_groups_[copies].push_back(G.rows(a, b - a));
    }
  };
  for (size_t i = 0; i < model_.table().size(); ++i) {
    const int64_t off = model_.flat_offset(static_cast<int>(i));
    for (const auto& r : model_.shard(static_cast<int>(i)).counted_ranges(d.span))
      add(off + r.offset, r.length, r.copies);
  }
}

int64_t GradSync::unsharded_moment_bytes() const { return 2 * model_.grad_buffer().numel() * 4; }

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

double GradSync::grad_norm() {
  double ss = 0;
  if (norm_groups_.empty()) {
    ss = be_.sum_squares(slot_grads_);
  } else {
    for (const auto& [copies, ts] : norm_groups_) ss += be_.sum_squares(ts) / double(copies);
  }
  if (zero_) grid_.host(Group::DpCp).all_reduce(&ss, 1, DType::F64, ReduceOp::Sum);
  if (!norm_groups_.empty()) grid_.host(Group::Tp).all_reduce(&ss, 1, DType::F64, ReduceOp::Sum);
  return std::sqrt(ss);
}

void GradSync::step(const AdamWHyper& h) {
  be_.adamw_step(slots_, h);
  if (zero_ && !comm_.trivial()) {
    Tensor& P = model_.param_buffer();
    char* base = static_cast<char*>(P.data);
    const size_t es = dtype_size(P.dtype);
    for (const auto& b : buckets_)
      comm_.all_gather(base + own_lo(b, rank_) * es, base + b.lo * es, part(b), P.dtype);
    comm_.join();
  }
  model_.refresh_compute_weights();
}

std::vector<float> GradSync::download_range(const Tensor& flat, int64_t lo, int64_t len) {
  std::vector<float> out(len);
  if (len == 0) return out;
  Tensor piece = flat.rows(lo, len);
  if (piece.dtype == DType::F32) {
    be_.download(out.data(), piece);
  } else {
    std::vector<double> tmp(len);
    be_.download(tmp.data(), piece);
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(tmp[i]);
  }
  return out;
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

void GradSync::moments_to_root(std::vector<std::vector<float>>& m,
                               std::vector<std::vector<float>>& v) {
  Communicator& host = grid_.host(Group::DpCp);
  const auto& table = model_.table();
  const int64_t total = model_.grad_buffer().numel();
  m.clear();
  v.clear();
  std::vector<float> fm, fv;  // full flat moments, on rank 0
  if (!zero_) {
    if (rank_ == 0) fm = download_range(m_, 0, total), fv = download_range(v_, 0, total);
  } else {
    std::vector<float> sm = download_range(m_, 0, shard_len_), sv = download_range(v_, 0, shard_len_);
    if (rank_ == 0) {
      fm.assign(total, 0.f);
      fv.assign(total, 0.f);
    }
    for (int q = 0; q < group_; ++q) {
      std::vector<float> qm, qv;
      if (rank_ == 0 && q == 0) {
        qm = sm, qv = sv;
      } else if (rank_ == 0) {
        qm.resize(shard_len_), qv.resize(shard_len_);  // every rank's shard has the same length
        host.recv(qm.data(), shard_len_, DType::F32, q);
        host.recv(qv.data(), shard_len_, DType::F32, q);
      } else if (rank_ == q) {
        host.send(sm.data(), shard_len_, DType::F32, 0);
        host.send(sv.data(), shard_len_, DType::F32, 0);
      }
      if (rank_ != 0) continue;
      for (const auto& b : buckets_)
        for (int64_t k = 0; k < part(b); ++k) {
          fm[own_lo(b, q) + k] = qm[b.shard_pos + k];
          fv[own_lo(b, q) + k] = qv[b.shard_pos + k];
        }
    }
  }
  if (rank_ != 0) return;
  for (size_t i = 0; i < table.size(); ++i) {
    const int64_t off = model_.flat_offset(static_cast<int>(i)), n = model_.params()[i].numel();
    m.emplace_back(fm.begin() + off, fm.begin() + off + n);
    v.emplace_back(fv.begin() + off, fv.begin() + off + n);
  }
}

void GradSync::moments_from_root(const std::vector<std::vector<float>>& m,
                                 const std::vector<std::vector<float>>& v) {
  Communicator& host = grid_.host(Group::DpCp);
  const auto& table = model_.table();
  const int64_t total = model_.grad_buffer().numel();
  std::vector<float> fm, fv;
  if (rank_ == 0) {
    fm.assign(total, 0.f);
    fv.assign(total, 0.f);
    for (size_t i = 0; i < table.size(); ++i) {
      const int64_t off = model_.flat_offset(static_cast<int>(i));
      std::copy(m[i].begin(), m[i].end(), fm.begin() + off);
      std::copy(v[i].begin(), v[i].end(), fv.begin() + off);
    }
  }
  if (!zero_) {
    if (rank_ != 0) fm.resize(total), fv.resize(total);
    host.broadcast(fm.data(), total, DType::F32, 0);
    host.broadcast(fv.data(), total, DType::F32, 0);
    upload_range(m_, 0, fm.data(), total);
    upload_range(v_, 0, fv.data(), total);
    return;
  }
  std::vector<float> sm(shard_len_), sv(shard_len_);
  for (int q = 0; q < group_; ++q) {
    if (rank_ == 0) {
      for (const auto& b : buckets_)
        for (int64_t k = 0; k < part(b); ++k) {
          sm[b.shard_pos + k] = fm[own_lo(b, q) + k];
          sv[b.shard_pos + k] = fv[own_lo(b, q) + k];
        }
      if (q == 0) {
        upload_range(m_, 0, sm.data(), shard_len_);
        upload_range(v_, 0, sv.data(), shard_len_);
      } else {
        host.send(sm.data(), shard_len_, DType::F32, q);
        host.send(sv.data(), shard_len_, DType::F32, q);
      }
    } else if (rank_ == q) {
      host.recv(sm.data(), shard_len_, DType::F32, 0);
      host.recv(sv.data(), shard_len_, DType::F32, 0);
      upload_range(m_, 0, sm.data(), shard_len_);
      upload_range(v_, 0, sv.data(), shard_len_);
    }
  }
}

std::vector<std::vector<float>> GradSync::gathered_grads() {
  const auto& table = model_.table();
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
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < table.size(); ++i) {
    const int64_t off = model_.flat_offset(static_cast<int>(i)), n = model_.params()[i].numel();
    out.emplace_back(full.begin() + off, full.begin() + off + n);
  }
  return out;
}

}  // namespace ssd
