// The tree-walking interpreter. Scoping follows Jinja2: each loop iteration and each macro call gets a
// fresh scope whose assignments never leak out; `if` bodies share their enclosing scope; macros see
// the scope they were defined in (late-bound, like Python closures).
#include <fmt/format.h>

#include "core/error.h"
#include "text/jinja.h"
#include "text/jinja_ast.h"
#include "text/jinja_builtins.h"

namespace mxlm::text::jinja {
namespace {

// An error that already names its template line, so outer statements do not re-wrap it.
class LocatedError : public Error {
 public:
  using Error::Error;
};

struct Scope {
  std::shared_ptr<Scope> parent;
  Dict vars;

  const Value* lookup(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent.get()) {
      if (const Value* v = s->vars.find(name)) return v;
    }
    return nullptr;
  }
};
using ScopePtr = std::shared_ptr<Scope>;

ScopePtr child_scope(const ScopePtr& parent) {
  auto s = std::make_shared<Scope>();
  s->parent = parent;
  return s;
}

enum class Flow { Normal, Break, Continue };

class Renderer {
 public:
  Renderer(const Program& program, const RenderLimits& limits) : program_(program), limits_(limits) {
    builtin_limits_.max_bytes = limits.max_output_bytes;
  }

  // Values can form reference cycles only through the two mutable things: a macro stored in the
  // scope it closes over, and a namespace holding itself. Macros therefore hold their scope weakly
  // while the renderer owns it, and mutated namespaces are emptied when rendering ends.
  ~Renderer() {
    for (auto& ns : mutated_namespaces_) ns.namespace_dict().items.clear();
  }

  std::string run(const Dict& variables) {
    auto globals = std::make_shared<Scope>();
    add_globals(globals->vars);
    for (const auto& [k, v] : variables.items) globals->vars.set(k, v);
    auto top = child_scope(globals);
    std::string out;
    exec_body(program_.body, top, out);
    return out;
  }

 private:
  [[noreturn]] void located(int line, const std::string& message) const {
    throw LocatedError(fmt::format("{}:{}: {}", program_.name, line, message));
  }

  void step(int line, uint64_t cost = 1) {
    steps_ += cost;
    if (steps_ > limits_.max_steps)
      located(line, fmt::format("template exceeded its budget of {} steps", limits_.max_steps));
  }

  // Builtins can make large values in one call (range(), list filters): their size counts as work.
  Value charged(Value v, int line) {
    if (v.is_list()) step(line, v.as_list().size());
    if (v.is_string()) step(line, v.as_string().size() / 64);
    return v;
  }

  void append(std::string& out, const std::string& s, int line) {
    if (out.size() + s.size() > limits_.max_output_bytes) {
      located(line, fmt::format("template output exceeds {} bytes", limits_.max_output_bytes));
    }
    out += s;
  }

