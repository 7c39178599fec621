// The subcommands of the ssdtrain binary (src/cli/commands.cpp). Each returns the exit code and
// throws ssd::Error for user-facing failures.
#pragma once
#include <string>
#include <vector>

#include "config/config.h"

namespace ssd::cli {

int cmd_train(const std::vector<std::string>& args);
int cmd_eval(const std::vector<std::string>& args);
int cmd_export(const std::vector<std::string>& args);
int cmd_config(const std::vector<std::string>& args);
int cmd_tokenize(const std::vector<std::string>& args);  // tokenize.cpp
int cmd_bench(const std::vector<std::string>& args, int argc, char** argv);

// --config FILE and --set k=v parsing shared by the commands; no --config gives the built-in
// default config (configs/default.yaml, embedded at build time).
Config config_from_args(const std::vector<std::string>& args, std::vector<std::string>* rest);
const char* default_config_yaml();

}  // namespace ssd::cli
