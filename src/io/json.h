// A small JSON value, reader and writer: enough for safetensors headers, Hugging Face /
// mamba_ssm config.json files and checkpoint manifests. Objects keep their insertion order.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ssd::json {

class Value {
 public:
  enum class Kind { Null, Bool, Int, Float, String, Array, Object };

  Value() = default;  // null
  Value(bool b) : kind_(Kind::Bool), b_(b) {}
  Value(int v) : kind_(Kind::Int), i_(v), d_(v) {}
  Value(int64_t v) : kind_(Kind::Int), i_(v), d_(static_cast<double>(v)) {}
  Value(uint64_t v);  // must fit in int64
  Value(double v) : kind_(Kind::Float), d_(v) {}
  Value(const char* s) : kind_(Kind::String), s_(s) {}
  Value(std::string s) : kind_(Kind::String), s_(std::move(s)) {}
  Value(std::string_view s) : kind_(Kind::String), s_(s) {}
  static Value array() { Value v; v.kind_ = Kind::Array; return v; }
  static Value object() { Value v; v.kind_ = Kind::Object; return v; }

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_bool() const { return kind_ == Kind::Bool; }
  bool is_int() const { return kind_ == Kind::Int; }
  bool is_number() const { return kind_ == Kind::Int || kind_ == Kind::Float; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_array() const { return kind_ == Kind::Array; }
  bool is_object() const { return kind_ == Kind::Object; }
  // "null", "bool", "integer", "number", "string", "array", "object" (for error messages).
  const char* kind_name() const;

  // Accessors throw ssd::Error on a kind mismatch; callers that can name the file and key
  // should check the kind first and produce their own message.
  bool as_bool() const;
  int64_t as_int() const;  // an Int, or a Float with an exactly integral value
  double as_double() const;
  const std::string& as_string() const;
  const std::vector<Value>& items() const;
  const std::vector<std::pair<std::string, Value>>& members() const;

  // Arrays.
  Value& push(Value v);
  size_t size() const;  // items of an array, members of an object
  const Value& operator[](size_t i) const { return items().at(i); }

  // Objects: find returns nullptr if absent; set replaces an existing key or appends.
  const Value* find(std::string_view key) const;
  Value& set(std::string key, Value v);
  // Appends without looking for an existing key: for the parser, which checks duplicates with
  // a hash set (set() is linear per key, quadratic over a 50k-entry tokenizer vocab).
  Value& append_new(std::string key, Value v);

 private:
  Kind kind_ = Kind::Null;
  bool b_ = false;
  int64_t i_ = 0;
  double d_ = 0;
  std::string s_;
  std::vector<Value> a_;
  std::vector<std::pair<std::string, Value>> o_;
};

// Parses a complete JSON text (RFC 8259; duplicate object keys are rejected). Errors throw
// ssd::Error "<origin>: invalid JSON at line L, column C: <what>".
Value parse(std::string_view text, const std::string& origin);

// Serialises. indent < 0: compact, one line; otherwise pretty-printed with that many spaces.
// Floats are written in the shortest form that reads back to the same double and always
// carry a '.' or exponent, so Python reads them back as float. NaN/Inf are internal errors.
std::string dump(const Value& v, int indent = -1);

}  // namespace ssd::json
