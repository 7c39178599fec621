#include "config/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "config/sizes.h"
#include "core/error.h"
#include "data/blend.h"

namespace ssd {
namespace {

// One row per key: where it lives in Config, and how to read and write it.
struct Field {
  std::string key;  // "section.name"
  std::function<void(Config&, const YAML::Node&)> read;
  std::function<void(const Config&, YAML::Emitter&)> write;
};

// "a string", "an integer": the article of a type name.
std::string with_article(const char* type_name) {
  return std::string(std::strchr("aeiou", type_name[0]) ? "an " : "a ") + type_name;
}

template <class T>
T as(const YAML::Node& n, const std::string& key, const char* type_name) {
  if (!n.IsScalar()) fail("config key '", key, "': expected ", with_article(type_name), ", got a ",
                          n.IsMap() ? "mapping" : n.IsSequence() ? "list" : "null value");
  T v;
  try {
    v = n.as<T>();
  } catch (const YAML::Exception&) {
    fail("config key '", key, "': expected ", with_article(type_name), ", got '", n.Scalar(), "'");
  }
  // YAML spells infinities and NaN as numbers (.inf, .nan); no key means them.
  if constexpr (std::is_floating_point_v<T>)
    if (!std::isfinite(v))
      fail("config key '", key, "': expected a finite number, got '", n.Scalar(), "'");
  return v;
}

template <class T>
Field field(std::string key, T Config::*section, auto member) {
  Field f;
  f.key = key;
  f.read = [key, section, member](Config& c, const YAML::Node& n) {
    using V = std::remove_reference_t<decltype((c.*section).*member)>;
    if constexpr (std::is_same_v<V, std::string>) {
      (c.*section).*member = as<std::string>(n, key, "string");
    } else if constexpr (std::is_same_v<V, int64_t>) {
      (c.*section).*member = as<int64_t>(n, key, "integer");
    } else if constexpr (std::is_same_v<V, double>) {
      (c.*section).*member = as<double>(n, key, "number");
    } else if constexpr (std::is_same_v<V, bool>) {
      (c.*section).*member = as<bool>(n, key, "boolean (true or false)");
    } else {
      static_assert(sizeof(V) == 0, "unsupported config field type");
    }
  };
  f.write = [section, member](const Config& c, YAML::Emitter& e) {
    const auto& v = (c.*section).*member;
    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(v)>, double>) {
      char buf[64];  // shortest text that reads back to the same double
      auto r = std::to_chars(buf, buf + sizeof buf, v);
      std::string t(buf, r.ptr);
      if (t.find_first_of(".eEn") == std::string::npos) t += ".0";  // keep it a float
      e << t;
    } else {
      e << v;
    }
  };
  return f;
}

const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      field("model.d_model", &Config::model, &ModelConfig::d_model),
      field("model.n_layer", &Config::model, &ModelConfig::n_layer),
      field("model.d_state", &Config::model, &ModelConfig::d_state),
      field("model.headdim", &Config::model, &ModelConfig::headdim),
      field("model.expand", &Config::model, &ModelConfig::expand),
      field("model.ngroups", &Config::model, &ModelConfig::ngroups),
      field("model.d_conv", &Config::model, &ModelConfig::d_conv),
      field("model.chunk_size", &Config::model, &ModelConfig::chunk_size),
      field("model.vocab_size", &Config::model, &ModelConfig::vocab_size),
      field("model.pad_vocab_size_multiple", &Config::model, &ModelConfig::pad_vocab_size_multiple),
      field("model.norm_eps", &Config::model, &ModelConfig::norm_eps),

