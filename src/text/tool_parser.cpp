#include "text/tool_parser.h"

#include "text/unicode.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "text/jinja_value.h"
#include "text/reasoning_parser.h"

namespace mxlm::text {
namespace {

using json = nlohmann::ordered_json;

const std::string kNs(kToolNamespace);
const std::string kBlockStart = kNs + "<tool_call>";
const std::string kBlockEnd = kNs + "</tool_call>";
const std::string kInvokeStart = kNs + "<invoke name=\"";
const std::string kInvokeEnd = kNs + "</invoke>";
constexpr size_t kMaxNameLength = 256;

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

// `s` is a proper prefix of `marker` (more text could complete it).
bool could_become(std::string_view s, std::string_view marker) {
  return s.size() < marker.size() && marker.substr(0, s.size()) == s;
}

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && is_ws(s[b])) ++b;
  while (e > b && is_ws(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Argument text becomes JSON strings, so it must be valid UTF-8: invalid bytes become U+FFFD.
std::string valid_utf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : jinja::utf8_to_u32(s)) append_utf8(out, c >= 0xDC80 && c <= 0xDCFF ? 0xFFFD : c);
  return out;
}

std::string python_json(const json& v) {
  jinja::JsonDumpOptions o;
  return jinja::json_dumps(jinja::Value::from_json(v), o);
}

void add_types(const json* s, std::vector<std::string>& out, int depth = 0) {
  if (!s || !s->is_object() || depth > 8) return;
  auto add = [&](const std::string& t) {
    if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
  };
  if (s->contains("type")) {
    const json& t = (*s)["type"];
    if (t.is_string()) add(t.get<std::string>());
    if (t.is_array()) {
      for (const auto& x : t) {
        if (x.is_string()) add(x.get<std::string>());
      }
    }
    return;
  }
  for (const char* key : {"anyOf", "oneOf"}) {
    if (s->contains(key) && (*s)[key].is_array()) {
      for (const auto& alt : (*s)[key]) add_types(&alt, out, depth + 1);
      return;
    }
  }
  if (s->contains("properties")) add("object");
  if (s->contains("items") || s->contains("prefixItems")) add("array");
}

std::vector<std::string> schema_types(const json* s) {
  std::vector<std::string> out;
  add_types(s, out);
  return out;
}

bool has_type(const std::vector<std::string>& types, const char* t) {
  return std::find(types.begin(), types.end(), t) != types.end();
}

// The alternative of `s` (itself, or one of anyOf/oneOf) that describes values of JSON type `type`.
const json* schema_for_type(const json* s, const char* type) {
  if (!s || !s->is_object()) return nullptr;
  if (has_type(schema_types(s), type) && !s->contains("anyOf") && !s->contains("oneOf")) return s;
  for (const char* key : {"anyOf", "oneOf"}) {
    if (s->contains(key) && (*s)[key].is_array()) {
      for (const auto& alt : (*s)[key]) {
        if (has_type(schema_types(&alt), type)) return &alt;
      }
    }
  }
  return has_type(schema_types(s), type) ? s : nullptr;
}

const json* property_schema(const json* object_schema, const std::string& key) {
  if (!object_schema) return nullptr;
  if (object_schema->contains("properties") && (*object_schema)["properties"].is_object() &&
      (*object_schema)["properties"].contains(key)) {
    return &(*object_schema)["properties"][key];
  }
  if (object_schema->contains("additionalProperties") && (*object_schema)["additionalProperties"].is_object()) {
    return &(*object_schema)["additionalProperties"];
  }
  return nullptr;
}

const json* item_schema(const json* array_schema, size_t i) {
  if (!array_schema) return nullptr;
  if (array_schema->contains("prefixItems") && (*array_schema)["prefixItems"].is_array()) {
    const json& prefix = (*array_schema)["prefixItems"];
    if (i < prefix.size()) return &prefix[i];
    if (array_schema->contains("additionalItems") && (*array_schema)["additionalItems"].is_object()) {
      return &(*array_schema)["additionalItems"];
    }
  }
  if (array_schema->contains("items") && (*array_schema)["items"].is_object()) return &(*array_schema)["items"];
  return nullptr;
}

std::optional<int64_t> parse_integer(const std::string& t) {
  if (t.empty()) return std::nullopt;
  size_t i = (t[0] == '-' || t[0] == '+') ? 1 : 0;
  if (i >= t.size()) return std::nullopt;
  for (size_t k = i; k < t.size(); ++k) {
    if (!std::isdigit(static_cast<unsigned char>(t[k]))) return std::nullopt;
  }
  errno = 0;
  long long v = std::strtoll(t.c_str(), nullptr, 10);
  if (errno == ERANGE) return std::nullopt;
  return v;
}

std::optional<double> parse_number(const std::string& t) {
  if (t.empty()) return std::nullopt;
  for (char c : t) {
    if (!(std::isdigit(static_cast<unsigned char>(c)) || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-')) {
      return std::nullopt;
    }
  }
  char* end = nullptr;
  double d = std::strtod(t.c_str(), &end);
  if (end != t.c_str() + t.size() || !std::isfinite(d)) return std::nullopt;
  return d;
}

struct Node {
  std::string tag;
  std::string text;
  std::vector<Node> children;
};

json convert(const Node& node, const json* schema) {
  if (node.children.empty()) return coerce_argument_text(valid_utf8(node.text), schema);
  const auto types = schema_types(schema);
  bool all_items =
      std::all_of(node.children.begin(), node.children.end(), [](const Node& c) { return c.tag == "item"; });
  bool as_array =
      has_type(types, "array") ? (all_items || !has_type(types, "object")) : (all_items && !has_type(types, "object"));
  if (as_array) {
    const json* arr = schema_for_type(schema, "array");
    json out = json::array();
    for (size_t i = 0; i < node.children.size(); ++i) out.push_back(convert(node.children[i], item_schema(arr, i)));
    return out;
  }
  const json* obj = schema_for_type(schema, "object");
  json out = json::object();
  std::vector<std::string> repeated;
  for (const auto& child : node.children) {
    json v = convert(child, property_schema(obj, child.tag));
    const std::string key = valid_utf8(child.tag);
    if (!out.contains(key)) {
      out[key] = std::move(v);
    } else {
      if (std::find(repeated.begin(), repeated.end(), key) == repeated.end()) {
        out[key] = json::array({out[key]});
        repeated.push_back(key);
      }
      out[key].push_back(std::move(v));
    }
  }
  if (!trim(node.text).empty()) out["$text"] = valid_utf8(node.text);
  return out;
}

enum class TagStatus { Complete, NeedMore, Invalid };

struct Tag {
  TagStatus status = TagStatus::Invalid;
  bool closing = false;
  std::string name;
  size_t length = 0;
};

// Parses `]<]minimax[>[<name>` or `]<]minimax[>[</name>` at the start of `s`.
Tag parse_tag(std::string_view s, bool final) {
  Tag t;
  t.status = TagStatus::Invalid;
  auto need_more = [&]() {
    t.status = final ? TagStatus::Invalid : TagStatus::NeedMore;
    return t;
  };
  if (s.size() < kNs.size()) return could_become(s, kNs) ? need_more() : t;
  if (!starts_with(s, kNs)) return t;
  size_t j = kNs.size();
  if (j >= s.size()) return need_more();
  if (s[j] != '<') return t;
  ++j;
  if (j >= s.size()) return need_more();
  if (s[j] == '/') {
    t.closing = true;
    ++j;
  }
  size_t k = j;
  while (k < s.size() && s[k] != '>') {
    char c = s[k];
    if (c == '<' || c == '"' || c == '\'' || c == '/' || c == '=' || is_ws(c) || k - j >= kMaxNameLength) return t;
    ++k;
  }
  if (k >= s.size()) return need_more();
  if (k == j) return t;
  t.status = TagStatus::Complete;
  t.name = std::string(s.substr(j, k - j));
  t.length = k + 1;
  return t;
}

}  // namespace

json coerce_argument_text(const std::string& text, const json* schema) {
  const auto types = schema_types(schema);
  if (types.empty()) return text;
  const std::string t = trim(text);
  if (has_type(types, "null") && (t.empty() || t == "null" || t == "Null" || t == "NULL")) return nullptr;
  for (const auto& type : types) {
    if (type == "string") return text;
    if (type == "integer") {
      if (auto i = parse_integer(t)) return *i;
    } else if (type == "number") {
      if (auto i = parse_integer(t)) return *i;
      if (auto d = parse_number(t)) {
        if (std::floor(*d) == *d && std::fabs(*d) < 9.007199254740992e15) return static_cast<int64_t>(*d);
        return *d;
      }
    } else if (type == "boolean") {
      std::string l = lower(t);
      if (l == "true" || l == "1" || l == "yes" || l == "on") return true;
      if (l == "false" || l == "0" || l == "no" || l == "off") return false;
    } else if (type == "object" || type == "array") {
      if (t.empty()) return type == "object" ? json::object() : json::array();
      json parsed = json::parse(t, nullptr, false);
      if (!parsed.is_discarded() && (type == "object" ? parsed.is_object() : parsed.is_array())) return parsed;
    }
  }
  return text;
}

json ToolCallDelta::to_json() const {
  json j = json::object();
  j["index"] = index;
  if (first) {
    j["id"] = id;
    j["type"] = "function";
    j["function"] = json{{"name", name}, {"arguments", arguments}};
  } else {
    j["function"] = json{{"arguments", arguments}};
  }
  return j;
}

ToolCallIdGenerator random_tool_call_ids() {
  auto rng = std::make_shared<std::mt19937_64>(std::random_device{}());
  return [rng]() {
    static const char* hex = "0123456789abcdef";
    std::string id = "chatcmpl-tool-";
    for (int i = 0; i < 32; ++i) id += hex[(*rng)() & 15];
    return id;
  };
}

struct ToolCallParser::Impl {
  enum class State { Content, Block, Invoke, SkipInvoke };

