// Export to / import from Hugging Face transformers (Mamba2ForCausalLM) and mamba_ssm
// (MambaLMHeadModel) directories: model.safetensors + config.json.
//
// Both formats are written as model.safetensors. mamba_ssm's own save_pretrained writes
// pytorch_model.bin (a pickle), which we do not produce; load the safetensors file with
// safetensors.torch.load_file and MambaLMHeadModel.load_state_dict instead.
//
// Names (reference -> file):
//   embedding.weight        -> backbone.embeddings.weight (HF) | backbone.embedding.weight (mamba_ssm)
//   layers.{i}.norm.weight  -> backbone.layers.{i}.norm.weight
//   layers.{i}.mixer.X      -> backbone.layers.{i}.mixer.X
//   norm_f.weight           -> backbone.norm_f.weight
//   (tied head)             -> lm_head.weight, a copy of the embedding
// Shapes are the same in all three (Linear weights [out, in], conv1d.weight [C, 1, K]).
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "core/error.h"
#include "io/export.h"
#include "io/json.h"

namespace fs = std::filesystem;

namespace ssd {

uint16_t fp32_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float bf16_to_fp32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

namespace {

const char* const kMixerParams[] = {"in_proj.weight", "conv1d.weight", "conv1d.bias",
                                    "dt_bias",        "A_log",         "D",
                                    "norm.weight",    "out_proj.weight"};

const char* format_name(ExportFormat f) {
  return f == ExportFormat::HuggingFace ? "Hugging Face (Mamba2ForCausalLM)"
                                        : "mamba_ssm (MambaLMHeadModel)";
}

// "layers.<digits>.<rest>": returns rest, or nullopt.
std::optional<std::string> layer_rest(const std::string& name) {
  const std::string pre = "layers.";
  if (name.compare(0, pre.size(), pre) != 0) return std::nullopt;
  size_t i = pre.size();
  size_t j = i;
  while (j < name.size() && name[j] >= '0' && name[j] <= '9') ++j;
  if (j == i || j >= name.size() || name[j] != '.') return std::nullopt;
  return name.substr(j + 1);
}

bool known_layer_param(const std::string& rest) {
  if (rest == "norm.weight") return true;
  const std::string mixer = "mixer.";
  if (rest.compare(0, mixer.size(), mixer) != 0) return false;
  const std::string x = rest.substr(mixer.size());
  for (const char* p : kMixerParams)
    if (x == p) return true;
  return false;
}

std::vector<float> to_f32(const SafeTensor& t) {
  std::vector<float> out(t.bytes.size() / (t.dtype == "BF16" ? 2 : 4));
  if (t.dtype == "F32") {
    std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
  } else {
    for (size_t i = 0; i < out.size(); ++i) {
      uint16_t b;
      std::memcpy(&b, t.bytes.data() + 2 * i, 2);
      out[i] = bf16_to_fp32(b);
    }
  }
  return out;
}

SafeTensor to_safetensor(const std::string& name, const HostTensor& t, ExportDType dtype) {
  SafeTensor s;
  s.name = name;
  s.shape = t.shape;
  if (dtype == ExportDType::F32) {
    s.dtype = "F32";
    s.bytes.resize(t.data.size() * 4);
    std::memcpy(s.bytes.data(), t.data.data(), s.bytes.size());
  } else {
    s.dtype = "BF16";
    s.bytes.resize(t.data.size() * 2);
    for (size_t i = 0; i < t.data.size(); ++i) {
      uint16_t b = fp32_to_bf16(t.data[i]);
      std::memcpy(s.bytes.data() + 2 * i, &b, 2);
    }
  }
  return s;
}

// ---- config.json reading ----

struct ConfigFile {
  const json::Value& root;
  const std::string& file;

  const json::Value& get(const json::Value& obj, const std::string& key,
                         const std::string& full) const {
    const json::Value* v = obj.find(key);
    if (!v) fail(file, ": missing key \"", full, "\"");
    return *v;
  }
  int64_t integer(const json::Value& v, const std::string& full) const {
    if (!v.is_number()) fail(file, ": \"", full, "\" is a ", v.kind_name(), ", expected an integer");
    try {
      return v.as_int();
    } catch (const Error&) {
      fail(file, ": \"", full, "\" is ", v.as_double(), ", expected an integer");
    }
  }
  int64_t integer(const std::string& key) const { return integer(get(root, key, key), key); }
  // ssm_cfg.<key>, with mamba_ssm's Mamba2 default when absent.
  int64_t ssm_int(const json::Value& ssm, const std::string& key, int64_t dflt) const {
    const json::Value* v = ssm.find(key);
    return v ? integer(*v, "ssm_cfg." + key) : dflt;
  }

