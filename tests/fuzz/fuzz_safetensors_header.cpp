// libFuzzer target for the safetensors header parser: any input is either a header whose tensors tile the
// data section exactly, or an mxlm::Error -- never a crash, a hang or another exception.
// Input layout: 8 bytes little-endian data-section size (taken modulo 2^20), then the header JSON.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t data_size = 0;
  for (int i = 7; i >= 0; --i) data_size = (data_size << 8) | data[i];
  data_size %= uint64_t{1} << 20;
  const std::string_view header(reinterpret_cast<const char*>(data + 8), size - 8);
  try {
    std::map<std::string, std::string> metadata;
    const auto tensors = mxlm::io::parse_header(header, data_size, "fuzz", &metadata);
    uint64_t end = 0;
    for (const auto& t : tensors) {
      if (t.begin != end || t.end < t.begin) std::abort();
      if (t.nbytes() != static_cast<uint64_t>(t.numel()) * mxlm::dtype_size(t.dtype)) std::abort();
      end = t.end;
    }
    if (end != data_size) std::abort();
  } catch (const mxlm::Error&) {
  }
  return 0;
}
