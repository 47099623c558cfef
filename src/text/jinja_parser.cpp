// Lexer and recursive-descent parser for the Jinja2 syntax chat templates use. Whitespace handling
// reproduces Jinja2 3.1's lexer with trim_blocks=True and lstrip_blocks=True (what transformers
// configures); the grammar and operator precedence follow jinja2/parser.py rule for rule, because
// templates are judged byte for byte against Python.
#include <cstring>
#include <string_view>

#include "core/error.h"
#include "text/jinja_ast.h"

namespace mxlm::text::jinja {
namespace {

constexpr int kMaxNesting = 200;  // deeper expressions or blocks are refused, never a stack overflow

struct Token {
  enum class Type { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };
  Type type;
  std::string value;
  int line;
  int64_t int_value = 0;
  double float_value = 0;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_name_char(char c) { return is_name_start(c) || is_digit(c); }

// Python str.rstrip() of the whitespace a template can hold.
void rstrip_python(std::string& s) {
  while (!s.empty()) {
    unsigned char c = static_cast<unsigned char>(s.back());
    if (is_space(static_cast<char>(c)) || (c >= 0x1c && c <= 0x1f)) {
      s.pop_back();
    } else {
      break;
    }
  }
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Python's "unicode_escape" decoding, which Jinja2 applies to string literals.
std::string unescape_string(std::string_view body) {
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    char c = body[i];
    if (c != '\\' || i + 1 >= body.size()) {
      out += c;
      continue;
    }
    char e = body[++i];
    switch (e) {
      case '\n':
        break;
      case '\\':
        out += '\\';
        break;
      case '\'':
        out += '\'';
        break;
      case '"':
        out += '"';
        break;
      case 'a':
        out += '\a';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'v':
        out += '\v';
        break;
      case 'x':
      case 'u':
      case 'U': {
        size_t digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
        char32_t cp = 0;
        for (size_t k = 1; k <= digits; ++k) {
          int h = i + k < body.size() ? hex_value(body[i + k]) : -1;
          if (h < 0) fail("truncated \\{} escape in a string literal", e);
          cp = cp * 16 + static_cast<char32_t>(h);
        }
        if (cp > 0x10FFFF) fail("illegal Unicode character in a string literal");
        append_utf8_escaped(out, cp);
        i += digits;
        break;
      }
      default:
        if (e >= '0' && e <= '7') {
          char32_t cp = static_cast<char32_t>(e - '0');
          for (int k = 0; k < 2 && i + 1 < body.size() && body[i + 1] >= '0' && body[i + 1] <= '7'; ++k) {
            cp = cp * 8 + static_cast<char32_t>(body[++i] - '0');
          }
          append_utf8_escaped(out, cp);
        } else {
          out += '\\';
          out += e;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  Lexer(const std::string& source, const std::string& name) : name_(name) {
    // Jinja2 normalises newlines and drops one trailing newline (keep_trailing_newline=False).
    src_.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        src_ += '\n';
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
      } else {
        src_ += source[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    bool line_starting = true;
    while (pos_ < src_.size()) {
      size_t start = find_tag(pos_);
      if (start == std::string::npos) {
        emit_text(src_.substr(pos_));
        pos_ = src_.size();
        break;
      }
      std::string tag = src_.substr(start, 2);
      char sign = start + 2 < src_.size() && (src_[start + 2] == '-' || src_[start + 2] == '+') ? src_[start + 2] : 0;
      std::string text = src_.substr(pos_, start - pos_);
      strip_before_tag(text, sign, tag != "{{", line_starting);
      emit_text(text);
      advance_to(start);
      size_t p = start + 2 + (sign ? 1 : 0);
      if (tag == "{#") {
        size_t q = src_.find("#}", p);
        if (q == std::string::npos) fail("{}:{}: missing end of comment tag", name_, line_);
        size_t after = q + 2;
        if (q > p && src_[q - 1] == '-') {
          while (after < src_.size() && is_space(src_[after])) ++after;
        } else if (!(q > p && src_[q - 1] == '+') && after < src_.size() && src_[after] == '\n') {
          ++after;
        }
        advance_to(after);
        line_starting = src_[after - 1] == '\n';
        continue;
      }
      if (tag == "{%" && lex_raw(p, line_starting)) continue;
      tokens_.push_back({tag == "{{" ? Token::Type::VarBegin : Token::Type::BlockBegin, tag, line_});
      advance_to(p);
      line_starting = lex_tag(tag == "{{");
    }
    tokens_.push_back({Token::Type::Eof, "", line_});
    return std::move(tokens_);
  }

 private:
  size_t find_tag(size_t from) const {
    size_t p = from;
    while ((p = src_.find('{', p)) != std::string::npos) {
      if (p + 1 < src_.size() && (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) return p;
      ++p;
    }
    return std::string::npos;
  }

  void advance_to(size_t p) {
    for (size_t i = pos_; i < p && i < src_.size(); ++i) {
      if (src_[i] == '\n') ++line_;
    }
    pos_ = p;
  }

  void emit_text(const std::string& text) {
    if (!text.empty()) tokens_.push_back({Token::Type::Text, text, line_});
  }

  // `{%-` strips all whitespace before the tag; lstrip_blocks strips spaces and tabs between the
  // line start and a block or comment tag (not `{{`, not `{%+`).
  static void strip_before_tag(std::string& text, char sign, bool block_or_comment, bool line_starting) {
    if (sign == '-') {
      rstrip_python(text);
    } else if (sign != '+' && block_or_comment) {
      size_t l_pos = text.rfind('\n');
      l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
      if (l_pos > 0 || line_starting) {
        if (text.find_first_not_of(" \t", l_pos) == std::string::npos) text.resize(l_pos);
      }
    }
  }

  // `{% raw %}...{% endraw %}`: emitted as text untouched. Returns false when the tag is not raw.
  bool lex_raw(size_t p, bool& line_starting) {
    size_t q = p;
    while (q < src_.size() && is_space(src_[q])) ++q;
    if (src_.compare(q, 3, "raw") != 0) return false;
    q += 3;
    while (q < src_.size() && is_space(src_[q])) ++q;
    if (src_.compare(q, 3, "-%}") == 0) {
      q += 3;
      while (q < src_.size() && is_space(src_[q])) ++q;
    } else if (src_.compare(q, 2, "%}") == 0) {
      q += 2;
    } else {
      return false;
    }
    size_t body_start = q;
    size_t search = q;
    while (true) {
      size_t t = src_.find("{%", search);
      if (t == std::string::npos) fail("{}:{}: missing end of raw directive", name_, line_);
      size_t r = t + 2;
      char sign = r < src_.size() && (src_[r] == '-' || src_[r] == '+') ? src_[r] : 0;
      if (sign) ++r;
      while (r < src_.size() && is_space(src_[r])) ++r;
      if (src_.compare(r, 6, "endraw") != 0) {
        search = t + 2;
        continue;
      }
      r += 6;
      while (r < src_.size() && is_space(src_[r])) ++r;
      size_t after;
      if (src_.compare(r, 3, "+%}") == 0) {
        after = r + 3;
      } else if (src_.compare(r, 3, "-%}") == 0) {
        after = r + 3;
        while (after < src_.size() && is_space(src_[after])) ++after;
      } else if (src_.compare(r, 2, "%}") == 0) {
        after = r + 2;
        if (after < src_.size() && src_[after] == '\n') ++after;
      } else {
        search = t + 2;
        continue;
      }
      std::string text = src_.substr(body_start, t - body_start);
      strip_before_tag(text, sign, true, false);
      emit_text(text);
      advance_to(after);
      line_starting = src_[after - 1] == '\n';
      return true;
    }
  }

  // Lexes the inside of `{{ }}` or `{% %}` up to and including the end delimiter; returns whether the
  // end delimiter consumed a trailing newline (Jinja2's line_starting).
  bool lex_tag(bool variable) {
    int depth = 0;
    while (true) {
      while (pos_ < src_.size() && is_space(src_[pos_])) advance_to(pos_ + 1);
      if (pos_ >= src_.size()) fail("{}:{}: unexpected end of template, expected end of tag", name_, line_);
      if (depth == 0) {
        size_t after = 0;
        if (variable) {
          if (src_.compare(pos_, 3, "-}}") == 0) {
            after = pos_ + 3;
            while (after < src_.size() && is_space(src_[after])) ++after;
          } else if (src_.compare(pos_, 2, "}}") == 0) {
            after = pos_ + 2;
          }
        } else {
          if (src_.compare(pos_, 3, "+%}") == 0) {
            after = pos_ + 3;
          } else if (src_.compare(pos_, 3, "-%}") == 0) {
            after = pos_ + 3;
            while (after < src_.size() && is_space(src_[after])) ++after;
          } else if (src_.compare(pos_, 2, "%}") == 0) {
            after = pos_ + 2;
            if (after < src_.size() && src_[after] == '\n') ++after;
          }
        }
        if (after) {
          tokens_.push_back({variable ? Token::Type::VarEnd : Token::Type::BlockEnd, "", line_});
          advance_to(after);
          return src_[after - 1] == '\n';
        }
      }
      char c = src_[pos_];
      if (is_digit(c)) {
        lex_number();
      } else if (is_name_start(c)) {
        size_t e = pos_;
        while (e < src_.size() && is_name_char(src_[e])) ++e;
        tokens_.push_back({Token::Type::Name, src_.substr(pos_, e - pos_), line_});
        advance_to(e);
      } else if (c == '\'' || c == '"') {
        size_t e = pos_ + 1;
        while (e < src_.size() && src_[e] != c) e += src_[e] == '\\' ? 2 : 1;
        if (e >= src_.size()) fail("{}:{}: unterminated string literal", name_, line_);
        tokens_.push_back(
            {Token::Type::String, unescape_string(std::string_view(src_).substr(pos_ + 1, e - pos_ - 1)), line_});
        advance_to(e + 1);
      } else {
        static const char* const kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[",
                                           "]",  "(",  ")",  "{",  "}",  ">",  "<", "=", ".", ":", "|", ",", ";"};
        const char* op = nullptr;
        for (const char* o : kOps) {
          if (src_.compare(pos_, std::strlen(o), o) == 0) {
            op = o;
            break;
          }
        }
        if (!op) fail("{}:{}: unexpected character '{}' in tag", name_, line_, c);
        std::string o(op);
        if (o == "(" || o == "[" || o == "{") ++depth;
        if ((o == ")" || o == "]" || o == "}") && depth > 0) --depth;
        tokens_.push_back({Token::Type::Op, o, line_});
        advance_to(pos_ + o.size());
      }
    }
  }

  size_t scan_digits(size_t p) const {
    // (\d+_)*\d+
    if (p >= src_.size() || !is_digit(src_[p])) return p;
    while (true) {
      while (p < src_.size() && is_digit(src_[p])) ++p;
      if (p + 1 < src_.size() && src_[p] == '_' && is_digit(src_[p + 1])) {
        ++p;
        continue;
      }
      return p;
    }
  }

  void lex_number() {
    size_t start = pos_;
    size_t e = scan_digits(pos_);
    bool is_float = false;
    bool after_dot = start > 0 && src_[start - 1] == '.';
    if (!after_dot) {
      size_t f = e;
      if (f + 1 < src_.size() && src_[f] == '.' && is_digit(src_[f + 1])) {
        f = scan_digits(f + 1);
        is_float = true;
      }
      if (f < src_.size() && (src_[f] == 'e' || src_[f] == 'E')) {
        size_t x = f + 1;
        if (x < src_.size() && (src_[x] == '+' || src_[x] == '-')) ++x;
        size_t xe = scan_digits(x);
        if (xe > x) {
          f = xe;
          is_float = true;
        }
      }
      if (is_float) e = f;
    }
    std::string text;
    for (size_t i = start; i < e; ++i) {
      if (src_[i] != '_') text += src_[i];
    }
    Token t{is_float ? Token::Type::Float : Token::Type::Int, text, line_};
    if (is_float) {
      t.float_value = std::strtod(text.c_str(), nullptr);
    } else {
      errno = 0;
      t.int_value = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == ERANGE) fail("{}:{}: integer literal {} is too large", name_, line_, text);
    }
    tokens_.push_back(std::move(t));
    advance_to(e);
  }

  std::string src_;
  std::string name_;
  size_t pos_ = 0;
  int line_ = 1;
  std::vector<Token> tokens_;
};

class Parser {
 public:
  Parser(std::vector<Token> tokens, std::string name) : t_(std::move(tokens)), name_(std::move(name)) {}

  std::shared_ptr<Program> run() {
    auto program = std::make_shared<Program>();
    program->name = name_;
    std::string end = parse_body(program->body, {});
    if (!end.empty()) error("unexpected '{}'", end);
    return program;
  }

 private:
  using Type = Token::Type;

  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  void next() {
    if (i_ + 1 < t_.size()) ++i_;
  }
  bool is_op(const char* op) const { return cur().type == Type::Op && cur().value == op; }
  bool is_name(const char* n) const { return cur().type == Type::Name && cur().value == n; }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    next();
    return true;
  }
  bool skip_name(const char* n) {
    if (!is_name(n)) return false;
    next();
    return true;
  }

  template <typename... Args>
  [[noreturn]] void error(fmt::format_string<Args...> f, Args&&... args) const {
    fail("{}:{}: syntax error: {}", name_, cur().line, fmt::format(f, std::forward<Args>(args)...));
  }

  std::string describe(const Token& t) const {
    switch (t.type) {
      case Type::Eof:
        return "end of template";
      case Type::VarEnd:
        return "end of print statement";
      case Type::BlockEnd:
        return "end of statement block";
      case Type::Text:
        return "template text";
      default:
        return "'" + t.value + "'";
    }
  }

  void expect_op(const char* op) {
    if (!skip_op(op)) error("expected '{}', got {}", op, describe(cur()));
  }
  std::string expect_name() {
    if (cur().type != Type::Name) error("expected a name, got {}", describe(cur()));
    std::string n = cur().value;
    next();
    return n;
  }
  void expect_block_end() {
    if (cur().type != Type::BlockEnd) error("expected end of statement block, got {}", describe(cur()));
    next();
  }

  struct DepthGuard {
    explicit DepthGuard(Parser& p) : p(p) {
      if (++p.depth_ > kMaxNesting) p.error("template nesting too deep");
    }
    ~DepthGuard() { --p.depth_; }
    Parser& p;
  };

  ExprPtr make(Expr::Kind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // Parses statements until a block tag whose name is in `ends`; returns that name with the
  // position on the name token (empty at end of template).
  std::string parse_body(Body& body, std::initializer_list<const char*> ends) {
    DepthGuard guard(*this);
    while (true) {
      const Token& t = cur();
      switch (t.type) {
        case Type::Eof:
          return {};
        case Type::Text: {
          auto s = std::make_unique<Stmt>();
          s->kind = Stmt::Kind::Text;
          s->line = t.line;
          s->text = t.value;
          body.push_back(std::move(s));
          next();
          break;
        }
        case Type::VarBegin: {
          next();
          auto s = std::make_unique<Stmt>();
          s->kind = Stmt::Kind::Output;
          s->line = cur().line;
          s->expr = parse_tuple(true, {}, false);
          if (cur().type != Type::VarEnd) error("expected end of print statement, got {}", describe(cur()));
          next();
          body.push_back(std::move(s));
          break;
        }
        case Type::BlockBegin: {
          next();
          if (cur().type != Type::Name) error("tag name expected");
          for (const char* e : ends) {
            if (cur().value == e) return e;
          }
          body.push_back(parse_statement());
          break;
        }
        default:
          error("unexpected {}", describe(t));
      }
    }
  }

  // Parses a body that must end with one of `ends`; consumes the end tag name and returns it.
  std::string parse_required_body(Body& body, std::initializer_list<const char*> ends, const char* what,
                                  int start_line) {
    std::string end = parse_body(body, ends);
    if (end.empty()) {
      fail("{}:{}: syntax error: unexpected end of template, the '{}' block opened on line {} is never closed", name_,
           cur().line, what, start_line);
    }
    next();
    return end;
  }

  StmtPtr parse_statement() {
    auto s = std::make_unique<Stmt>();
    s->line = cur().line;
    std::string tag = expect_name();
    if (tag == "if") {
      s->kind = Stmt::Kind::If;
      s->conditions.push_back(parse_tuple(false, {}, false));
      expect_block_end();
      while (true) {
        s->bodies.emplace_back();
        std::string end = parse_required_body(s->bodies.back(), {"elif", "else", "endif"}, "if", s->line);
        if (end == "elif") {
          s->conditions.push_back(parse_tuple(false, {}, false));
          expect_block_end();
          continue;
        }
        if (end == "else") {
          expect_block_end();
          parse_required_body(s->else_body, {"endif"}, "if", s->line);
        }
        expect_block_end();
        break;
      }
    } else if (tag == "for") {
      s->kind = Stmt::Kind::For;
      parse_targets(s->targets, "in");
      if (!skip_name("in")) error("expected 'in', got {}", describe(cur()));
      s->expr = parse_tuple(false, {"recursive"}, false);
      if (skip_name("if")) s->filter = parse_expression(true);
      if (is_name("recursive")) error("recursive loops are not supported");
      expect_block_end();
      std::string end = parse_required_body(s->body, {"endfor", "else"}, "for", s->line);
      if (end == "else") {
        expect_block_end();
        parse_required_body(s->else_body, {"endfor"}, "for", s->line);
      }
      expect_block_end();
    } else if (tag == "set") {
      if (cur().type == Type::Name && peek().type == Type::Op && peek().value == ".") {
        s->targets.push_back(expect_name());
        next();
        s->attr = expect_name();
      } else {
        parse_targets(s->targets, "=");
      }
      if (skip_op("=")) {
        s->kind = Stmt::Kind::Set;
        s->expr = parse_tuple(true, {}, false);
        expect_block_end();
      } else {
        s->kind = Stmt::Kind::SetBlock;
        if (s->targets.size() != 1) error("a set block assigns exactly one name");
        if (is_op("|")) s->filter = parse_filter(make(Expr::Kind::Literal, cur().line), true);
        expect_block_end();
        parse_required_body(s->body, {"endset"}, "set", s->line);
        expect_block_end();
      }
    } else if (tag == "macro") {
      s->kind = Stmt::Kind::Macro;
      s->text = expect_name();
      parse_signature(s->params);
      expect_block_end();
      parse_required_body(s->body, {"endmacro"}, "macro", s->line);
      if (cur().type == Type::Name && cur().value == s->text) next();
      expect_block_end();
    } else if (tag == "call") {
      s->kind = Stmt::Kind::CallBlock;
      if (is_op("(")) parse_signature(s->params);
      s->expr = parse_expression(true);
      if (s->expr->kind != Expr::Kind::Call) error("expected a call after 'call'");
      expect_block_end();
      parse_required_body(s->body, {"endcall"}, "call", s->line);
      expect_block_end();
    } else if (tag == "filter") {
      s->kind = Stmt::Kind::FilterBlock;
      s->filter = parse_filter(make(Expr::Kind::Literal, cur().line), true);
      expect_block_end();
      parse_required_body(s->body, {"endfilter"}, "filter", s->line);
      expect_block_end();
    } else if (tag == "break" || tag == "continue") {
      s->kind = tag == "break" ? Stmt::Kind::Break : Stmt::Kind::Continue;
      expect_block_end();
    } else {
      fail("{}:{}: syntax error: unknown tag '{}'", name_, s->line, tag);
    }
    return s;
  }

  void parse_targets(std::vector<std::string>& targets, const char* end) {
    bool paren = skip_op("(");
    while (true) {
      targets.push_back(expect_name());
      if (!skip_op(",")) break;
      if ((paren && is_op(")")) || is_name(end) || is_op(end)) break;
    }
    if (paren) expect_op(")");
  }

  void parse_signature(std::vector<std::pair<std::string, ExprPtr>>& params) {
    expect_op("(");
    while (!is_op(")")) {
      if (!params.empty()) expect_op(",");
      if (is_op(")")) break;
      std::string n = expect_name();
      ExprPtr def;
      if (skip_op("=")) def = parse_expression(true);
      params.emplace_back(n, std::move(def));
    }
    next();
  }

  bool is_tuple_end(std::initializer_list<const char*> extra_end) const {
    if (cur().type == Type::VarEnd || cur().type == Type::BlockEnd || cur().type == Type::Eof) return true;
    if (is_op(")")) return true;
    for (const char* e : extra_end) {
      if (is_name(e)) return true;
    }
    return false;
  }

  ExprPtr parse_tuple(bool with_condexpr, std::initializer_list<const char*> extra_end, bool explicit_parens) {
    int line = cur().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) expect_op(",");
      if (is_tuple_end(extra_end)) break;
      items.push_back(parse_expression(with_condexpr));
      if (is_op(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens) error("expected an expression, got {}", describe(cur()));
    }
    auto e = make(Expr::Kind::TupleLit, line);
    e->args = std::move(items);
    return e;
  }

  ExprPtr parse_expression(bool with_condexpr) {
    DepthGuard guard(*this);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    ExprPtr expr1 = parse_or();
    while (is_name("if")) {
      int line = cur().line;
      next();
      ExprPtr cond = parse_or();
      ExprPtr other;
      if (skip_name("else")) {
        DepthGuard guard(*this);
        other = parse_condexpr();
      }
      auto e = make(Expr::Kind::Conditional, line);
      e->args.push_back(std::move(cond));
      e->args.push_back(std::move(expr1));
      e->args.push_back(std::move(other));
      expr1 = std::move(e);
    }
    return expr1;
  }

  ExprPtr binary(Expr::Kind kind, ExprPtr l, ExprPtr r, int line, std::string op = {}) {
    auto e = make(kind, line);
    e->name = std::move(op);
    e->args.push_back(std::move(l));
    e->args.push_back(std::move(r));
    return e;
  }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (is_name("or")) {
      int line = cur().line;
      next();
      left = binary(Expr::Kind::Or, std::move(left), parse_and(), line);
    }
    return left;
  }

  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (is_name("and")) {
      int line = cur().line;
      next();
      left = binary(Expr::Kind::And, std::move(left), parse_not(), line);
    }
    return left;
  }

  ExprPtr parse_not() {
    if (is_name("not")) {
      DepthGuard guard(*this);
      auto e = make(Expr::Kind::Not, cur().line);
      next();
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    int line = cur().line;
    ExprPtr first = parse_math1();
    std::vector<std::string> ops;
    std::vector<ExprPtr> operands;
    while (true) {
      if (cur().type == Type::Op && (cur().value == "==" || cur().value == "!=" || cur().value == "<" ||
                                     cur().value == "<=" || cur().value == ">" || cur().value == ">=")) {
        ops.push_back(cur().value);
        next();
      } else if (is_name("in")) {
        ops.push_back("in");
        next();
      } else if (is_name("not") && peek().type == Type::Name && peek().value == "in") {
        ops.push_back("notin");
        next();
        next();
      } else {
        break;
      }
      operands.push_back(parse_math1());
    }
    if (ops.empty()) return first;
    auto e = make(Expr::Kind::Compare, line);
    e->args.push_back(std::move(first));
    for (auto& o : operands) e->args.push_back(std::move(o));
    e->ops = std::move(ops);
    return e;
  }

  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      std::string op = cur().value;
      int line = cur().line;
      next();
      left = binary(Expr::Kind::Binary, std::move(left), parse_concat(), line, op);
    }
    return left;
  }

  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (is_op("~")) {
      int line = cur().line;
      next();
      left = binary(Expr::Kind::Binary, std::move(left), parse_math2(), line, "~");
    }
    return left;
  }

  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = cur().value;
      int line = cur().line;
      next();
      left = binary(Expr::Kind::Binary, std::move(left), parse_pow(), line, op);
    }
    return left;
  }

