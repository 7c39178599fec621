// The process grid: the one place that computes ranks. Built once per job from the Layout
// (config.h): world = dp * cp * tp, rank order tp fastest, then cp, then dp, so a tensor-parallel
// group holds consecutive ranks and stays inside a node. Each group has a host communicator
// (MPI) and, once a backend is attached, a communicator on the backend's memory: MPI itself for
// the CPU backend; NCCL (or MPI staged through host memory, parallel.comm=mpi) for CUDA.
#pragma once
#include <mpi.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "dist/comm.h"
#include "dist/counting_comm.h"

namespace ssd {

// This process in the whole job (MPI_COMM_WORLD). Initialises MPI on first use; a process
// started without mpirun is a world of one.
struct ProcessInfo {
  int rank = 0, size = 1;
  int local_rank = 0;  // among the processes of this host (the GPU it uses)
  std::string host;
};
const ProcessInfo& process_info();

// Runs `fn` on every rank of `comm` and agrees on the outcome: when any rank threw ssd::Error,
// every rank throws (the first failing rank's message, marked as known to all ranks so it is
// printed once), instead of some ranks going on into a collective that never completes.
void agree(MPI_Comm comm, const std::function<void()>& fn);

// TpSpan: the ranks of a tensor-parallel group that share one B/C group (layout.tp_span of
// them; the whole tp group when model.ngroups = 1, a group of one when each rank owns whole
// groups).
enum class Group { World, Dp, Tp, Cp, DpCp, TpSpan };

class ProcessGrid {
 public:
  // The groups of `layout` over the processes of `base` (whose size must be layout.world).
  // Checks that every tensor-parallel group lies on one host.
  explicit ProcessGrid(const Layout& layout, MPI_Comm base = MPI_COMM_WORLD);
  ~ProcessGrid();
  ProcessGrid(const ProcessGrid&) = delete;
  ProcessGrid& operator=(const ProcessGrid&) = delete;

  const Layout& layout() const { return layout_; }
  int rank() const { return rank_; }
  int size() const { return static_cast<int>(layout_.world); }
  bool is_root() const { return rank_ == 0; }
  int dp_rank() const { return dp_rank_; }
  int tp_rank() const { return tp_rank_; }
  int cp_rank() const { return cp_rank_; }
  MPI_Comm base() const { return base_; }

  // Host-memory (MPI) communicator of a group.
  Communicator& host(Group g);
  // The communicator on the attached backend's memory.
  Communicator& dev(Group g);
  // Makes the device communicators for `be` (NCCL when the layout says so).
  void attach(Backend& be);
  // The device communicator of a group with the bytes it has moved (bench train).
  CountingComm& counted(Group g);

  // One line per rank, gathered on every rank: "grid: rank R host H local_rank L dp D tp T cp C".
  std::vector<std::string> describe_ranks();

 private:
  Layout layout_;
  MPI_Comm base_;
  int rank_ = 0, dp_rank_ = 0, tp_rank_ = 0, cp_rank_ = 0;
  std::vector<std::unique_ptr<Communicator>> host_;  // indexed by Group
  std::vector<std::unique_ptr<CountingComm>> dev_;   // indexed by Group
  bool attached_ = false;
};

// Device communicator factories (grid.cpp uses them; nccl_comm.cpp / its stub define NCCL's).
// An NCCL communicator over the ranks of `host` (which bootstraps it), on `be`'s device.
std::unique_ptr<Communicator> make_nccl_comm(Communicator& host, Backend& be);
// MPI on device memory: every operation copies through host memory.
std::unique_ptr<Communicator> make_staged_comm(Communicator& host, Backend& be);

}  // namespace ssd