  void expect(const std::string& key, int64_t got, const char* model_key, int64_t want) const {
    if (got != want)
      fail(file, ": \"", key, "\" is ", got, " but the model config has ", model_key, " = ",
           want, " (the imported model must have the same sizes)");
  }
  void expect_bool(const std::string& key, bool want) const {
    const json::Value* v = root.find(key);
    if (!v) return;
    if (!v->is_bool() || v->as_bool() != want)
      fail(file, ": \"", key, "\" must be ", want ? "true" : "false",
           " for a model ssdtrain can load");
  }
};

void check_vocab(const ConfigFile& c, const std::string& key, int64_t padded, const ModelConfig& m) {
  if (padded != m.padded_vocab())
    fail(c.file, ": \"", key, "\" gives a vocabulary of ", padded,
         " rows but the model config has ", m.padded_vocab(), " (model.vocab_size = ",
         m.vocab_size, " padded to a multiple of model.pad_vocab_size_multiple = ",
         m.pad_vocab_size_multiple, ")");
}

void check_hf_config(const ConfigFile& c, const ModelConfig& m) {
  c.expect("hidden_size", c.integer("hidden_size"), "model.d_model", m.d_model);
  c.expect("num_hidden_layers", c.integer("num_hidden_layers"), "model.n_layer", m.n_layer);
  c.expect("state_size", c.integer("state_size"), "model.d_state", m.d_state);
  c.expect("head_dim", c.integer("head_dim"), "model.headdim", m.headdim);
  c.expect("num_heads", c.integer("num_heads"), "nheads (model.expand * model.d_model / model.headdim)",
           m.nheads());
  c.expect("expand", c.integer("expand"), "model.expand", m.expand);
  c.expect("n_groups", c.integer("n_groups"), "model.ngroups", m.ngroups);
  c.expect("conv_kernel", c.integer("conv_kernel"), "model.d_conv", m.d_conv);
  check_vocab(c, "vocab_size", c.integer("vocab_size"), m);
  c.expect_bool("use_bias", false);
  c.expect_bool("use_conv_bias", true);
  c.expect_bool("rms_norm", true);
}

void check_mamba_ssm_config(const ConfigFile& c, const ModelConfig& m) {
  c.expect("d_model", c.integer("d_model"), "model.d_model", m.d_model);
  c.expect("n_layer", c.integer("n_layer"), "model.n_layer", m.n_layer);
  const json::Value* di = c.root.find("d_intermediate");
  if (di && c.integer(*di, "d_intermediate") != 0)
    fail(c.file, ": \"d_intermediate\" is ", c.integer(*di, "d_intermediate"),
         ": models with MLP blocks are not supported (must be 0)");
  const json::Value* attn = c.root.find("attn_layer_idx");
  if (attn && !(attn->is_array() && attn->size() == 0) && !attn->is_null())
    fail(c.file, ": \"attn_layer_idx\" is not empty: hybrid attention models are not supported");
  // mamba_ssm pads the vocabulary itself (default multiple 8).
  const int64_t vocab = c.integer("vocab_size");
  const json::Value* pm = c.root.find("pad_vocab_size_multiple");
  const int64_t mult = pm ? c.integer(*pm, "pad_vocab_size_multiple") : 8;
  if (mult <= 0) fail(c.file, ": \"pad_vocab_size_multiple\" must be positive");
  check_vocab(c, "vocab_size", (vocab + mult - 1) / mult * mult, m);
  const json::Value& ssm = c.get(c.root, "ssm_cfg", "ssm_cfg");
  if (!ssm.is_object()) fail(c.file, ": \"ssm_cfg\" is not an object");
  const json::Value* layer = ssm.find("layer");
  if (!layer || !layer->is_string() || layer->as_string() != "Mamba2")
    fail(c.file, ": \"ssm_cfg.layer\" is ",
         layer && layer->is_string() ? "\"" + layer->as_string() + "\"" : "absent (Mamba1)",
         ": only Mamba2 models can be imported");
  c.expect("ssm_cfg.d_state", c.ssm_int(ssm, "d_state", 128), "model.d_state", m.d_state);
  c.expect("ssm_cfg.d_conv", c.ssm_int(ssm, "d_conv", 4), "model.d_conv", m.d_conv);
  c.expect("ssm_cfg.expand", c.ssm_int(ssm, "expand", 2), "model.expand", m.expand);
  c.expect("ssm_cfg.headdim", c.ssm_int(ssm, "headdim", 64), "model.headdim", m.headdim);
  c.expect("ssm_cfg.ngroups", c.ssm_int(ssm, "ngroups", 1), "model.ngroups", m.ngroups);
  c.expect_bool("rms_norm", true);
}

std::string read_text_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    if (errno == ENOENT) fail(path, " does not exist");
    fail("cannot open ", path, ": ", std::strerror(errno));
  }
  std::string s;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) s.append(buf, n);
  bool err = std::ferror(f);
  std::fclose(f);
  if (err) fail("cannot read ", path);
  return s;
}

}  // namespace

