// Operators, attribute access, filters, tests and methods with Python/Jinja2 semantics. Shared by the
// interpreter; errors are thrown as mxlm::Error without a location (the interpreter adds the line).
#pragma once

#include <functional>
#include <string>

#include "text/jinja_value.h"

namespace mxlm::text::jinja {

// Caps on sizes that builtins can make explode (string repetition, range()).
struct BuiltinLimits {
  size_t max_bytes = size_t{256} << 20;
};

// `obj.name`: Jinja2's getattr (attribute/method first, then item).
Value get_attribute(const Value& obj, const std::string& name);
// `obj[key]`: Jinja2's getitem (item first, then attribute); failures give Undefined.
Value get_item(const Value& obj, const Value& key);
// `obj[start:stop:step]` with Python semantics (null Values for omitted parts).
Value slice_value(const Value& obj, const Value& start, const Value& stop, const Value& step);

Value binary_op(const std::string& op, const Value& a, const Value& b, const BuiltinLimits& limits);
Value negate(const Value& v);
bool compare(const std::string& op, const Value& a, const Value& b);
bool contains(const Value& container, const Value& item);

// Iteration as Python's iter() sees it: list items, dict keys, string characters; Undefined is empty.
ValueList iterate(const Value& v);

// Calls a filter or test by name. `call_test`/`call_filter` callbacks let map/select reuse them.
Value apply_filter(const std::string& name, const Value& v, CallArgs& args, const BuiltinLimits& limits);
bool apply_test(const std::string& name, const Value& v, CallArgs& args);

// Throws the Undefined's error when a value that must exist is Undefined.
void require_defined(const Value& v);

// The global functions of a transformers chat-template environment.
void add_globals(Dict& globals);

}  // namespace mxlm::text::jinja
