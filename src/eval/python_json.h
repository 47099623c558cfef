// JSON text exactly as Python's `json.dumps(value)` writes it with default arguments (what aiohttp sends
// for `session.post(json=...)`): separators ", " and ": ", keys in insertion order, `ensure_ascii=True`
// (every character outside printable ASCII as a lowercase \uXXXX escape, surrogate pairs above U+FFFF),
// and floats in `repr` form ("0.0", "1e-05", "1e+16").
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace mxlm::eval {

std::string python_json_dumps(const nlohmann::ordered_json& value);

// Python's repr() of a float.
std::string python_float_repr(double value);

}  // namespace mxlm::eval
