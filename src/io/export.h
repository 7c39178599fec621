// Export to Hugging Face transformers (Mamba2ForCausalLM) and mamba_ssm (MambaLMHeadModel),
// and import of such a directory as initial weights.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "config/config.h"
#include "io/checkpoint.h"

namespace ssd {

enum class ExportFormat { HuggingFace, MambaSsm };
enum class ExportDType { F32, BF16 };

// Writes <out_dir>/model.safetensors and <out_dir>/config.json for the params (reference names,
// table order) of a model with config m. Atomic per file; creates out_dir if needed.
void export_model(const ModelConfig& m, const std::vector<HostTensor>& params,
                  const std::string& out_dir, ExportFormat fmt, ExportDType dtype);

// Reads an exported directory (either format, detected from names) back into reference names.
// Checks the config.json's sizes against m and every shape; throws ssd::Error naming the
// mismatch. Returns tensors in the order of `expected` (names/shapes).
std::vector<HostTensor> import_model(const std::string& dir, const ModelConfig& m,
                                     const std::vector<HostTensor>& expected);

// safetensors, minimal and self-contained.
struct SafeTensor {
  std::string name;
  std::string dtype;  // "F32" | "BF16"
  Shape shape;
  std::vector<uint8_t> bytes;
};
void write_safetensors(const std::string& path, const std::vector<SafeTensor>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata);
// Reads and validates a safetensors file (header inside the file, dtypes F32/BF16, shapes vs
// byte lengths, offsets in bounds and contiguous). Tensors come back in file (offset) order.
std::vector<SafeTensor> read_safetensors(const std::string& path);
// Only the header: names, dtypes and shapes (bytes left empty); same validation.
std::vector<SafeTensor> read_safetensors_header(const std::string& path);

// fp32 -> bf16 with round-to-nearest-even (NaN stays a quiet NaN); bf16 -> fp32 is exact.
uint16_t fp32_to_bf16(float x);
float bf16_to_fp32(uint16_t b);

// Name of a reference parameter in an exported model ("layers.0.mixer.D" ->
// "backbone.layers.0.mixer.D"); throws for a name that has no counterpart. The tied head is
// written separately as "lm_head.weight".
std::string export_name(const std::string& ref_name, ExportFormat fmt);
// The config.json text export_model writes for m.
std::string export_config_json(const ModelConfig& m, ExportFormat fmt, ExportDType dtype);

}  // namespace ssd
