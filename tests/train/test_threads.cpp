// The CPU backend's thread policy: the same training run gives bitwise the same losses and
// parameters with 1 and 2 OpenMP threads. OPENBLAS_NUM_THREADS is left unset, as a user's shell
// would (ctest sets it for the other tests), so OpenBLAS would follow OMP_NUM_THREADS if the
// backend did not pin it to one thread inside its OpenMP-parallel ops.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "io/checkpoint.h"
#include "testutil.h"

namespace fs = std::filesystem;

namespace {

fs::path train_with_threads(const fs::path& root, int threads) {
  const fs::path dir = root / ("omp" + std::to_string(threads));
  // Wider than the default model so that the GEMMs are large enough for OpenBLAS to split.
  const std::string cmd = "env -u OPENBLAS_NUM_THREADS -u GOTO_NUM_THREADS OMP_NUM_THREADS=" +
                          std::to_string(threads) + " '" + SSD_BINARY +
                          "' train --set train.device=cpu --set train.max_steps=6 "
                          "--set run.log_every=1 --set model.d_model=256 --set run.dir='" +
                          dir.string() + "' > '" + dir.string() + ".log' 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return dir;
}

TEST(Threads, LossesAndParametersDoNotDependOnTheThreadCount) {
  const fs::path root = fs::temp_directory_path() / ("ssd_test_threads_" + std::to_string(getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  const fs::path a = train_with_threads(root, 1), b = train_with_threads(root, 2);
  const auto la = ssdtest::read_losses(a / "metrics.jsonl"), lb = ssdtest::read_losses(b / "metrics.jsonl");
  EXPECT_EQ(la.size(), 6u);
  EXPECT_EQ(la, lb);
  const auto ca = ssd::read_checkpoint((a / "checkpoints" / "step_00000006.h5").string());
  const auto cb = ssd::read_checkpoint((b / "checkpoints" / "step_00000006.h5").string());
  ASSERT_EQ(ca.params.size(), cb.params.size());
  for (size_t i = 0; i < ca.params.size(); ++i)
    EXPECT_EQ(std::memcmp(ca.params[i].data.data(), cb.params[i].data.data(),
                          ca.params[i].data.size() * sizeof(float)), 0)
        << ca.params[i].name << " differs between 1 and 2 threads";
  fs::remove_all(root);
}

}  // namespace
