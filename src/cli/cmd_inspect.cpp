// mxlm inspect MODEL_DIR [--json]: config summary, tensor count, bytes per dtype, MXFP4 modules.
#include <cstdio>
#include <memory>

#include "cli/registry.h"
#include "io/inspect.h"

namespace mxlm::cli {
namespace {

struct InspectOptions {
  std::string model_dir;
  bool json = false;
  std::string resave_to;
  std::string max_shard_size = "5GB";
};

void run_inspect(const InspectOptions& options) {
  if (!options.resave_to.empty()) {
    const io::Checkpoint checkpoint(options.model_dir);
    io::resave_checkpoint(checkpoint, options.resave_to, io::parse_size(options.max_shard_size));
    return;
  }
  const auto report = io::inspect_model_dir(options.model_dir, options.json);
  const std::string text = options.json ? report.dump(2) + "\n" : io::format_inspect_report(report);
  std::fwrite(text.data(), 1, text.size(), stdout);
}

void add_inspect(CLI::App& app) {
  auto options = std::make_shared<InspectOptions>();
  auto* cmd = app.add_subcommand("inspect", "Show a model directory's config, tensors, dtypes and MXFP4 layers");
  cmd->add_option("model_dir", options->model_dir, "Hugging Face model directory (config.json + safetensors)")
      ->required();
  cmd->add_flag("--json", options->json,
                "Machine-readable report (includes every tensor's dtype, shape, file, offsets)");
  // Hidden: re-writes the checkpoint through mxlm's safetensors writer (used by the interoperability tests).
  cmd->add_option("--resave-to", options->resave_to, "Write every tensor to this directory with mxlm's writer")
      ->group("");
  cmd->add_option("--max-shard-size", options->max_shard_size, "Shard size for --resave-to (5GB, 1GiB, ...)")
      ->group("");
  cmd->callback([options] { run_inspect(*options); });
}

const bool registered = register_command("inspect", add_inspect);

}  // namespace
}  // namespace mxlm::cli
