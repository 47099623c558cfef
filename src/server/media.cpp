#include "server/media.h"

#include <httplib.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>

#include "core/error.h"

namespace mxlm::server {

namespace fs = std::filesystem;

namespace {

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+' || c == '-') return 62;
  if (c == '/' || c == '_') return 63;
  return -1;
}

std::string percent_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out.push_back(static_cast<char>(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16)));
      i += 2;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::vector<uint8_t> load_data_uri(std::string_view url, const MediaOptions& o) {
  const size_t comma = url.find(',');
  if (comma == std::string_view::npos) fail("malformed data: URL (no ',' before the data)");
  const std::string header = lower(url.substr(5, comma - 5));  // after "data:"
  if (header.size() < 7 || header.substr(header.size() - 7) != ";base64")
    fail("only base64 data: URLs are supported (data:image/<type>;base64,...)");
  const std::string media_type = header.substr(0, header.size() - 7);
  if (media_type.rfind("video/", 0) == 0) fail("video input is not supported");
  if (!media_type.empty() && media_type.rfind("image/", 0) != 0)
    fail("the data: URL's media type '{}' is not an image", media_type);
  const std::string_view data = url.substr(comma + 1);
  if (data.size() / 4 * 3 > o.max_bytes + 3)
    fail("the image is larger than the server accepts ({} bytes at most; --max-image-bytes)", o.max_bytes);
  auto bytes = decode_base64(data);
  if (bytes.size() > o.max_bytes)
    fail("the image is larger than the server accepts ({} bytes > {}; --max-image-bytes)", bytes.size(), o.max_bytes);
  return bytes;
}

std::vector<uint8_t> load_http(const std::string& url, const MediaOptions& o) {
  const size_t scheme_end = url.find("://");
  const size_t path_begin = url.find('/', scheme_end + 3);
  const std::string origin = path_begin == std::string::npos ? url : url.substr(0, path_begin);
  std::string path = path_begin == std::string::npos ? "/" : url.substr(path_begin);
  if (const size_t hash = path.find('#'); hash != std::string::npos) path.resize(hash);
  if (origin.size() <= scheme_end + 3) fail("the URL has no host");
  if (!o.allowed_domains.empty()) {
    std::string host = origin.substr(scheme_end + 3);
    if (const size_t at = host.rfind('@'); at != std::string::npos) host = host.substr(at + 1);
    if (!host.empty() && host[0] == '[')
      host = host.substr(0, host.find(']') + 1);
    else if (const size_t colon = host.find(':'); colon != std::string::npos)
      host.resize(colon);
    host = lower(host);
    if (std::find_if(o.allowed_domains.begin(), o.allowed_domains.end(),
                     [&](const std::string& d) { return lower(d) == host; }) == o.allowed_domains.end())
      fail("the host {} is not among --allowed-media-domains", host);
  }
  httplib::Client client(origin);
  if (!client.is_valid()) fail("cannot fetch {} (unsupported URL)", url);
  const auto timeout = std::chrono::duration<double>(o.fetch_timeout_s);
  const auto usec = std::chrono::duration_cast<std::chrono::microseconds>(timeout).count();
  client.set_connection_timeout(static_cast<time_t>(usec / 1000000), static_cast<time_t>(usec % 1000000));
  client.set_read_timeout(static_cast<time_t>(usec / 1000000), static_cast<time_t>(usec % 1000000));
  client.set_write_timeout(static_cast<time_t>(usec / 1000000), static_cast<time_t>(usec % 1000000));
  client.set_follow_location(o.allowed_domains.empty());
#ifdef CPPHTTPLIB_OPENSSL_SUPPORT
  if (fs::exists("/etc/ssl/certs/ca-certificates.crt")) client.set_ca_cert_path("/etc/ssl/certs/ca-certificates.crt");
#endif
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::nanoseconds>(timeout);
  std::vector<uint8_t> body;
  bool too_large = false, too_slow = false;
  auto res = client.Get(
      path, httplib::Headers{{"Accept", "image/*"}},
      [&](const httplib::Response& r) {
        if (r.status >= 300 && r.status < 400) return true;  // a redirect: the client follows it
        if (r.has_header("Content-Length")) {
          const std::string len = r.get_header_value("Content-Length");
          if (len.size() > 18 || std::stoull(len.empty() ? "0" : len) > o.max_bytes) {
            too_large = true;
            return false;
          }
        }
        return true;
      },
      [&](const char* data, size_t n) {
        if (body.size() + n > o.max_bytes) {
          too_large = true;
          return false;
        }
        if (std::chrono::steady_clock::now() > deadline) {
          too_slow = true;
          return false;
        }
        body.insert(body.end(), data, data + n);
        return true;
      });
  if (too_large)
    fail("the image at {} is larger than the server accepts ({} bytes at most; --max-image-bytes)", url, o.max_bytes);
  if (too_slow || (!res && res.error() == httplib::Error::Read))
    fail("fetching {} took longer than {} s (--image-fetch-timeout)", url, o.fetch_timeout_s);
  if (!res) fail("cannot fetch {}: {}", url, httplib::to_string(res.error()));
  if (res->status >= 300 && res->status < 400 && !o.allowed_domains.empty())
    fail("fetching {}: redirects are not followed when --allowed-media-domains is set", url);
  if (res->status != 200) fail("fetching {} failed with HTTP status {}", url, res->status);
  return body;
}

