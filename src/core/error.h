// One exception type for every user-facing failure: the message names the problem and the object
// (file, tensor, request field) so the CLI and the server can show it unchanged.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace mxlm {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace mxlm
