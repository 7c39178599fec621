// Reading a Hugging Face tokenizer.json into Tokenizer::Impl. Only what changes the ids of a
// byte-level BPE is read (added_tokens, normalizer, pre_tokenizer, model, decoder); the
// post_processor is ignored because encode() is add_special_tokens=False. Anything that would
// change the ids and is not implemented is refused, naming the key and value.
#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "data/tokenizer_impl.h"
#include "io/json.h"

namespace ssd {
namespace {

// The split pattern of tokenizers' ByteLevel pre-tokenizer (GPT-2's).
const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct Reader {
  std::string path;

  [[noreturn]] void bad(const std::string& key, const std::string& what) const {
    fail(path, ": key '", key, "' ", what);
  }
  const json::Value* get(const json::Value& obj, const std::string& parent,
                         const std::string& name) const {
    if (!obj.is_object()) bad(parent, "must be an object");
    return obj.find(name);
  }
  bool flag(const json::Value& obj, const std::string& parent, const std::string& name,
            bool dflt) const {
    const json::Value* v = get(obj, parent, name);
    if (!v || v->is_null()) return dflt;
    if (!v->is_bool()) bad(parent + "." + name, std::string("must be true or false, got ") +
                                                 v->kind_name());
    return v->as_bool();
  }
  std::string str(const json::Value& obj, const std::string& parent,
                  const std::string& name) const {
    const json::Value* v = get(obj, parent, name);
    if (!v || !v->is_string()) bad(parent + "." + name, "must be a string");
    return v->as_string();
  }
  int32_t id(const json::Value& v, const std::string& key) const {
    if (!v.is_int() || v.as_int() < 0 || v.as_int() > INT32_MAX)
      bad(key, "must be a token id (an integer in [0, 2^31)), got " + json::dump(v));
    return static_cast<int32_t>(v.as_int());
  }
};

PreStep::Behavior behavior_of(const Reader& r, const std::string& key, const std::string& b) {
  using B = PreStep::Behavior;
  if (b == "Removed") return B::Removed;
  if (b == "Isolated") return B::Isolated;
  if (b == "MergedWithPrevious") return B::MergedWithPrevious;
  if (b == "MergedWithNext") return B::MergedWithNext;
  if (b == "Contiguous") return B::Contiguous;
  r.bad(key, "has an unknown split behavior '" + b + "'");
}

void read_pre_tokenizer(const Reader& r, const json::Value& v, const std::string& key,
                        std::vector<PreStep>& steps) {
  const std::string type = r.str(v, key, "type");
  if (type == "Sequence") {
    const json::Value* list = r.get(v, key, "pretokenizers");
    if (!list || !list->is_array()) r.bad(key + ".pretokenizers", "must be a list");
    for (size_t i = 0; i < list->size(); ++i)
      read_pre_tokenizer(r, (*list)[i], key + ".pretokenizers[" + std::to_string(i) + "]", steps);
    return;
  }
  PreStep s;
  if (type == "ByteLevel") {
    s.kind = PreStep::Kind::ByteLevel;
    s.add_prefix_space = r.flag(v, key, "add_prefix_space", true);
    s.use_regex = r.flag(v, key, "use_regex", true);
    if (s.use_regex) s.regex = std::make_shared<SplitRegex>(kGpt2Pattern, r.path + ": " + key);
  } else if (type == "Split") {
    s.kind = PreStep::Kind::Split;
    const json::Value* pat = r.get(v, key, "pattern");
    if (!pat || !pat->is_object()) r.bad(key + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
    if (const json::Value* re = pat->find("Regex"); re && re->is_string()) {
      s.regex = std::make_shared<SplitRegex>(re->as_string(), r.path + ": " + key + ".pattern.Regex");
    } else if (const json::Value* lit = pat->find("String"); lit && lit->is_string()) {
      s.literal = lit->as_string();
      if (s.literal.empty()) r.bad(key + ".pattern.String", "must not be empty");
    } else {
      r.bad(key + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
    }
    s.behavior = behavior_of(r, key + ".behavior", r.str(v, key, "behavior"));
    s.invert = r.flag(v, key, "invert", false);
  } else {
    r.bad(key + ".type", "is '" + type + "': only ByteLevel, Split and Sequence pre-tokenizers "
                         "are supported (byte-level BPE)");
  }
  steps.push_back(std::move(s));
}

void read_added(const Reader& r, const json::Value& root, Tokenizer::Impl& t) {
  const json::Value* list = root.find("added_tokens");
  if (!list || list->is_null()) return;
  if (!list->is_array()) r.bad("added_tokens", "must be a list");
  for (size_t i = 0; i < list->size(); ++i) {
    const std::string key = "added_tokens[" + std::to_string(i) + "]";
    const json::Value& a = (*list)[i];
    AddedToken tok;
    tok.content = r.str(a, key, "content");
    const json::Value* idv = r.get(a, key, "id");
    if (!idv) r.bad(key + ".id", "is missing");
    tok.id = r.id(*idv, key + ".id");
    tok.special = r.flag(a, key, "special", false);
    tok.lstrip = r.flag(a, key, "lstrip", false);
    tok.rstrip = r.flag(a, key, "rstrip", false);
    tok.single_word = r.flag(a, key, "single_word", false);
    tok.normalized = r.flag(a, key, "normalized", !tok.special);
    t.added.push_back(std::move(tok));
  }
}

void build_set(Tokenizer::Impl& t, AddedSet& set, bool normalized) {
  for (size_t i = 0; i < t.added.size(); ++i) {
    const auto& a = t.added[i];
    if (a.normalized != normalized || a.content.empty()) continue;
    set.tokens.push_back(static_cast<int>(i));
    set.by_first[static_cast<unsigned char>(a.content[0])].push_back(static_cast<int>(i));
  }
  for (auto& v : set.by_first)
    std::stable_sort(v.begin(), v.end(), [&](int x, int y) {
      return t.added[x].content.size() > t.added[y].content.size();
    });
}

// "a b" (the older string form) or ["a", "b"] (tokenizers >= 0.20).
std::pair<std::string, std::string> merge_parts(const Reader& r, const json::Value& m,
                                                const std::string& key) {
  if (m.is_string()) {
    const std::string& s = m.as_string();
    const size_t sp = s.find(' ');
    if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
      r.bad(key, "must be two tokens separated by one space, got '" + s + "'");
    return {s.substr(0, sp), s.substr(sp + 1)};
  }
  if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string())
    return {m[0].as_string(), m[1].as_string()};
  r.bad(key, "must be \"a b\" or [\"a\", \"b\"], got " + json::dump(m));
}

void read_model(const Reader& r, const json::Value& root, Tokenizer::Impl& t) {
  const json::Value* m = root.find("model");
  if (!m || !m->is_object()) r.bad("model", "must be an object");
  if (const json::Value* ty = m->find("type"); ty && !(ty->is_string() && ty->as_string() == "BPE"))
    r.bad("model.type", "is " + json::dump(*ty) + ": only BPE models are supported");
  if (const json::Value* d = m->find("dropout"); d && !d->is_null())
    r.bad("model.dropout", "is " + json::dump(*d) + ": BPE dropout makes encoding random; use null");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const json::Value* v = m->find(k); v && !v->is_null() && !(v->is_string() && v->as_string().empty()))
      r.bad(std::string("model.") + k, "is " + json::dump(*v) + ": not supported for byte-level BPE");
  if (r.flag(*m, "model", "byte_fallback", false))
    r.bad("model.byte_fallback", "is true: not supported for byte-level BPE");
  t.fuse_unk = r.flag(*m, "model", "fuse_unk", false);
  t.ignore_merges = r.flag(*m, "model", "ignore_merges", false);

  const json::Value* vocab = m->find("vocab");
  if (!vocab || !vocab->is_object()) r.bad("model.vocab", "must be an object of token: id");
  int64_t max_id = -1;
  for (const auto& [tok, idv] : vocab->members()) {
    const int32_t id = r.id(idv, "model.vocab[\"" + tok + "\"]");
    t.vocab.emplace(tok, id);
    max_id = std::max<int64_t>(max_id, id);
  }
  for (const auto& a : t.added) max_id = std::max<int64_t>(max_id, a.id);
  if (max_id < 0) r.bad("model.vocab", "is empty");
  t.vocab_size = max_id + 1;
  t.id_to_token.assign(t.vocab_size, "");
  for (const auto& [tok, id] : t.vocab) t.id_to_token[id] = tok;
  t.added_of_id.assign(t.vocab_size, -1);
  for (size_t i = 0; i < t.added.size(); ++i) t.added_of_id[t.added[i].id] = static_cast<int>(i);

  for (int b = 0; b < 256; ++b) {
    auto it = t.vocab.find(utf8_encode(byte_to_codepoint(static_cast<uint8_t>(b))));
    t.byte_id[b] = it == t.vocab.end() ? -1 : it->second;
  }
  if (const json::Value* u = m->find("unk_token"); u && !u->is_null()) {
    if (!u->is_string()) r.bad("model.unk_token", "must be a string or null");
    auto it = t.vocab.find(u->as_string());
    if (it == t.vocab.end()) r.bad("model.unk_token", "'" + u->as_string() + "' is not in model.vocab");
    t.unk = it->second;
  }

  const json::Value* merges = m->find("merges");
  if (!merges || !merges->is_array()) r.bad("model.merges", "must be a list");
  t.merges.reserve(merges->size() * 2);
  for (size_t i = 0; i < merges->size(); ++i) {
    const std::string key = "model.merges[" + std::to_string(i) + "]";
    auto [a, b] = merge_parts(r, (*merges)[i], key);
    auto ia = t.vocab.find(a), ib = t.vocab.find(b), iab = t.vocab.find(a + b);
    if (ia == t.vocab.end()) r.bad(key, "uses '" + a + "', which is not in model.vocab");
    if (ib == t.vocab.end()) r.bad(key, "uses '" + b + "', which is not in model.vocab");
    if (iab == t.vocab.end()) r.bad(key, "makes '" + a + b + "', which is not in model.vocab");
    // A repeated pair keeps its last rank, as the reference's map does.
    t.merges[Tokenizer::Impl::pair_key(ia->second, ib->second)] = {static_cast<int32_t>(i),
                                                                    iab->second};
  }
}

}  // namespace

std::shared_ptr<const Tokenizer> Tokenizer::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("tokenizer '", path, "' cannot be read");
  std::stringstream ss;
  ss << f.rdbuf();
  const json::Value root = json::parse(ss.str(), path);
  if (!root.is_object()) fail(path, ": a tokenizer.json must be a JSON object");
  Reader r{path};
  auto t = std::make_unique<Impl>();
  t->path = path;

