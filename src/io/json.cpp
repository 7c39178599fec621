#include "io/json.h"

#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "core/error.h"

namespace ssd::json {

Value::Value(uint64_t v) : kind_(Kind::Int) {
  SSD_CHECK(v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
            "JSON integer out of range: ", v);
  i_ = static_cast<int64_t>(v);
  d_ = static_cast<double>(v);
}

const char* Value::kind_name() const {
  switch (kind_) {
    case Kind::Null: return "null";
    case Kind::Bool: return "bool";
    case Kind::Int: return "integer";
    case Kind::Float: return "number";
    case Kind::String: return "string";
    case Kind::Array: return "array";
    case Kind::Object: return "object";
  }
  return "?";
}

namespace {
[[noreturn]] void kind_error(const Value& v, const char* want) {
  fail("JSON value is ", v.kind_name(), ", expected ", want);
}
}  // namespace

bool Value::as_bool() const {
  if (kind_ != Kind::Bool) kind_error(*this, "bool");
  return b_;
}

int64_t Value::as_int() const {
  if (kind_ == Kind::Int) return i_;
  if (kind_ == Kind::Float && std::isfinite(d_) && std::floor(d_) == d_ &&
      std::fabs(d_) < 9.2e18)
    return static_cast<int64_t>(d_);
  kind_error(*this, "integer");
}

double Value::as_double() const {
  if (kind_ == Kind::Int || kind_ == Kind::Float) return d_;
  kind_error(*this, "number");
}

const std::string& Value::as_string() const {
  if (kind_ != Kind::String) kind_error(*this, "string");
  return s_;
}

const std::vector<Value>& Value::items() const {
  if (kind_ != Kind::Array) kind_error(*this, "array");
  return a_;
}

const std::vector<std::pair<std::string, Value>>& Value::members() const {
  if (kind_ != Kind::Object) kind_error(*this, "object");
  return o_;
}

Value& Value::push(Value v) {
  if (kind_ != Kind::Array) kind_error(*this, "array");
  a_.push_back(std::move(v));
  return *this;
}

size_t Value::size() const {
  if (kind_ == Kind::Array) return a_.size();
  if (kind_ == Kind::Object) return o_.size();
  kind_error(*this, "array or object");
}

const Value* Value::find(std::string_view key) const {
  if (kind_ != Kind::Object) return nullptr;
  for (const auto& [k, v] : o_)
    if (k == key) return &v;
  return nullptr;
}

Value& Value::set(std::string key, Value v) {
  if (kind_ != Kind::Object) kind_error(*this, "object");
  for (auto& [k, old] : o_)
    if (k == key) {
      old = std::move(v);
      return *this;
    }
  o_.emplace_back(std::move(key), std::move(v));
  return *this;
}

Value& Value::append_new(std::string key, Value v) {
  if (kind_ != Kind::Object) kind_error(*this, "object");
  o_.emplace_back(std::move(key), std::move(v));
  return *this;
}

// ---------------------------------------------------------------------------------------------
// Reader

namespace {

constexpr int kMaxDepth = 64;

class Parser {
 public:
  Parser(std::string_view text, const std::string& origin) : t_(text), origin_(origin) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != t_.size()) error("unexpected characters after the JSON value");
    return v;
  }

 private:
  std::string_view t_;
  const std::string& origin_;
  size_t pos_ = 0;

