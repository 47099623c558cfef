// Syntax tree of a parsed Jinja template. One node type for expressions and one for statements keeps
// the interpreter a pair of switch statements; every node remembers its template line for errors.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "text/jinja_value.h"

namespace mxlm::text::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    Literal,      // value
    Name,         // name
    GetAttr,      // args[0].name
    GetItem,      // args[0][args[1]]
    Slice,        // args[0][args[1]:args[2]:args[3]] (any of 1..3 may be null)
    Call,         // args[0](args[1..], kwargs)
    Filter,       // args[0] | name(args[1..], kwargs)
    Test,         // args[0] is [not] name(args[1..])
    Negate,       // -args[0]
    Plus,         // +args[0]
    Not,          // not args[0]
    And,          // args[0] and args[1]
    Or,           // args[0] or args[1]
    Binary,       // args[0] op args[1] (op in name: + - * / // % ** ~)
    Compare,      // args[0] ops[0] args[1] ops[1] args[2] ... (== != < <= > >= in notin)
    Conditional,  // args[1] if args[0] else args[2] (args[2] may be null)
    ListLit,      // [args...]
    TupleLit,     // (args...)
    DictLit,      // {args[0]: args[1], args[2]: args[3], ...}
  };
  Kind kind;
  int line = 0;
  Value literal;
  std::string name;
  bool negated = false;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Stmt {
  enum class Kind {
    Text,         // text
    Output,       // {{ expr }}
    If,           // conditions[i] -> bodies[i]; else_body
    For,          // targets in expr [if filter]: body; else_body
    Set,          // targets (or namespace attr) = expr
    SetBlock,     // {% set target %}body{% endset %} (optionally filtered)
    Macro,        // name(params) body
    CallBlock,    // {% call macro(...) %}body{% endcall %}: body becomes caller()
    FilterBlock,  // {% filter f %}body{% endfilter %}
    Break,
    Continue,
  };
  Kind kind;
  int line = 0;
  std::string text;
  ExprPtr expr;
  ExprPtr filter;  // For: loop filter; SetBlock/FilterBlock: Filter chain applied to a placeholder
  std::vector<std::string> targets;
  std::string attr;  // Set/SetBlock: `ns.attr` target when non-empty (targets[0] is the namespace)
  std::vector<ExprPtr> conditions;
  std::vector<Body> bodies;
  Body body;
  Body else_body;
  // Macro parameters: names and defaults (null when none).
  std::vector<std::pair<std::string, ExprPtr>> params;
};

struct Program {
  std::string name;
  Body body;
};

// Parses template source (Jinja2 syntax with trim_blocks and lstrip_blocks) into a program.
// Throws mxlm::Error naming the template line on syntax errors.
std::shared_ptr<Program> parse_template(const std::string& source, const std::string& name);

}  // namespace mxlm::text::jinja
