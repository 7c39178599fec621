// Checkpoints: one HDF5 file per checkpoint, written atomically, verified on load.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace ssd {

inline constexpr int64_t kCheckpointFormatVersion = 1;


struct CheckpointData {
  int64_t format_version = kCheckpointFormatVersion;
  int64_t step = 0;                 // optimizer steps completed
  std::string config_yaml;          // the full resolved config
  std::vector<HostTensor> params;   // in parameter-table order
  std::vector<HostTensor> adam_m;   // same names and shapes as params
  std::vector<HostTensor> adam_v;
  // Small named state: RNG states, data-loader position, schedule position, token counts...
  std::map<std::string, std::vector<uint64_t>> state;
  // Set by read_checkpoint to the file it came from (used in error messages); not stored.
  std::string source;
};

// Writes a checkpoint to <path> as its tensors arrive, so the writer holds no more than the
// tensor it is given: the constructor creates temp_path(path); add() writes one parameter (and,
// when the checkpoint has optimizer state, its AdamW moments: same name and shape) in table
// order; finish() writes the step, the config, the small state and the manifest (the names as
// they were added), then fsyncs, renames onto path and fsyncs the directory. The file is the one
// write_checkpoint writes for the same contents, verified by read_checkpoint.
// Every call checks what it is given first (the checks of write_checkpoint: names, shapes,
// sizes, moments matching their parameter) and throws ssd::Error naming path on a bad tensor or
// a failed write (ENOSPC...: with the errno); after any error the temp file is removed and the
// writer refuses further calls. Destroyed without a successful finish(), it removes the temp
// file: path is then untouched (an earlier checkpoint there stays as it was).
class CheckpointWriter {
 public:
  CheckpointWriter(const std::string& path, bool optimizer);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  void add(const HostTensor& param);  // a checkpoint without optimizer state
  void add(const HostTensor& param, const HostTensor& adam_m, const HostTensor& adam_v);
  void finish(int64_t step, const std::string& config_yaml,
              const std::map<std::string, std::vector<uint64_t>>& state);
  const std::string& path() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Writes <path> atomically through CheckpointWriter: tensor by tensor into temp_path(path) (no
// copy of the file in memory), fsync, rename, fsync the directory. The whole checkpoint is
// checked before the file is created. A failed write (ENOSPC...) throws naming path and the
// errno, and leaves neither file. Every dataset carries a checksum verified by read_checkpoint.
void write_checkpoint(const std::string& path, const CheckpointData& ckpt);

// Reads and verifies a checkpoint. Throws ssd::Error naming the file and what is wrong
// (not HDF5, truncated, checksum mismatch, missing dataset, newer format version).
CheckpointData read_checkpoint(const std::string& path);

// Checkpoint file name for a step inside a checkpoint directory: step_00001234.h5
std::string checkpoint_path(const std::string& dir, int64_t step);
// Newest complete checkpoint in dir (by step number in the name), if any.
std::optional<std::string> latest_checkpoint(const std::string& dir);
// Deletes all but the newest keep_last checkpoints in dir (keep_last <= 0 keeps all).
void prune_checkpoints(const std::string& dir, int64_t keep_last);

// Checks a checkpoint's tensors against the parameter names/shapes expected; throws naming the
// first mismatch (missing, unexpected, wrong shape).
void check_checkpoint_shapes(const CheckpointData& ckpt, const std::vector<HostTensor>& expected);
// Throws naming the file and dataset when a parameter or AdamW moment holds inf or NaN (a
// diverged run's checkpoint: its CRCs are valid, so read_checkpoint, which keeps any bits,
// accepts it). Every loader of a checkpoint for use (resume, eval, export) calls it.
void check_checkpoint_finite(const CheckpointData& ckpt);

// ---- File helpers shared by the I/O layer (checkpoints and exports) ----
// "<path>.tmp.<host>.<pid>": where an atomic write puts its bytes before commit_file. Host and
// pid tell a later run whether the writer is still alive (train/run_dir.cpp removes the others).
std::string temp_path(const std::string& path);
// This host's name, as temp_path and the run-directory lock write it.
std::string host_name();
// fsyncs tmp, renames it to path, fsyncs path's directory. On failure removes tmp and throws.
void commit_file(const std::string& tmp, const std::string& path);
// Writes bytes to path atomically (temp_path, write, commit_file).
void write_file_atomic(const std::string& path, const std::string& bytes);
// CRC-32 (IEEE 802.3 polynomial, the value zlib's crc32() gives), continuing from crc.
uint32_t crc32(const void* data, size_t n, uint32_t crc = 0);

}  // namespace ssd