std::vector<uint8_t> load_file(const std::string& url, const MediaOptions& o) {
  std::string path = url;
  if (lower(url.substr(0, 7)) == "file://") {
    path = url.substr(7);
    if (lower(path.substr(0, 9)) == "localhost") path = path.substr(9);
    path = percent_decode(path);
  } else if (lower(url.substr(0, 5)) == "file:") {
    path = percent_decode(url.substr(5));
  }
  if (o.allowed_local_path.empty())
    fail("local files are not allowed (start the server with --allowed-local-media-path)");
  if (path.empty() || path[0] != '/') fail("a local file must be given by its absolute path");
  std::error_code ec;
  const fs::path allowed = fs::weakly_canonical(o.allowed_local_path, ec);
  const fs::path target = fs::weakly_canonical(path, ec);
  if (ec) fail("cannot resolve the local path {}", path);
  // Symlinks are resolved first, so a link inside the folder cannot point outside it.
  auto [a, t] = std::mismatch(allowed.begin(), allowed.end(), target.begin(), target.end());
  const bool inside = a == allowed.end() || (a->empty() && std::next(a) == allowed.end());
  if (!inside) fail("the local file {} is outside --allowed-local-media-path {}", path, o.allowed_local_path);
  if (!fs::is_regular_file(target, ec)) fail("the local file {} does not exist or is not a regular file", path);
  const auto size = fs::file_size(target, ec);
  if (ec) fail("cannot read the local file {}", path);
  if (size > o.max_bytes)
    fail("the image file {} is larger than the server accepts ({} bytes > {}; --max-image-bytes)", path, size,
         o.max_bytes);
  std::ifstream in(target, std::ios::binary);
  std::vector<uint8_t> bytes(size);
  if (!in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size)))
    fail("cannot read the local file {}", path);
  return bytes;
}

}  // namespace

std::vector<uint8_t> decode_base64(std::string_view text) {
  std::vector<uint8_t> out;
  out.reserve(text.size() / 4 * 3 + 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t pad = 0;
  for (const char c : text) {
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') {
      ++pad;
      continue;
    }
    const int v = base64_value(c);
    if (v < 0 || pad > 0) fail("invalid base64 data");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<uint8_t>((acc >> bits) & 0xff));
    }
  }
  if (pad > 2 || bits >= 6) fail("invalid base64 data (truncated)");
  return out;
}

std::vector<uint8_t> load_media(const std::string& url, const MediaOptions& o) {
  const std::string head = lower(std::string_view(url).substr(0, 8));
  if (head.rfind("data:", 0) == 0) return load_data_uri(url, o);
  if (head.rfind("http://", 0) == 0 || head.rfind("https://", 0) == 0) return load_http(url, o);
  if (head.rfind("file:", 0) == 0 || (!url.empty() && url[0] == '/')) return load_file(url, o);
  fail("the URL must be a data:, http(s):// or file:// URL");
}

}  // namespace mxlm::server