  [[noreturn]] void error(const std::string& what) const { error_at(pos_, what); }
  [[noreturn]] void error_at(size_t at, const std::string& what) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < at && i < t_.size(); ++i) {
      if (t_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    fail(origin_, ": invalid JSON at line ", line, ", column ", col, ": ", what);
  }

  bool at_end() const { return pos_ >= t_.size(); }
  char peek() const { return at_end() ? '\0' : t_[pos_]; }

  void skip_ws() {
    while (!at_end()) {
      char c = t_[pos_];
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
        ++pos_;
      else
        break;
    }
  }

  void expect(char c) {
    if (peek() != c) {
      if (at_end()) error(std::string("unexpected end of text, expected '") + c + "'");
      error(std::string("expected '") + c + "', found '" + peek() + "'");
    }
    ++pos_;
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) error("nesting deeper than 64 levels");
    if (at_end()) error("unexpected end of text, expected a value");
    char c = peek();
    switch (c) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return Value(parse_string());
      case 't': literal("true"); return Value(true);
      case 'f': literal("false"); return Value(false);
      case 'n': literal("null"); return Value();
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        error(std::string("unexpected character '") + c + "'");
    }
  }

  void literal(const char* word) {
    size_t n = std::strlen(word);
    if (t_.substr(pos_, n) != word) error(std::string("invalid literal, expected ") + word);
    pos_ += n;
  }

  Value parse_object(int depth) {
    expect('{');
    Value obj = Value::object();
    std::unordered_set<std::string> seen;
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      return obj;
    }
    while (true) {
      skip_ws();
      if (peek() != '"') error("expected a string key");
      size_t key_at = pos_;
      std::string key = parse_string();
      if (!seen.insert(key).second) error_at(key_at, "duplicate key \"" + key + "\"");
      skip_ws();
      expect(':');
      skip_ws();
      obj.append_new(std::move(key), parse_value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return obj;
      }
      if (at_end()) error("unexpected end of text inside an object");
      error("expected ',' or '}' in an object");
    }
  }

  Value parse_array(int depth) {
    expect('[');
    Value arr = Value::array();
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      return arr;
    }
    while (true) {
      skip_ws();
      arr.push(parse_value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return arr;
      }
      if (at_end()) error("unexpected end of text inside an array");
      error("expected ',' or ']' in an array");
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > t_.size()) error("truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = t_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= c - '0';
      else if (c >= 'a' && c <= 'f')
        v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        v |= c - 'A' + 10;
      else
        error("invalid hex digit in \\u escape");
    }
    return v;
  }

  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (at_end()) error("unterminated string");
      char c = t_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error_at(pos_ - 1, "control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (at_end()) error("unterminated string");
      char e = t_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (t_.substr(pos_, 2) != "\\u") error("unpaired UTF-16 surrogate in \\u escape");
            pos_ += 2;
            unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) error("invalid UTF-16 low surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            error("unpaired UTF-16 surrogate in \\u escape");
          }
          put_utf8(out, cp);
          break;
        }
        default: error_at(pos_ - 1, std::string("invalid escape '\\") + e + "'");
      }
    }
  }

  Value parse_number() {
    size_t start = pos_;
    bool is_float = false;
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      error("invalid number");
    }
    if (peek() == '.') {
      is_float = true;
      ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) error("invalid number: digit expected after '.'");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      is_float = true;
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) error("invalid number: digit expected in exponent");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    const char* b = t_.data() + start;
    const char* e = t_.data() + pos_;
    if (!is_float) {
      int64_t v = 0;
      auto r = std::from_chars(b, e, v);
      if (r.ec == std::errc() && r.ptr == e) return Value(v);
      // Too large for int64: keep it as a double.
    }
    double d = 0;
    auto r = std::from_chars(b, e, d);
    if (r.ec == std::errc::result_out_of_range) error_at(start, "number out of range");
    if (r.ec != std::errc() || r.ptr != e) error_at(start, "invalid number");
    return Value(d);
  }
};

}  // namespace

Value parse(std::string_view text, const std::string& origin) {
  return Parser(text, origin).parse_document();
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {

void dump_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          static const char* hex = "0123456789abcdef";
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

void dump_double(std::string& out, double d) {
  SSD_CHECK(std::isfinite(d), "JSON cannot represent ", d);
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), d);
  SSD_CHECK(r.ec == std::errc());
  std::string s(buf, r.ptr);
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  out += s;
}

void newline(std::string& out, int indent, int level) {
  if (indent < 0) return;
  out += '\n';
  out.append(static_cast<size_t>(indent) * level, ' ');
}

void dump_value(std::string& out, const Value& v, int indent, int level) {
  switch (v.kind()) {
    case Value::Kind::Null: out += "null"; break;
    case Value::Kind::Bool: out += v.as_bool() ? "true" : "false"; break;
    case Value::Kind::Int: out += std::to_string(v.as_int()); break;
    case Value::Kind::Float: dump_double(out, v.as_double()); break;
    case Value::Kind::String: dump_string(out, v.as_string()); break;
    case Value::Kind::Array: {
      const auto& items = v.items();
      out += '[';
      // Arrays of scalars stay on one line even when pretty-printing.
      bool flat = true;
      for (const auto& x : items)
        if (x.is_array() || x.is_object()) flat = false;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += flat && indent >= 0 ? ", " : ",";
        if (!flat) newline(out, indent, level + 1);
        dump_value(out, items[i], indent, level + 1);
      }
      if (!flat && !items.empty()) newline(out, indent, level);
      out += ']';
      break;
    }
    case Value::Kind::Object: {
      const auto& members = v.members();
      out += '{';
      for (size_t i = 0; i < members.size(); ++i) {
        if (i) out += ',';
        newline(out, indent, level + 1);
        dump_string(out, members[i].first);
        out += indent >= 0 ? ": " : ":";
        dump_value(out, members[i].second, indent, level + 1);
      }
      if (!members.empty()) newline(out, indent, level);
      out += '}';
      break;
    }
  }
}

}  // namespace

std::string dump(const Value& v, int indent) {
  std::string out;
  dump_value(out, v, indent, 0);
  return out;
}

}  // namespace ssd::json
