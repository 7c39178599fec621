/* Launch probe for scripts/launch/test_multinode.sh (built there with mpicc, not part of the
 * ssdtrain build). Every rank prints one line
 *   probe: rank R size N host H local_rank L local_size S allreduce ok|BAD
 * where local_rank comes from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), as ssdtrain's process
 * grid computes it, and the allreduce sums MB megabytes of floats over all ranks (default 4), so
 * that traffic between hosts is large enough to see on their links. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank, size, lrank, lsize;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &lrank);
  MPI_Comm_size(local, &lsize);
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  const double mb = argc > 1 ? atof(argv[1]) : 4.0;
  const long n = (long)(mb * 1024 * 1024 / sizeof(float));
  float* buf = malloc(n * sizeof(float));
  for (long i = 0; i < n; ++i) buf[i] = (float)(rank + 1);
  MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  const float want = (float)size * (size + 1) / 2;
  int ok = 1;
  for (long i = 0; i < n; ++i) ok &= buf[i] == want;
  printf("probe: rank %d size %d host %s local_rank %d local_size %d allreduce %s\n", rank, size,
         host, lrank, lsize, ok ? "ok" : "BAD");
  fflush(stdout);
  free(buf);
  MPI_Comm_free(&local);
  MPI_Finalize();
  return ok ? 0 : 1;
}
