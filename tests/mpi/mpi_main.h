// main() of the tests run under mpirun: MPI up first, results printed by rank 0, and the job
// fails when any rank failed.
#pragma once
#include <gtest/gtest.h>
#include <mpi.h>

#include "dist/grid.h"

int main(int argc, char** argv) {
  ssd::process_info();  // MPI_Init
  ::testing::InitGoogleTest(&argc, argv);
  if (ssd::process_info().rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  int any = rc;
  MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any;
}