  json tools;
  ToolCallIdGenerator ids;
  State state = State::Content;
  std::string buf;
  std::string block_raw;  // text of the current block while it has no call yet (given back if it is junk)
  bool block_has_invoke = false;
  int calls = 0;
  // The open invoke.
  int index = -1;
  const json* params = nullptr;
  std::vector<Node> stack;  // open argument tags; stack[0] is a top-level argument
  std::vector<std::string> keys;

  const json* parameters_schema(const std::string& name) const {
    if (!tools.is_array()) return nullptr;
    for (const auto& t : tools) {
      if (!t.is_object()) continue;
      const json* fn = t.contains("function") && t["function"].is_object() ? &t["function"] : &t;
      if (fn->contains("name") && (*fn)["name"] == name && fn->contains("parameters") &&
          (*fn)["parameters"].is_object()) {
        return &(*fn)["parameters"];
      }
    }
    return nullptr;
  }

  void emit_args(ToolParserDelta& out, const std::string& fragment) {
    if (!out.tool_calls.empty() && out.tool_calls.back().index == index) {
      out.tool_calls.back().arguments += fragment;
      return;
    }
    ToolCallDelta d;
    d.index = index;
    d.arguments = fragment;
    out.tool_calls.push_back(std::move(d));
  }

  void open_call(const std::string& name, ToolParserDelta& out) {
    index = calls++;
    ToolCallDelta d;
    d.index = index;
    d.id = ids();
    d.name = valid_utf8(name);
    d.first = true;
    out.tool_calls.push_back(std::move(d));
    params = parameters_schema(name);
    stack.clear();
    keys.clear();
    block_has_invoke = true;
    block_raw.clear();
  }

