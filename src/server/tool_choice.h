// Guaranteed tool calls for tool_choice "required" and a named function (vLLM does this with guided
// decoding): the engine constrains the assistant output to open a MiniMax-M3 tool call,
//   ]<]minimax[>[<tool_call>\n]<]minimax[>[<invoke name="NAME">
// (spec m3_chat_and_tools.md §3, the parser's start marker), with NAME forced for a named choice or spelt
// token by token from the request's tool names for "required"; the arguments that follow are the model's.
// With thinking enabled the constraint starts once the reasoning ends (</mm:think>).
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <string>

#include "engine/constraint.h"
#include "text/tokenizer.h"

namespace mxlm::server {

// The raw bytes of every token id in running text (byte-level pieces that hold part of a UTF-8 character
// included), for spelling names token by token.
engine::TokenBytes token_bytes(const text::Tokenizer& tokenizer);

// `tools`: the request's OpenAI tools array; `named`: the named function, or empty for "required".
std::shared_ptr<const engine::ToolChoiceConstraint> make_tool_choice_constraint(
    const text::Tokenizer& tokenizer, std::shared_ptr<const engine::TokenBytes> vocab,
    const nlohmann::ordered_json& tools, const std::string& named, bool thinking_enabled);

}  // namespace mxlm::server
