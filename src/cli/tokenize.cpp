// `ssdtrain tokenize`: text files, directories of them, or JSONL files -> a Megatron indexed
// dataset (PREFIX.bin/.idx, see src/data/indexed_file.h), one document per text file or JSONL
// line, each followed by the tokenizer's end-of-document token. Documents are encoded in
// batches on all cores (each thread with its own merge cache) and written in input order, so
// the output does not depend on the number of threads.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "cli/commands.h"
#include "core/error.h"
#include "data/indexed_file.h"
#include "data/tokenizer.h"
#include "io/json.h"

namespace fs = std::filesystem;

namespace ssd::cli {
namespace {

const char* kUsage =
    "usage: ssdtrain tokenize --tokenizer tokenizer.json --input PATH [PATH ...] --out PREFIX\n"
    "                         [--jsonl-key text] [--eos TOKEN] [--threads N]\n"
    "Tokenizes text into PREFIX.bin + PREFIX.idx (Megatron-LM indexed dataset; uint16 tokens\n"
    "when the vocabulary fits, else int32), for data.kind=indexed with data.path=PREFIX.\n"
    "PATH: a text file (one document), a .jsonl file (one document per line, the text under\n"
    "--jsonl-key), or a directory (its files, recursively, in name order; hidden ones skipped).\n"
    "Each document ends with the end-of-document token: --eos, else tokenizer_config.json's\n"
    "eos_token next to the tokenizer, else <|endoftext|>, </s>, <|end_of_text|> or <eos>.\n"
    "Empty documents are skipped. --threads: default all cores.\n";

struct Input {
  fs::path path;
  bool jsonl;
};

std::vector<Input> list_inputs(const std::vector<std::string>& paths) {
  std::vector<Input> out;
  auto add = [&](const fs::path& p) { out.push_back({p, p.extension() == ".jsonl"}); };
  for (const auto& p : paths) {
    if (fs::is_directory(p)) {
      std::vector<fs::path> files;
      for (const auto& e : fs::recursive_directory_iterator(p)) {
        const std::string rel = fs::relative(e.path(), p).string();
        if (rel.rfind('.', 0) == 0 || rel.find("/.") != std::string::npos) continue;
        if (e.is_regular_file()) files.push_back(e.path());
      }
      std::sort(files.begin(), files.end());
      if (files.empty()) fail("--input '", p, "': directory holds no files");
      for (const auto& f : files) add(f);
    } else if (fs::is_regular_file(p)) {
      add(p);
    } else {
      fail("--input '", p, "' is not a file or directory");
    }
  }
  return out;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) fail("cannot read '", p.string(), "'");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int32_t find_eos(const Tokenizer& tok, const std::string& flag) {
  if (!flag.empty()) {
    if (auto id = tok.token_to_id(flag)) return *id;
    fail("--eos '", flag, "' is not a token of '", tok.path(), "'");
  }
  const fs::path cfg = fs::path(tok.path()).parent_path() / "tokenizer_config.json";
  if (fs::exists(cfg)) {
    const json::Value j = json::parse(read_file(cfg), cfg.string());
    if (const json::Value* e = j.is_object() ? j.find("eos_token") : nullptr) {
      const json::Value* c = e->is_object() ? e->find("content") : e;
      if (c && c->is_string()) {
        if (auto id = tok.token_to_id(c->as_string())) return *id;
        fail(cfg.string(), ": key 'eos_token' is '", c->as_string(), "', which is not a token of '",
             tok.path(), "'");
      }
    }
  }
  for (const char* name : {"<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"})
    if (auto id = tok.token_to_id(name)) return *id;
  fail("tokenizer '", tok.path(), "' has no end-of-document token: none of <|endoftext|>, </s>, "
       "<|end_of_text|>, <eos> is in its added_tokens or model.vocab, and there is no "
       "tokenizer_config.json with key 'eos_token' beside it; name one with --eos TOKEN");
}

// One document waiting to be encoded: the text itself, or a JSONL line to parse first (in the
// worker, so parsing runs on all cores too).
struct Doc {
  std::string text;
  bool json_line = false;
  const fs::path* file = nullptr;
  int64_t line = 0;
  std::vector<int32_t> ids;
  bool empty = false;
};

std::string text_of_line(const Doc& d, const std::string& key) {
  const std::string origin = d.file->string() + " line " + std::to_string(d.line);
  const json::Value v = json::parse(d.text, origin);
  const json::Value* t = v.is_object() ? v.find(key) : nullptr;
  if (!t) fail(origin, ": no key '", key, "' (set the key with --jsonl-key)");
  if (!t->is_string()) fail(origin, ": key '", key, "' is a ", t->kind_name(), ", not a string");
  return t->as_string();
}

std::string fmt_time(double s) {
  char b[32];
  const long long t = static_cast<long long>(s + 0.5);
  if (t >= 3600) std::snprintf(b, sizeof b, "%lldh%02lldm", t / 3600, t / 60 % 60);
  else std::snprintf(b, sizeof b, "%lldm%02llds", t / 60, t % 60);
  return b;
}

}  // namespace

int cmd_tokenize(const std::vector<std::string>& in) {
  if (std::find(in.begin(), in.end(), "--help") != in.end()) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::string tok_path, out, key = "text", eos_flag;
  std::vector<std::string> inputs;
  int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  for (size_t i = 0; i < in.size(); ++i) {
    auto value = [&]() -> std::string {
      if (i + 1 >= in.size() || in[i + 1].rfind("--", 0) == 0) fail("option ", in[i], " needs a value");
      return in[++i];
    };
    if (in[i] == "--tokenizer") tok_path = value();
    else if (in[i] == "--out") out = value();
    else if (in[i] == "--jsonl-key") key = value();
    else if (in[i] == "--eos") eos_flag = value();
    else if (in[i] == "--threads") {
      const std::string v = value();
      size_t used = 0;
      try { threads = std::stoll(v, &used); } catch (const std::exception&) { used = 0; }
      if (used != v.size() || threads <= 0) fail("option --threads needs a positive integer, got '", v, "'");
    } else if (in[i] == "--input") {
      inputs.push_back(value());
      while (i + 1 < in.size() && in[i + 1].rfind("--", 0) != 0) inputs.push_back(in[++i]);
    } else {
      fail("unexpected argument '", in[i], "' for 'tokenize' (see --help)");
    }
  }
  if (tok_path.empty() || inputs.empty() || out.empty())
    fail("tokenize needs --tokenizer FILE, --input PATH and --out PREFIX (see --help)");

  const auto tok = Tokenizer::load(tok_path);
  const int32_t eos = find_eos(*tok, eos_flag);
  const std::vector<Input> files = list_inputs(inputs);
  int64_t total_bytes = 0;
  for (const auto& f : files) total_bytes += static_cast<int64_t>(fs::file_size(f.path));
  if (fs::path(out).has_parent_path()) fs::create_directories(fs::path(out).parent_path());
  const TokenDType dtype = dtype_for_vocab(tok->vocab_size());
  IndexedWriter writer(out, dtype);

  std::vector<BpeCache> caches(threads);
  const auto t0 = std::chrono::steady_clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  int64_t done_bytes = 0, docs = 0, skipped = 0;
  double last_report = 0;
  auto report = [&](bool final) {
    const double s = seconds();
    if (!final && s - last_report < 1.0) return;
    last_report = s;
    const double mb = done_bytes / 1e6, rate = mb / std::max(s, 1e-9);
    std::fprintf(stderr, "\rtokenize: %.1f / %.1f MB (%.0f%%), %.2f MB/s, %lld documents, %lld tokens, %s %s   ",
                 mb, total_bytes / 1e6, total_bytes ? 100.0 * done_bytes / total_bytes : 100.0, rate,
                 (long long)docs, (long long)writer.tokens_written(), final ? "took" : "ETA",
                 fmt_time(final ? s : (total_bytes - done_bytes) / 1e6 / std::max(rate, 1e-9)).c_str());
    if (final) std::fputc('\n', stderr);
  };

  // Batches of about 16 MB: encoded in parallel, written in order.
  std::vector<Doc> batch;
  int64_t batch_bytes = 0;
  auto flush = [&] {
    // Largest documents first, so no thread is left with a long one at the end of the batch.
    std::vector<size_t> order(batch.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t x, size_t y) { return batch[x].text.size() > batch[y].text.size(); });
    std::atomic<size_t> next{0};
    std::vector<std::exception_ptr> errors(threads);
    auto work = [&](int64_t t) {
      try {
        for (size_t i; (i = next.fetch_add(1)) < batch.size();) {
          Doc& d = batch[order[i]];
          if (d.json_line) d.text = text_of_line(d, key);
          d.empty = d.text.empty();
          if (!d.empty) tok->encode(d.text, d.ids, &caches[t]);
        }
      } catch (...) {
        errors[t] = std::current_exception();
        next = batch.size();
      }
    };
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
    work(0);
    for (auto& th : pool) th.join();
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
    for (Doc& d : batch) {
      if (d.empty) {
        ++skipped;
        continue;
      }
      d.ids.push_back(eos);
      writer.add_document(d.ids.data(), static_cast<int64_t>(d.ids.size()));
      ++docs;
    }
    batch.clear();
    batch_bytes = 0;
    report(false);
  };
  auto add = [&](Doc d, int64_t bytes) {
    batch_bytes += static_cast<int64_t>(d.text.size());
    batch.push_back(std::move(d));
    done_bytes += bytes;
    if (batch_bytes >= (16 << 20)) flush();
  };