      field("train.device", &Config::train, &TrainConfig::device),
      field("train.seed", &Config::train, &TrainConfig::seed),
      field("train.seq_len", &Config::train, &TrainConfig::seq_len),
      field("train.micro_batch", &Config::train, &TrainConfig::micro_batch),
      field("train.grad_accum", &Config::train, &TrainConfig::grad_accum),
      field("train.global_batch", &Config::train, &TrainConfig::global_batch),
      field("train.max_steps", &Config::train, &TrainConfig::max_steps),
      field("train.lr", &Config::train, &TrainConfig::lr),
      field("train.min_lr", &Config::train, &TrainConfig::min_lr),
      field("train.warmup_steps", &Config::train, &TrainConfig::warmup_steps),
      field("train.weight_decay", &Config::train, &TrainConfig::weight_decay),
      field("train.grad_clip", &Config::train, &TrainConfig::grad_clip),
      field("train.beta1", &Config::train, &TrainConfig::beta1),
      field("train.beta2", &Config::train, &TrainConfig::beta2),
      field("train.adam_eps", &Config::train, &TrainConfig::adam_eps),
      field("train.resume", &Config::train, &TrainConfig::resume),
      field("train.init_from", &Config::train, &TrainConfig::init_from),
      field("train.on_nan", &Config::train, &TrainConfig::on_nan),
      field("train.max_skipped_steps", &Config::train, &TrainConfig::max_skipped_steps),
      field("train.resume_config", &Config::train, &TrainConfig::resume_config),
      field("train.stop_after", &Config::train, &TrainConfig::stop_after),
      field("train.recompute", &Config::train, &TrainConfig::recompute),

      field("data.kind", &Config::data, &DataConfig::kind),
      field("data.path", &Config::data, &DataConfig::path),
      field("data.val_fraction", &Config::data, &DataConfig::val_fraction),
      field("data.reset_at_eos", &Config::data, &DataConfig::reset_at_eos),
      field("data.mqar_num_pairs", &Config::data, &DataConfig::mqar_num_pairs),
      field("data.mqar_key_vocab", &Config::data, &DataConfig::mqar_key_vocab),
      field("data.mqar_value_vocab", &Config::data, &DataConfig::mqar_value_vocab),

      field("run.name", &Config::run, &RunConfig::name),
      field("run.dir", &Config::run, &RunConfig::dir),
      field("run.log_every", &Config::run, &RunConfig::log_every),
      field("run.eval_every", &Config::run, &RunConfig::eval_every),
      field("run.eval_batches", &Config::run, &RunConfig::eval_batches),

      field("checkpoint.every", &Config::checkpoint, &CheckpointConfig::every),
      field("checkpoint.keep_last", &Config::checkpoint, &CheckpointConfig::keep_last),
      field("checkpoint.dir", &Config::checkpoint, &CheckpointConfig::dir),

      field("parallel.tp", &Config::parallel, &ParallelConfig::tp),
      field("parallel.sequence_parallel", &Config::parallel, &ParallelConfig::sequence_parallel),
      field("parallel.cp", &Config::parallel, &ParallelConfig::cp),
      field("parallel.cp_combine", &Config::parallel, &ParallelConfig::cp_combine),
      field("parallel.zero", &Config::parallel, &ParallelConfig::zero),
      field("parallel.bucket_mb", &Config::parallel, &ParallelConfig::bucket_mb),
      field("parallel.timeout_s", &Config::parallel, &ParallelConfig::timeout_s),
      field("parallel.comm", &Config::parallel, &ParallelConfig::comm),
  };
  return table;
}

const Field* find_field(const std::string& key) {
  for (const auto& f : fields())
    if (f.key == key) return &f;
  return nullptr;
}

std::string known_keys_of(const std::string& section) {
  std::string out;
  for (const auto& f : fields())
    if (f.key.rfind(section + ".", 0) == 0) out += (out.empty() ? "" : ", ") + f.key.substr(section.size() + 1);
  return out;
}

// `a.b=value`: value parsed as YAML so numbers stay numbers.
void apply_override(YAML::Node& root, const std::string& ov) {
  auto eq = ov.find('=');
  if (eq == std::string::npos || eq == 0)
    fail("--set '", ov, "': expected section.key=value");
  std::string key = ov.substr(0, eq), value = ov.substr(eq + 1);
  auto dot = key.find('.');
  if (dot != std::string::npos) {
    YAML::Node sec = root[key.substr(0, dot)];
    if (sec.IsDefined() && !sec.IsNull() && !sec.IsMap())
      fail("--set '", ov, "': config section '", key.substr(0, dot), "' must be a mapping");
  }
  if (dot == std::string::npos || !find_field(key)) {
    std::string section = key.substr(0, dot);
    std::string known = dot == std::string::npos ? "" : known_keys_of(section);
    if (!known.empty())
      fail("--set: unknown config key '", key, "' (keys of '", section, "': ", known, ")");
    fail("--set: unknown config key '", key, "'");
  }
  YAML::Node v;
  try {
    v = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    fail("--set '", ov, "': cannot parse value: ", e.what());
  }
  if (!v.IsDefined() || v.IsNull()) v = YAML::Node(std::string());
  root[key.substr(0, dot)][key.substr(dot + 1)] = v;
}

