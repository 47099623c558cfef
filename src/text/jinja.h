// A Jinja2 interpreter for Hugging Face chat templates, configured as transformers configures Jinja2:
// ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]), a
// `tojson` filter that is Python json.dumps (key order kept, ensure_ascii=False by default, no HTML
// escaping) and a `raise_exception` global. Output is meant to be byte-identical to Jinja2 3.1.6.
//
// Supported: {{ }}, {% if/elif/else %}, {% for ... in ... if ... %} with loop.* and else, break and
// continue, {% set %} (also namespace attributes, tuples and set blocks), macros (defaults, caller,
// call blocks), filter blocks, raw blocks, comments, whitespace control, and the filters, tests,
// globals and str/dict/list methods chat templates use. Not supported (a clear error instead):
// template inheritance and includes, recursive loops, *args/**kwargs in calls.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <string>

#include "text/jinja_value.h"

namespace mxlm::text::jinja {

struct Program;

// Bounds that keep any template, even a hostile one, from hanging or exhausting memory.
struct RenderLimits {
  uint64_t max_steps = 50'000'000;              // evaluated expressions and executed statements
  size_t max_output_bytes = size_t{256} << 20;  // any rendered string (output, macro result, repetition)
  int max_call_depth = 200;                     // nested macro calls (Python's recursion limit in Jinja2)
};

class Template {
 public:
  // Parses the template; throws mxlm::Error naming the line on syntax errors.
  explicit Template(const std::string& source, std::string name = "template");

  // Renders with the given variables (a JSON object; key order is kept). Throws mxlm::Error naming
  // the template line on runtime errors, including raise_exception().
  std::string render(const nlohmann::ordered_json& variables, const RenderLimits& limits = {}) const;
  std::string render(const Dict& variables, const RenderLimits& limits = {}) const;

 private:
  std::shared_ptr<const Program> program_;
};

}  // namespace mxlm::text::jinja
