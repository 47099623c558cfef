#include "text/jinja_builtins.h"

#include <utf8proc.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>

#include "core/error.h"

namespace mxlm::text::jinja {
namespace {

std::u32string cps(const std::string& s) { return utf8_to_u32(s); }

bool is_py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool is_letter(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT ||
         cat == UTF8PROC_CATEGORY_LM || cat == UTF8PROC_CATEGORY_LO;
}

char32_t to_upper(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') ? c - 32 : c;
  if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return c;
  return static_cast<char32_t>(utf8proc_toupper(static_cast<utf8proc_int32_t>(c)));
}

char32_t to_lower(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return c;
  return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
}

bool is_cased(char32_t c) { return to_upper(c) != c || to_lower(c) != c; }

std::string str_upper(const std::string& s) {
  std::string out;
  for (char32_t c : cps(s)) append_utf8_escaped(out, to_upper(c));
  return out;
}

std::string str_lower(const std::string& s) {
  std::string out;
  for (char32_t c : cps(s)) append_utf8_escaped(out, to_lower(c));
  return out;
}

std::string str_capitalize(const std::string& s) {
  std::u32string u = cps(s);
  std::string out;
  for (size_t i = 0; i < u.size(); ++i) append_utf8_escaped(out, i == 0 ? to_upper(u[i]) : to_lower(u[i]));
  return out;
}

// Python str.title(): a cased character after an uncased one starts a word.
std::string str_title(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (char32_t c : cps(s)) {
    append_utf8_escaped(out, prev_cased ? to_lower(c) : to_upper(c));
    prev_cased = is_cased(c);
  }
  return out;
}

std::u32string strip_cps(const std::u32string& u, const Value* chars, bool left, bool right) {
  std::u32string set;
  bool whitespace = !chars || chars->is_none() || chars->is_undefined();
  if (!whitespace) {
    if (!chars->is_string()) fail("strip arg must be None or str");
    set = cps(chars->as_string());
  }
  auto strip_it = [&](char32_t c) { return whitespace ? is_py_space(c) : set.find(c) != std::u32string::npos; };
  size_t b = 0, e = u.size();
  if (left) {
    while (b < e && strip_it(u[b])) ++b;
  }
  if (right) {
    while (e > b && strip_it(u[e - 1])) --e;
  }
  return u.substr(b, e - b);
}

std::string str_strip(const std::string& s, const Value* chars, bool left, bool right) {
  return u32_to_utf8(strip_cps(cps(s), chars, left, right));
}

ValueList str_split(const std::string& s, const Value* sep_value, int64_t maxsplit, bool from_right) {
  ValueList parts;
  if (!sep_value || sep_value->is_none()) {
    std::u32string u = cps(s);
    std::vector<std::u32string> words;
    if (!from_right) {
      size_t i = 0;
      while (true) {
        while (i < u.size() && is_py_space(u[i])) ++i;
        if (i >= u.size()) break;
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
          size_t e = u.size();
          while (e > i && is_py_space(u[e - 1])) --e;
          words.push_back(u.substr(i, e - i));
          break;
        }
        size_t j = i;
        while (j < u.size() && !is_py_space(u[j])) ++j;
        words.push_back(u.substr(i, j - i));
        i = j;
      }
    } else {
      size_t i = u.size();
      while (true) {
        while (i > 0 && is_py_space(u[i - 1])) --i;
        if (i == 0) break;
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
          size_t b = 0;
          while (b < i && is_py_space(u[b])) ++b;
          words.push_back(u.substr(b, i - b));
          break;
        }
        size_t j = i;
        while (j > 0 && !is_py_space(u[j - 1])) --j;
        words.push_back(u.substr(j, i - j));
        i = j;
      }
      std::reverse(words.begin(), words.end());
    }
    for (auto& w : words) parts.push_back(Value::string(u32_to_utf8(w)));
    return parts;
  }
  if (!sep_value->is_string()) fail("must be str or None, not {}", sep_value->type_name());
  const std::string& sep = sep_value->as_string();
  if (sep.empty()) fail("empty separator");
  std::vector<std::string> pieces;
  if (!from_right) {
    size_t start = 0;
    while (true) {
      size_t p = s.find(sep, start);
      if (p == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(pieces.size()) == maxsplit)) {
        pieces.push_back(s.substr(start));
        break;
      }
      pieces.push_back(s.substr(start, p - start));
      start = p + sep.size();
    }
  } else {
    size_t end = s.size();
    while (true) {
      size_t p = end >= sep.size() ? s.rfind(sep, end - sep.size()) : std::string::npos;
      if (p == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(pieces.size()) == maxsplit)) {
        pieces.push_back(s.substr(0, end));
        break;
      }
      pieces.push_back(s.substr(p + sep.size(), end - p - sep.size()));
      end = p;
    }
    std::reverse(pieces.begin(), pieces.end());
  }
  for (auto& p : pieces) parts.push_back(Value::string(std::move(p)));
  return parts;
}

std::string str_replace(const std::string& s, const std::string& old, const std::string& repl, int64_t count,
                        const BuiltinLimits& limits) {
  std::string out;
  int64_t done = 0;
  if (old.empty()) {
    std::u32string u = cps(s);
    for (size_t i = 0; i <= u.size(); ++i) {
      if (count < 0 || done < count) {
        out += repl;
        ++done;
      }
      if (i < u.size()) append_utf8_escaped(out, u[i]);
      if (out.size() > limits.max_bytes) fail("string result too large");
    }
    return out;
  }
  size_t start = 0;
  while (true) {
    size_t p = s.find(old, start);
    if (p == std::string::npos || (count >= 0 && done >= count)) {
      out.append(s, start, std::string::npos);
      break;
    }
    out.append(s, start, p - start);
    out += repl;
    if (out.size() > limits.max_bytes) fail("string result too large");
    ++done;
    start = p + old.size();
  }
  return out;
}

int64_t python_len(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return 0;
    case Value::Kind::String:
      return static_cast<int64_t>(cps(v.as_string()).size());
    case Value::Kind::List:
      return static_cast<int64_t>(v.as_list().size());
    case Value::Kind::Dict:
      return static_cast<int64_t>(v.as_dict().items.size());
    default:
      fail("object of type '{}' has no len()", v.type_name());
  }
}

// Python slice.indices().
void slice_indices(int64_t length, const Value& start_v, const Value& stop_v, const Value& step_v, int64_t& start,
                   int64_t& stop, int64_t& step) {
  auto as_index = [](const Value& v) -> std::optional<int64_t> {
    if (v.is_none() || v.is_undefined()) return std::nullopt;
    if (v.is_int() || v.is_bool()) return v.as_int();
    fail("slice indices must be integers or None");
  };
  step = as_index(step_v).value_or(1);
  if (step == 0) fail("slice step cannot be zero");
  auto clamp = [&](std::optional<int64_t> x, int64_t dflt) {
    if (!x) return dflt;
    int64_t i = *x;
    if (i < 0) {
      i += length;
      if (i < 0) i = step < 0 ? -1 : 0;
    } else if (i >= length) {
      i = step < 0 ? length - 1 : length;
    }
    return i;
  };
  start = clamp(as_index(start_v), step < 0 ? length - 1 : 0);
  stop = clamp(as_index(stop_v), step < 0 ? -1 : length);
}

bool is_int_like(const Value& v) { return v.is_int() || v.is_bool(); }

