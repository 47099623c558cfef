#include "quant/plan.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <set>

#include "core/error.h"
#include "core/progress.h"
#include "mx/mxfp4.h"

namespace mxlm::quant {
namespace {

constexpr std::string_view kWeightSuffix = ".weight";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Why a selected linear weight cannot be written as MXFP4, or "" when it can.
std::string incompatibility(const io::TensorInfo& t) {
  if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
    return fmt::format("its dtype {} is not F32, F16 or BF16", dtype_name(t.dtype));
  if (t.shape.size() != 2)
    return fmt::format("it has {} dimensions (only 2-D linear weights are quantized)", t.shape.size());
  if (t.shape[1] <= 0 || t.shape[1] % static_cast<int64_t>(mx::kBlockSize) != 0)
    return fmt::format("its input dimension K = {} is not a positive multiple of {}", t.shape[1], mx::kBlockSize);
  return "";
}

// "layers.12.experts.7.w1" -> "layers.*.experts.*.w1": groups the thousands of per-layer names for --dry-run.
std::string name_group(std::string_view name) {
  std::string out;
  for (size_t i = 0; i < name.size();) {
    const bool segment_start = i == 0 || name[i - 1] == '.';
    size_t j = i;
    while (j < name.size() && name[j] >= '0' && name[j] <= '9') ++j;
    if (segment_start && j > i && (j == name.size() || name[j] == '.')) {
      out += '*';
      i = j;
    } else {
      out += name[i++];
    }
  }
  return out;
}

}  // namespace

bool is_linear_weight_name(std::string_view tensor_name) {
  const size_t dot = tensor_name.rfind('.');
  if (dot == std::string_view::npos) return false;
  if (tensor_name.substr(dot + 1) != "weight") return false;
  const std::string_view module = tensor_name.substr(0, dot);
  return !ends_with(module, "norm") && module.find("embed") == std::string_view::npos;
}

std::string module_name_of(std::string_view weight_name) {
  if (ends_with(weight_name, kWeightSuffix)) weight_name.remove_suffix(kWeightSuffix.size());
  return std::string(weight_name);
}

QuantPlan make_plan(const std::vector<io::TensorInfo>& tensors, const PlanOptions& options) {
  std::vector<LayerPattern> exclude;
  for (const auto& text : options.exclude) exclude.emplace_back(text);

  QuantPlan plan;
  std::set<std::string_view> names;
  for (const auto& t : tensors)
    if (!names.insert(t.name).second) fail("tensor '{}' appears twice in the input", t.name);

  std::vector<std::string> problems;
  for (const auto& t : tensors) {
    TensorPlan p{t.name, t.dtype, t.shape, TensorAction::Copy, t.nbytes()};
    if (is_linear_weight_name(t.name) && t.shape.size() >= 2) {
      std::string module = module_name_of(t.name);
      if (matches_any(exclude, module)) {
        plan.excluded_modules.push_back(std::move(module));
      } else if (std::string why = incompatibility(t); !why.empty()) {
        if (options.skip_incompatible) {
          plan.skipped.push_back(t.name);
          plan.excluded_modules.push_back(std::move(module));  // a loader must see it as unquantized
        } else {
          problems.push_back(fmt::format("tensor '{}' {}: {}", t.name, fmt::join(t.shape, "x"), why));
        }
      } else {
        const std::string scale_name = t.name + "_scale";
        if (names.count(scale_name))
          fail("tensor '{}' is selected for MXFP4 but the input already has '{}' (is it already quantized?)", t.name,
               scale_name);
        p.action = TensorAction::Quantize;
      }
    }
    plan.bytes_in += p.in_bytes;
    if (p.action == TensorAction::Quantize) {
      ++plan.quantized_count;
      plan.quantized_bytes_in += p.in_bytes;
      const auto rows = static_cast<uint64_t>(p.rows()), k = static_cast<uint64_t>(p.cols());
      plan.bytes_out += rows * (k / 2) + rows * (k / mx::kBlockSize);
    } else {
      ++plan.copied_count;
      plan.bytes_out += p.in_bytes;
    }
    plan.tensors.push_back(std::move(p));
  }
  if (!problems.empty()) {
    std::string list;
    for (size_t i = 0; i < problems.size() && i < 10; ++i) list += "\n  " + problems[i];
    if (problems.size() > 10) list += fmt::format("\n  ... and {} more", problems.size() - 10);
    fail(
        "{} tensor(s) selected for MXFP4 cannot be quantized (exclude them with --exclude-layers, or pass "
        "--skip-incompatible to keep them unquantized):{}",
        problems.size(), list);
  }
  std::sort(plan.excluded_modules.begin(), plan.excluded_modules.end());
  plan.excluded_modules.erase(std::unique(plan.excluded_modules.begin(), plan.excluded_modules.end()),
                              plan.excluded_modules.end());
  return plan;
}

std::vector<io::PlannedTensor> QuantPlan::output_tensors() const {
  std::vector<io::PlannedTensor> out;
  out.reserve(tensors.size() + quantized_count);
  for (const auto& t : tensors) {
    if (t.action == TensorAction::Copy) {
      out.push_back({t.name, t.dtype, t.shape});
    } else {
      out.push_back({t.name, DType::U8, {t.rows(), t.cols() / 2}});
      out.push_back({t.name + "_scale", DType::U8, {t.rows(), t.cols() / static_cast<int64_t>(mx::kBlockSize)}});
    }
  }
  return out;
}

std::string describe_plan(const QuantPlan& plan) {
  struct Group {
    size_t count = 0;
    uint64_t bytes = 0;
    std::set<std::string> dtypes;
  };
  std::vector<std::string> order[2];
  std::map<std::string, Group> groups[2];
  for (const auto& t : plan.tensors) {
    const int q = t.action == TensorAction::Quantize ? 1 : 0;
    const std::string key = name_group(t.name);
    auto [it, inserted] = groups[q].try_emplace(key);
    if (inserted) order[q].push_back(key);
    ++it->second.count;
    it->second.bytes += t.in_bytes;
    it->second.dtypes.insert(std::string(dtype_name(t.dtype)));
  }
  std::string out;
  const char* titles[2] = {"kept (copied unchanged)", "quantized to MXFP4"};
  for (int q : {1, 0}) {
    out += fmt::format("{}: {} tensors\n", titles[q], q ? plan.quantized_count : plan.copied_count);
    for (const auto& key : order[q]) {
      const auto& g = groups[q].at(key);
      out += fmt::format("  {:>6}  {:>10}  {:<5} {}\n", g.count, format_bytes(static_cast<double>(g.bytes)),
                         fmt::format("{}", fmt::join(g.dtypes, ",")), key);
    }
  }
  if (!plan.skipped.empty()) out += fmt::format("skipped as incompatible (kept): {}\n", plan.skipped.size());
  out += fmt::format("excluded linear modules (config `exclude`): {}\n", plan.excluded_modules.size());
  out += fmt::format(
      "input {} -> output {} ({:.1f}% of input)\n", format_bytes(static_cast<double>(plan.bytes_in)),
      format_bytes(static_cast<double>(plan.bytes_out)),
      plan.bytes_in ? 100.0 * static_cast<double>(plan.bytes_out) / static_cast<double>(plan.bytes_in) : 0.0);
  return out;
}

}  // namespace mxlm::quant
