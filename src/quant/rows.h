// Quantizes a run of rows of one weight to MXFP4, refusing non-finite input: Quark would export NaN/Inf
// weights as meaningless codes and scales, so a bad value is an error naming the tensor and the element.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/dtype.h"

namespace mxlm::quant {

// `src` points at row `first_row` of tensor `name` ([*, k] of `dtype`: F32, F16 or BF16); writes `rows` rows of
// packed codes ([rows, k/2]) and scale bytes ([rows, k/32]).
void quantize_rows(std::string_view name, DType dtype, const uint8_t* src, size_t first_row, size_t rows, size_t k,
                   uint8_t* packed, uint8_t* scales);

}  // namespace mxlm::quant