[[noreturn]] void overflow() { fail("integer overflow (integers beyond 64 bits are not supported)"); }
int64_t add_checked(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) overflow();
  return r;
}
int64_t sub_checked(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r)) overflow();
  return r;
}
int64_t mul_checked(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) overflow();
  return r;
}

double py_floor_mod(double a, double b) {
  double m = std::fmod(a, b);
  if (m != 0 && ((m < 0) != (b < 0))) m += b;
  return m;
}

// printf-style `str % args`.
std::string percent_format(const std::string& fmt, const Value& args) {
  ValueList positional;
  const Dict* named = nullptr;
  if (args.is_tuple()) {
    positional = args.as_list();
  } else if (args.is_dict()) {
    named = &args.as_dict();
  } else {
    positional.push_back(args);
  }
  size_t next_arg = 0;
  std::string out;
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] != '%') {
      out += fmt[i];
      continue;
    }
    if (++i >= fmt.size()) fail("incomplete format");
    const Value* arg = nullptr;
    if (fmt[i] == '(') {
      size_t close = fmt.find(')', i);
      if (close == std::string::npos || !named) fail("format requires a mapping");
      const Value* found = named->find(fmt.substr(i + 1, close - i - 1));
      if (!found) fail("KeyError: '{}'", fmt.substr(i + 1, close - i - 1));
      arg = found;
      i = close + 1;
    }
    std::string spec = "%";
    while (i < fmt.size() && std::string("-+ 0#").find(fmt[i]) != std::string::npos) spec += fmt[i++];
    while (i < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[i]))) spec += fmt[i++];
    if (i < fmt.size() && fmt[i] == '.') {
      spec += fmt[i++];
      while (i < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[i]))) spec += fmt[i++];
    }
    if (i >= fmt.size()) fail("incomplete format");
    char conv = fmt[i];
    if (conv == '%') {
      out += '%';
      continue;
    }
    if (!arg) {
      if (named) {
        arg = &args;
      } else {
        if (next_arg >= positional.size()) fail("not enough arguments for format string");
        arg = &positional[next_arg++];
      }
    }
    char buf[512];
    switch (conv) {
      case 's':
      case 'r': {
        std::string s = conv == 's' ? arg->str() : arg->repr();
        std::snprintf(buf, sizeof buf, (spec + "s").c_str(), "");
        if (spec == "%") {
          out += s;
        } else {
          std::string padded = fmt::format("{}", s);
          int width = 0;
          bool left = spec.find('-') != std::string::npos;
          size_t d = spec.find_first_of("123456789");
          if (d != std::string::npos) width = std::atoi(spec.c_str() + d);
          int len = static_cast<int>(cps(s).size());
          if (len < width) padded = left ? s + std::string(width - len, ' ') : std::string(width - len, ' ') + s;
          out += padded;
        }
        break;
      }
      case 'd':
      case 'i':
      case 'x':
      case 'X':
      case 'o': {
        if (!arg->is_number()) fail("%{} format: a number is required, not {}", conv, arg->type_name());
        long long n = arg->is_float() ? static_cast<long long>(arg->as_double()) : arg->as_int();
        std::string c = conv == 'i' ? "d" : std::string(1, conv);
        std::snprintf(buf, sizeof buf, (spec + "ll" + c).c_str(), n);
        out += buf;
        break;
      }
      case 'f':
      case 'F':
      case 'e':
      case 'E':
      case 'g':
      case 'G': {
        if (!arg->is_number()) fail("must be real number, not {}", arg->type_name());
        std::snprintf(buf, sizeof buf, (spec + conv).c_str(), arg->as_double());
        out += buf;
        break;
      }
      case 'c': {
        if (arg->is_string()) {
          out += arg->as_string();
        } else {
          append_utf8_escaped(out, static_cast<char32_t>(arg->as_int()));
        }
        break;
      }
      default:
        fail("unsupported format character '{}'", conv);
    }
  }
  if (!named && next_arg < positional.size()) fail("not all arguments converted during string formatting");
  return out;
}

// str.format with `{}`, `{0}`, `{name}` fields and `{{`/`}}` escapes (no format specs beyond none).
std::string brace_format(const std::string& fmt, const CallArgs& args) {
  std::string out;
  size_t auto_index = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    char c = fmt[i];
    if (c == '{') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '{') {
        out += '{';
        ++i;
        continue;
      }
      size_t close = fmt.find('}', i);
      if (close == std::string::npos) fail("Single '{{' encountered in format string");
      std::string field = fmt.substr(i + 1, close - i - 1);
      std::string spec;
      size_t colon = field.find(':');
      if (colon != std::string::npos) {
        spec = field.substr(colon + 1);
        field = field.substr(0, colon);
      }
      bool repr = false;
      if (field.size() >= 2 && field[field.size() - 2] == '!') {
        repr = field.back() == 'r';
        field.resize(field.size() - 2);
      }
      const Value* v = nullptr;
      if (field.empty()) {
        if (auto_index >= args.positional.size()) fail("Replacement index {} out of range", auto_index);
        v = &args.positional[auto_index++];
      } else if (std::all_of(field.begin(), field.end(),
                             [](char d) { return std::isdigit(static_cast<unsigned char>(d)); })) {
        size_t k = std::stoul(field);
        if (k >= args.positional.size()) fail("Replacement index {} out of range", k);
        v = &args.positional[k];
      } else {
        v = args.kwarg(field);
        if (!v) fail("KeyError: '{}'", field);
      }
      if (!spec.empty()) fail("format spec '{}' is not supported in str.format", spec);
      out += repr ? v->repr() : v->str();
      i = close;
    } else if (c == '}') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}') ++i;
      out += '}';
    } else {
      out += c;
    }
  }
  return out;
}

const Value* arg_at(const CallArgs& args, size_t index, const char* name) {
  if (const Value* k = args.kwarg(name)) return k;
  if (index < args.positional.size()) return &args.positional[index];
  return nullptr;
}

int64_t int_arg(const CallArgs& args, size_t index, const char* name, int64_t dflt) {
  const Value* v = arg_at(args, index, name);
  if (!v || v->is_none()) return dflt;
  if (!is_int_like(*v)) fail("argument '{}' must be an integer, not {}", name, v->type_name());
  return v->as_int();
}

bool bool_arg(const CallArgs& args, size_t index, const char* name, bool dflt) {
  const Value* v = arg_at(args, index, name);
  return v ? v->truthy() : dflt;
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// Python's float(str).
std::optional<double> parse_float(const std::string& text) {
  std::string s = str_strip(text, nullptr, true, true);
  std::string cleaned;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '_' && i > 0 && i + 1 < s.size() && std::isdigit(static_cast<unsigned char>(s[i - 1])) &&
        std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      continue;
    }
    cleaned += s[i];
  }
  if (cleaned.empty()) return std::nullopt;
  std::string lower = str_lower(cleaned);
  std::string body = lower[0] == '+' || lower[0] == '-' ? lower.substr(1) : lower;
  double sign = lower[0] == '-' ? -1.0 : 1.0;
  if (body == "inf" || body == "infinity") return sign * INFINITY;
  if (body == "nan") return NAN;
  for (char c : body) {
    if (!(std::isdigit(static_cast<unsigned char>(c)) || c == '.' || c == 'e' || c == '+' || c == '-'))
      return std::nullopt;
  }
  char* end = nullptr;
  double d = std::strtod(cleaned.c_str(), &end);
  if (end != cleaned.c_str() + cleaned.size()) return std::nullopt;
  return d;
}

