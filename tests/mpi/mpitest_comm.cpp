// Collectives of the MPI communicator on the grid's sub-groups (run by ctest under mpirun -np 4),
// each against the same computation done serially from every rank's known contribution; and the
// chunking of large counts, with the chunk limit lowered so that small buffers take many chunks.
#include <gtest/gtest.h>

#include <numeric>

#include "config/config.h"
#include "dist/counting_comm.h"
#include "dist/grid.h"
#include "dist/mpi_comm.h"
#include "mpi_main.h"

using namespace ssd;

namespace {

// What rank r (of the group) contributes at element i: exact in float.
float val(int r, int64_t i) { return static_cast<float>((r + 1) * 1000 + i % 997); }

Layout layout(int64_t tp, int64_t cp) {
  Layout l;
  l.world = process_info().size;
  l.tp = tp;
  l.cp = cp;
  l.dp = l.world / (tp * cp);
  return l;
}

// Every collective on one group, checked against the serial result.
void check_group(Communicator& c, int64_t n) {
  const int R = c.size(), me = c.rank();
  SCOPED_TRACE("group " + c.name() + " of " + std::to_string(R) + ", n=" + std::to_string(n));
  // all_reduce: sum, max, min
  std::vector<float> a(n), b(n), d(n);
  for (int64_t i = 0; i < n; ++i) a[i] = b[i] = d[i] = val(me, i);
  c.all_reduce(a.data(), n, DType::F32, ReduceOp::Sum);
  c.all_reduce(b.data(), n, DType::F32, ReduceOp::Max);
  c.all_reduce(d.data(), n, DType::F32, ReduceOp::Min);
  for (int64_t i = 0; i < n; ++i) {
    float s = 0;
    for (int r = 0; r < R; ++r) s += val(r, i);
    ASSERT_EQ(a[i], s) << i;
    ASSERT_EQ(b[i], val(R - 1, i)) << i;
    ASSERT_EQ(d[i], val(0, i)) << i;
  }
  // reduce_scatter: block q of rank r holds val(r, q*n + i)
  std::vector<float> send(n * R), recv(n, -1);
  for (int q = 0; q < R; ++q)
    for (int64_t i = 0; i < n; ++i) send[q * n + i] = val(me, q * n + i);
  c.reduce_scatter(send.data(), recv.data(), n, DType::F32);
  for (int64_t i = 0; i < n; ++i) {
    float s = 0;
    for (int r = 0; r < R; ++r) s += val(r, me * n + i);
    ASSERT_EQ(recv[i], s) << i;
  }
  // in place: this rank's block of the send buffer receives
  c.reduce_scatter(send.data(), send.data() + me * n, n, DType::F32);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(send[me * n + i], recv[i]) << i;
  // all_gather, also in place
  std::vector<double> mine(n), all(n * R, -1), all2(n * R, -1);
  for (int64_t i = 0; i < n; ++i) mine[i] = all2[me * n + i] = val(me, i) * 0.5;
  c.all_gather(mine.data(), all.data(), n, DType::F64);
  c.all_gather(all2.data() + me * n, all2.data(), n, DType::F64);
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(all[r * n + i], val(r, i) * 0.5) << r << " " << i;
      ASSERT_EQ(all2[r * n + i], val(r, i) * 0.5) << r << " " << i;
    }
  // broadcast from the last rank
  std::vector<int32_t> bc(n);
  for (int64_t i = 0; i < n; ++i) bc[i] = me * 7 + static_cast<int32_t>(i);
  c.broadcast(bc.data(), n, DType::I32, R - 1);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(bc[i], (R - 1) * 7 + i);
  // send/recv around a ring
  if (R > 1) {
    std::vector<float> out(n), in(n);
    for (int64_t i = 0; i < n; ++i) out[i] = val(me, i);
    const int next = (me + 1) % R, prev = (me + R - 1) % R;
    if (me % 2 == 0) {
      c.send(out.data(), n, DType::F32, next);
      c.recv(in.data(), n, DType::F32, prev);
    } else {
      c.recv(in.data(), n, DType::F32, prev);
      c.send(out.data(), n, DType::F32, next);
    }
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(in[i], val(prev, i));
  }
  c.barrier();
}

}  // namespace

