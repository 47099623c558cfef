// Binds checkpoint tensors to backend weights by upstream name, through a sharding rule, so a model is
// written once for any tensor-parallel size (TP = 1 is the whole tensor). A tensor is MXFP4 when
// `<stem>.weight` is U8 and `<stem>.weight_scale` exists (quark_mxfp4_format.md §1); otherwise it must be
// F32, BF16 or F16 with exactly the expected shape. Missing or misshapen tensors are an Error naming them.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/safetensors.h"

namespace mxlm::model {

struct TensorParallel {
  int rank = 0;
  int size = 1;
};

// How one rank's piece is cut from a [rows, cols] matrix.
struct Shard {
  enum class Split : uint8_t { None, Rows, Cols } split = Split::None;
  int64_t begin = 0;  // first row / column of this rank's piece
  int64_t count = 0;  // rows / columns in it

  static Shard whole() { return {}; }
  static Shard rows(int64_t begin, int64_t count) { return {Split::Rows, begin, count}; }
  static Shard cols(int64_t begin, int64_t count) { return {Split::Cols, begin, count}; }
  // Even split of `total` into `parts` (column-parallel: rows of the weight; row-parallel: its columns).
  static Shard even_rows(int64_t total, const TensorParallel& tp);
  static Shard even_cols(int64_t total, const TensorParallel& tp);
};

// Where a model's weights come from, by upstream tensor name: a checkpoint (WeightLoader) or random values made
// by the backend (DummyWeights, `--load-format dummy`).
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // A linear weight `<stem>.weight` of logical shape [rows, cols] (out x in); force_f32: a float tensor kept f32.
  virtual std::unique_ptr<backend::Weight> matrix(const std::string& stem, int64_t rows, int64_t cols,
                                                  Shard shard = Shard::whole(), bool force_f32 = false) = 0;
  // A vector `name` of `n` elements as f32 (norm weights, router bias).
  virtual std::unique_ptr<backend::Buffer> vector(const std::string& name, int64_t n) = 0;
  virtual bool has(const std::string& name) const = 0;
  // Bytes of the weights made so far, in their stored formats.
  virtual uint64_t bytes_loaded() const = 0;
  // Names the source in error messages (the checkpoint directory).
  virtual std::string origin() const = 0;
};

class WeightLoader final : public WeightSource {
 public:
  // `float_format`: store float weights as this format (F32 or BF16 conversion; nullopt keeps each tensor's own).
  WeightLoader(const io::Checkpoint& checkpoint, backend::Backend& backend,
               std::optional<backend::WeightFormat> float_format);

  std::unique_ptr<backend::Weight> matrix(const std::string& stem, int64_t rows, int64_t cols,
                                          Shard shard = Shard::whole(), bool force_f32 = false) override;
  std::unique_ptr<backend::Buffer> vector(const std::string& name, int64_t n) override;
  bool has(const std::string& name) const override { return checkpoint_.contains(name); }
  uint64_t bytes_loaded() const override { return bytes_loaded_; }
  std::string origin() const override { return checkpoint_.dir().string(); }

 private:
  const io::Checkpoint& checkpoint_;
  backend::Backend& backend_;
  std::optional<backend::WeightFormat> float_format_;
  uint64_t bytes_loaded_ = 0;
};

}  // namespace mxlm::model