  ExprPtr parse_pow() {
    ExprPtr left = parse_unary(true);
    while (is_op("**")) {
      int line = cur().line;
      next();
      left = binary(Expr::Kind::Binary, std::move(left), parse_unary(true), line, "**");
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this);
    ExprPtr node;
    if (is_op("-") || is_op("+")) {
      auto e = make(is_op("-") ? Expr::Kind::Negate : Expr::Kind::Plus, cur().line);
      next();
      e->args.push_back(parse_unary(false));
      node = std::move(e);
    } else {
      node = parse_primary();
    }
    node = parse_postfix(std::move(node));
    if (with_filter) node = parse_filter_expr(std::move(node));
    return node;
  }

  ExprPtr parse_primary() {
    DepthGuard guard(*this);
    const Token& t = cur();
    int line = t.line;
    switch (t.type) {
      case Type::Name: {
        auto e = make(Expr::Kind::Literal, line);
        if (t.value == "true" || t.value == "True") {
          e->literal = Value::boolean(true);
        } else if (t.value == "false" || t.value == "False") {
          e->literal = Value::boolean(false);
        } else if (t.value == "none" || t.value == "None") {
          e->literal = Value::none();
        } else {
          e->kind = Expr::Kind::Name;
          e->name = t.value;
        }
        next();
        return e;
      }
      case Type::String: {
        std::string s;
        while (cur().type == Type::String) {
          s += cur().value;
          next();
        }
        auto e = make(Expr::Kind::Literal, line);
        e->literal = Value::string(std::move(s));
        return e;
      }
      case Type::Int:
      case Type::Float: {
        auto e = make(Expr::Kind::Literal, line);
        e->literal = t.type == Type::Int ? Value::integer(t.int_value) : Value::floating(t.float_value);
        next();
        return e;
      }
      case Type::Op:
        if (t.value == "(") {
          next();
          ExprPtr e = parse_tuple(true, {}, true);
          expect_op(")");
          return e;
        }
        if (t.value == "[") {
          next();
          auto e = make(Expr::Kind::ListLit, line);
          while (!is_op("]")) {
            if (!e->args.empty()) expect_op(",");
            if (is_op("]")) break;
            e->args.push_back(parse_expression(true));
          }
          next();
          return e;
        }
        if (t.value == "{") {
          next();
          auto e = make(Expr::Kind::DictLit, line);
          while (!is_op("}")) {
            if (!e->args.empty()) expect_op(",");
            if (is_op("}")) break;
            e->args.push_back(parse_expression(true));
            expect_op(":");
            e->args.push_back(parse_expression(true));
          }
          next();
          return e;
        }
        break;
      default:
        break;
    }
    error("unexpected {}", describe(t));
  }

