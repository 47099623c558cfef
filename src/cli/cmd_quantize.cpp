// `mxlm quantize`: file-to-file MXFP4 quantization in AMD Quark's export format (src/quant/quantizer.h).
// Flag names follow Quark's quantize script: --template is Quark's model-type template, --exclude-layers
// replaces the template's exclude list exactly as `template.get_config(scheme, exclude_layers=...)` does
// (give it with no value to exclude nothing).
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <fmt/format.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/registry.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "quant/quantizer.h"
#include "quant/template.h"

namespace mxlm::cli {
namespace {

struct Flags {
  quant::QuantizeOptions options;
  std::string model, output;
  std::vector<std::string> exclude;
  std::string max_shard_size = "5GB";
  bool no_progress = false;
  bool verify_only = false;
};

void run(Flags& f, const CLI::App& cmd) {
  auto& o = f.options;
  o.model_dir = f.model;
  o.output_dir = f.output;
  if (cmd.count("--exclude-layers")) o.exclude_layers = f.exclude;
  o.max_shard_bytes = io::parse_size(f.max_shard_size);
  o.progress = !f.no_progress && ::isatty(STDERR_FILENO);  // a bar only where someone watches it
  if (o.output_dir.empty() && !o.dry_run) fail("--output is required (or use --dry-run)");

  if (f.verify_only) {
    const auto v = quant::verify_quantized(o.model_dir, o.output_dir, o.threads, o.progress);
    std::printf("verified %s against %s: %zu quantized and %zu copied tensors match (%s checked)\n",
                o.output_dir.c_str(), o.model_dir.c_str(), v.quantized, v.copied,
                format_bytes(static_cast<double>(v.bytes_checked)).c_str());
    return;
  }
  const auto r = quant::quantize_checkpoint(o);
  if (o.dry_run) {
    std::printf("template %s, scheme %s, exclude patterns:", r.template_name.c_str(), o.scheme.c_str());
    for (const auto& p : r.exclude_patterns) std::printf(" %s", p.c_str());
    std::printf("\n%s", quant::describe_plan(r.plan).c_str());
    std::printf("output shards: %zu (max %s each)\n", r.shards_total,
                format_bytes(static_cast<double>(o.max_shard_bytes)).c_str());
    return;
  }
  const double gb_s = r.seconds > 0 ? static_cast<double>(r.plan.bytes_in) / r.seconds / 1e9 : 0.0;
  std::printf("quantized %zu tensors, copied %zu: %s -> %s in %zu shard(s)%s, %.1f s (%.2f GB/s of input)%s\n",
              r.plan.quantized_count, r.plan.copied_count, format_bytes(static_cast<double>(r.plan.bytes_in)).c_str(),
              format_bytes(static_cast<double>(r.plan.bytes_out)).c_str(), r.shards_total,
              r.shards_resumed ? fmt::format(" ({} resumed)", r.shards_resumed).c_str() : "", r.seconds, gb_s,
              r.verified ? "; verified" : "");
}

void add_quantize(CLI::App& app) {
  auto flags = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand("quantize", "Quantize a checkpoint to MXFP4 in AMD Quark's export format");
  cmd->add_option("--model", flags->model, "input Hugging Face checkpoint directory")->required();
  cmd->add_option("--output", flags->output, "output directory");
  cmd->add_option("--template", flags->options.template_name,
                  "quantization template (minimax_m3_vl, default); default: by config.json model_type");
  cmd->add_option("--scheme", flags->options.scheme, "quantization scheme (mxfp4)")->capture_default_str();
  cmd->add_option("--exclude-layers", flags->exclude,
                  "module-name patterns kept unquantized (fnmatch globs, or re:REGEX); replaces the template's list")
      ->expected(0, -1);
  cmd->add_option("--max-shard-size", flags->max_shard_size, "largest output shard (e.g. 5GB, 500MB)")
      ->capture_default_str();
  cmd->add_option("--threads", flags->options.threads, "worker threads (default: all cores)");
  cmd->add_flag("--skip-incompatible", flags->options.skip_incompatible,
                "keep selected weights that cannot be MXFP4 (not 2-D, K % 32 != 0, not a float) instead of failing");
  cmd->add_flag("--dry-run", flags->options.dry_run, "print the plan (what is quantized, what is kept, sizes) only");
  cmd->add_flag("--overwrite", flags->options.overwrite, "replace the checkpoint files of a non-empty output");
  cmd->add_flag("--verify", flags->options.verify, "re-read the output and check every tensor against the input");
  cmd->add_flag("--verify-only", flags->verify_only, "only check an existing --output against --model");
  cmd->add_flag("--no-progress", flags->no_progress, "no progress bar");
  cmd->callback([flags, cmd] { run(*flags, *cmd); });
}

const bool registered = register_command("quantize", add_quantize);

}  // namespace
}  // namespace mxlm::cli
