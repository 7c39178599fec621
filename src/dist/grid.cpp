#include "dist/grid.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "dist/mpi_comm.h"
#include "dist/watchdog.h"

namespace ssd {
namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long n = std::strtol(v, &end, 10);
  return (end && *end == 0 && n >= 0) ? static_cast<int>(n) : fallback;
}

ProcessInfo make_info() {
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    std::atexit([] {
      int fin = 0;
      MPI_Finalized(&fin);
      if (!fin) MPI_Finalize();
    });
  }
  ProcessInfo p;
  MPI_Comm_rank(MPI_COMM_WORLD, &p.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &p.size);
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  p.host = host;
  // The launcher knows the local rank; without one, count the processes sharing this host.
  int local = env_int("OMPI_COMM_WORLD_LOCAL_RANK", -1);
  if (local < 0) local = env_int("SLURM_LOCALID", -1);
  if (local < 0) local = env_int("MPI_LOCALRANKID", -1);
  if (local < 0) {
    MPI_Comm shm;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, p.rank, MPI_INFO_NULL, &shm);
    MPI_Comm_rank(shm, &local);
    MPI_Comm_free(&shm);
  }
  p.local_rank = local;
  watchdog::configure(600, "rank " + std::to_string(p.rank) + " (host " + p.host + ")");
  return p;
}

// The whole of a string, from `root` to every rank of comm.
void broadcast_string(MPI_Comm comm, std::string& s, int root) {
  int64_t n = static_cast<int64_t>(s.size());
  MPI_Bcast(&n, 1, MPI_INT64_T, root, comm);
  s.resize(n);
  if (n) MPI_Bcast(s.data(), static_cast<int>(n), MPI_CHAR, root, comm);
}

// Hosts of every rank of comm, in rank order.
std::vector<std::string> gather_hosts(MPI_Comm comm) {
  int size = 1;
  MPI_Comm_size(comm, &size);
  char mine[256] = {0};
  std::strncpy(mine, process_info().host.c_str(), sizeof mine - 1);
  std::vector<char> all(256 * size);
  MPI_Allgather(mine, 256, MPI_CHAR, all.data(), 256, MPI_CHAR, comm);
  std::vector<std::string> out;
  for (int r = 0; r < size; ++r) out.emplace_back(all.data() + 256 * r);
  return out;
}

}  // namespace

const ProcessInfo& process_info() {
  static ProcessInfo p = make_info();
  return p;
}

void agree(MPI_Comm comm, const std::function<void()>& fn) {
  process_info();
  std::string msg;
  bool known = false;
  try {
    fn();
  } catch (const Error& e) {
    msg = e.what();
    known = e.all_ranks();
  }
  int size = 1, rank = 0;
  MPI_Comm_size(comm, &size);
  MPI_Comm_rank(comm, &rank);
  if (size == 1) {
    if (!msg.empty()) throw Error(msg, known);
    return;
  }
  // The lowest failing rank speaks for all; how many failed tells whether to name it.
  int failed_rank = msg.empty() ? size : rank, first = size, nfailed = msg.empty() ? 0 : 1;
  MPI_Allreduce(&failed_rank, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == size) return;
  MPI_Allreduce(MPI_IN_PLACE, &nfailed, 1, MPI_INT, MPI_SUM, comm);
  broadcast_string(comm, msg, first);
  if (nfailed < size) {
    std::vector<std::string> hosts = gather_hosts(comm);
    msg = "rank " + std::to_string(first) + " (host " + hosts[first] + "): " + msg;
  }
  throw Error(msg, true);
}