TEST(Comm, GridRanksAndGroups) {
  ASSERT_EQ(process_info().size, 4) << "run under mpirun -np 4";
  const int r = process_info().rank;
  // tp fastest, then cp, then dp.
  ProcessGrid g(layout(2, 1));
  EXPECT_EQ(g.tp_rank(), r % 2);
  EXPECT_EQ(g.dp_rank(), r / 2);
  EXPECT_EQ(g.host(Group::Tp).size(), 2);
  EXPECT_EQ(g.host(Group::Dp).size(), 2);
  EXPECT_EQ(g.host(Group::Cp).size(), 1);
  EXPECT_EQ(g.host(Group::DpCp).size(), 2);
  EXPECT_EQ(g.host(Group::World).size(), 4);
  ProcessGrid h(layout(1, 2));
  EXPECT_EQ(h.cp_rank(), r % 2);
  EXPECT_EQ(h.dp_rank(), r / 2);
  EXPECT_EQ(h.host(Group::DpCp).size(), 4);
  // The tp group of rank r is {r & ~1, r | 1}: its members' ranks sum to the pair's.
  int sum = r;
  g.host(Group::Tp).all_reduce(&sum, 1, DType::I32, ReduceOp::Sum);
  EXPECT_EQ(sum, (r & ~1) + (r | 1));
  int dsum = r;
  g.host(Group::Dp).all_reduce(&dsum, 1, DType::I32, ReduceOp::Sum);
  EXPECT_EQ(dsum, r % 2 == 0 ? 0 + 2 : 1 + 3);
  auto lines = g.describe_ranks();
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_NE(lines[3].find("grid: rank 3 host"), std::string::npos) << lines[3];
  EXPECT_NE(lines[3].find("dp 1 tp 1 cp 0"), std::string::npos) << lines[3];
}

TEST(Comm, CollectivesOnEveryGroupMatchSerial) {
  for (auto [tp, cp] : {std::pair<int64_t, int64_t>{1, 1}, {2, 1}, {1, 2}, {2, 2}, {4, 1}}) {
    ProcessGrid g(layout(tp, cp));
    for (Group grp : {Group::World, Group::Dp, Group::Tp, Group::Cp, Group::DpCp})
      for (int64_t n : {1, 5, 1000}) check_group(g.host(grp), n);
  }
}

TEST(Comm, LargeCountsAreChunked) {
  // With a limit of 7 elements per MPI call, 1000 elements take 143 chunks (the last partial):
  // the same logic that splits counts above 2^31 on real buffers.
  const int64_t saved = MpiComm::chunk_limit();
  MpiComm::set_chunk_limit(7);
  ProcessGrid g(layout(2, 1));
  for (Group grp : {Group::World, Group::Dp, Group::Tp})
    for (int64_t n : {7, 13, 1000}) check_group(g.host(grp), n);
  MpiComm::set_chunk_limit(saved);
  EXPECT_GE(saved, int64_t{1} << 30);
}

TEST(Comm, CountingCommCountsAndTimesEveryKind) {
  // The counting wrapper that `bench train` reads: bytes and calls per kind, and while timing is
  // on the calls it timed per kind (a host communicator's, each call on its own).
  ProcessGrid g(layout(1, 1));
  CountingComm c(g.host(Group::World));
  check_group(c, 100);  // 3 all-reduces, 2 reduce-scatters, 2 all-gathers, 1 broadcast, 1 send
  const CommBytes& n = c.counts();
  const auto at = [](CommOp op) { return static_cast<int>(op); };
  EXPECT_EQ(n.calls[at(CommOp::AllReduce)], 3);
  EXPECT_EQ(n.bytes[at(CommOp::AllReduce)], 3 * 100 * 4);
  EXPECT_EQ(n.calls[at(CommOp::ReduceScatter)], 2);
  EXPECT_EQ(n.bytes[at(CommOp::ReduceScatter)], 2 * 100 * 4);
  EXPECT_EQ(n.calls[at(CommOp::AllGather)], 2);
  EXPECT_EQ(n.bytes[at(CommOp::AllGather)], 2 * 100 * 8);
  EXPECT_EQ(n.calls[at(CommOp::Broadcast)], 1);
  EXPECT_EQ(n.calls[at(CommOp::SendRecv)], 1);  // the send; a receive hands over no payload
  // Nothing timed before timing starts; then every call of the kind, sends and receives both.
  c.start_timing();
  EXPECT_EQ(c.take_times().calls, (std::array<int64_t, kCommOps>{}));
  c.start_timing();
  check_group(c, 100);
  const CommTimes t = c.take_times();
  EXPECT_EQ(t.calls[at(CommOp::AllReduce)], 3);
  EXPECT_EQ(t.calls[at(CommOp::ReduceScatter)], 2);
  EXPECT_EQ(t.calls[at(CommOp::AllGather)], 2);
  EXPECT_EQ(t.calls[at(CommOp::Broadcast)], 1);
  EXPECT_EQ(t.calls[at(CommOp::SendRecv)], 2);
  for (int k = 0; k < kCommOps; ++k) EXPECT_GT(t.seconds[k], 0) << comm_op_name(CommOp(k));
  // After the take, calls are not timed.
  check_group(c, 10);
  EXPECT_EQ(c.take_times().calls, (std::array<int64_t, kCommOps>{}));
  EXPECT_EQ(c.counts().calls[at(CommOp::AllReduce)], 9);
}