  if (const json::Value* n = root.find("normalizer"); n && !n->is_null()) {
    const bool empty_seq = n->is_object() && n->find("type") && n->find("type")->is_string() &&
                           n->find("type")->as_string() == "Sequence" && n->find("normalizers") &&
                           n->find("normalizers")->is_array() && n->find("normalizers")->size() == 0;
    if (!empty_seq)
      r.bad("normalizer", "is " + json::dump(*n) + ": normalizers are not supported (use null)");
  }
  const json::Value* pre = root.find("pre_tokenizer");
  if (!pre || pre->is_null())
    r.bad("pre_tokenizer", "is missing: only byte-level BPE tokenizers (ByteLevel pre-tokenizer) "
                           "are supported");
  read_pre_tokenizer(r, *pre, "pre_tokenizer", t->steps);
  if (std::none_of(t->steps.begin(), t->steps.end(),
                   [](const PreStep& s) { return s.kind == PreStep::Kind::ByteLevel; }))
    r.bad("pre_tokenizer", "has no ByteLevel step: only byte-level BPE tokenizers are supported");

  if (const json::Value* d = root.find("decoder"); d && !d->is_null()) {
    const std::string type = r.str(*d, "decoder", "type");
    if (type != "ByteLevel")
      r.bad("decoder.type", "is '" + type + "': only the ByteLevel decoder is supported");
  } else {
    t->byte_level_decoder = false;
  }

  read_added(r, root, *t);
  read_model(r, root, *t);
  build_set(*t, t->raw_set, false);
  build_set(*t, t->norm_set, true);
  if (std::any_of(t->added.begin(), t->added.end(), [](const AddedToken& a) { return a.single_word; }))
    t->word_char = std::make_shared<SplitRegex>("\\w", path + ": added_tokens (single_word)");
  return std::shared_ptr<const Tokenizer>(new Tokenizer(std::move(t)));
}

}  // namespace ssd
