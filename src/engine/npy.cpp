#include "engine/npy.h"

#include <cstring>
#include <fstream>
#include <string>

#include "core/error.h"

namespace mxlm::engine {

void write_npy_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape, const float* data) {
  std::string dims;
  size_t count = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
    if (i + 1 < shape.size()) dims += " ";
    count *= static_cast<size_t>(shape[i]);
  }
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  if (!f) fail("cannot write {}", path.string());
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  f.write(magic, 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  f.write(len_bytes, 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
  if (!f) fail("error writing {}", path.string());
}

NpyArray read_npy_f32(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open {}", path.string());
  char magic[10];
  f.read(magic, 10);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) fail("{} is not a .npy file", path.string());
  size_t hlen;
  if (magic[6] == 1) {
    hlen = static_cast<uint8_t>(magic[8]) | static_cast<size_t>(static_cast<uint8_t>(magic[9])) << 8;
  } else {
    char more[2];
    f.read(more, 2);
    hlen = static_cast<uint8_t>(magic[8]) | static_cast<size_t>(static_cast<uint8_t>(magic[9])) << 8 |
           static_cast<size_t>(static_cast<uint8_t>(more[0])) << 16 |
           static_cast<size_t>(static_cast<uint8_t>(more[1])) << 24;
  }
  std::string header(hlen, '\0');
  f.read(header.data(), static_cast<std::streamsize>(hlen));
  if (header.find("'<f4'") == std::string::npos) fail("{}: only little-endian f32 arrays are supported", path.string());
  if (header.find("'fortran_order': False") == std::string::npos)
    fail("{}: Fortran order is not supported", path.string());
  const size_t open = header.find('(', header.find("'shape'")), close = header.find(')', open);
  if (open == std::string::npos || close == std::string::npos) fail("{}: no shape in the header", path.string());
  NpyArray a;
  size_t count = 1;
  std::string dims = header.substr(open + 1, close - open - 1);
  size_t p = 0;
  while (p < dims.size()) {
    while (p < dims.size() && (dims[p] == ' ' || dims[p] == ',')) ++p;
    if (p >= dims.size()) break;
    size_t q = p;
    while (q < dims.size() && dims[q] >= '0' && dims[q] <= '9') ++q;
    if (q == p) fail("{}: bad shape '{}'", path.string(), dims);
    a.shape.push_back(std::stoll(dims.substr(p, q - p)));
    count *= static_cast<size_t>(a.shape.back());
    p = q;
  }
  a.data.resize(count);
  f.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (!f) fail("{}: truncated data", path.string());
  return a;
}

}  // namespace mxlm::engine