// yaml-cpp keeps a mapping's repeated keys and lookups see only one of them, so a repeated
// section (merged) or key (one value silently lost) would go unnoticed: refuse both by name.
void refuse_duplicates(const YAML::Node& root, const std::string& origin) {
  std::set<std::string> sections;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (!it->first.IsScalar()) continue;  // reported by the section loop
    const std::string section = it->first.Scalar();
    if (!sections.insert(section).second)
      fail(origin, ": config section '", section, "' appears twice (merge the two into one)");
    if (!it->second.IsMap()) continue;
    std::set<std::string> keys;
    for (auto kv = it->second.begin(); kv != it->second.end(); ++kv)
      if (kv->first.IsScalar() && !keys.insert(kv->first.Scalar()).second)
        fail(origin, ": config key '", section, ".", kv->first.Scalar(),
             "' appears twice in section '", section, "' (keep one)");
  }
}

}  // namespace

Config parse_config(const std::string& text, const std::vector<std::string>& overrides,
                    const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail(origin, ": not valid YAML: ", e.what());
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap()) fail(origin, ": the top level must be a mapping of sections");
  refuse_duplicates(root, origin);
  // Which keys --set gave, so an error about one blames the --set and not the file.
  std::vector<std::pair<std::string, std::string>> set_keys;  // key, the whole --set text
  for (const auto& ov : overrides) {
    apply_override(root, ov);
    set_keys.emplace_back(ov.substr(0, ov.find('=')), ov);
  }
  auto source_of = [&](const std::string& message) {
    for (auto it = set_keys.rbegin(); it != set_keys.rend(); ++it)  // the last --set wins
      if (message.find("'" + it->first + "'") != std::string::npos)
        return "--set " + it->second;
    return origin;
  };

  Config c;
  c.source = origin;
  static const char* sections[] = {"model", "train", "data", "run", "checkpoint", "parallel"};
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (!it->first.IsScalar()) fail(origin, ": config section names must be plain words");
    std::string section = it->first.as<std::string>();
    if (std::find(std::begin(sections), std::end(sections), section) == std::end(sections))
      fail(origin, ": unknown config section '", section,
           "' (sections: model, train, data, run, checkpoint, parallel)");
    if (it->second.IsNull()) continue;
    if (!it->second.IsMap()) fail(origin, ": section '", section, "' must be a mapping");
    for (auto kv = it->second.begin(); kv != it->second.end(); ++kv) {
      if (!kv->first.IsScalar()) fail(origin, ": keys of section '", section, "' must be plain words");
      std::string key = section + "." + kv->first.as<std::string>();
      const Field* f = find_field(key);
      if (!f)
        fail(origin, ": unknown config key '", key, "' (keys of '", section, "': ",
             known_keys_of(section), ")");
      try {
        f->read(c, kv->second);
      } catch (const Error& e) {
        fail(source_of(e.what()), ": ", e.what());
      }
    }
  }
  // data.reset_at_eos defaults to whether the data marks documents.
  const YAML::Node data_section = static_cast<const YAML::Node&>(root)["data"];  // no insert
  if (!(data_section.IsDefined() && data_section.IsMap() &&
        data_section["reset_at_eos"].IsDefined()))
    c.data.reset_at_eos = c.data.kind == "indexed";
  if (c.run.name.empty()) c.run.name = std::filesystem::path(origin).stem().string();
  if (c.run.name.empty()) c.run.name = "run";
  if (c.run.dir.empty()) c.run.dir = "runs/" + c.run.name;
  if (c.checkpoint.dir.empty()) c.checkpoint.dir = c.run.dir + "/checkpoints";
  try {
    validate(c);
  } catch (const Error& e) {
    fail(source_of(e.what()), ": ", e.what());
  }
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (std::filesystem::exists(path) && !std::filesystem::is_regular_file(path))
    fail("config file '", path, "' is not a regular file");
  std::ifstream f(path);
  if (!f) fail("config file '", path, "' cannot be read (", std::strerror(errno), ")");
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_config(ss.str(), overrides, path);
}

