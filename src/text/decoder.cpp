#include "text/decoder.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "text/tokenizer_json.h"
#include "text/unicode.h"
#include "text/unicode_regex.h"

namespace mxlm::text {

namespace {

class ByteLevel final : public Decoder {
 public:
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const override {
    std::string bytes;
    for (const auto& token : tokens) {
      const size_t mark = bytes.size();
      size_t i = 0;
      bool all_mapped = true;
      while (i < token.size()) {
        const int b = char_to_byte(next_code_point(token, i));
        if (b < 0) {
          all_mapped = false;
          break;
        }
        bytes.push_back(static_cast<char>(b));
      }
      // A token outside the byte alphabet (an added token such as "<｜User｜>") is taken verbatim.
      if (!all_mapped) {
        bytes.resize(mark);
        bytes += token;
      }
    }
    return {utf8_lossy(bytes)};
  }
};

class ByteFallback final : public Decoder {
 public:
  bool merges_byte_tokens() const override { return true; }
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    const auto flush = [&] {
      if (pending.empty()) return;
      if (is_valid_utf8(pending)) {
        out.push_back(pending);
      } else {
        for (size_t k = 0; k < pending.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (auto& token : tokens) {
      int byte = -1;
      if (token.size() == 6 && token.compare(0, 3, "<0x") == 0 && token[5] == '>')
        byte = parse_hex_byte(token.substr(3, 2));
      if (byte >= 0) {
        pending.push_back(static_cast<char>(byte));
      } else {
        flush();
        out.push_back(std::move(token));
      }
    }
    flush();
    return out;
  }

 private:
  // u8::from_str_radix(_, 16) on two characters: a leading '+' is allowed.
  static int parse_hex_byte(const std::string& s) {
    const auto digit = [](char c) {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    if (s[0] == '+') return digit(s[1]);
    const int hi = digit(s[0]), lo = digit(s[1]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
  }
};

class Fuse final : public Decoder {
 public:
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const override {
    std::string joined;
    for (const auto& t : tokens) joined += t;
    return {joined};
  }
};

class Strip final : public Decoder {
 public:
  Strip(char32_t content, size_t start, size_t stop) : content_(content), start_(start), stop_(stop) {}
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const override {
    for (auto& token : tokens) {
      std::vector<char32_t> chars;
      size_t i = 0;
      while (i < token.size()) chars.push_back(next_code_point(token, i));
      size_t start_cut = 0;
      while (start_cut < chars.size() && start_cut < start_ && chars[start_cut] == content_) ++start_cut;
      size_t stop_cut = 0;
      while (stop_cut < chars.size() && stop_cut < stop_ && chars[chars.size() - 1 - stop_cut] == content_) ++stop_cut;
      // HF takes `byte length - cuts` characters after the start cut (a byte/char mix-up we mirror).
      const size_t cuts = start_cut + stop_cut;
      const size_t take = token.size() > cuts ? token.size() - cuts : 0;
      std::string out;
      for (size_t k = start_cut; k < chars.size() && k - start_cut < take; ++k) append_utf8(out, chars[k]);
      token = std::move(out);
    }
    return tokens;
  }

 private:
  char32_t content_;
  size_t start_, stop_;
};

class Replace final : public Decoder {
 public:
  Replace(const std::string& pattern, std::string content) : regex_(pattern), content_(std::move(content)) {}
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const override {
    for (auto& token : tokens) token = replace_all(regex_, token, content_);
    return tokens;
  }

 private:
  UnicodeRegex regex_;
  std::string content_;
};

class Metaspace final : public Decoder {
 public:
  Metaspace(char32_t replacement, bool prepend) : replacement_(replacement), prepend_(prepend) {}
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const override {
    for (size_t t = 0; t < tokens.size(); ++t) {
      std::string out;
      const std::string& token = tokens[t];
      size_t i = 0;
      while (i < token.size()) {
        const size_t start = i;
        const char32_t cp = next_code_point(token, i);
        if (cp == replacement_) {
          // HF drops every replacement character of the first token when the pre-tokenizer prepends.
          if (!(t == 0 && prepend_)) out.push_back(' ');
        } else {
          out.append(token, start, i - start);
        }
      }
      tokens[t] = std::move(out);
    }
    return tokens;
  }

 private:
  char32_t replacement_;
  bool prepend_;
};

class BpeSuffix final : public Decoder {
 public:
  explicit BpeSuffix(std::string suffix) : suffix_(std::move(suffix)) {}
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const override {
    for (size_t t = 0; t < tokens.size(); ++t) {
      const std::string with = t + 1 == tokens.size() ? "" : " ";
      std::string out;
      size_t pos = 0;
      while (!suffix_.empty()) {
        const size_t hit = tokens[t].find(suffix_, pos);
        if (hit == std::string::npos) break;
        out.append(tokens[t], pos, hit - pos);
        out += with;
        pos = hit + suffix_.size();
      }
      out.append(tokens[t], pos);
      tokens[t] = std::move(out);
    }
    return tokens;
  }

 private:
  std::string suffix_;
};

class Sequence final : public Decoder {
 public:
  explicit Sequence(std::vector<std::unique_ptr<Decoder>> steps) : steps_(std::move(steps)) {}
  bool merges_byte_tokens() const override {
    for (const auto& step : steps_) {
      if (step->merges_byte_tokens()) return true;
    }
    return false;
  }
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const override {
    for (const auto& step : steps_) tokens = step->decode_chain(std::move(tokens));
    return tokens;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

char32_t single_char(const std::string& s, std::string_view owner) {
  size_t i = 0;
  if (s.empty()) fail("tokenizer.json: {} needs a one-character string", owner);
  const char32_t cp = next_code_point(s, i);
  if (i != s.size()) fail("tokenizer.json: {} needs a one-character string, got {:?}", owner, s);
  return cp;
}

size_t json_size(const nlohmann::json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end() || !it->is_number_integer() || it->get<int64_t>() < 0)
    fail("tokenizer.json: decoder Strip needs an unsigned {:?}", key);
  return it->get<size_t>();
}

}  // namespace

std::unique_ptr<Decoder> make_decoder(const nlohmann::json& config) {
  if (config.is_null()) return nullptr;
  const std::string type = json_string(config, "type", "decoder");
  if (type == "ByteLevel") return std::make_unique<ByteLevel>();
  if (type == "ByteFallback") return std::make_unique<ByteFallback>();
  if (type == "Fuse") return std::make_unique<Fuse>();
  if (type == "Strip") {
    return std::make_unique<Strip>(
        single_char(json_string(config, "content", "decoder Strip"), "decoder Strip content"),
        json_size(config, "start"), json_size(config, "stop"));
  }
  if (type == "Replace") {
    return std::make_unique<Replace>(pattern_regex(config, "decoder Replace"),
                                     json_string(config, "content", "decoder Replace"));
  }
  if (type == "Metaspace") {
    bool prepend = config.value("add_prefix_space", true);
    if (config.contains("prepend_scheme") && config["prepend_scheme"].is_string()) {
      prepend = config["prepend_scheme"].get<std::string>() != "never";
    }
    return std::make_unique<Metaspace>(
        single_char(json_string(config, "replacement", "decoder Metaspace"), "decoder Metaspace replacement"), prepend);
  }
  if (type == "BPEDecoder") return std::make_unique<BpeSuffix>(config.value("suffix", "</w>"));
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> steps;
    for (const auto& step : json_array(config, "decoders", "decoder Sequence")) {
      if (auto d = make_decoder(step)) steps.push_back(std::move(d));
    }
    return std::make_unique<Sequence>(std::move(steps));
  }
  fail("tokenizer.json: unsupported decoder type {:?}", type);
}

}  // namespace mxlm::text
