// Helpers shared by the multi-process layout tests: sub-communicators of the job and the
// comparison of a layout's training losses with the one-process run's.
#pragma once
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "dist/grid.h"

inline int world_rank() { return ssd::process_info().rank; }

// The job's ranks in consecutive groups of n.
inline MPI_Comm groups_of(int n) {
  MPI_Comm c;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() / n, world_rank(), &c);
  return c;
}

// Every step's loss within 1e-5 (relative) of the reference's; the worst printed for the record.
inline void expect_losses_close(const std::vector<double>& a, const std::vector<double>& b,
                                const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NEAR(a[i], b[i], 1e-5 * std::fabs(b[i])) << what << " step " << i + 1;
    worst = std::max(worst, std::fabs(a[i] - b[i]) / std::fabs(b[i]));
  }
  if (world_rank() == 0)
    std::printf("%s: %zu steps, largest relative loss difference %.2e\n", what.c_str(), a.size(),
                worst);
}
