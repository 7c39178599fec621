// ssdtrain: one binary, subcommands. Every user-facing failure ends here as one line on stderr
// and a non-zero exit code.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "dist/grid.h"
#include "dist/watchdog.h"

namespace {

void usage(FILE* out) {
  std::fprintf(out,
      "usage: ssdtrain <command> [options]\n"
      "\n"
      "commands:\n"
      "  train   [--config FILE] [--set section.key=value ...]   train a model (default config if none)\n"
      "  eval    --checkpoint FILE [--set ...]                   evaluate a checkpoint\n"
      "  export  --checkpoint FILE --out DIR [--dtype bf16|fp32] [--format hf|mamba_ssm] [--with-reference]\n"
      "  config  [--config FILE] [--set ...]                     print the resolved config\n"
      "  tokenize --tokenizer tokenizer.json --input PATH... --out PREFIX   text -> PREFIX.bin/.idx\n"
      "  bench   ssd [--batch N --seqlen N --heads N --headdim N --groups N --dstate N --chunk N]\n"
      "  bench   train [--config FILE] [--set ...] [--steps N] [--breakdown]\n"
      "\n"
      "Run 'ssdtrain <command> --help' for details. Configs live in configs/.\n");
}

// An error every rank found alike (a config or layout error, agreed before any work) is printed
// once, by rank 0, and every rank exits 1. An error of one rank alone is printed with its rank
// and ends the whole job: the others would otherwise wait for it in their next collective.
int fail_job(const std::string& cmd, const char* what, bool all_ranks, const char* kind) {
  const ssd::ProcessInfo& p = ssd::process_info();
  if (all_ranks || p.size == 1) {
    if (p.rank == 0) std::fprintf(stderr, "ssdtrain %s: %s: %s\n", cmd.c_str(), kind, what);
    return 1;
  }
  ssd::watchdog::abort_job(std::string("ssdtrain ") + cmd + ": " + kind + ": " + what);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  try {
    if (cmd == "train") return ssd::cli::cmd_train(args);
    if (cmd == "eval") return ssd::cli::cmd_eval(args);
    if (cmd == "export") return ssd::cli::cmd_export(args);
    if (cmd == "config") return ssd::cli::cmd_config(args);
    if (cmd == "tokenize") return ssd::cli::cmd_tokenize(args);
    if (cmd == "bench") return ssd::cli::cmd_bench(args, argc - 1, argv + 1);
    std::fprintf(stderr, "ssdtrain: unknown command '%s'\n\n", cmd.c_str());
    usage(stderr);
    return 2;
  } catch (const ssd::Error& e) {
    return fail_job(cmd, e.what(), e.all_ranks(), "error");
  } catch (const std::exception& e) {
    return fail_job(cmd, e.what(), false, "unexpected error");
  }
}
