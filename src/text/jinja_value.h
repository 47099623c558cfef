// Values of the Jinja interpreter. They mirror the Python objects Jinja2 works with, because chat
// templates are judged byte for byte against Python: printing follows Python `str()` (True, None,
// 1.0, ['a', 1]), equality follows Python (1 == 1.0 == True), and dicts keep insertion order.
// Lists and dicts are shared and never mutated after construction (transformers renders in an
// immutable sandbox); only namespaces are mutable.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace mxlm::text::jinja {

class Value;
using ValueList = std::vector<Value>;

struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  const Value* find(const std::string& key) const;
  void set(const std::string& key, Value value);
};

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
  const Value* kwarg(const std::string& name) const;
};

class Value;
using NativeFunction = std::function<Value(CallArgs&)>;

struct Callable {
  std::string name;
  NativeFunction call;
};

class Value {
 public:
  enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Namespace, Callable };

  Value() = default;  // Undefined
  static Value undefined(std::string hint = {});
  static Value none();
  static Value boolean(bool b);
  static Value integer(int64_t i);
  static Value floating(double f);
  static Value string(std::string s);
  static Value list(ValueList items, bool tuple = false);
  static Value dict(Dict d);
  static Value new_namespace(Dict d);
  static Value function(std::string name, NativeFunction fn);
  static Value from_json(const nlohmann::ordered_json& j);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::Undefined; }
  bool is_none() const { return kind_ == Kind::None; }
  bool is_bool() const { return kind_ == Kind::Bool; }
  bool is_int() const { return kind_ == Kind::Int; }
  bool is_float() const { return kind_ == Kind::Float; }
  bool is_number() const { return kind_ == Kind::Int || kind_ == Kind::Float || kind_ == Kind::Bool; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_list() const { return kind_ == Kind::List; }
  bool is_tuple() const { return kind_ == Kind::List && tuple_; }
  bool is_dict() const { return kind_ == Kind::Dict; }
  bool is_namespace() const { return kind_ == Kind::Namespace; }
  bool is_callable() const { return kind_ == Kind::Callable; }

  bool as_bool() const { return b_; }
  int64_t as_int() const { return kind_ == Kind::Bool ? (b_ ? 1 : 0) : i_; }
  double as_double() const;
  const std::string& as_string() const { return s_; }
  const ValueList& as_list() const { return *list_; }
  const Dict& as_dict() const { return *dict_; }
  Dict& namespace_dict() const { return *dict_; }
  const Callable& as_callable() const { return *fn_; }
  const std::string& undefined_hint() const { return s_; }

  // Python truthiness.
  bool truthy() const;
  // Python str(): what `{{ value }}` prints.
  std::string str() const;
  // Python repr(): how a value prints inside a list or dict.
  std::string repr() const;
  // Python type name for error messages ("dict object", "int", ...).
  std::string type_name() const;
  // Python ==.
  bool equals(const Value& other) const;

  nlohmann::ordered_json to_json() const;

  // Container nesting at construction (0 for scalars). Creating a value nested deeper than
  // kMaxValueNesting fails, so destroying or printing values never recurses too deep.
  int depth() const { return depth_; }
  uint64_t nodes() const { return nodes_; }

 private:
  void set_depth_from(const ValueList& items);
  void set_depth_from(const Dict& d);

  int depth_ = 0;
  uint64_t nodes_ = 1;
  Kind kind_ = Kind::Undefined;
  bool b_ = false;
  bool tuple_ = false;
  int64_t i_ = 0;
  double f_ = 0;
  std::string s_;
  std::shared_ptr<const ValueList> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<const Callable> fn_;
};

// Bounds recursion over nested values (a namespace can contain itself): deeper than kMaxValueNesting
// levels is refused with an error instead of overflowing the stack.
inline constexpr int kMaxValueNesting = 256;
// Containers may share children, so a few assignments can describe an exponentially large value;
// building one with more than kMaxValueNodes nodes (counting shared ones each time) is refused.
inline constexpr uint64_t kMaxValueNodes = uint64_t{4} << 20;
class NestingGuard {
 public:
  NestingGuard();
  ~NestingGuard();
  NestingGuard(const NestingGuard&) = delete;
  NestingGuard& operator=(const NestingGuard&) = delete;
};

// Python repr() of a float ("1.0", "1e-05", "1e+16", "inf", "nan").
std::string python_float_repr(double f);
// Python repr() of a str (quotes chosen as Python does, non-printable characters escaped).
std::string python_string_repr(const std::string& s);

struct JsonDumpOptions {
  bool ensure_ascii = false;
  bool has_indent = false;
  std::string indent;  // the indent unit when has_indent
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
};
// Python json.dumps() of a value; throws mxlm::Error for values JSON cannot hold.
std::string json_dumps(const Value& v, const JsonDumpOptions& options);

// UTF-8 <-> code points (Python str indexing counts code points).
std::u32string utf8_to_u32(const std::string& s);
std::string u32_to_utf8(const std::u32string& s);
void append_utf8_escaped(std::string& out, char32_t cp);

}  // namespace mxlm::text::jinja
