// What `mxlm quantize` does with every tensor, decided from names, dtypes and shapes alone (no data), exactly as
// Quark's file-to-file quantizer decides it: a tensor is a "linear weight" when its name ends in `.weight`,
// its module name does not end in "norm" nor contain "embed", and it has at least 2 dimensions. A linear
// weight whose module matches no exclude pattern is quantized to MXFP4; everything else is copied unchanged.
// Unlike Quark (which pads), a selected weight must be 2-D with K % 32 == 0 and F32/F16/BF16, or it is an
// error naming the tensor (or, with skip_incompatible, it is copied and added to the exclude list).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "io/safetensors.h"
#include "quant/pattern.h"

namespace mxlm::quant {

enum class TensorAction { Copy, Quantize };

struct TensorPlan {
  std::string name;  // input tensor name
  DType dtype;
  std::vector<int64_t> shape;
  TensorAction action = TensorAction::Copy;
  uint64_t in_bytes = 0;
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.size() < 2 ? 0 : shape[1]; }
};

struct PlanOptions {
  std::vector<std::string> exclude;  // effective exclude patterns (globs, or `re:` regexes)
  bool skip_incompatible = false;
};

struct QuantPlan {
  std::vector<TensorPlan> tensors;            // input order
  std::vector<std::string> excluded_modules;  // sorted exact module names, as Quark writes `exclude`
  std::vector<std::string> skipped;           // incompatible selected tensors copied (skip_incompatible)
  size_t quantized_count = 0;
  size_t copied_count = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  uint64_t quantized_bytes_in = 0;

  // The output tensors (quantized ones become `.weight` U8 [N, K/2] + `.weight_scale` U8 [N, K/32]), in order.
  std::vector<io::PlannedTensor> output_tensors() const;
};

// Quark's name rule (`_is_linear_weight_tensor`); the >= 2-D rule is applied by make_plan.
bool is_linear_weight_name(std::string_view tensor_name);
// "a.b.weight" -> "a.b".
std::string module_name_of(std::string_view weight_name);

QuantPlan make_plan(const std::vector<io::TensorInfo>& tensors, const PlanOptions& options);

// Human-readable summary for --dry-run: counts, bytes in/out, and the quantized/kept module groups.
std::string describe_plan(const QuantPlan& plan);

}  // namespace mxlm::quant
