// End to end on the MiniMax-M3 fixture made with transformers (tests/fixtures/m3/, tools/gen_m3_fixtures.py):
// `mixed` quantized with the seed's template and exclude list must equal `mixed_mxfp4`, whose expert tensors
// were quantized independently by PyTorch (tools/mxfp4_torch.py): every quantized tensor bit for bit, every
// kept tensor byte for byte (the scale byte of an all-zero block excepted, which Quark versions write as 0 or 1).
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>

#include "io/safetensors.h"
#include "quant/quantizer.h"

namespace mxlm::quant {
namespace {

namespace fs = std::filesystem;

bool all_zero_block(std::span<const uint8_t> packed, size_t row, size_t block, size_t k) {
  for (size_t j = 0; j < 16; ++j) {
    const uint8_t b = packed[row * (k / 2) + block * 16 + j];
    if ((b & 0x7) != 0 || (b & 0x70) != 0) return false;
  }
  return true;
}

TEST(QuantizeFixture, MixedMatchesTorchReference) {
  const fs::path fixtures = fs::path(MXLM_SOURCE_DIR) / "tests" / "fixtures" / "m3";
  ASSERT_TRUE(fs::exists(fixtures / "mixed" / "model.safetensors"));
  const fs::path out = fs::temp_directory_path() / fmt::format("mxlm_quant_fixture_{}", ::getpid());
  fs::remove_all(out);

  QuantizeOptions o;
  o.model_dir = fixtures / "mixed";
  o.output_dir = out;
  o.template_name = "minimax_m3_vl";
  o.exclude_layers = std::vector<std::string>{"*lm_head",          "*vision_tower*",         "*multi_modal_projector*",
                                              "*patch_merge_mlp*", "*block_sparse_moe.gate", "*self_attn*",
                                              "*mlp.gate_proj",    "*mlp.up_proj",           "*mlp.down_proj"};
  o.threads = 2;
  o.progress = false;
  o.verify = true;
  const QuantizeResult r = quantize_checkpoint(o);
  EXPECT_GT(r.plan.quantized_count, 0u);

  const io::Checkpoint ours(out);
  const io::Checkpoint reference(fixtures / "mixed_mxfp4");
  EXPECT_EQ(ours.tensor_names(), reference.tensor_names());
  size_t quantized = 0;
  for (const auto& name : reference.tensor_names()) {
    if (!ours.contains(name)) continue;
    const auto& a = ours.info(name);
    const auto& b = reference.info(name);
    ASSERT_EQ(a.dtype, b.dtype) << name;
    ASSERT_EQ(a.shape, b.shape) << name;
    const auto da = ours.data(name), db = reference.data(name);
    if (name.ends_with(".weight_scale")) {
      ++quantized;
      const std::string weight = name.substr(0, name.size() - 6);
      const size_t rows = static_cast<size_t>(a.shape[0]), blocks = static_cast<size_t>(a.shape[1]);
      for (size_t i = 0; i < rows * blocks; ++i) {
        if (da[i] != db[i]) {
          EXPECT_TRUE(all_zero_block(ours.data(weight), i / blocks, i % blocks, blocks * 32))
              << name << " scale " << i << ": " << int(da[i]) << " vs torch " << int(db[i]);
        }
      }
    } else {
      EXPECT_TRUE(std::equal(da.begin(), da.end(), db.begin(), db.end())) << name;
    }
  }
  EXPECT_EQ(quantized, r.plan.quantized_count);
  fs::remove_all(out);
}

}  // namespace
}  // namespace mxlm::quant