std::string export_name(const std::string& ref, ExportFormat fmt) {
  if (ref == "embedding.weight")
    return fmt == ExportFormat::HuggingFace ? "backbone.embeddings.weight"
                                            : "backbone.embedding.weight";
  if (ref == "norm_f.weight") return "backbone.norm_f.weight";
  if (auto rest = layer_rest(ref); rest && known_layer_param(*rest)) return "backbone." + ref;
  fail("parameter ", ref, " has no name in the ", format_name(fmt), " format");
}

std::string export_config_json(const ModelConfig& m, ExportFormat fmt, ExportDType dtype) {
  using json::Value;
  Value c = Value::object();
  if (fmt == ExportFormat::HuggingFace) {
    // Keys as transformers' Mamba2Config reads them (configuration_mamba2.py).
    c.set("architectures", Value::array().push("Mamba2ForCausalLM"));
    c.set("model_type", "mamba2");
    c.set("hidden_size", m.d_model);
    c.set("num_hidden_layers", m.n_layer);
    c.set("state_size", m.d_state);
    c.set("head_dim", m.headdim);
    c.set("num_heads", m.nheads());
    c.set("expand", m.expand);
    c.set("n_groups", m.ngroups);
    c.set("conv_kernel", m.d_conv);
    c.set("chunk_size", m.chunk_size);
    c.set("vocab_size", m.padded_vocab());
    c.set("layer_norm_epsilon", m.norm_eps);
    c.set("use_bias", false);
    c.set("use_conv_bias", true);
    c.set("residual_in_fp32", true);
    c.set("rms_norm", true);
    c.set("tie_word_embeddings", true);
    c.set("norm_before_gate", false);  // informational: transformers always gates first
    c.set("hidden_act", "silu");
    c.set("time_step_min", 0.001);
    c.set("time_step_max", 0.1);
    c.set("time_step_floor", 1e-4);
    // (0, inf) in transformers; JSON has no infinity, and any bound above every dt is the same.
    c.set("time_step_limit", Value::array().push(0.0).push(1e30));
    c.set("torch_dtype", dtype == ExportDType::F32 ? "float32" : "bfloat16");
    c.set("pad_token_id", 0);
    c.set("bos_token_id", 0);
    c.set("eos_token_id", 0);
  } else {
    // Exactly the fields of mamba_ssm's MambaConfig dataclass (MambaConfig(**config) rejects
    // unknown keys). mamba_ssm has no norm epsilon in its config: it always uses 1e-5.
    Value ssm = Value::object();
    ssm.set("layer", "Mamba2");
    ssm.set("d_state", m.d_state);
    ssm.set("d_conv", m.d_conv);
    ssm.set("expand", m.expand);
    ssm.set("headdim", m.headdim);
    ssm.set("ngroups", m.ngroups);
    ssm.set("chunk_size", m.chunk_size);
    c.set("d_model", m.d_model);
    c.set("d_intermediate", 0);
    c.set("n_layer", m.n_layer);
    c.set("vocab_size", m.vocab_size);
    c.set("ssm_cfg", std::move(ssm));
    c.set("attn_layer_idx", Value::array());
    c.set("attn_cfg", Value::object());
    c.set("rms_norm", true);
    c.set("residual_in_fp32", true);
    c.set("fused_add_norm", true);
    c.set("pad_vocab_size_multiple", m.pad_vocab_size_multiple);
    c.set("tie_embeddings", true);
  }
  return json::dump(c, 2) + "\n";
}

void export_model(const ModelConfig& m, const std::vector<HostTensor>& params,
                  const std::string& out_dir, ExportFormat fmt, ExportDType dtype) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) fail("cannot create export directory ", out_dir, ": ", ec.message());
  if (!fs::is_directory(out_dir, ec)) fail("export target ", out_dir, " is not a directory");

  const HostTensor* embedding = nullptr;
  std::vector<SafeTensor> tensors;
  tensors.reserve(params.size() + 1);
  std::set<std::string> seen;
  for (const auto& p : params) {
    if (!seen.insert(p.name).second) fail("export: parameter ", p.name, " appears twice");
    if (static_cast<int64_t>(p.data.size()) != shape_numel(p.shape))
      fail("export: parameter ", p.name, " has ", p.data.size(), " values for shape ",
           shape_str(p.shape));
    if (p.name == "embedding.weight") embedding = &p;
    tensors.push_back(to_safetensor(export_name(p.name, fmt), p, dtype));
  }
  if (!embedding) fail("export: the parameters have no embedding.weight");
  const Shape emb_shape{m.padded_vocab(), m.d_model};
  if (embedding->shape != emb_shape)
    fail("export: embedding.weight has shape ", shape_str(embedding->shape),
         " but the model config implies ", shape_str(emb_shape));
  // The head is tied to the embedding; safetensors cannot alias, so it is a second copy.
  tensors.push_back(to_safetensor("lm_head.weight", *embedding, dtype));

  const std::vector<std::pair<std::string, std::string>> metadata = {
      {"format", "pt"},  // transformers refuses safetensors files without it
      {"producer", "ssdtrain"},
  };
  write_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, metadata);
  write_file_atomic((fs::path(out_dir) / "config.json").string(),
                    export_config_json(m, fmt, dtype));
}

