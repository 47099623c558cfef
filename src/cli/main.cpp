#include <algorithm>
#include <cstdio>

#include "cli/registry.h"
#include "core/error.h"
#include "core/log.h"

namespace mxlm::cli {

std::vector<Command>& commands() {
  static std::vector<Command> all;
  return all;
}

bool register_command(std::string name, Registrar add) {
  commands().push_back({std::move(name), std::move(add)});
  return true;
}

int& exit_code() {
  static int code = 0;
  return code;
}

}  // namespace mxlm::cli

int main(int argc, char** argv) {
  CLI::App app{"mxlm: quantize MoE checkpoints to MXFP4, serve them, evaluate them"};
  app.require_subcommand(1);
  mxlm::set_log_level("info");
  app.add_option_function<std::string>(
         "--log-level", [](const std::string& level) { mxlm::set_log_level(level); }, "trace|debug|info|warn|error|off")
      ->trigger_on_parse();
  auto& all = mxlm::cli::commands();
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  for (const auto& command : all) command.add(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const mxlm::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return mxlm::cli::exit_code();
}
