#include "backend/backend.h"

namespace mxlm::backend {

const char* weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::F32:
      return "F32";
    case WeightFormat::BF16:
      return "BF16";
    case WeightFormat::F16:
      return "F16";
    case WeightFormat::MXFP4:
      return "MXFP4";
  }
  return "?";
}

}  // namespace mxlm::backend