std::vector<HostTensor> import_model(const std::string& dir, const ModelConfig& m,
                                     const std::vector<HostTensor>& expected) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail("model directory ", dir, " does not exist");
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  const std::string st_path = (fs::path(dir) / "model.safetensors").string();
  if (!fs::exists(st_path, ec)) {
    if (fs::exists(fs::path(dir) / "pytorch_model.bin", ec))
      fail(dir, " has pytorch_model.bin but no model.safetensors: only safetensors can be "
                "imported (convert it with safetensors.torch.save_file)");
    if (fs::exists(fs::path(dir) / "model.safetensors.index.json", ec))
      fail(dir, " holds a sharded safetensors model: only a single model.safetensors is "
                "supported");
    fail(st_path, " does not exist");
  }

  const json::Value root = json::parse(read_text_file(cfg_path), cfg_path);
  if (!root.is_object()) fail(cfg_path, ": not a JSON object");
  ConfigFile cfg{root, cfg_path};

  std::vector<SafeTensor> file_tensors = read_safetensors(st_path);
  std::map<std::string, const SafeTensor*> by_name;
  for (const auto& t : file_tensors) by_name[t.name] = &t;

  // Format: from the names, cross-checked with config.json.
  const bool hf_names = by_name.count("backbone.embeddings.weight");
  const bool ssm_names = by_name.count("backbone.embedding.weight");
  if (hf_names == ssm_names)
    fail(st_path, ": cannot tell the format: expected exactly one of backbone.embeddings.weight "
                  "(Hugging Face) or backbone.embedding.weight (mamba_ssm)");
  const ExportFormat fmt = hf_names ? ExportFormat::HuggingFace : ExportFormat::MambaSsm;
  const bool cfg_ssm = root.find("ssm_cfg") != nullptr;
  const bool cfg_hf = root.find("hidden_size") != nullptr || root.find("model_type") != nullptr;
  if (cfg_ssm == cfg_hf)
    fail(cfg_path, ": cannot tell the format (expected Hugging Face keys such as hidden_size, or "
                   "mamba_ssm's ssm_cfg)");
  if (cfg_ssm != (fmt == ExportFormat::MambaSsm))
    fail(dir, ": config.json is in the ", format_name(cfg_ssm ? ExportFormat::MambaSsm
                                                             : ExportFormat::HuggingFace),
         " format but model.safetensors has ", format_name(fmt), " tensor names");
  if (fmt == ExportFormat::HuggingFace) {
    if (const json::Value* mt = root.find("model_type");
        mt && !(mt->is_string() && mt->as_string() == "mamba2"))
      fail(cfg_path, ": \"model_type\" is ", json::dump(*mt), ", expected \"mamba2\"");
    check_hf_config(cfg, m);
  } else {
    check_mamba_ssm_config(cfg, m);
  }

  std::set<std::string> used;
  std::vector<HostTensor> out;
  out.reserve(expected.size());
  for (const auto& e : expected) {
    const std::string fname = export_name(e.name, fmt);
    auto it = by_name.find(fname);
    if (it == by_name.end())
      fail(st_path, ": missing tensor ", fname, " (parameter ", e.name, ")");
    const SafeTensor& t = *it->second;
    if (t.shape != e.shape)
      fail(st_path, ": tensor ", fname, " has shape ", shape_str(t.shape),
           " but the model expects ", shape_str(e.shape), " for parameter ", e.name);
    used.insert(fname);
    out.push_back(HostTensor{e.name, e.shape, to_f32(t)});
  }
  if (auto it = by_name.find("lm_head.weight"); it != by_name.end()) {
    const SafeTensor& emb = *by_name.at(export_name("embedding.weight", fmt));
    const SafeTensor& head = *it->second;
    const std::vector<float> h = to_f32(head), e = to_f32(emb);
    if (head.shape != emb.shape || std::memcmp(h.data(), e.data(), h.size() * 4) != 0)
      fail(st_path, ": lm_head.weight differs from the embedding ", emb.name,
           ": ssdtrain ties them and cannot import a model with a separate output head");
    used.insert(head.name);
  }
  for (const auto& t : file_tensors)
    if (!used.count(t.name))
      fail(st_path, ": unexpected tensor ", t.name, " (not a parameter of this model)");
  return out;
}

}  // namespace ssd