ProcessGrid::ProcessGrid(const Layout& l, MPI_Comm base) : layout_(l), base_(base) {
  process_info();
  int size = 1;
  MPI_Comm_rank(base, &rank_);
  MPI_Comm_size(base, &size);
  SSD_CHECK(size == l.world && l.world == l.dp * l.cp * l.tp, "base communicator of ", size,
            " ranks for a layout of ", l.world);
  tp_rank_ = static_cast<int>(rank_ % l.tp);
  cp_rank_ = static_cast<int>(rank_ / l.tp % l.cp);
  dp_rank_ = static_cast<int>(rank_ / (l.tp * l.cp));
  watchdog::configure(watchdog::timeout_s(), "rank " + std::to_string(process_info().rank) +
                                                 " (host " + process_info().host + ")");

  auto split = [&](int color, int key, const char* name) {
    MPI_Comm c;
    MPI_Comm_split(base, color, key, &c);
    return std::make_unique<MpiComm>(c, name);
  };
  const int tp = static_cast<int>(l.tp), cp = static_cast<int>(l.cp);
  host_.resize(6);
  {
    MPI_Comm w;
    MPI_Comm_dup(base, &w);
    host_[int(Group::World)] = std::make_unique<MpiComm>(w, "world");
  }
  host_[int(Group::Dp)] = split(cp_rank_ * tp + tp_rank_, dp_rank_, "dp");
  host_[int(Group::Tp)] = split(dp_rank_ * cp + cp_rank_, tp_rank_, "tp");
  host_[int(Group::Cp)] = split(dp_rank_ * tp + tp_rank_, cp_rank_, "cp");
  host_[int(Group::DpCp)] = split(tp_rank_, dp_rank_ * cp + cp_rank_, "dpcp");
  const int span = static_cast<int>(l.tp_span);
  host_[int(Group::TpSpan)] =
      split((dp_rank_ * cp + cp_rank_) * (tp / span) + tp_rank_ / span, tp_rank_ % span, "tpspan");

  // A tensor-parallel group exchanges activations every layer: it must not cross hosts.
  agree(base, [&] {
    auto hosts = gather_hosts(static_cast<MpiComm&>(host(Group::Tp)).raw());
    for (size_t r = 1; r < hosts.size(); ++r)
      if (hosts[r] != hosts[0])
        fail_all("parallel.tp=", l.tp, " puts one tensor-parallel group on hosts ", hosts[0],
                 " and ", hosts[r], ": a group must lie on one host. Give every host a multiple "
                 "of parallel.tp processes (mpirun --map-by ppr:N:node with N a multiple of tp)");
  });
}

ProcessGrid::~ProcessGrid() {
  dev_.clear();
  host_.clear();
}

Communicator& ProcessGrid::host(Group g) { return *host_[static_cast<int>(g)]; }

Communicator& ProcessGrid::dev(Group g) {
  SSD_CHECK(attached_, "ProcessGrid::attach was not called");
  return *dev_[static_cast<int>(g)];
}

void ProcessGrid::attach(Backend& be) {
  dev_.clear();
  attached_ = true;
  // The CPU backend's memory is host memory: its device communicators are the host ones.
  for (auto& h : host_) {
    if (be.device() == Device::CPU)
      dev_.push_back(std::make_unique<CountingComm>(*h));
    else
      dev_.push_back(std::make_unique<CountingComm>(
          layout_.comm_nccl ? make_nccl_comm(*h, be) : make_staged_comm(*h, be)));
  }
}

CountingComm& ProcessGrid::counted(Group g) {
  SSD_CHECK(attached_, "ProcessGrid::attach was not called");
  return *dev_[static_cast<int>(g)];
}

std::vector<std::string> ProcessGrid::describe_ranks() {
  const ProcessInfo& p = process_info();
  char line[512];
  std::snprintf(line, sizeof line, "grid: rank %d host %s local_rank %d dp %d tp %d cp %d",
                rank_, p.host.c_str(), p.local_rank, dp_rank_, tp_rank_, cp_rank_);
  std::vector<char> all(512 * layout_.world);
  MPI_Allgather(line, 512, MPI_CHAR, all.data(), 512, MPI_CHAR, base_);
  std::vector<std::string> out;
  for (int64_t r = 0; r < layout_.world; ++r) out.emplace_back(all.data() + 512 * r);
  return out;
}

}  // namespace ssd
