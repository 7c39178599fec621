// `ssdtrain bench ssd`: times the CUDA SSD forward and forward+backward (src/cli/bench_ssd.cpp).
#pragma once

namespace ssd {
// argv[0] is "ssd"; flags follow. Returns the exit code.
int run_bench_ssd(int argc, char** argv);
}