void validate(const Config& c) {
  const auto& m = c.model;
  // Both also refuse inf and NaN: a Config built in code, not parsed, can hold them.
  auto positive = [](const char* key, double v) {
    if (!(v > 0) || !std::isfinite(v)) fail("config key '", key, "' must be positive and finite, got ", v);
  };
  auto non_negative = [](const char* key, double v) {
    if (!(v >= 0) || !std::isfinite(v)) fail("config key '", key, "' must be >= 0 and finite, got ", v);
  };
  positive("model.d_model", m.d_model);
  positive("model.n_layer", m.n_layer);
  positive("model.d_state", m.d_state);
  positive("model.headdim", m.headdim);
  positive("model.expand", m.expand);
  positive("model.ngroups", m.ngroups);
  positive("model.d_conv", m.d_conv);
  positive("model.chunk_size", m.chunk_size);
  positive("model.vocab_size", m.vocab_size);
  positive("model.pad_vocab_size_multiple", m.pad_vocab_size_multiple);
  positive("model.norm_eps", m.norm_eps);
  check_sizes_sane(c);  // before any product below can overflow int64
  if (m.d_inner() % m.headdim != 0)
    fail("config key 'model.headdim' (", m.headdim, ") must divide d_inner = expand*d_model = ",
         m.d_inner());
  if (m.nheads() % m.ngroups != 0)
    fail("config key 'model.ngroups' (", m.ngroups, ") must divide the number of heads (",
         m.nheads(), " = d_inner/headdim)");

  const auto& t = c.train;
  if (t.device != "auto" && t.device != "cpu" && t.device != "cuda")
    fail("config key 'train.device' must be auto, cpu or cuda, got '", t.device, "'");
  positive("train.seq_len", t.seq_len);
  positive("train.micro_batch", t.micro_batch);
  positive("train.grad_accum", t.grad_accum);
  positive("train.max_steps", t.max_steps);
  positive("train.lr", t.lr);
  non_negative("train.min_lr", t.min_lr);
  non_negative("train.warmup_steps", t.warmup_steps);
  non_negative("train.weight_decay", t.weight_decay);
  non_negative("train.grad_clip", t.grad_clip);
  if (!(t.beta1 >= 0 && t.beta1 < 1)) fail("config key 'train.beta1' must be in [0, 1), got ", t.beta1);
  if (!(t.beta2 >= 0 && t.beta2 < 1)) fail("config key 'train.beta2' must be in [0, 1), got ", t.beta2);
  positive("train.adam_eps", t.adam_eps);
  non_negative("train.stop_after", t.stop_after);
  if (t.recompute != "none" && t.recompute != "layers")
    fail("config key 'train.recompute' must be none or layers, got '", t.recompute, "'");
  if (t.on_nan != "stop" && t.on_nan != "skip")
    fail("config key 'train.on_nan' must be stop or skip, got '", t.on_nan, "'");
  non_negative("train.max_skipped_steps", t.max_skipped_steps);
  if (t.resume_config != "check" && t.resume_config != "override")
    fail("config key 'train.resume_config' must be check or override, got '", t.resume_config,
         "'");
  if (t.resume.empty()) fail("config key 'train.resume' must be auto, never or a checkpoint path");
  if (t.resume != "auto" && t.resume != "never" && !std::filesystem::exists(t.resume))
    fail("config key 'train.resume': checkpoint '", t.resume, "' does not exist");
  if (!t.init_from.empty() && !std::filesystem::is_directory(t.init_from))
    fail("config key 'train.init_from': '", t.init_from, "' is not a directory");

  const auto& d = c.data;
  if (d.kind == "text") {
    if (d.path.empty()) fail("config key 'data.path' is required when data.kind is text");
    if (!std::filesystem::exists(d.path))
      fail("config key 'data.path': data file '", d.path, "' does not exist");
    if (!(d.val_fraction >= 0 && d.val_fraction < 1))
      fail("config key 'data.val_fraction' must be in [0, 1), got ", d.val_fraction);
    if (m.vocab_size < 256)
      fail("config key 'model.vocab_size' must be >= 256 for byte-level text data, got ",
           m.vocab_size);
  } else if (d.kind == "indexed") {
    if (d.path.empty())
      fail("config key 'data.path' is required when data.kind is indexed (a dataset prefix, or "
           "a blend \"W1 PREFIX1 W2 PREFIX2 ...\")");
    for (const BlendPart& part : parse_blend(d.path))
      for (const char* ext : {".idx", ".bin"})
        if (!std::filesystem::is_regular_file(part.prefix + ext))
          fail("config key 'data.path': dataset file '", part.prefix + ext, "' does not exist");
    if (!(d.val_fraction >= 0 && d.val_fraction < 1))
      fail("config key 'data.val_fraction' must be in [0, 1), got ", d.val_fraction);
  } else if (d.kind == "mqar") {
    positive("data.mqar_num_pairs", d.mqar_num_pairs);
    positive("data.mqar_key_vocab", d.mqar_key_vocab);
    positive("data.mqar_value_vocab", d.mqar_value_vocab);
    if (d.mqar_num_pairs > d.mqar_key_vocab)
      fail("config key 'data.mqar_num_pairs' (", d.mqar_num_pairs,
           ") must not exceed data.mqar_key_vocab (", d.mqar_key_vocab, "): keys are distinct");
    int64_t need = 2 + d.mqar_key_vocab + d.mqar_value_vocab;
    if (m.vocab_size < need)
      fail("config key 'model.vocab_size' (", m.vocab_size, ") is too small for MQAR: needs ",
           need, " = 2 + data.mqar_key_vocab + data.mqar_value_vocab");
    if (t.seq_len < 4 * d.mqar_num_pairs + 1)
      fail("config key 'train.seq_len' (", t.seq_len, ") is too short for ", d.mqar_num_pairs,
           " MQAR pairs: needs at least ", 4 * d.mqar_num_pairs + 1);
  } else {
    fail("config key 'data.kind' must be mqar, text or indexed, got '", d.kind, "'");
  }
  if (d.reset_at_eos && d.kind != "indexed")
    fail("config key 'data.reset_at_eos' is true, but data.kind=", d.kind, " has no "
         "end-of-document tokens to reset at (only data.kind=indexed marks documents); set "
         "data.reset_at_eos=false");

  positive("run.log_every", c.run.log_every);
  non_negative("run.eval_every", c.run.eval_every);
  positive("run.eval_batches", c.run.eval_batches);
  non_negative("checkpoint.every", c.checkpoint.every);
  non_negative("checkpoint.keep_last", c.checkpoint.keep_last);

  const auto& p = c.parallel;
  positive("parallel.tp", p.tp);
  positive("parallel.cp", p.cp);
  if (p.cp_combine != "ring" && p.cp_combine != "allgather")
    fail("config key 'parallel.cp_combine' must be ring or allgather, got '", p.cp_combine, "'");
  if (p.zero != 0 && p.zero != 1) fail("config key 'parallel.zero' must be 0 or 1, got ", p.zero);
  positive("parallel.bucket_mb", p.bucket_mb);
  positive("parallel.timeout_s", p.timeout_s);
  if (p.comm != "auto" && p.comm != "nccl" && p.comm != "mpi")
    fail("config key 'parallel.comm' must be auto, nccl or mpi, got '", p.comm, "'");
  non_negative("train.global_batch", t.global_batch);
}