// Python's int(str) in base 10.
std::optional<int64_t> parse_int(const std::string& text) {
  std::string s = str_strip(text, nullptr, true, true);
  if (s.empty()) return std::nullopt;
  size_t i = 0;
  bool neg = false;
  if (s[0] == '+' || s[0] == '-') {
    neg = s[0] == '-';
    i = 1;
  }
  if (i >= s.size()) return std::nullopt;
  int64_t v = 0;
  bool prev_digit = false;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (c == '_') {
      if (!prev_digit || i + 1 >= s.size() || !std::isdigit(static_cast<unsigned char>(s[i + 1]))) return std::nullopt;
      prev_digit = false;
      continue;
    }
    if (!std::isdigit(static_cast<unsigned char>(c))) return std::nullopt;
    if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, c - '0', &v)) return std::nullopt;
    prev_digit = true;
  }
  return neg ? -v : v;
}

// Python `<` for sortable values.
bool less_than(const Value& a, const Value& b) { return compare("<", a, b); }

Value sort_key(const Value& v, bool case_sensitive) {
  if (!case_sensitive && v.is_string()) return Value::string(str_lower(v.as_string()));
  return v;
}

// Jinja's make_attrgetter: dotted path, integer parts index lists.
Value attr_path(const Value& item, const std::string& path) {
  Value cur = item;
  size_t start = 0;
  while (true) {
    size_t dot = path.find('.', start);
    std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(),
                                               [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
    cur = get_item(cur, digits ? Value::integer(std::stoll(part)) : Value::string(part));
    if (dot == std::string::npos) return cur;
    start = dot + 1;
  }
}

Value make_method(const Value& obj, const std::string& name);

const char* const kStringMethods[] = {
    "split",    "rsplit",    "strip",     "lstrip",       "rstrip",       "startswith", "endswith",
    "replace",  "upper",     "lower",     "title",        "capitalize",   "find",       "rfind",
    "index",    "rindex",    "count",     "join",         "format",       "isdigit",    "isalpha",
    "isalnum",  "isspace",   "isupper",   "islower",      "splitlines",   "swapcase",   "zfill",
    "center",   "ljust",     "rjust",     "removeprefix", "removesuffix", "partition",  "rpartition",
    "casefold", "isnumeric", "isdecimal", "istitle",      "encode",       "expandtabs"};
const char* const kDictMethods[] = {"get",     "items",  "keys",       "values", "copy",    "pop",
                                    "popitem", "update", "setdefault", "clear",  "fromkeys"};
const char* const kListMethods[] = {"index", "count",  "copy",    "append", "extend", "insert",
                                    "pop",   "remove", "reverse", "sort",   "clear"};

template <size_t N>
bool in_list(const char* const (&names)[N], const std::string& name) {
  for (const char* n : names) {
    if (name == n) return true;
  }
  return false;
}

ValueList items_of(const Dict& d) {
  ValueList out;
  for (const auto& [k, v] : d.items) out.push_back(Value::list({Value::string(k), v}, true));
  return out;
}

int64_t find_sub(const std::string& s, const std::string& sub, const CallArgs& args, bool reverse) {
  std::u32string u = cps(s);
  std::u32string su = cps(sub);
  int64_t start = 0, stop = 0, step = 1;
  slice_indices(static_cast<int64_t>(u.size()), args.positional.size() > 1 ? args.positional[1] : Value::none(),
                args.positional.size() > 2 ? args.positional[2] : Value::none(), Value::none(), start, stop, step);
  if (stop < start) return -1;
  std::u32string window = u.substr(start, stop - start);
  size_t p = reverse ? window.rfind(su) : window.find(su);
  return p == std::u32string::npos ? -1 : static_cast<int64_t>(p) + start;
}

Value call_string_method(const std::string& s, const std::string& name, CallArgs& args) {
  const BuiltinLimits limits;
  auto need = [&](size_t n) {
    if (args.positional.size() < n) fail("str.{}() takes at least {} argument(s)", name, n);
  };
  auto str_arg = [&](size_t i) -> const std::string& {
    need(i + 1);
    if (!args.positional[i].is_string())
      fail("str.{}() argument must be str, not {}", name, args.positional[i].type_name());
    return args.positional[i].as_string();
  };
  if (name == "split" || name == "rsplit") {
    const Value* sep = arg_at(args, 0, "sep");
    int64_t maxsplit = int_arg(args, 1, "maxsplit", -1);
    return Value::list(str_split(s, sep, maxsplit, name == "rsplit"));
  }
  if (name == "strip") return Value::string(str_strip(s, arg_at(args, 0, "chars"), true, true));
  if (name == "lstrip") return Value::string(str_strip(s, arg_at(args, 0, "chars"), true, false));
  if (name == "rstrip") return Value::string(str_strip(s, arg_at(args, 0, "chars"), false, true));
  if (name == "startswith" || name == "endswith") {
    need(1);
    std::u32string u = cps(s);
    int64_t start = 0, stop = 0, step = 1;
    slice_indices(static_cast<int64_t>(u.size()), args.positional.size() > 1 ? args.positional[1] : Value::none(),
                  args.positional.size() > 2 ? args.positional[2] : Value::none(), Value::none(), start, stop, step);
    std::u32string window = stop >= start ? u.substr(start, stop - start) : std::u32string();
    if (stop < start && !(args.positional.size() > 1)) window.clear();
    ValueList candidates;
    if (args.positional[0].is_tuple()) {
      candidates = args.positional[0].as_list();
    } else {
      candidates.push_back(args.positional[0]);
    }
    for (const auto& c : candidates) {
      if (!c.is_string()) fail("{} first arg must be str or a tuple of str, not {}", name, c.type_name());
      std::u32string p = cps(c.as_string());
      if (p.size() > window.size()) continue;
      if (name == "startswith" ? window.compare(0, p.size(), p) == 0
                               : window.compare(window.size() - p.size(), p.size(), p) == 0) {
        if (stop >= start || p.empty()) return Value::boolean(true);
      }
    }
    return Value::boolean(false);
  }
  if (name == "replace") {
    int64_t count = args.positional.size() > 2 ? int_arg(args, 2, "count", -1) : -1;
    return Value::string(str_replace(s, str_arg(0), str_arg(1), count, limits));
  }
  if (name == "upper") return Value::string(str_upper(s));
  if (name == "lower" || name == "casefold") return Value::string(str_lower(s));
  if (name == "title") return Value::string(str_title(s));
  if (name == "capitalize") return Value::string(str_capitalize(s));
  if (name == "swapcase") {
    std::string out;
    for (char32_t c : cps(s)) append_utf8_escaped(out, to_upper(c) != c ? to_upper(c) : to_lower(c));
    return Value::string(out);
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex") {
    int64_t r = find_sub(s, str_arg(0), args, name[0] == 'r');
    if (r < 0 && (name == "index" || name == "rindex")) fail("substring not found");
    return Value::integer(r);
  }
  if (name == "count") {
    const std::string& sub = str_arg(0);
    if (sub.empty()) return Value::integer(static_cast<int64_t>(cps(s).size()) + 1);
    int64_t n = 0;
    for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
    return Value::integer(n);
  }
  if (name == "join") {
    need(1);
    std::string out;
    bool first = true;
    for (const auto& item : iterate(args.positional[0])) {
      if (!item.is_string()) fail("sequence item: expected str instance, {} found", item.type_name());
      if (!first) out += s;
      first = false;
      out += item.as_string();
      if (out.size() > limits.max_bytes) fail("string result too large");
    }
    return Value::string(out);
  }
  if (name == "format") return Value::string(brace_format(s, args));
  if (name == "isdigit" || name == "isnumeric" || name == "isdecimal") {
    std::u32string u = cps(s);
    return Value::boolean(!u.empty() &&
                          std::all_of(u.begin(), u.end(), [](char32_t c) { return c >= '0' && c <= '9'; }));
  }
  if (name == "isalpha") {
    std::u32string u = cps(s);
    return Value::boolean(!u.empty() && std::all_of(u.begin(), u.end(), is_letter));
  }
  if (name == "isalnum") {
    std::u32string u = cps(s);
    return Value::boolean(!u.empty() && std::all_of(u.begin(), u.end(),
                                                    [](char32_t c) { return is_letter(c) || (c >= '0' && c <= '9'); }));
  }
  if (name == "isspace") {
    std::u32string u = cps(s);
    return Value::boolean(!u.empty() && std::all_of(u.begin(), u.end(), is_py_space));
  }
  if (name == "isupper" || name == "islower") {
    bool any_cased = false;
    for (char32_t c : cps(s)) {
      if (!is_cased(c)) continue;
      any_cased = true;
      if (name == "isupper" ? to_upper(c) != c : to_lower(c) != c) return Value::boolean(false);
    }
    return Value::boolean(any_cased);
  }
  if (name == "istitle") return Value::boolean(!s.empty() && str_title(s) == s);
  if (name == "splitlines") {
    ValueList lines;
    std::u32string u = cps(s);
    bool keepends = bool_arg(args, 0, "keepends", false);
    size_t start = 0;
    for (size_t i = 0; i < u.size(); ++i) {
      char32_t c = u[i];
      bool br = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D || c == 0x1E || c == 0x85 ||
                c == 0x2028 || c == 0x2029;
      if (!br) continue;
      size_t end = i;
      if (c == '\r' && i + 1 < u.size() && u[i + 1] == '\n') ++i;
      lines.push_back(Value::string(u32_to_utf8(u.substr(start, (keepends ? i + 1 : end) - start))));
      start = i + 1;
    }
    if (start < u.size()) lines.push_back(Value::string(u32_to_utf8(u.substr(start))));
    return Value::list(std::move(lines));
  }
  if (name == "zfill" || name == "center" || name == "ljust" || name == "rjust") {
    int64_t width = int_arg(args, 0, "width", 0);
    if (width > static_cast<int64_t>(limits.max_bytes)) fail("string result too large");
    std::u32string u = cps(s);
    int64_t pad = width - static_cast<int64_t>(u.size());
    if (pad <= 0) return Value::string(s);
    std::string fill = name == "zfill" ? "0" : " ";
    if (name != "zfill" && args.positional.size() > 1) fill = str_arg(1);
    auto rep = [&](int64_t n) {
      std::string r;
      for (int64_t i = 0; i < n; ++i) r += fill;
      return r;
    };
    if (name == "ljust") return Value::string(s + rep(pad));
    if (name == "rjust") return Value::string(rep(pad) + s);
    if (name == "zfill") {
      if (!u.empty() && (u[0] == '+' || u[0] == '-')) return Value::string(s.substr(0, 1) + rep(pad) + s.substr(1));
      return Value::string(rep(pad) + s);
    }
    int64_t left = pad / 2 + (pad & width & 1);
    return Value::string(rep(left) + s + rep(pad - left));
  }
  if (name == "removeprefix") {
    const std::string& p = str_arg(0);
    return Value::string(s.compare(0, p.size(), p) == 0 ? s.substr(p.size()) : s);
  }
  if (name == "removesuffix") {
    const std::string& p = str_arg(0);
    return Value::string(!p.empty() && s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0
                             ? s.substr(0, s.size() - p.size())
                             : s);
  }
  if (name == "partition" || name == "rpartition") {
    const std::string& sep = str_arg(0);
    if (sep.empty()) fail("empty separator");
    size_t p = name == "partition" ? s.find(sep) : s.rfind(sep);
    if (p == std::string::npos) {
      return name == "partition" ? Value::list({Value::string(s), Value::string(""), Value::string("")}, true)
                                 : Value::list({Value::string(""), Value::string(""), Value::string(s)}, true);
    }
    return Value::list({Value::string(s.substr(0, p)), Value::string(sep), Value::string(s.substr(p + sep.size()))},
                       true);
  }
  fail("str.{}() is not supported", name);
}

Value call_dict_method(const Value& obj, const std::string& name, CallArgs& args) {
  const Dict& d = obj.as_dict();
  if (name == "get") {
    if (args.positional.empty()) fail("get expected at least 1 argument, got 0");
    const Value& key = args.positional[0];
    if (key.is_string()) {
      if (const Value* v = d.find(key.as_string())) return *v;
    }
    return args.positional.size() > 1 ? args.positional[1] : Value::none();
  }
  if (name == "items") return Value::list(items_of(d));
  if (name == "keys") {
    ValueList keys;
    for (const auto& [k, v] : d.items) keys.push_back(Value::string(k));
    return Value::list(std::move(keys));
  }
  if (name == "values") {
    ValueList values;
    for (const auto& [k, v] : d.items) values.push_back(v);
    return Value::list(std::move(values));
  }
  if (name == "copy") return Value::dict(d);
  fail("access to the mutating method dict.{}() is not allowed in the immutable sandbox", name);
}

Value call_list_method(const Value& obj, const std::string& name, CallArgs& args) {
  const ValueList& l = obj.as_list();
  if (name == "index" || name == "count") {
    if (args.positional.empty()) fail("list.{}() takes exactly one argument", name);
    int64_t n = 0;
    for (size_t i = 0; i < l.size(); ++i) {
      if (l[i].equals(args.positional[0])) {
        if (name == "index") return Value::integer(static_cast<int64_t>(i));
        ++n;
      }
    }
    if (name == "index") fail("{} is not in list", args.positional[0].repr());
    return Value::integer(n);
  }
  if (name == "copy") return Value::list(l);
  fail("access to the mutating method list.{}() is not allowed in the immutable sandbox", name);
}

Value make_method(const Value& obj, const std::string& name) {
  return Value::function(obj.type_name() + "." + name, [obj, name](CallArgs& args) -> Value {
    if (obj.is_string()) return call_string_method(obj.as_string(), name, args);
    if (obj.is_dict()) return call_dict_method(obj, name, args);
    return call_list_method(obj, name, args);
  });
}

std::string object_name(const Value& obj) {
  if (obj.is_none()) return "'None'";
  return "'" + obj.type_name() + " object'";
}

}  // namespace

