#include "quant/rows.h"

#include <cstring>
#include <vector>

#include "core/error.h"
#include "mx/mxfp4.h"

namespace mxlm::quant {
namespace {

// Index of the first element whose exponent field is all ones (Inf or NaN), or n. The branch-free OR scan
// vectorises; the slow search only runs once something was found.
template <typename Bits>
size_t first_non_finite(const uint8_t* src, size_t n, Bits exponent_mask) {
  Bits any = 0;
  for (size_t i = 0; i < n; ++i) {
    Bits v;
    std::memcpy(&v, src + i * sizeof(Bits), sizeof(Bits));
    any |= static_cast<Bits>((v & exponent_mask) == exponent_mask);
  }
  if (!any) return n;
  for (size_t i = 0; i < n; ++i) {
    Bits v;
    std::memcpy(&v, src + i * sizeof(Bits), sizeof(Bits));
    if ((v & exponent_mask) == exponent_mask) return i;
  }
  return n;
}

}  // namespace

void quantize_rows(std::string_view name, DType dtype, const uint8_t* src, size_t first_row, size_t rows, size_t k,
                   uint8_t* packed, uint8_t* scales) {
  const size_t n = rows * k;
  size_t bad = n;
  switch (dtype) {
    case DType::BF16:
      bad = first_non_finite<uint16_t>(src, n, 0x7f80);
      break;
    case DType::F16:
      bad = first_non_finite<uint16_t>(src, n, 0x7c00);
      break;
    case DType::F32:
      bad = first_non_finite<uint32_t>(src, n, 0x7f800000u);
      break;
    default:
      fail("tensor '{}': cannot quantize dtype {}", name, dtype_name(dtype));
  }
  if (bad != n) {
    const float value = load_as_f32(dtype, src + bad * dtype_size(dtype));
    fail("tensor '{}' holds a non-finite weight ({}) at [{}, {}]; refusing to quantize it", name, value,
         first_row + bad / k, bad % k);
  }
  // Tensors in files from other writers may sit at odd offsets; the kernels take typed pointers.
  std::vector<uint8_t> aligned;
  if (reinterpret_cast<uintptr_t>(src) % dtype_size(dtype) != 0) {
    aligned.resize(n * dtype_size(dtype) + 8);
    uint8_t* p = aligned.data() + (8 - reinterpret_cast<uintptr_t>(aligned.data()) % 8) % 8;
    std::memcpy(p, src, n * dtype_size(dtype));
    src = p;
  }
  switch (dtype) {
    case DType::BF16:
      mx::quantize_bf16(reinterpret_cast<const uint16_t*>(src), rows, k, packed, scales);
      break;
    case DType::F16:
      mx::quantize_f16(reinterpret_cast<const uint16_t*>(src), rows, k, packed, scales);
      break;
    default:
      mx::quantize_f32(reinterpret_cast<const float*>(src), rows, k, packed, scales);
      break;
  }
}

}  // namespace mxlm::quant
