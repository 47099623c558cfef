#include "model/weight_loader.h"

#include <cstring>

#include "core/error.h"

namespace mxlm::model {

using backend::WeightFormat;

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void check_shape(const io::TensorInfo& info, const std::vector<int64_t>& expected, const std::string& what) {
  if (info.shape != expected)
    fail("tensor {} has shape {} but the config needs {}{}", info.name, shape_str(info.shape), shape_str(expected),
         what);
}

// Copies rows [r0, r0 + nr) and byte columns [c0, c0 + nc) of a row-major byte matrix of `row_bytes` per row.
std::vector<uint8_t> slice_bytes(const uint8_t* src, int64_t row_bytes, int64_t r0, int64_t nr, int64_t c0,
                                 int64_t nc) {
  std::vector<uint8_t> out(static_cast<size_t>(nr * nc));
  for (int64_t r = 0; r < nr; ++r)
    std::memcpy(out.data() + r * nc, src + (r0 + r) * row_bytes + c0, static_cast<size_t>(nc));
  return out;
}

}  // namespace

Shard Shard::even_rows(int64_t total, const TensorParallel& tp) {
  if (tp.size == 1) return whole();
  if (total % tp.size != 0) fail("cannot split {} rows evenly over {} tensor-parallel ranks", total, tp.size);
  return rows(total / tp.size * tp.rank, total / tp.size);
}

Shard Shard::even_cols(int64_t total, const TensorParallel& tp) {
  if (tp.size == 1) return whole();
  if (total % tp.size != 0) fail("cannot split {} columns evenly over {} tensor-parallel ranks", total, tp.size);
  return cols(total / tp.size * tp.rank, total / tp.size);
}

WeightLoader::WeightLoader(const io::Checkpoint& checkpoint, backend::Backend& backend,
                           std::optional<WeightFormat> float_format)
    : checkpoint_(checkpoint), backend_(backend), float_format_(float_format) {}

std::unique_ptr<backend::Weight> WeightLoader::matrix(const std::string& stem, int64_t rows, int64_t cols, Shard shard,
                                                      bool force_f32) {
  const std::string name = stem + ".weight";
  if (!checkpoint_.contains(name)) fail("checkpoint {} has no tensor {}", checkpoint_.dir().string(), name);
  const io::TensorInfo& info = checkpoint_.info(name);
  const auto bytes = checkpoint_.data(name);
  int64_t r0 = 0, nr = rows, c0 = 0, nc = cols;
  if (shard.split == Shard::Split::Rows) r0 = shard.begin, nr = shard.count;
  if (shard.split == Shard::Split::Cols) c0 = shard.begin, nc = shard.count;
  if (r0 < 0 || nr <= 0 || r0 + nr > rows || c0 < 0 || nc <= 0 || c0 + nc > cols)
    fail("shard [{}+{}, {}+{}] outside {} [{}, {}]", r0, nr, c0, nc, name, rows, cols);

  const std::string scale_name = stem + ".weight_scale";
  if (info.dtype == DType::U8 && checkpoint_.contains(scale_name)) {
    const io::TensorInfo& sinfo = checkpoint_.info(scale_name);
    if (cols % 32 != 0) fail("MXFP4 tensor {} has {} input columns (not a multiple of 32)", name, cols);
    check_shape(info, {rows, cols / 2}, " (MXFP4 packed: [out, in/2])");
    check_shape(sinfo, {rows, cols / 32}, " (MXFP4 scales: [out, in/32])");
    if (sinfo.dtype != DType::U8)
      fail("MXFP4 scales {} must be U8 (E8M0), got {}", scale_name, dtype_name(sinfo.dtype));
    if (c0 % 32 != 0 || nc % 32 != 0) fail("MXFP4 tensor {} cannot be split at column {} (+{})", name, c0, nc);
    const auto sbytes = checkpoint_.data(scale_name);
    auto packed = slice_bytes(bytes.data(), cols / 2, r0, nr, c0 / 2, nc / 2);
    auto scales = slice_bytes(sbytes.data(), cols / 32, r0, nr, c0 / 32, nc / 32);
    if (force_f32) fail("tensor {} is MXFP4 but must be a float tensor (the router stays f32)", name);
    bytes_loaded_ += packed.size() + scales.size();
    return backend_.upload_weight({WeightFormat::MXFP4, nr, nc, packed.data(), scales.data()});
  }

  WeightFormat src;
  switch (info.dtype) {
    case DType::F32:
      src = WeightFormat::F32;
      break;
    case DType::BF16:
      src = WeightFormat::BF16;
      break;
    case DType::F16:
      src = WeightFormat::F16;
      break;
    default:
      fail("tensor {} has dtype {}; expected F32, BF16, F16 or MXFP4 (U8 + {})", name, dtype_name(info.dtype),
           scale_name);
  }
  check_shape(info, {rows, cols}, "");
  const int64_t esize = static_cast<int64_t>(dtype_size(info.dtype));
  auto piece = slice_bytes(bytes.data(), cols * esize, r0, nr, c0 * esize, nc * esize);
  WeightFormat dst = force_f32 ? WeightFormat::F32 : float_format_.value_or(src);
  bytes_loaded_ += piece.size();
  if (dst == src) return backend_.upload_weight({src, nr, nc, piece.data(), nullptr});
  const size_t n = static_cast<size_t>(nr * nc);
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = load_as_f32(info.dtype, piece.data() + i * static_cast<size_t>(esize));
  if (dst == WeightFormat::F32) return backend_.upload_weight({dst, nr, nc, f.data(), nullptr});
  std::vector<uint16_t> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = dst == WeightFormat::BF16 ? f32_to_bf16(f[i]) : f32_to_f16(f[i]);
  return backend_.upload_weight({dst, nr, nc, h.data(), nullptr});
}

std::unique_ptr<backend::Buffer> WeightLoader::vector(const std::string& name, int64_t n) {
  if (!checkpoint_.contains(name)) fail("checkpoint {} has no tensor {}", checkpoint_.dir().string(), name);
  const io::TensorInfo& info = checkpoint_.info(name);
  check_shape(info, {n}, "");
  if (!is_float(info.dtype)) fail("tensor {} has dtype {}; expected a float type", name, dtype_name(info.dtype));
  const auto bytes = checkpoint_.data(name);
  std::vector<float> f(static_cast<size_t>(n));
  for (size_t i = 0; i < f.size(); ++i) f[i] = load_as_f32(info.dtype, bytes.data() + i * dtype_size(info.dtype));
  return backend_.upload_vector(f);
}

}  // namespace mxlm::model