void require_defined(const Value& v) {
  if (v.is_undefined()) fail("{}", v.undefined_hint().empty() ? std::string("value is undefined") : v.undefined_hint());
}

Value get_attribute(const Value& obj, const std::string& name) {
  require_defined(obj);
  switch (obj.kind()) {
    case Value::Kind::Dict:
      if (in_list(kDictMethods, name)) return make_method(obj, name);
      if (const Value* v = obj.as_dict().find(name)) return *v;
      break;
    case Value::Kind::Namespace:
      if (const Value* v = obj.namespace_dict().find(name)) return *v;
      return Value::undefined("'jinja2.utils.Namespace object' has no attribute '" + name + "'");
    case Value::Kind::String:
      if (in_list(kStringMethods, name)) return make_method(obj, name);
      break;
    case Value::Kind::List:
      if (in_list(kListMethods, name)) return make_method(obj, name);
      break;
    default:
      break;
  }
  return Value::undefined(object_name(obj) + " has no attribute '" + name + "'");
}

Value get_item(const Value& obj, const Value& key) {
  require_defined(obj);
  switch (obj.kind()) {
    case Value::Kind::Dict:
      if (key.is_string()) {
        if (const Value* v = obj.as_dict().find(key.as_string())) return *v;
      }
      break;
    case Value::Kind::List:
      if (is_int_like(key)) {
        int64_t n = static_cast<int64_t>(obj.as_list().size());
        int64_t i = key.as_int();
        if (i < 0) i += n;
        if (i >= 0 && i < n) return obj.as_list()[i];
      }
      break;
    case Value::Kind::String:
      if (is_int_like(key)) {
        std::u32string u = cps(obj.as_string());
        int64_t n = static_cast<int64_t>(u.size());
        int64_t i = key.as_int();
        if (i < 0) i += n;
        if (i >= 0 && i < n) {
          std::string out;
          append_utf8_escaped(out, u[i]);
          return Value::string(out);
        }
      }
      break;
    default:
      break;
  }
  if (key.is_string()) {
    Value attr = get_attribute(obj, key.as_string());
    if (!attr.is_undefined()) return attr;
    return Value::undefined(object_name(obj) + " has no attribute '" + key.as_string() + "'");
  }
  return Value::undefined(object_name(obj) + " has no attribute " + key.repr());
}

