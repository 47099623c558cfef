// The GEMV tile list of launch_moe_route as the GPU checks verify it (test_cuda_moe_device.cpp, test_cuda_moe_shared.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mxlm::gpucheck {

// Errors in a tile list of `num_tiles` (expert, first row, rows) triples: the count within max_tiles, each tile inside
// one expert's rows (offsets[e] .. offsets[e + 1]) with 1..tile_rows rows, and rows 0..rows-1 covered exactly once.
inline int tile_list_errors(const std::vector<int32_t>& tiles, int num_tiles, int max_tiles, int experts, int tile_rows,
                            const std::vector<int32_t>& offsets, int rows) {
  int bad = num_tiles > max_tiles ? 1 : 0;
  std::vector<int> covered(static_cast<size_t>(std::max(rows, 1)), 0);
  for (int i = 0; i < std::min(num_tiles, max_tiles); ++i) {
    const int x = tiles[static_cast<size_t>(3 * i)], r0 = tiles[static_cast<size_t>(3 * i + 1)],
              m = tiles[static_cast<size_t>(3 * i + 2)];
    if (x < 0 || x >= experts || m < 1 || m > tile_rows || r0 < offsets[static_cast<size_t>(x)] ||
        r0 + m > offsets[static_cast<size_t>(x) + 1]) {
      ++bad;
      continue;
    }
    for (int r = r0; r < r0 + m; ++r) ++covered[static_cast<size_t>(r)];
  }
  for (int r = 0; r < rows; ++r)
    if (covered[static_cast<size_t>(r)] != 1) ++bad;
  return bad;
}

}  // namespace mxlm::gpucheck