  ExprPtr parse_postfix(ExprPtr node) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        node = parse_subscript(std::move(node));
      } else if (is_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_filter_expr(ExprPtr node) {
    while (true) {
      if (is_op("|")) {
        node = parse_filter(std::move(node), false);
      } else if (is_name("is")) {
        node = parse_test(std::move(node));
      } else if (is_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr node) {
    int line = cur().line;
    if (skip_op(".")) {
      if (cur().type == Type::Name) {
        auto e = make(Expr::Kind::GetAttr, line);
        e->name = cur().value;
        e->args.push_back(std::move(node));
        next();
        return e;
      }
      if (cur().type == Type::Int) {
        auto e = make(Expr::Kind::GetItem, line);
        e->args.push_back(std::move(node));
        auto idx = make(Expr::Kind::Literal, line);
        idx->literal = Value::integer(cur().int_value);
        e->args.push_back(std::move(idx));
        next();
        return e;
      }
      error("expected name or number after '.'");
    }
    expect_op("[");
    std::vector<ExprPtr> subs;
    while (!is_op("]")) {
      if (!subs.empty()) expect_op(",");
      subs.push_back(parse_subscribed());
    }
    next();
    if (subs.empty()) error("expected a subscript");
    ExprPtr index;
    if (subs.size() == 1) {
      index = std::move(subs[0]);
    } else {
      index = make(Expr::Kind::TupleLit, line);
      index->args = std::move(subs);
    }
    if (index->kind == Expr::Kind::Slice) {
      index->args[0] = std::move(node);
      return index;
    }
    auto e = make(Expr::Kind::GetItem, line);
    e->args.push_back(std::move(node));
    e->args.push_back(std::move(index));
    return e;
  }

  // An index or a slice; a slice comes back as Slice with args[0] left for the sliced object.
  ExprPtr parse_subscribed() {
    int line = cur().line;
    ExprPtr start;
    if (!is_op(":")) {
      start = parse_expression(true);
      if (!is_op(":")) return start;
    }
    next();
    auto e = make(Expr::Kind::Slice, line);
    e->args.push_back(nullptr);
    e->args.push_back(std::move(start));
    if (!is_op(":") && !is_op("]") && !is_op(",")) {
      e->args.push_back(parse_expression(true));
    } else {
      e->args.push_back(nullptr);
    }
    if (skip_op(":") && !is_op("]") && !is_op(",")) {
      e->args.push_back(parse_expression(true));
    } else {
      e->args.push_back(nullptr);
    }
    return e;
  }

  void parse_call_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) {
        expect_op(",");
        if (is_op(")")) break;
      }
      first = false;
      if (is_op("*") || is_op("**")) error("*args and **kwargs in calls are not supported");
      if (cur().type == Type::Name && peek().type == Type::Op && peek().value == "=") {
        std::string key = cur().value;
        next();
        next();
        e.kwargs.emplace_back(key, parse_expression(true));
      } else {
        if (!e.kwargs.empty()) error("positional argument after keyword argument");
        e.args.push_back(parse_expression(true));
      }
    }
    next();
  }

  ExprPtr parse_call(ExprPtr node) {
    auto e = make(Expr::Kind::Call, cur().line);
    e->args.push_back(std::move(node));
    parse_call_args(*e);
    return e;
  }

  ExprPtr parse_filter(ExprPtr node, bool start_inline) {
    while (is_op("|") || start_inline) {
      if (!start_inline) next();
      start_inline = false;
      auto e = make(Expr::Kind::Filter, cur().line);
      e->name = expect_name();
      while (skip_op(".")) e->name += "." + expect_name();
      e->args.push_back(std::move(node));
      if (is_op("(")) parse_call_args(*e);
      node = std::move(e);
    }
    return node;
  }

  ExprPtr parse_test(ExprPtr node) {
    auto e = make(Expr::Kind::Test, cur().line);
    next();  // 'is'
    if (skip_name("not")) e->negated = true;
    e->name = expect_name();
    while (skip_op(".")) e->name += "." + expect_name();
    e->args.push_back(std::move(node));
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((cur().type == Type::Name || cur().type == Type::String || cur().type == Type::Int ||
                cur().type == Type::Float || is_op("(") || is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) error("you cannot chain multiple tests with is");
      e->args.push_back(parse_postfix(parse_primary()));
    }
    return e;
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  std::string name_;
  int depth_ = 0;
};

}  // namespace

std::shared_ptr<Program> parse_template(const std::string& source, const std::string& name) {
  Lexer lexer(source, name);
  Parser parser(lexer.run(), name);
  return parser.run();
}

}  // namespace mxlm::text::jinja