Value slice_value(const Value& obj, const Value& start_v, const Value& stop_v, const Value& step_v) {
  require_defined(obj);
  if (!obj.is_string() && !obj.is_list()) return Value::undefined(object_name(obj) + " is not subscriptable");
  int64_t start, stop, step;
  if (obj.is_string()) {
    std::u32string u = cps(obj.as_string());
    slice_indices(static_cast<int64_t>(u.size()), start_v, stop_v, step_v, start, stop, step);
    std::u32string out;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(u[i]);
    return Value::string(u32_to_utf8(out));
  }
  const ValueList& l = obj.as_list();
  slice_indices(static_cast<int64_t>(l.size()), start_v, stop_v, step_v, start, stop, step);
  ValueList out;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(l[i]);
  return Value::list(std::move(out), obj.is_tuple());
}

ValueList iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return {};
    case Value::Kind::List:
      return v.as_list();
    case Value::Kind::Dict: {
      ValueList keys;
      for (const auto& [k, x] : v.as_dict().items) keys.push_back(Value::string(k));
      return keys;
    }
    case Value::Kind::String: {
      ValueList chars;
      for (char32_t c : cps(v.as_string())) {
        std::string s;
        append_utf8_escaped(s, c);
        chars.push_back(Value::string(std::move(s)));
      }
      return chars;
    }
    default:
      fail("'{}' object is not iterable", v.type_name());
  }
}

Value negate(const Value& v) {
  require_defined(v);
  if (v.is_float()) return Value::floating(-v.as_double());
  if (is_int_like(v)) {
    return Value::integer(sub_checked(0, v.as_int()));
  }
  fail("bad operand type for unary -: '{}'", v.type_name());
}

Value binary_op(const std::string& op, const Value& a, const Value& b, const BuiltinLimits& limits) {
  if (op == "~") {
    std::string s = a.str() + b.str();
    if (s.size() > limits.max_bytes) fail("string result too large");
    return Value::string(std::move(s));
  }
  require_defined(a);
  require_defined(b);
  auto type_error = [&]() {
    fail("unsupported operand type(s) for {}: '{}' and '{}'", op, a.type_name(), b.type_name());
  };
  const bool ints = is_int_like(a) && is_int_like(b);
  const bool nums = a.is_number() && b.is_number();
  if (op == "+") {
    if (ints) {
      return Value::integer(add_checked(a.as_int(), b.as_int()));
    }
    if (nums) return Value::floating(a.as_double() + b.as_double());
    if (a.is_string() && b.is_string()) {
      if (a.as_string().size() + b.as_string().size() > limits.max_bytes) fail("string result too large");
      return Value::string(a.as_string() + b.as_string());
    }
    if (a.is_list() && b.is_list() && a.is_tuple() == b.is_tuple()) {
      ValueList out = a.as_list();
      out.insert(out.end(), b.as_list().begin(), b.as_list().end());
      return Value::list(std::move(out), a.is_tuple());
    }
    if (a.is_string() || b.is_string()) {
      if (a.is_string()) fail("can only concatenate str (not \"{}\") to str", b.type_name());
    }
    type_error();
  }
  if (op == "-") {
    if (ints) {
      return Value::integer(sub_checked(a.as_int(), b.as_int()));
    }
    if (nums) return Value::floating(a.as_double() - b.as_double());
    type_error();
  }
  if (op == "*") {
    if (ints) {
      return Value::integer(mul_checked(a.as_int(), b.as_int()));
    }
    if (nums) return Value::floating(a.as_double() * b.as_double());
    const Value* seq = (a.is_string() || a.is_list()) && is_int_like(b)   ? &a
                       : (b.is_string() || b.is_list()) && is_int_like(a) ? &b
                                                                          : nullptr;
    if (!seq) type_error();
    int64_t n = std::max<int64_t>(0, (seq == &a ? b : a).as_int());
    if (seq->is_string()) {
      if (n > 0 && seq->as_string().size() > limits.max_bytes / static_cast<uint64_t>(n))
        fail("string result too large");
      std::string out;
      for (int64_t i = 0; i < n; ++i) out += seq->as_string();
      return Value::string(std::move(out));
    }
    if (n > 0 && seq->as_list().size() > (limits.max_bytes / 64) / static_cast<uint64_t>(n))
      fail("list result too large");
    ValueList out;
    for (int64_t i = 0; i < n; ++i) out.insert(out.end(), seq->as_list().begin(), seq->as_list().end());
    return Value::list(std::move(out), seq->is_tuple());
  }
  if (op == "/") {
    if (!nums) type_error();
    if (b.as_double() == 0) fail("division by zero");
    return Value::floating(a.as_double() / b.as_double());
  }
  if (op == "//") {
    if (!nums) type_error();
    if (ints) {
      if (b.as_int() == 0) fail("integer division or modulo by zero");
      int64_t x = a.as_int(), y = b.as_int();
      if (x == INT64_MIN && y == -1) fail("integer overflow (integers beyond 64 bits are not supported)");
      int64_t q = x / y;
      if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
      return Value::integer(q);
    }
    if (b.as_double() == 0) fail("float floor division by zero");
    return Value::floating(std::floor(a.as_double() / b.as_double()));
  }
  if (op == "%") {
    if (a.is_string()) return Value::string(percent_format(a.as_string(), b));
    if (!nums) type_error();
    if (ints) {
      if (b.as_int() == 0) fail("integer division or modulo by zero");
      int64_t x = a.as_int(), y = b.as_int();
      if (y == -1) return Value::integer(0);
      int64_t m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) m += y;
      return Value::integer(m);
    }
    if (b.as_double() == 0) fail("float modulo");
    return Value::floating(py_floor_mod(a.as_double(), b.as_double()));
  }
  if (op == "**") {
    if (!nums) type_error();
    if (ints && b.as_int() >= 0) {
      int64_t base = a.as_int(), e = b.as_int(), r = 1;
      while (e > 0) {
        if (e & 1) r = mul_checked(r, base);
        e >>= 1;
        if (e > 0) base = mul_checked(base, base);
      }
      return Value::integer(r);
    }
    if (a.as_double() == 0 && b.as_double() < 0) fail("0.0 cannot be raised to a negative power");
    return Value::floating(std::pow(a.as_double(), b.as_double()));
  }
  fail("unknown operator {}", op);
}

