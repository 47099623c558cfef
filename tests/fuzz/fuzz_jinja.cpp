// Parses and renders arbitrary bytes as a Jinja chat template with a small step, size and recursion
// budget, so loops and recursion cannot hang the fuzzer. Any failure must be an mxlm::Error (a clear
// template error); anything else (a crash, another exception, a sanitizer report) is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "text/jinja.h"

namespace {

const nlohmann::ordered_json& context() {
  static const nlohmann::ordered_json vars = nlohmann::ordered_json::parse(R"({
    "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "hi é"}, {"type": "image"}]},
      {"role": "assistant", "content": "<think>x</think>ok", "reasoning_content": "r",
       "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": [1, 2.5, null, true], "b": {"c": "d"}}}}]},
      {"role": "tool", "content": "{\"t\": 1}"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "array"}}}}}],
    "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>", "thinking_mode": "enabled"})");
  return vars;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string source(reinterpret_cast<const char*>(data), size);
  mxlm::text::jinja::RenderLimits limits;
  limits.max_steps = 200000;
  limits.max_output_bytes = size_t{1} << 20;
  limits.max_call_depth = 40;
  try {
    mxlm::text::jinja::Template t(source, "fuzz");
    t.render(context(), limits);
  } catch (const mxlm::Error&) {
  }
  return 0;
}
