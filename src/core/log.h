// Logging goes to stderr through spdlog so stdout stays clean for machine-readable output.
#pragma once

#include <spdlog/spdlog.h>

namespace mxlm {

// Sets the level from "trace|debug|info|warn|error|off"; unknown names are an Error.
void set_log_level(const std::string& level);

}  // namespace mxlm
