// Subcommands register themselves here from their own file (cmd_<name>.cpp), so adding one never
// touches main.cpp. Each registers a function that adds a CLI11 subcommand and its callback; the
// callback does the work by calling the library and throws mxlm::Error on bad input.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace mxlm::cli {

using Registrar = std::function<void(CLI::App& app)>;

struct Command {
  std::string name;
  Registrar add;
};

std::vector<Command>& commands();

// Use at namespace scope in a cmd_*.cpp: `const bool registered = register_command("inspect", add_inspect);`
bool register_command(std::string name, Registrar add);

// Exit code a subcommand's callback asks for (default 0); main returns it.
int& exit_code();

}  // namespace mxlm::cli
