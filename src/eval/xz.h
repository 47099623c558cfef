// Reads a whole file into memory, transparently decompressing `.xz` (the repository stores large data
// files xz-compressed to keep each committed file small).
#pragma once

#include <string>

namespace mxlm::eval {

// Decompresses an in-memory .xz stream; throws mxlm::Error naming `what` on corrupt input.
std::string xz_decompress(const std::string& compressed, const std::string& what);

// Reads `path`; if it ends in ".xz" the contents are decompressed.
std::string read_file_maybe_xz(const std::string& path);

}  // namespace mxlm::eval