bool compare(const std::string& op, const Value& a, const Value& b) {
  NestingGuard guard;
  if (op == "==") return a.equals(b);
  if (op == "!=") return !a.equals(b);
  if (op == "in") return contains(b, a);
  if (op == "notin") return !contains(b, a);
  require_defined(a);
  require_defined(b);
  int c = 0;
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) {
      double x = a.as_double(), y = b.as_double();
      if (std::isnan(x) || std::isnan(y)) return false;
      c = x < y ? -1 : x > y ? 1 : 0;
    } else {
      c = a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
    }
  } else if (a.is_string() && b.is_string()) {
    int r = a.as_string().compare(b.as_string());
    c = r < 0 ? -1 : r > 0 ? 1 : 0;
  } else if (a.is_list() && b.is_list() && a.is_tuple() == b.is_tuple()) {
    const auto& x = a.as_list();
    const auto& y = b.as_list();
    size_t i = 0;
    while (i < x.size() && i < y.size() && x[i].equals(y[i])) ++i;
    if (i < x.size() && i < y.size()) {
      c = compare("<", x[i], y[i]) ? -1 : 1;
    } else {
      c = x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
    }
  } else {
    fail("'{}' not supported between instances of '{}' and '{}'", op, a.type_name(), b.type_name());
  }
  if (op == "<") return c < 0;
  if (op == "<=") return c <= 0;
  if (op == ">") return c > 0;
  if (op == ">=") return c >= 0;
  fail("unknown comparison {}", op);
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::Undefined:
      return false;
    case Value::Kind::String:
      if (!item.is_string()) fail("'in <string>' requires string as left operand, not {}", item.type_name());
      return container.as_string().find(item.as_string()) != std::string::npos;
    case Value::Kind::List:
      for (const auto& e : container.as_list()) {
        if (e.equals(item)) return true;
      }
      return false;
    case Value::Kind::Dict:
      return item.is_string() && container.as_dict().find(item.as_string()) != nullptr;
    default:
      fail("argument of type '{}' is not iterable", container.type_name());
  }
}