  void commit_argument(Node node, ToolParserDelta& out) {
    if (std::find(keys.begin(), keys.end(), node.tag) != keys.end()) return;
    json value = convert(node, property_schema(schema_for_type(params, "object"), node.tag));
    std::string fragment = keys.empty() ? "{" : ", ";
    fragment += python_json(valid_utf8(node.tag)) + ": " + python_json(value);
    keys.push_back(node.tag);
    emit_args(out, fragment);
  }

  void close_call(ToolParserDelta& out) {
    emit_args(out, keys.empty() ? "{}" : "}");
    stack.clear();
  }

  // Closes the tags still open at the end of the output and commits the argument they form.
  void close_truncated(ToolParserDelta& out) {
    while (!stack.empty()) {
      Node n = std::move(stack.back());
      stack.pop_back();
      if (stack.empty()) {
        commit_argument(std::move(n), out);
      } else {
        stack.back().children.push_back(std::move(n));
      }
    }
    close_call(out);
  }

  void junk_in_block(ToolParserDelta& out) {
    if (!block_has_invoke) out.content += block_raw;
    block_raw.clear();
    state = State::Content;
  }

  void process(bool final, ToolParserDelta& out) {
    while (true) {
      std::string_view b = buf;
      switch (state) {
        case State::Content: {
          size_t p = b.find(kBlockStart);
          if (p != std::string_view::npos) {
            out.content.append(b.substr(0, p));
            buf.erase(0, p + kBlockStart.size());
            block_raw = kBlockStart;
            block_has_invoke = false;
            state = State::Block;
            continue;
          }
          size_t keep = final ? 0 : partial_marker_suffix(b, kBlockStart);
          out.content.append(b.substr(0, b.size() - keep));
          buf.erase(0, b.size() - keep);
          return;
        }
        case State::Block: {
          size_t i = 0;
          while (i < b.size() && is_ws(b[i])) ++i;
          if (!block_has_invoke) block_raw.append(b.substr(0, i));
          buf.erase(0, i);
          b = buf;
          if (b.empty()) {
            if (final) junk_in_block(out);
            return;
          }
          if (starts_with(b, kBlockEnd)) {
            buf.erase(0, kBlockEnd.size());
            block_raw.clear();
            state = State::Content;
            continue;
          }
          if (starts_with(b, kInvokeStart)) {
            size_t q = b.find("\">", kInvokeStart.size());
            std::string_view name = b.substr(
                kInvokeStart.size(), q == std::string_view::npos ? std::string_view::npos : q - kInvokeStart.size());
            // Incomplete header: a final quote may be the start of the closing `">`.
            std::string_view checked = name;
            if (q == std::string_view::npos && !checked.empty() && checked.back() == '"') checked.remove_suffix(1);
            bool valid = checked.size() <= kMaxNameLength && checked.find_first_of("\"<>\n") == std::string_view::npos;
            if (valid && q != std::string_view::npos && !name.empty()) {
              std::string n(name);
              buf.erase(0, q + 2);
              open_call(n, out);
              state = State::Invoke;
              continue;
            }
            if (valid && q == std::string_view::npos && !final) return;
          } else if (!final && (could_become(b, kBlockEnd) || could_become(b, kInvokeStart))) {
            return;
          }
          junk_in_block(out);
          continue;
        }
        case State::Invoke: {
          if (stack.empty()) {
            size_t i = 0;
            while (i < b.size() && is_ws(b[i])) ++i;
            buf.erase(0, i);
            b = buf;
            if (b.empty()) {
              if (!final) return;
              close_call(out);
              state = State::Block;
              continue;
            }
            if (starts_with(b, kInvokeEnd)) {
              buf.erase(0, kInvokeEnd.size());
              close_call(out);
              state = State::Block;
              continue;
            }
            Tag t = parse_tag(b, final);
            if (t.status == TagStatus::NeedMore) return;
            if (t.status == TagStatus::Invalid || t.closing) {
              malformed(out);
              continue;
            }
            stack.push_back(Node{t.name, {}, {}});
            buf.erase(0, t.length);
            continue;
          }
          size_t p = b.find(kNs);
          if (p == std::string_view::npos) {
            size_t keep = final ? 0 : partial_marker_suffix(b, kNs);
            stack.back().text.append(b.substr(0, b.size() - keep));
            buf.erase(0, b.size() - keep);
            if (!final) return;
            close_truncated(out);
            state = State::Block;
            continue;
          }
          stack.back().text.append(b.substr(0, p));
          buf.erase(0, p);
          b = buf;
          Tag t = parse_tag(b, final);
          if (t.status == TagStatus::NeedMore) return;
          if (t.status == TagStatus::Invalid) {
            stack.back().text += kNs;  // not a tag: the namespace text is part of the value
            buf.erase(0, kNs.size());
            continue;
          }
          buf.erase(0, t.length);
          if (!t.closing) {
            stack.push_back(Node{t.name, {}, {}});
          } else if (t.name == stack.back().tag) {
            Node n = std::move(stack.back());
            stack.pop_back();
            if (stack.empty()) {
              commit_argument(std::move(n), out);
            } else {
              stack.back().children.push_back(std::move(n));
            }
          } else {
            malformed(out);
          }
          continue;
        }
        case State::SkipInvoke: {
          size_t p1 = b.find(kInvokeEnd);
          size_t p2 = b.find(kBlockEnd);
          if (p1 != std::string_view::npos && (p2 == std::string_view::npos || p1 < p2)) {
            buf.erase(0, p1 + kInvokeEnd.size());
            state = State::Block;
            continue;
          }
          if (p2 != std::string_view::npos) {
            buf.erase(0, p2 + kBlockEnd.size());
            state = State::Content;
            continue;
          }
          size_t keep = final ? 0 : std::max(partial_marker_suffix(b, kInvokeEnd), partial_marker_suffix(b, kBlockEnd));
          buf.erase(0, b.size() - keep);
          return;
        }
      }
    }
  }