Layout resolve_layout(const Config& c, int64_t world, bool on_gpu) {
  const auto& p = c.parallel;
  const auto& t = c.train;
  Layout l;
  l.world = world;
  l.tp = p.tp;
  l.cp = p.cp;
  if (world % (p.tp * p.cp) != 0)
    fail("the job has ", world, " processes, which parallel.tp * parallel.cp = ", p.tp, " * ", p.cp,
         " = ", p.tp * p.cp, " does not divide; launch a multiple of ", p.tp * p.cp,
         " processes or change parallel.tp / parallel.cp");
  if (p.cp > 1) {
    const int64_t seg = t.seq_len / p.cp;
    if (t.seq_len % p.cp != 0 || seg % c.model.chunk_size != 0)
      fail("parallel.cp=", p.cp, " splits train.seq_len=", t.seq_len, " into segments of ",
           t.seq_len / double(p.cp), " tokens, which must be a whole multiple of model.chunk_size=",
           c.model.chunk_size, "; choose seq_len a multiple of cp * chunk_size = ",
           p.cp * c.model.chunk_size);
    if (seg < c.model.d_conv - 1)
      fail("parallel.cp=", p.cp, ": segments of ", seg, " tokens are shorter than model.d_conv - 1");
  }
  if (p.tp > 1) {
    // Each tensor-parallel rank owns whole heads, whole B/C groups (or one group shared by
    // tp / ngroups ranks) and an equal slice of the (padded) vocabulary.
    const auto& m = c.model;
    if (m.nheads() % p.tp != 0)
      fail("parallel.tp=", p.tp, " must divide the number of heads, model.expand * model.d_model / "
           "model.headdim = ", m.nheads());
    if (m.ngroups % p.tp != 0 && p.tp % m.ngroups != 0)
      fail("parallel.tp=", p.tp, " and model.ngroups=", m.ngroups, ": one must divide the other "
           "(each rank holds whole groups, or one group is shared by tp / ngroups ranks)");
    if (m.padded_vocab() % p.tp != 0)
      fail("parallel.tp=", p.tp, " must divide the padded vocabulary (", m.padded_vocab(),
           " = model.vocab_size ", m.vocab_size, " rounded up to model.pad_vocab_size_multiple ",
           m.pad_vocab_size_multiple, "); choose a pad_vocab_size_multiple that tp divides");
    l.tp_span = m.ngroups % p.tp == 0 ? 1 : p.tp / m.ngroups;
    const int64_t tokens = t.micro_batch * (t.seq_len / p.cp);
    if (p.sequence_parallel && tokens % p.tp != 0)
      fail("parallel.sequence_parallel splits the ", tokens, " tokens of a micro-batch "
           "(train.micro_batch * train.seq_len / parallel.cp) over parallel.tp=", p.tp,
           " ranks, which must divide them");
  }
  l.dp = world / (p.tp * p.cp);
  l.micro_batch = t.micro_batch;
  if (t.global_batch > 0) {
    const int64_t per_step = t.micro_batch * l.dp;
    if (t.global_batch % per_step != 0)
      fail("train.global_batch=", t.global_batch, " is not a multiple of train.micro_batch * dp = ",
           t.micro_batch, " * ", l.dp, " = ", per_step, " (dp = ", world,
           " processes / (parallel.tp * parallel.cp)); change train.global_batch, "
           "train.micro_batch or the number of processes");
    l.grad_accum = t.global_batch / per_step;
    if (t.grad_accum != 1 && t.grad_accum != l.grad_accum)
      fail("train.grad_accum=", t.grad_accum, " contradicts train.global_batch=", t.global_batch,
           " (which needs grad_accum ", l.grad_accum, " with micro_batch ", t.micro_batch,
           " on dp=", l.dp, "); leave train.grad_accum at 1 when train.global_batch is set");
    l.global_batch = t.global_batch;
  } else {
    l.grad_accum = t.grad_accum;
    l.global_batch = t.micro_batch * t.grad_accum * l.dp;
  }
  if (p.comm == "nccl" && !on_gpu)
    fail("parallel.comm=nccl needs the CUDA backend (train.device resolved to the CPU)");
  l.comm_nccl = on_gpu && p.comm != "mpi";
  return l;
}

std::string config_to_yaml(const Config& c) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  std::string section;
  for (const auto& f : fields()) {
    auto dot = f.key.find('.');
    std::string s = f.key.substr(0, dot);
    if (s != section) {
      if (!section.empty()) e << YAML::EndMap;
      e << YAML::Key << s << YAML::Value << YAML::BeginMap;
      section = s;
    }
    e << YAML::Key << f.key.substr(dot + 1) << YAML::Value;
    f.write(c, e);
  }
  e << YAML::EndMap << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace ssd