Value apply_filter(const std::string& name, const Value& v, CallArgs& args, const BuiltinLimits& limits) {
  auto positional = [&](size_t i) -> const Value* {
    return i < args.positional.size() ? &args.positional[i] : nullptr;
  };
  if (name == "default" || name == "d") {
    const Value* dflt = arg_at(args, 0, "default_value");
    bool boolean = bool_arg(args, 1, "boolean", false);
    if (v.is_undefined() || (boolean && !v.truthy())) return dflt ? *dflt : Value::string("");
    return v;
  }
  if (name == "length" || name == "count") return Value::integer(python_len(v));
  if (name == "string") return Value::string(v.str());
  if (name == "safe") return Value::string(v.str());
  if (name == "escape" || name == "e" || name == "forceescape") return Value::string(html_escape(v.str()));
  if (name == "tojson") {
    JsonDumpOptions o;
    const Value* ensure_ascii = arg_at(args, 0, "ensure_ascii");
    o.ensure_ascii = ensure_ascii && ensure_ascii->truthy();
    const Value* indent = arg_at(args, 1, "indent");
    if (indent && !indent->is_none()) {
      o.has_indent = true;
      if (indent->is_string()) {
        o.indent = indent->as_string();
      } else if (is_int_like(*indent)) {
        o.indent = std::string(static_cast<size_t>(std::clamp<int64_t>(indent->as_int(), 0, 1024)), ' ');
      } else {
        fail("tojson: indent must be an integer or a string");
      }
      o.item_separator = ",";
    }
    const Value* separators = arg_at(args, 2, "separators");
    if (separators && !separators->is_none()) {
      if (!separators->is_list() || separators->as_list().size() != 2 || !separators->as_list()[0].is_string() ||
          !separators->as_list()[1].is_string()) {
        fail("tojson: separators must be a pair of strings");
      }
      o.item_separator = separators->as_list()[0].as_string();
      o.key_separator = separators->as_list()[1].as_string();
    }
    o.sort_keys = bool_arg(args, 3, "sort_keys", false);
    return Value::string(json_dumps(v, o));
  }
  if (name == "trim") return Value::string(str_strip(v.str(), arg_at(args, 0, "chars"), true, true));
  if (name == "upper") return Value::string(str_upper(v.str()));
  if (name == "lower") return Value::string(str_lower(v.str()));
  if (name == "capitalize") return Value::string(str_capitalize(v.str()));
  if (name == "title") {
    // Jinja2's title: words begin after '-', whitespace and opening brackets.
    std::string out;
    bool word_start = true;
    for (char32_t c : cps(v.str())) {
      bool sep = c == '-' || is_py_space(c) || c == '(' || c == '{' || c == '[' || c == '<';
      if (sep) {
        append_utf8_escaped(out, c);
        word_start = true;
      } else {
        append_utf8_escaped(out, word_start ? to_upper(c) : to_lower(c));
        word_start = false;
      }
    }
    return Value::string(out);
  }
  if (name == "replace") {
    const Value* old = positional(0);
    const Value* repl = positional(1);
    if (!old || !repl) fail("replace filter needs two arguments");
    int64_t count = int_arg(args, 2, "count", -1);
    return Value::string(str_replace(v.str(), old->str(), repl->str(), count, limits));
  }
  if (name == "first" || name == "last") {
    ValueList items = iterate(v);
    if (items.empty()) return Value::undefined(std::string("No ") + name + " item, sequence was empty.");
    return name == "first" ? items.front() : items.back();
  }
  if (name == "join") {
    const Value* sep = arg_at(args, 0, "d");
    const Value* attribute = arg_at(args, 1, "attribute");
    std::string out;
    bool first = true;
    for (const auto& item : iterate(v)) {
      if (!first && sep) out += sep->str();
      first = false;
      out += attribute ? attr_path(item, attribute->str()).str() : item.str();
      if (out.size() > limits.max_bytes) fail("string result too large");
    }
    return Value::string(out);
  }
  if (name == "list") return Value::list(iterate(v));
  if (name == "items") {
    if (v.is_undefined()) return Value::list({});
    if (!v.is_dict()) fail("Can only get item pairs from a mapping.");
    return Value::list(items_of(v.as_dict()));
  }
  if (name == "int") {
    int64_t dflt = int_arg(args, 0, "default", 0);
    if (is_int_like(v)) return Value::integer(v.as_int());
    if (v.is_float()) {
      double d = v.as_double();
      if (!std::isfinite(d) || std::fabs(d) >= 9.2e18) return Value::integer(dflt);
      return Value::integer(static_cast<int64_t>(d));
    }
    if (v.is_string()) {
      if (auto i = parse_int(v.as_string())) return Value::integer(*i);
      if (auto f = parse_float(v.as_string()); f && std::isfinite(*f) && std::fabs(*f) < 9.2e18) {
        return Value::integer(static_cast<int64_t>(*f));
      }
    }
    return Value::integer(dflt);
  }
  if (name == "float") {
    const Value* dflt = arg_at(args, 0, "default");
    if (v.is_number()) return Value::floating(v.as_double());
    if (v.is_string()) {
      if (auto f = parse_float(v.as_string())) return Value::floating(*f);
    }
    return dflt ? *dflt : Value::floating(0.0);
  }
  if (name == "abs") {
    if (v.is_float()) return Value::floating(std::fabs(v.as_double()));
    if (is_int_like(v)) return v.as_int() < 0 ? negate(v) : Value::integer(v.as_int());
    fail("bad operand type for abs(): '{}'", v.type_name());
  }
  if (name == "round") {
    int64_t precision = int_arg(args, 0, "precision", 0);
    std::string method = arg_at(args, 1, "method") ? arg_at(args, 1, "method")->str() : "common";
    if (!v.is_number()) fail("round filter needs a number");
    double scale = std::pow(10.0, static_cast<double>(precision));
    double x = v.as_double() * scale;
    double r;
    if (method == "common") {
      if (is_int_like(v)) return Value::integer(v.as_int());
      r = std::nearbyint(x);  // Python round(): half to even
    } else if (method == "ceil") {
      r = std::ceil(x);
    } else if (method == "floor") {
      r = std::floor(x);
    } else {
      fail("method must be 'common', 'ceil' or 'floor'");
    }
    return Value::floating(r / scale);
  }
  if (name == "reverse") {
    if (v.is_string()) {
      std::u32string u = cps(v.as_string());
      std::reverse(u.begin(), u.end());
      return Value::string(u32_to_utf8(u));
    }
    ValueList items = iterate(v);
    std::reverse(items.begin(), items.end());
    return Value::list(std::move(items));
  }
  if (name == "sort") {
    bool reverse = bool_arg(args, 0, "reverse", false);
    bool case_sensitive = bool_arg(args, 1, "case_sensitive", false);
    const Value* attribute = arg_at(args, 2, "attribute");
    ValueList items = iterate(v);
    auto key = [&](const Value& x) { return sort_key(attribute ? attr_path(x, attribute->str()) : x, case_sensitive); };
    std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
      return reverse ? less_than(key(b), key(a)) : less_than(key(a), key(b));
    });
    return Value::list(std::move(items));
  }
  if (name == "dictsort") {
    if (!v.is_dict()) fail("dictsort expects a mapping");
    bool case_sensitive = bool_arg(args, 0, "case_sensitive", false);
    std::string by = arg_at(args, 1, "by") ? arg_at(args, 1, "by")->str() : "key";
    bool reverse = bool_arg(args, 2, "reverse", false);
    if (by != "key" && by != "value") fail("You can only sort by either \"key\" or \"value\"");
    ValueList items = items_of(v.as_dict());
    auto key = [&](const Value& x) { return sort_key(x.as_list()[by == "key" ? 0 : 1], case_sensitive); };
    std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
      return reverse ? less_than(key(b), key(a)) : less_than(key(a), key(b));
    });
    return Value::list(std::move(items));
  }
  if (name == "unique") {
    bool case_sensitive = bool_arg(args, 0, "case_sensitive", false);
    const Value* attribute = arg_at(args, 1, "attribute");
    ValueList out, seen;
    for (const auto& item : iterate(v)) {
      Value k = sort_key(attribute ? attr_path(item, attribute->str()) : item, case_sensitive);
      if (std::none_of(seen.begin(), seen.end(), [&](const Value& s) { return s.equals(k); })) {
        seen.push_back(k);
        out.push_back(item);
      }
    }
    return Value::list(std::move(out));
  }
  if (name == "min" || name == "max") {
    bool case_sensitive = bool_arg(args, 0, "case_sensitive", false);
    const Value* attribute = arg_at(args, 1, "attribute");
    ValueList items = iterate(v);
    if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
    auto key = [&](const Value& x) { return sort_key(attribute ? attr_path(x, attribute->str()) : x, case_sensitive); };
    Value best = items[0];
    for (size_t i = 1; i < items.size(); ++i) {
      if (name == "min" ? less_than(key(items[i]), key(best)) : less_than(key(best), key(items[i]))) best = items[i];
    }
    return best;
  }
  if (name == "sum") {
    const Value* attribute = arg_at(args, 0, "attribute");
    const Value* start = arg_at(args, 1, "start");
    Value total = start ? *start : Value::integer(0);
    for (const auto& item : iterate(v))
      total = binary_op("+", total, attribute ? attr_path(item, attribute->str()) : item, limits);
    return total;
  }
  if (name == "map") {
    ValueList out;
    const Value* attribute = args.kwarg("attribute");
    if (attribute) {
      const Value* dflt = args.kwarg("default");
      for (const auto& item : iterate(v)) {
        Value x = attr_path(item, attribute->str());
        out.push_back(x.is_undefined() && dflt ? *dflt : x);
      }
      return Value::list(std::move(out));
    }
    if (args.positional.empty()) fail("map requires a filter argument");
    std::string filter = args.positional[0].str();
    CallArgs rest;
    rest.positional.assign(args.positional.begin() + 1, args.positional.end());
    rest.keyword = args.keyword;
    for (const auto& item : iterate(v)) out.push_back(apply_filter(filter, item, rest, limits));
    return Value::list(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    bool attr_mode = name == "selectattr" || name == "rejectattr";
    bool want = name == "select" || name == "selectattr";
    size_t first = 0;
    std::string attribute;
    if (attr_mode) {
      if (args.positional.empty()) fail("{} requires an attribute name", name);
      attribute = args.positional[0].str();
      first = 1;
    }
    std::string test;
    CallArgs rest;
    if (args.positional.size() > first) {
      test = args.positional[first].str();
      rest.positional.assign(args.positional.begin() + static_cast<long>(first) + 1, args.positional.end());
      rest.keyword = args.keyword;
    }
    ValueList out;
    for (const auto& item : iterate(v)) {
      Value x = attr_mode ? attr_path(item, attribute) : item;
      bool ok = test.empty() ? x.truthy() : apply_test(test, x, rest);
      if (ok == want) out.push_back(item);
    }
    return Value::list(std::move(out));
  }
  if (name == "attr") {
    if (args.positional.empty()) fail("attr requires a name");
    return get_attribute(v, args.positional[0].str());
  }
  if (name == "indent") {
    const Value* width = arg_at(args, 0, "width");
    std::string indention =
        width && width->is_string()
            ? width->as_string()
            : std::string(static_cast<size_t>(std::clamp<int64_t>(width ? width->as_int() : 4, 0, 1024)), ' ');
    bool first = bool_arg(args, 1, "first", false);
    bool blank = bool_arg(args, 2, "blank", false);
    CallArgs none;
    ValueList lines = call_string_method(v.str() + "\n", "splitlines", none).as_list();
    std::string rv;
    if (blank) {
      for (size_t i = 0; i < lines.size(); ++i) rv += (i ? "\n" + indention : "") + lines[i].as_string();
    } else {
      rv = lines.empty() ? "" : lines[0].as_string();
      for (size_t i = 1; i < lines.size(); ++i) {
        rv += "\n";
        if (!lines[i].as_string().empty()) rv += indention;
        rv += lines[i].as_string();
      }
    }
    if (first) rv = indention + rv;
    return Value::string(rv);
  }
  if (name == "center") {
    CallArgs a;
    a.positional.push_back(Value::integer(int_arg(args, 0, "width", 80)));
    return call_string_method(v.str(), "center", a);
  }
  if (name == "format") {
    if (!args.keyword.empty()) {
      Dict d;
      for (const auto& [k, x] : args.keyword) d.set(k, x);
      return Value::string(percent_format(v.str(), Value::dict(std::move(d))));
    }
    return Value::string(percent_format(v.str(), Value::list(args.positional, true)));
  }
  if (name == "wordcount") {
    int64_t n = 0;
    bool in_word = false;
    for (char32_t c : cps(v.str())) {
      bool w = is_letter(c) || (c >= '0' && c <= '9') || c == '_';
      if (w && !in_word) ++n;
      in_word = w;
    }
    return Value::integer(n);
  }
  if (name == "batch") {
    int64_t size = int_arg(args, 0, "linecount", 1);
    if (size <= 0) fail("batch size must be positive");
    const Value* fill = arg_at(args, 1, "fill_with");
    ValueList out, cur;
    for (const auto& item : iterate(v)) {
      cur.push_back(item);
      if (static_cast<int64_t>(cur.size()) == size) {
        out.push_back(Value::list(std::move(cur)));
        cur.clear();
      }
    }
    if (!cur.empty()) {
      if (fill && !fill->is_none()) {
        while (static_cast<int64_t>(cur.size()) < size) cur.push_back(*fill);
      }
      out.push_back(Value::list(std::move(cur)));
    }
    return Value::list(std::move(out));
  }
  fail("no filter named '{}'", name);
}

