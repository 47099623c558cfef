#include "core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include "core/error.h"

namespace mxlm {

void set_log_level(const std::string& level) {
  static const bool configured = [] {
    spdlog::set_default_logger(spdlog::stderr_color_mt("mxlm"));
    spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
    return true;
  }();
  (void)configured;
  const auto parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off") fail("unknown log level '{}'", level);
  spdlog::set_level(parsed);
}

}  // namespace mxlm