  void malformed(ToolParserDelta& out) {
    close_call(out);
    state = State::SkipInvoke;
  }
};

ToolCallParser::ToolCallParser(const json& tools, ToolCallIdGenerator ids) : impl_(std::make_unique<Impl>()) {
  impl_->tools = tools;
  impl_->ids = ids ? std::move(ids) : random_tool_call_ids();
}

ToolCallParser::~ToolCallParser() = default;
ToolCallParser::ToolCallParser(ToolCallParser&&) noexcept = default;
ToolCallParser& ToolCallParser::operator=(ToolCallParser&&) noexcept = default;

ToolParserDelta ToolCallParser::feed(std::string_view text) {
  impl_->buf.append(text);
  ToolParserDelta out;
  impl_->process(false, out);
  return out;
}

ToolParserDelta ToolCallParser::finish() {
  ToolParserDelta out;
  impl_->process(true, out);
  return out;
}

int ToolCallParser::calls() const { return impl_->calls; }

ToolParseResult ToolCallParser::parse(std::string_view text, const json& tools, ToolCallIdGenerator ids) {
  ToolCallParser parser(tools, std::move(ids));
  ToolParseResult result;
  for (ToolParserDelta d : {parser.feed(text), parser.finish()}) {
    result.content += d.content;
    for (auto& c : d.tool_calls) {
      if (c.first) result.tool_calls.push_back({c.id, c.name, ""});
      result.tool_calls[static_cast<size_t>(c.index)].arguments += c.arguments;
    }
  }
  return result;
}

}  // namespace mxlm::text
