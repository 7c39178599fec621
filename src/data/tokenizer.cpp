// Encoding and decoding with a loaded tokenizer.json; the steps and their order follow
// Hugging Face tokenizers (added tokens, pre-tokenizer, BPE merges by rank, ByteLevel decoder).
#include <algorithm>
#include <deque>
#include <queue>

#include "core/error.h"
#include "data/tokenizer_impl.h"

namespace ssd {

uint32_t byte_to_codepoint(uint8_t b) {
  // Printable Latin-1 bytes stand for themselves; the other 68 bytes take 256, 257, ... in
  // byte order (GPT-2's bytes_to_unicode).
  auto printable = [](int x) { return (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174; };
  if (printable(b)) return b;
  uint32_t n = 0;
  for (int x = 0; x < b; ++x)
    if (!printable(x)) ++n;
  return 256 + n;
}

std::string utf8_encode(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

namespace {

// The code point starting at s[i] and its length; an invalid byte reads as itself, length 1.
std::pair<uint32_t, size_t> utf8_at(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return {c, 1};
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) {
    const auto d = static_cast<unsigned char>(s[i + k]);
    if ((d & 0xC0) != 0x80) return {c, 1};
    cp = (cp << 6) | (d & 0x3F);
  }
  return {cp, n};
}

// Unicode White_Space (what Rust's char::is_whitespace tests, used for lstrip/rstrip).
bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// Start of the last code point of s (s non-empty).
size_t last_char_start(std::string_view s) {
  size_t i = s.size() - 1;
  while (i > 0 && s.size() - i < 4 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

using Piece = std::string_view;

// The pieces of one gap between added tokens, after every pre-tokenizer step. `arena` owns
// the strings made by add_prefix_space (a deque, so views into it stay valid).
void pre_tokenize(const Tokenizer::Impl& t, std::string_view text, std::vector<Piece>& pieces,
                  std::deque<std::string>& arena) {
  pieces.assign(1, text);
  std::vector<Piece> next;
  std::vector<std::pair<size_t, size_t>> m;
  for (const PreStep& s : t.steps) {
    next.clear();
    for (Piece p : pieces) {
      if (s.kind == PreStep::Kind::ByteLevel) {
        // The reference prepends to non-empty pieces only (prepending to "" is a no-op there).
        if (s.add_prefix_space && !p.empty() && p[0] != ' ') {
          arena.push_back(" ");
          arena.back().append(p);
          p = arena.back();
        }
        if (!s.use_regex) {
          next.push_back(p);
          continue;
        }
      }
      // Regions of p: matches (true) and the text between them (false), as the reference's
      // Pattern::find_matches lays them out.
      m.clear();
      if (s.regex) {
        s.regex->find_all(p, m);
      } else {
        for (size_t at = p.find(s.literal); at != Piece::npos; at = p.find(s.literal, at + s.literal.size()))
          m.emplace_back(at, at + s.literal.size());
      }
      std::vector<std::pair<Piece, bool>> regions;
      size_t prev = 0;
      for (auto [b, e] : m) {
        if (prev != b) regions.emplace_back(p.substr(prev, b - prev), false);
        regions.emplace_back(p.substr(b, e - b), true);
        prev = e;
      }
      if (prev != p.size() || p.empty()) regions.emplace_back(p.substr(prev), false);
      if (s.kind == PreStep::Kind::Split && s.invert)
        for (auto& r : regions) r.second = !r.second;

      using B = PreStep::Behavior;
      const B behavior = s.kind == PreStep::Kind::ByteLevel ? B::Isolated : s.behavior;
      // Joins views of adjacent regions of p.
      auto join = [&](Piece a, Piece b) { return Piece(a.data(), b.data() + b.size() - a.data()); };
      std::vector<Piece> out;
      bool prev_match = false;
      switch (behavior) {
        case B::Isolated:
          for (auto& r : regions) out.push_back(r.first);
          break;
        case B::Removed:
          for (auto& r : regions)
            if (!r.second) out.push_back(r.first);
          break;
        case B::Contiguous:
          for (auto& r : regions) {
            if (r.second == prev_match && !out.empty()) out.back() = join(out.back(), r.first);
            else out.push_back(r.first);
            prev_match = r.second;
          }
          break;
        case B::MergedWithPrevious:
          for (auto& r : regions) {
            if (r.second && !prev_match && !out.empty()) out.back() = join(out.back(), r.first);
            else out.push_back(r.first);
            prev_match = r.second;
          }
          break;
        case B::MergedWithNext:
          for (auto it = regions.rbegin(); it != regions.rend(); ++it) {
            if (it->second && !prev_match && !out.empty()) out.back() = join(it->first, out.back());
            else out.push_back(it->first);
            prev_match = it->second;
          }
          std::reverse(out.begin(), out.end());
          break;
      }
      for (Piece q : out)
        if (!q.empty()) next.push_back(q);
    }
    pieces.swap(next);
  }
}

struct Symbol {
  int32_t id;
  int prev, next;
  bool alive;
};

struct Merge {
  int32_t rank;
  int pos;
  int32_t new_id;
  // std::priority_queue pops the largest: make that the lowest rank, then the leftmost.
  bool operator<(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
};

// The reference's BPE on one piece: start from one symbol per byte, repeatedly merge the
// adjacent pair of lowest rank (leftmost on ties), skipping queue entries made stale.
void bpe(const Tokenizer::Impl& t, Piece piece, std::vector<int32_t>& out) {
  if (t.ignore_merges) {
    std::string mapped;
    for (unsigned char b : piece) mapped += utf8_encode(byte_to_codepoint(b));
    if (auto it = t.vocab.find(mapped); it != t.vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<Symbol> sym;
  sym.reserve(piece.size());
  bool last_unk = false;
  for (unsigned char b : piece) {
    int32_t id = t.byte_id[b];
    if (id < 0) {
      if (!t.unk) continue;  // the reference drops characters it cannot represent
      if (t.fuse_unk && last_unk) continue;
      id = *t.unk;
      last_unk = true;
    } else {
      last_unk = false;
    }
    const int n = static_cast<int>(sym.size());
    sym.push_back({id, n - 1, n + 1, true});
  }
  if (sym.empty()) return;
  sym.back().next = -1;

  std::priority_queue<Merge> q;
  auto lookup = [&](int32_t a, int32_t b) {
    auto it = t.merges.find(Tokenizer::Impl::pair_key(a, b));
    return it == t.merges.end() ? nullptr : &it->second;
  };
  for (size_t i = 0; i + 1 < sym.size(); ++i)
    if (auto m = lookup(sym[i].id, sym[i + 1].id)) q.push({m->first, static_cast<int>(i), m->second});
  while (!q.empty()) {
    const Merge top = q.top();
    q.pop();
    Symbol& cur = sym[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    Symbol& right = sym[cur.next];
    auto m = lookup(cur.id, right.id);
    if (!m || m->second != top.new_id) continue;  // stale entry
    cur.id = top.new_id;
    right.alive = false;
    cur.next = right.next;
    if (cur.next >= 0) sym[cur.next].prev = top.pos;
    if (cur.prev >= 0)
      if (auto pm = lookup(sym[cur.prev].id, cur.id)) q.push({pm->first, cur.prev, pm->second});
    if (cur.next >= 0)
      if (auto nm = lookup(cur.id, sym[cur.next].id)) q.push({nm->first, top.pos, nm->second});
  }
  for (const Symbol& s : sym)
    if (s.alive) out.push_back(s.id);
}

void encode_gap(const Tokenizer::Impl& t, std::string_view gap, std::vector<int32_t>& out,
                BpeCache* cache) {
  if (gap.empty()) return;
  std::vector<Piece> pieces;
  std::deque<std::string> arena;
  pre_tokenize(t, gap, pieces, arena);
  for (Piece p : pieces) {
    // Long pieces (whitespace runs, long numbers without a split) are not worth keeping.
    if (!cache || p.size() > 64) {
      bpe(t, p, out);
      continue;
    }
    std::string key(p);
    auto it = cache->pieces.find(key);
    if (it == cache->pieces.end()) {
      if (cache->pieces.size() >= cache->max_entries) cache->pieces.clear();
      std::vector<int32_t> ids;
      bpe(t, p, ids);
      it = cache->pieces.emplace(std::move(key), std::move(ids)).first;
    }
    out.insert(out.end(), it->second.begin(), it->second.end());
  }
}

bool is_word_char(const Tokenizer::Impl& t, std::string_view ch) {
  std::vector<std::pair<size_t, size_t>> m;
  t.word_char->find_all(ch, m);
  return !m.empty();
}

// Splits text around the tokens of `set` (leftmost-longest, non-overlapping, as the
// reference's Aho-Corasick search) and calls gap(text) / token(id) in order.
template <class Gap>
void split_added(const Tokenizer::Impl& t, const AddedSet& set, std::string_view text, Gap&& gap,
                 std::vector<int32_t>& out) {
  if (set.tokens.empty()) {
    gap(text);
    return;
  }
  size_t start_offset = 0, i = 0;
  while (i < text.size()) {
    const auto& cands = set.by_first[static_cast<unsigned char>(text[i])];
    const AddedToken* hit = nullptr;
    for (int c : cands) {
      const std::string& s = t.added[c].content;
      if (text.compare(i, s.size(), s) == 0) {
        hit = &t.added[c];
        break;
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    size_t start = i, stop = i + hit->content.size();
    i = stop;  // the search continues after this match even when it is rejected below
    if (hit->single_word) {
      const size_t before = start == 0 ? 0 : last_char_start(text.substr(0, start));
      const bool start_ok = start == 0 || !is_word_char(t, text.substr(before, start - before));
      const bool stop_ok = stop == text.size() ||
                           !is_word_char(t, text.substr(stop, utf8_at(text, stop).second));
      if (!start_ok || !stop_ok) continue;
    }
    if (hit->lstrip) {
      size_t s = start;
      while (s > 0) {
        const size_t c = last_char_start(text.substr(0, s));
        if (!is_white_space(utf8_at(text, c).first)) break;
        s = c;
      }
      start = std::max(s, start_offset);
    }
    if (hit->rstrip) {
      while (stop < text.size()) {
        auto [cp, n] = utf8_at(text, stop);
        if (!is_white_space(cp)) break;
        stop += n;
      }
      i = stop;
    }
    if (start_offset < start) gap(text.substr(start_offset, start - start_offset));
    out.push_back(hit->id);
    start_offset = stop;
  }
  if (start_offset < text.size()) gap(text.substr(start_offset));
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

void Tokenizer::encode(std::string_view text, std::vector<int32_t>& out, BpeCache* cache) const {
  const Impl& t = *impl_;
  split_added(t, t.raw_set, text, [&](std::string_view g1) {
    split_added(t, t.norm_set, g1, [&](std::string_view g2) { encode_gap(t, g2, out, cache); }, out);
  }, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  BpeCache cache;
  encode(text, out, &cache);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  const Impl& t = *impl_;
  static const std::vector<int> byte_of_cp = [] {
    std::vector<int> v(512, -1);
    for (int b = 0; b < 256; ++b) v[byte_to_codepoint(static_cast<uint8_t>(b))] = b;
    return v;
  }();
  std::string out;
  bool first = true;
  for (size_t k = 0; k < ids.size(); ++k) {
    const int32_t id = ids[k];
    if (id < 0 || id >= t.vocab_size)
      fail("decode: token id ", id, " at position ", k, " is outside the vocabulary of '", t.path,
           "' (", t.vocab_size, " ids)");
    const int a = t.added_of_id[id];
    if (a >= 0 && skip_special && t.added[a].special) continue;
    const std::string& tok = a >= 0 ? t.added[a].content : t.id_to_token[id];
    if (a < 0 && tok.empty())
      fail("decode: token id ", id, " at position ", k, " has no token in '", t.path, "'");
    if (!t.byte_level_decoder) {  // no decoder: the reference joins the tokens with spaces
      if (!first) out += ' ';
      out += tok;
      first = false;
      continue;
    }
    // Each character back to its byte; a token with a character outside the byte map (an
    // added token such as "<|endoftext|>" written in plain text) is taken as its own bytes.
    std::string bytes;
    bool mapped = true;
    for (size_t i = 0; i < tok.size();) {
      auto [cp, n] = utf8_at(tok, i);
      if (cp >= byte_of_cp.size() || byte_of_cp[cp] < 0) {
        mapped = false;
        break;
      }
      bytes += static_cast<char>(byte_of_cp[cp]);
      i += n;
    }
    out += mapped ? bytes : tok;
  }
  return out;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  for (const auto& a : impl_->added)
    if (a.content == token) return a.id;
  if (auto it = impl_->vocab.find(std::string(token)); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

const std::string& Tokenizer::path() const { return impl_->path; }

}  // namespace ssd
