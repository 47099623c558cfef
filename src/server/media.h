// Where the bytes of a chat request's image come from (vLLM's MediaConnector): `data:` URIs (base64), http(s) URLs
// fetched with a deadline and a size cap, and local files (`file://` URLs or absolute paths) only under
// --allowed-local-media-path. Errors are mxlm::Error texts without the request part's name; the caller adds it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mxlm::server {

struct MediaOptions {
  double fetch_timeout_s = 5.0;    // whole http(s) fetch (vLLM's VLLM_IMAGE_FETCH_TIMEOUT)
  size_t max_bytes = 20u << 20;    // encoded image bytes, whatever the source
  std::string allowed_local_path;  // empty: local files are refused
  // --allowed-media-domains: when not empty, http(s) URLs must name one of these hosts, and redirects (which could
  // leave them) are refused.
  std::vector<std::string> allowed_domains;
};

// Standard or URL-safe alphabet; padding optional; whitespace ignored. An Error on any other character.
std::vector<uint8_t> decode_base64(std::string_view text);

// The encoded bytes behind `url`.
std::vector<uint8_t> load_media(const std::string& url, const MediaOptions& options);

}  // namespace mxlm::server