  for (const Input& f : files) {
    if (!f.jsonl) {
      Doc d;
      d.text = read_file(f.path);
      const int64_t n = static_cast<int64_t>(d.text.size());
      add(std::move(d), n);
      continue;
    }
    std::ifstream jf(f.path, std::ios::binary);
    if (!jf) fail("cannot read '", f.path.string(), "'");
    std::string line;
    for (int64_t ln = 1; std::getline(jf, line); ++ln) {
      const int64_t n = static_cast<int64_t>(line.size()) + 1;
      if (line.find_first_not_of(" \t\r") == std::string::npos) {
        done_bytes += n;
        continue;
      }
      Doc d;
      d.text = std::move(line);
      d.json_line = true;
      d.file = &f.path;
      d.line = ln;
      add(std::move(d), n);
    }
  }
  flush();
  if (docs == 0) fail("tokenize: the input holds no non-empty documents; nothing written");
  done_bytes = total_bytes;
  report(true);
  writer.finish();
  std::printf("wrote %s.bin and %s.idx: %lld documents (%lld empty ones skipped), %lld tokens "
              "(%s, end-of-document id %d), %.1f MB of text in %.1f s (%.2f MB/s on %lld threads)\n",
              out.c_str(), out.c_str(), (long long)docs, (long long)skipped,
              (long long)writer.tokens_written(), dtype_name(dtype), eos, total_bytes / 1e6,
              seconds(), total_bytes / 1e6 / std::max(seconds(), 1e-9), (long long)threads);
  return 0;
}

}  // namespace ssd::cli
