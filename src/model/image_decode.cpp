// Image decoding: stb_image (PNG, JPEG, BMP, GIF first frame) and libwebp (WebP), then RGB with alpha composited
// on white exactly as Pillow's Image.paste with an L mask does (vLLM's rgba_to_rgb).
#include <webp/decode.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#include "core/error.h"
#include "model/image_preprocess.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wdouble-promotion"
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#define STBI_ONLY_GIF
#include <stb/stb_image.h>
#pragma GCC diagnostic pop

namespace mxlm::model {

namespace {

enum class Format { Png, Jpeg, Bmp, Gif, Webp, Unknown };

Format sniff(std::span<const uint8_t> b) {
  auto starts = [&](const char* magic, size_t n, size_t at = 0) {
    return b.size() >= at + n && std::memcmp(b.data() + at, magic, n) == 0;
  };
  if (starts("\x89PNG\r\n\x1a\n", 8)) return Format::Png;
  if (starts("\xff\xd8\xff", 3)) return Format::Jpeg;
  if (starts("GIF87a", 6) || starts("GIF89a", 6)) return Format::Gif;
  if (starts("BM", 2)) return Format::Bmp;
  if (starts("RIFF", 4) && starts("WEBP", 4, 8)) return Format::Webp;
  return Format::Unknown;
}

const char* format_name(Format f) {
  switch (f) {
    case Format::Png:
      return "PNG";
    case Format::Jpeg:
      return "JPEG";
    case Format::Bmp:
      return "BMP";
    case Format::Gif:
      return "GIF";
    case Format::Webp:
      return "WebP";
    default:
      return "unknown";
  }
}

// Pillow's DIV255 / BLEND (paste with an L mask onto a white background).
uint8_t blend_on_white(uint8_t value, uint8_t alpha) {
  const unsigned t = 255u * (255u - alpha) + static_cast<unsigned>(value) * alpha + 128u;
  return static_cast<uint8_t>(((t >> 8) + t) >> 8);
}

void check_size(int64_t width, int64_t height, const std::string& what, Format f) {
  if (width <= 0 || height <= 0) fail("{}: the {} image has no pixels ({}x{})", what, format_name(f), width, height);
  if (width * height > kMaxDecodedPixels)
    fail("{}: the {} image is too large ({}x{} = {} pixels; at most {})", what, format_name(f), width, height,
         width * height, kMaxDecodedPixels);
}

RgbImage from_channels(const uint8_t* src, int width, int height, int channels) {
  RgbImage out{width, height, std::vector<uint8_t>(static_cast<size_t>(width) * static_cast<size_t>(height) * 3)};
  const size_t n = static_cast<size_t>(width) * static_cast<size_t>(height);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = src + i * static_cast<size_t>(channels);
    uint8_t* o = out.pixels.data() + i * 3;
    if (channels == 4) {
      for (int c = 0; c < 3; ++c) o[c] = blend_on_white(p[c], p[3]);
    } else {
      o[0] = p[0], o[1] = p[1], o[2] = p[2];
    }
  }
  return out;
}

RgbImage decode_webp(std::span<const uint8_t> b, const std::string& what) {
  WebPBitstreamFeatures features;
  if (WebPGetFeatures(b.data(), b.size(), &features) != VP8_STATUS_OK) fail("{}: corrupt or truncated WebP data", what);
  check_size(features.width, features.height, what, Format::Webp);
  int w = 0, h = 0;
  std::unique_ptr<uint8_t, void (*)(void*)> px(
      features.has_alpha ? WebPDecodeRGBA(b.data(), b.size(), &w, &h) : WebPDecodeRGB(b.data(), b.size(), &w, &h),
      WebPFree);
  if (!px) fail("{}: corrupt or truncated WebP data (decoding failed)", what);
  return from_channels(px.get(), w, h, features.has_alpha ? 4 : 3);
}

// The size a PNG, GIF or BMP header declares (0x0 when the header is too short), so that an oversized image gets
// "too large" rather than stb's refusal, which reads as corrupt data.
std::pair<int64_t, int64_t> header_size(std::span<const uint8_t> b, Format f) {
  auto be32 = [&](size_t at) {
    return static_cast<int64_t>(b[at]) << 24 | static_cast<int64_t>(b[at + 1]) << 16 |
           static_cast<int64_t>(b[at + 2]) << 8 | b[at + 3];
  };
  auto le16 = [&](size_t at) { return static_cast<int64_t>(b[at]) | static_cast<int64_t>(b[at + 1]) << 8; };
  auto le32 = [&](size_t at) { return static_cast<int64_t>(static_cast<int32_t>(le16(at) | le16(at + 2) << 16)); };
  if (f == Format::Png && b.size() >= 24) return {be32(16), be32(20)};
  if (f == Format::Gif && b.size() >= 10) return {le16(6), le16(8)};
  if (f == Format::Bmp && b.size() >= 26) return {le32(18), std::abs(le32(22))};  // negative height: top-down
  return {0, 0};
}

}  // namespace

RgbImage decode_image(std::span<const uint8_t> bytes, const std::string& what) {
  if (bytes.empty()) fail("{}: the image data is empty", what);
  const Format f = sniff(bytes);
  if (f == Format::Unknown) fail("{}: unsupported image format (expected PNG, JPEG, WebP, BMP or GIF)", what);
  if (f == Format::Webp) return decode_webp(bytes, what);
  if (bytes.size() > static_cast<size_t>(INT32_MAX)) fail("{}: the image data is too large", what);
  if (const auto [hw, hh] = header_size(bytes, f); hw > 0 && hh > 0) check_size(hw, hh, what, f);
  const auto* data = bytes.data();
  const int len = static_cast<int>(bytes.size());
  int w = 0, h = 0, comp = 0;
  if (!stbi_info_from_memory(data, len, &w, &h, &comp))
    fail("{}: corrupt or truncated {} data ({})", what, format_name(f), stbi_failure_reason());
  check_size(w, h, what, f);
  // Alpha only when the file has it: then composite on white.
  const int want = (comp == 2 || comp == 4) ? 4 : 3;
  std::unique_ptr<stbi_uc, void (*)(void*)> px(stbi_load_from_memory(data, len, &w, &h, &comp, want), stbi_image_free);
  if (!px) fail("{}: corrupt or truncated {} data ({})", what, format_name(f), stbi_failure_reason());
  return from_channels(px.get(), w, h, want);
}

}  // namespace mxlm::model
