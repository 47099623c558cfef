#include "eval/xz.h"

#include <lzma.h>

#include <cstdint>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace mxlm::eval {

std::string xz_decompress(const std::string& compressed, const std::string& what) {
  lzma_stream stream = LZMA_STREAM_INIT;
  if (lzma_stream_decoder(&stream, UINT64_MAX, LZMA_CONCATENATED) != LZMA_OK) fail("{}: cannot start the xz decoder", what);
  std::string out;
  char buffer[1 << 16];
  stream.next_in = reinterpret_cast<const uint8_t*>(compressed.data());
  stream.avail_in = compressed.size();
  lzma_ret ret = LZMA_OK;
  while (ret == LZMA_OK) {
    stream.next_out = reinterpret_cast<uint8_t*>(buffer);
    stream.avail_out = sizeof(buffer);
    ret = lzma_code(&stream, LZMA_FINISH);
    out.append(buffer, sizeof(buffer) - stream.avail_out);
  }
  lzma_end(&stream);
  if (ret != LZMA_STREAM_END) fail("{}: corrupt or truncated xz data (liblzma error {})", what, static_cast<int>(ret));
  return out;
}

std::string read_file_maybe_xz(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open {}", path);
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) fail("cannot read {}", path);
  const bool xz = path.size() > 3 && path.compare(path.size() - 3, 3, ".xz") == 0;
  return xz ? xz_decompress(contents.str(), path) : contents.str();
}

}  // namespace mxlm::eval