bool apply_test(const std::string& name, const Value& v, CallArgs& args) {
  const Value* other = args.positional.empty() ? nullptr : &args.positional[0];
  auto need_other = [&]() -> const Value& {
    if (!other) fail("test '{}' needs an argument", name);
    return *other;
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "number") return v.is_number();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict();
  if (name == "iterable") return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
  if (name == "sequence") return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
  if (name == "callable") return v.is_callable();
  if (name == "escaped") return false;
  if (name == "eq" || name == "equalto" || name == "==") return v.equals(need_other());
  if (name == "ne" || name == "!=") return !v.equals(need_other());
  if (name == "lt" || name == "lessthan" || name == "<") return compare("<", v, need_other());
  if (name == "le" || name == "<=") return compare("<=", v, need_other());
  if (name == "gt" || name == "greaterthan" || name == ">") return compare(">", v, need_other());
  if (name == "ge" || name == ">=") return compare(">=", v, need_other());
  if (name == "in") return contains(need_other(), v);
  if (name == "sameas") {
    const Value& o = need_other();
    if (v.kind() != o.kind()) return false;
    if (v.is_none() || v.is_undefined()) return true;
    if (v.is_bool()) return v.as_bool() == o.as_bool();
    return v.equals(o) && (v.is_int() || v.is_string());
  }
  if (name == "divisibleby") {
    const Value& o = need_other();
    if (!is_int_like(v) || !is_int_like(o)) return std::fmod(v.as_double(), o.as_double()) == 0;
    if (o.as_int() == 0) fail("integer division or modulo by zero");
    return v.as_int() % o.as_int() == 0;
  }
  if (name == "even" || name == "odd") {
    if (!is_int_like(v)) fail("test '{}' needs an integer", name);
    return (v.as_int() % 2 == 0) == (name == "even");
  }
  if (name == "lower" || name == "upper") {
    std::string s = v.str();
    return (name == "lower" ? str_lower(s) : str_upper(s)) == s;
  }
  if (name == "filter" || name == "test") {
    static const char* const kFilters[] = {
        "default", "d",      "length", "count",      "string",    "safe",    "escape",     "e",          "tojson",
        "trim",    "upper",  "lower",  "capitalize", "title",     "replace", "first",      "last",       "join",
        "list",    "items",  "int",    "float",      "abs",       "round",   "reverse",    "sort",       "dictsort",
        "unique",  "min",    "max",    "sum",        "map",       "select",  "reject",     "selectattr", "rejectattr",
        "attr",    "indent", "center", "format",     "wordcount", "batch",   "forceescape"};
    static const char* const kTests[] = {
        "defined", "undefined", "none",        "boolean",  "true",     "false",    "integer",     "float",
        "number",  "string",    "mapping",     "iterable", "sequence", "callable", "escaped",     "eq",
        "equalto", "ne",        "lt",          "lessthan", "le",       "gt",       "greaterthan", "ge",
        "in",      "sameas",    "divisibleby", "even",     "odd",      "lower",    "upper",       "filter",
        "test",    "==",        "!=",          "<",        "<=",       ">",        ">="};
    return v.is_string() && (name == "filter" ? in_list(kFilters, v.as_string()) : in_list(kTests, v.as_string()));
  }
  fail("no test named '{}'", name);
}

void add_globals(Dict& globals) {
  globals.set("range", Value::function("range", [](CallArgs& args) {
                if (args.positional.empty() || args.positional.size() > 3) fail("range expected 1 to 3 arguments");
                for (const auto& a : args.positional) {
                  if (!is_int_like(a)) fail("'{}' object cannot be interpreted as an integer", a.type_name());
                }
                int64_t start = 0, stop, step = 1;
                if (args.positional.size() == 1) {
                  stop = args.positional[0].as_int();
                } else {
                  start = args.positional[0].as_int();
                  stop = args.positional[1].as_int();
                  if (args.positional.size() == 3) step = args.positional[2].as_int();
                }
                if (step == 0) fail("range() arg 3 must not be zero");
                ValueList out;
                for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
                  // Jinja2's sandbox refuses ranges longer than MAX_RANGE = 100000.
                  if (out.size() >= 100000)
                    fail("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
                  out.push_back(Value::integer(i));
                }
                return Value::list(std::move(out));
              }));
  globals.set("namespace", Value::function("namespace", [](CallArgs& args) {
                Dict d;
                for (const auto& a : args.positional) {
                  if (!a.is_dict()) fail("namespace() positional argument must be a mapping");
                  for (const auto& [k, x] : a.as_dict().items) d.set(k, x);
                }
                for (const auto& [k, x] : args.keyword) d.set(k, x);
                return Value::new_namespace(std::move(d));
              }));
  globals.set("dict", Value::function("dict", [](CallArgs& args) {
                Dict d;
                for (const auto& a : args.positional) {
                  if (!a.is_dict()) fail("dict() positional argument must be a mapping");
                  for (const auto& [k, x] : a.as_dict().items) d.set(k, x);
                }
                for (const auto& [k, x] : args.keyword) d.set(k, x);
                return Value::dict(std::move(d));
              }));
  globals.set("raise_exception", Value::function("raise_exception", [](CallArgs& args) -> Value {
                fail("{}",
                     args.positional.empty() ? std::string("raise_exception() called") : args.positional[0].str());
              }));
  globals.set("strftime_now", Value::function("strftime_now", [](CallArgs& args) {
                if (args.positional.empty() || !args.positional[0].is_string())
                  fail("strftime_now expects a format string");
                std::time_t t = std::time(nullptr);
                std::tm tm{};
                localtime_r(&t, &tm);
                char buf[512];
                size_t n = std::strftime(buf, sizeof buf, args.positional[0].as_string().c_str(), &tm);
                return Value::string(std::string(buf, n));
              }));
}

}  // namespace mxlm::text::jinja
