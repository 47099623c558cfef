// NumPy .npy (format version 1.0, little-endian f32, C order) for logits files and test references.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace mxlm::engine {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

void write_npy_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape, const float* data);
// Reads a '<f4' C-order array (an Error for anything else).
NpyArray read_npy_f32(const std::filesystem::path& path);

}  // namespace mxlm::engine
