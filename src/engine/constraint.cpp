#include "engine/constraint.h"

#include <algorithm>
#include <limits>

#include "core/error.h"

namespace mxlm::engine {

namespace {
constexpr int32_t kDone = -2;
constexpr int32_t kDead = -1;
}  // namespace

ToolChoiceConstraint::ToolChoiceConstraint(std::vector<int32_t> trigger, std::vector<int32_t> forced,
                                           std::vector<std::string> choices, std::shared_ptr<const TokenBytes> vocab)
    : trigger_(std::move(trigger)), forced_(std::move(forced)), vocab_(std::move(vocab)) {
  if (!choices.empty() && !vocab_) fail("a constraint with choices needs the vocabulary's token bytes");
  std::array<int32_t, 256> none;
  none.fill(-1);
  next_.push_back(none);
  terminal_.push_back(false);
  for (const auto& choice : choices) {
    if (choice.empty()) fail("a constraint choice is empty");
    int32_t node = 0;
    for (const char ch : choice) {
      const auto b = static_cast<unsigned char>(ch);
      if (next_[static_cast<size_t>(node)][b] < 0) {
        next_[static_cast<size_t>(node)][b] = static_cast<int32_t>(next_.size());
        next_.push_back(none);
        terminal_.push_back(false);
      }
      node = next_[static_cast<size_t>(node)][b];
    }
    terminal_[static_cast<size_t>(node)] = true;
  }
}

int32_t ToolChoiceConstraint::walk(int32_t node, const std::string& bytes) const {
  for (const char ch : bytes) {
    if (terminal_[static_cast<size_t>(node)]) return kDone;
    node = next_[static_cast<size_t>(node)][static_cast<unsigned char>(ch)];
    if (node < 0) return kDead;
  }
  return terminal_[static_cast<size_t>(node)] ? kDone : node;
}

ToolChoiceConstraint::State ToolChoiceConstraint::state(std::span<const int32_t> output) const {
  State s;
  size_t start = 0;
  if (!trigger_.empty()) {
    const auto it = std::search(output.begin(), output.end(), trigger_.begin(), trigger_.end());
    if (it == output.end()) {
      s.phase = Phase::Waiting;
      return s;
    }
    start = static_cast<size_t>(it - output.begin()) + trigger_.size();
  }
  const size_t after = output.size() - start;
  if (after < forced_.size()) {
    s.phase = Phase::Forced;
    s.forced_index = after;
    return s;
  }
  if (next_.size() == 1) return s;  // no choices: free after the forced tokens
  int32_t node = 0;
  for (size_t i = start + forced_.size(); i < output.size(); ++i) {
    const auto t = static_cast<size_t>(output[i]);
    node = walk(node, t < vocab_->size() ? (*vocab_)[t] : std::string());
    if (node == kDone || node == kDead) return s;  // satisfied (or left by a token it did not choose): free
  }
  s.phase = Phase::Choice;
  s.node = node;
  return s;
}

bool ToolChoiceConstraint::active(std::span<const int32_t> output) const {
  const Phase p = state(output).phase;
  return p == Phase::Forced || p == Phase::Choice;
}

void ToolChoiceConstraint::apply(std::span<float> logits, std::span<const int32_t> output) const {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  const State s = state(output);
  if (s.phase == Phase::Forced) {
    const int32_t keep = forced_[s.forced_index];
    if (keep < 0 || static_cast<size_t>(keep) >= logits.size())
      fail("the forced token {} is outside the vocabulary (size {})", keep, logits.size());
    for (size_t i = 0; i < logits.size(); ++i)
      if (static_cast<int32_t>(i) != keep) logits[i] = kMasked;
    return;
  }
  if (s.phase != Phase::Choice) return;
  bool any = false;
  for (size_t i = 0; i < logits.size(); ++i) {
    // A token that spells nothing would leave the constraint where it is; a token past the vocabulary's bytes
    // table (padding rows of the embedding) is never chosen.
    const bool ok = i < vocab_->size() && !(*vocab_)[i].empty() && walk(s.node, (*vocab_)[i]) != kDead;
    if (ok)
      any = true;
    else
      logits[i] = kMasked;
  }
  if (!any) fail("no token of the vocabulary continues the constrained output");
}

}  // namespace mxlm::engine