  Flow exec_body(const Body& body, ScopePtr& scope, std::string& out) {
    for (const auto& stmt : body) {
      Flow f = exec(*stmt, scope, out);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Flow exec(const Stmt& s, ScopePtr& scope, std::string& out) {
    step(s.line);
    try {
      return exec_inner(s, scope, out);
    } catch (const LocatedError&) {
      throw;
    } catch (const Error& e) {
      located(s.line, e.what());
    }
  }

  void assign(Scope& scope, const std::vector<std::string>& targets, const Value& v) {
    if (targets.size() == 1) {
      scope.vars.set(targets[0], v);
      return;
    }
    ValueList items = iterate(v);
    if (items.size() != targets.size()) {
      fail("cannot unpack {} values into {} names", items.size(), targets.size());
    }
    for (size_t i = 0; i < targets.size(); ++i) scope.vars.set(targets[i], items[i]);
  }

  Flow exec_inner(const Stmt& s, ScopePtr& scope, std::string& out) {
    switch (s.kind) {
      case Stmt::Kind::Text:
        append(out, s.text, s.line);
        return Flow::Normal;
      case Stmt::Kind::Output:
        append(out, eval(*s.expr, scope).str(), s.line);
        return Flow::Normal;
      case Stmt::Kind::If:
        for (size_t i = 0; i < s.conditions.size(); ++i) {
          if (eval(*s.conditions[i], scope).truthy()) return exec_body(s.bodies[i], scope, out);
        }
        return exec_body(s.else_body, scope, out);
      case Stmt::Kind::For:
        return exec_for(s, scope, out);
      case Stmt::Kind::Set: {
        Value v = eval(*s.expr, scope);
        set_target(s, *scope, v);
        return Flow::Normal;
      }
      case Stmt::Kind::SetBlock: {
        std::string captured;
        auto inner = scope;
        exec_body(s.body, inner, captured);
        Value v = Value::string(std::move(captured));
        if (s.filter) v = apply_filter_chain(*s.filter, v, scope);
        set_target(s, *scope, v);
        return Flow::Normal;
      }
      case Stmt::Kind::Macro:
        scope->vars.set(s.text, make_macro(s, scope));
        return Flow::Normal;
      case Stmt::Kind::CallBlock: {
        const Expr& call = *s.expr;
        Value callee = eval(*call.args[0], scope);
        CallArgs args = eval_args(call, scope);
        args.keyword.emplace_back("caller", make_macro(s, scope));
        append(out, invoke(callee, args, s.line).str(), s.line);
        return Flow::Normal;
      }
      case Stmt::Kind::FilterBlock: {
        std::string captured;
        auto inner = scope;
        exec_body(s.body, inner, captured);
        append(out, apply_filter_chain(*s.filter, Value::string(std::move(captured)), scope).str(), s.line);
        return Flow::Normal;
      }
      case Stmt::Kind::Break:
        return Flow::Break;
      case Stmt::Kind::Continue:
        return Flow::Continue;
    }
    return Flow::Normal;
  }

  void set_target(const Stmt& s, Scope& scope, const Value& v) {
    if (s.attr.empty()) {
      assign(scope, s.targets, v);
      return;
    }
    const Value* ns = scope.lookup(s.targets[0]);
    if (!ns || !ns->is_namespace()) fail("cannot assign attribute on non-namespace object");
    // Namespaces are mutable, so their nesting is not known from construction: measure what is stored.
    step(s.line, nesting_of(v, 1));
    ns->namespace_dict().set(s.attr, v);
    mutated_namespaces_.push_back(*ns);
  }

  // Walks the containers in `v` (bounded by NestingGuard); returns the number of values visited.
  uint64_t nesting_of(const Value& v, int level) {
    uint64_t visited = 0;
    walk(v, level, visited);
    return visited;
  }

  void walk(const Value& v, int level, uint64_t& visited) {
    if (level > kMaxValueNesting) fail("value nesting deeper than {} levels", kMaxValueNesting);
    if (++visited > std::min<uint64_t>(limits_.max_steps, kMaxValueNodes))
      fail("value too large to store in a namespace");
    if (v.is_list()) {
      for (const auto& x : v.as_list()) walk(x, level + 1, visited);
    } else if (v.is_dict()) {
      for (const auto& [k, x] : v.as_dict().items) walk(x, level + 1, visited);
    } else if (v.is_namespace()) {
      for (const auto& [k, x] : v.namespace_dict().items) walk(x, level + 1, visited);
    }
  }

  Value apply_filter_chain(const Expr& filter, const Value& input, const ScopePtr& scope) {
    const Expr& inner = *filter.args[0];
    Value v = inner.kind == Expr::Kind::Filter ? apply_filter_chain(inner, input, scope) : input;
    CallArgs args = eval_args(filter, scope);
    return apply_filter(filter.name, v, args, builtin_limits_);
  }

  Flow exec_for(const Stmt& s, ScopePtr& scope, std::string& out) {
    Value seq = eval(*s.expr, scope);
    ValueList items = iterate(seq);
    if (s.filter) {
      ValueList kept;
      for (const auto& item : items) {
        step(s.line);
        auto probe = child_scope(scope);
        assign(*probe, s.targets, item);
        if (eval(*s.filter, probe).truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) return exec_body(s.else_body, scope, out);
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      step(s.line);
      auto iter = child_scope(scope);
      Dict loop;
      loop.set("index", Value::integer(i + 1));
      loop.set("index0", Value::integer(i));
      loop.set("revindex", Value::integer(n - i));
      loop.set("revindex0", Value::integer(n - i - 1));
      loop.set("first", Value::boolean(i == 0));
      loop.set("last", Value::boolean(i == n - 1));
      loop.set("length", Value::integer(n));
      loop.set("depth", Value::integer(1));
      loop.set("depth0", Value::integer(0));
      loop.set("previtem", i > 0 ? items[i - 1] : Value::undefined("there is no previous item"));
      loop.set("nextitem", i + 1 < n ? items[i + 1] : Value::undefined("there is no next item"));
      loop.set("cycle", Value::function("loop.cycle", [i](CallArgs& args) {
                 if (args.positional.empty()) fail("no items for cycling given");
                 return args.positional[static_cast<size_t>(i) % args.positional.size()];
               }));
      iter->vars.set("loop", Value::dict(std::move(loop)));
      assign(*iter, s.targets, items[i]);
      if (exec_body(s.body, iter, out) == Flow::Break) break;
    }
    return Flow::Normal;
  }

  Value make_macro(const Stmt& s, const ScopePtr& defining) {
    const Stmt* macro = &s;
    macro_scopes_.push_back(defining);
    std::weak_ptr<Scope> closure = defining;
    return Value::function(s.text.empty() ? "caller" : s.text, [this, macro, closure](CallArgs& args) {
      if (++depth_ > limits_.max_call_depth) {
        --depth_;
        fail("maximum recursion depth ({}) exceeded in macro calls", limits_.max_call_depth);
      }
      struct Leave {
        int& d;
        ~Leave() { --d; }
      } leave{depth_};
      auto scope = child_scope(closure.lock());  // alive: macro_scopes_ owns it
      const auto& params = macro->params;
      ValueList varargs;
      for (size_t i = 0; i < args.positional.size(); ++i) {
        if (i < params.size()) {
          scope->vars.set(params[i].first, args.positional[i]);
        } else {
          varargs.push_back(args.positional[i]);
        }
      }
      Dict kwargs;
      for (const auto& [k, v] : args.keyword) {
        bool is_param = false;
        for (const auto& p : params) is_param = is_param || p.first == k;
        if (is_param || k == "caller") {
          scope->vars.set(k, v);
        } else {
          kwargs.set(k, v);
        }
      }
      for (size_t i = args.positional.size(); i < params.size(); ++i) {
        if (scope->vars.find(params[i].first)) continue;
        scope->vars.set(params[i].first,
                        params[i].second ? eval(*params[i].second, scope)
                                         : Value::undefined("parameter '" + params[i].first + "' was not provided"));
      }
      scope->vars.set("varargs", Value::list(std::move(varargs)));
      scope->vars.set("kwargs", Value::dict(std::move(kwargs)));
      std::string out;
      exec_body(macro->body, scope, out);
      return Value::string(std::move(out));
    });
  }

  CallArgs eval_args(const Expr& e, const ScopePtr& scope) {
    CallArgs args;
    for (size_t i = 1; i < e.args.size(); ++i) args.positional.push_back(eval(*e.args[i], scope));
    for (const auto& [k, v] : e.kwargs) args.keyword.emplace_back(k, eval(*v, scope));
    return args;
  }

  Value invoke(const Value& callee, CallArgs& args, int line) {
    require_defined(callee);
    if (!callee.is_callable()) fail("'{}' object is not callable", callee.type_name());
    (void)line;
    return callee.as_callable().call(args);
  }

  Value eval(const Expr& e, const ScopePtr& scope) {
    step(e.line);
    switch (e.kind) {
      case Expr::Kind::Literal:
        return e.literal;
      case Expr::Kind::Name: {
        if (const Value* v = scope->lookup(e.name)) return *v;
        return Value::undefined("'" + e.name + "' is undefined");
      }
      case Expr::Kind::GetAttr:
        return get_attribute(eval(*e.args[0], scope), e.name);
      case Expr::Kind::GetItem:
        return get_item(eval(*e.args[0], scope), eval(*e.args[1], scope));
      case Expr::Kind::Slice: {
        // A slice inside a tuple subscript (x[1:2, 3]) has no object of its own: Jinja2 builds a slice object there,
        // the subscript's TypeError is swallowed by its getitem and the result is undefined; so is ours (found by
        // fuzz_jinja).
        if (!e.args[0]) return Value::undefined("a slice inside a tuple index");
        Value obj = eval(*e.args[0], scope);
        auto part = [&](size_t i) { return e.args[i] ? eval(*e.args[i], scope) : Value::none(); };
        return slice_value(obj, part(1), part(2), part(3));
      }
      case Expr::Kind::Call: {
        Value callee = eval(*e.args[0], scope);
        CallArgs args = eval_args(e, scope);
        return charged(invoke(callee, args, e.line), e.line);
      }
      case Expr::Kind::Filter: {
        Value v = eval(*e.args[0], scope);
        CallArgs args = eval_args(e, scope);
        return charged(apply_filter(e.name, v, args, builtin_limits_), e.line);
      }
      case Expr::Kind::Test: {
        Value v = eval(*e.args[0], scope);
        CallArgs args = eval_args(e, scope);
        return Value::boolean(apply_test(e.name, v, args) != e.negated);
      }
      case Expr::Kind::Negate:
        return negate(eval(*e.args[0], scope));
      case Expr::Kind::Plus: {
        Value v = eval(*e.args[0], scope);
        require_defined(v);
        if (!v.is_number()) fail("bad operand type for unary +: '{}'", v.type_name());
        return v.is_bool() ? Value::integer(v.as_int()) : v;
      }
      case Expr::Kind::Not:
        return Value::boolean(!eval(*e.args[0], scope).truthy());
      case Expr::Kind::And: {
        Value l = eval(*e.args[0], scope);
        return l.truthy() ? eval(*e.args[1], scope) : l;
      }
      case Expr::Kind::Or: {
        Value l = eval(*e.args[0], scope);
        return l.truthy() ? l : eval(*e.args[1], scope);
      }
      case Expr::Kind::Binary:
        return charged(binary_op(e.name, eval(*e.args[0], scope), eval(*e.args[1], scope), builtin_limits_), e.line);
      case Expr::Kind::Compare: {
        Value left = eval(*e.args[0], scope);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.args[i + 1], scope);
          if (!compare(e.ops[i], left, right)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case Expr::Kind::Conditional:
        if (eval(*e.args[0], scope).truthy()) return eval(*e.args[1], scope);
        if (e.args[2]) return eval(*e.args[2], scope);
        return Value::undefined("the inline if-expression evaluated to false and no else section was defined.");
      case Expr::Kind::ListLit:
      case Expr::Kind::TupleLit: {
        ValueList items;
        for (const auto& a : e.args) items.push_back(eval(*a, scope));
        return Value::list(std::move(items), e.kind == Expr::Kind::TupleLit);
      }
      case Expr::Kind::DictLit: {
        Dict d;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          Value k = eval(*e.args[i], scope);
          if (!k.is_string()) fail("dict literal keys must be strings in this interpreter, got {}", k.type_name());
          d.set(k.as_string(), eval(*e.args[i + 1], scope));
        }
        return Value::dict(std::move(d));
      }
    }
    return Value();
  }

  const Program& program_;
  RenderLimits limits_;
  BuiltinLimits builtin_limits_;
  uint64_t steps_ = 0;
  int depth_ = 0;
  std::vector<ScopePtr> macro_scopes_;
  std::vector<Value> mutated_namespaces_;
};

}  // namespace

Template::Template(const std::string& source, std::string name) : program_(parse_template(source, name)) {}

std::string Template::render(const Dict& variables, const RenderLimits& limits) const {
  Renderer renderer(*program_, limits);
  return renderer.run(variables);
}

std::string Template::render(const nlohmann::ordered_json& variables, const RenderLimits& limits) const {
  if (!variables.is_object()) fail("template variables must be a JSON object");
  Value v = Value::from_json(variables);
  return render(v.as_dict(), limits);
}

}  // namespace mxlm::text::jinja
