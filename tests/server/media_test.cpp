// Image sources of chat requests: base64 against RFC 4648's vectors and a straightforward encoder, data: URIs,
// local files only under the allowed folder (also through `..` and symlinks), and http fetches against an
// in-process httplib server (size cap by Content-Length and by streamed bytes, HTTP errors, the deadline).
#include <gtest/gtest.h>

#include <httplib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "core/error.h"
#include "server/media.h"

namespace mxlm::server {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> bytes(std::string_view s) { return {s.begin(), s.end()}; }

std::string encode_base64(const std::vector<uint8_t>& in) {
  static const char* abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (size_t i = 0; i < in.size(); i += 3) {
    const uint32_t n = (uint32_t{in[i]} << 16) | (i + 1 < in.size() ? uint32_t{in[i + 1]} << 8 : 0) |
                       (i + 2 < in.size() ? uint32_t{in[i + 2]} : 0);
    out += abc[(n >> 18) & 63];
    out += abc[(n >> 12) & 63];
    out += i + 1 < in.size() ? abc[(n >> 6) & 63] : '=';
    out += i + 2 < in.size() ? abc[n & 63] : '=';
  }
  return out;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Media, Base64) {
  EXPECT_EQ(decode_base64(""), bytes(""));
  EXPECT_EQ(decode_base64("Zg=="), bytes("f"));
  EXPECT_EQ(decode_base64("Zm8="), bytes("fo"));
  EXPECT_EQ(decode_base64("Zm9v"), bytes("foo"));
  EXPECT_EQ(decode_base64("Zm9vYg=="), bytes("foob"));
  EXPECT_EQ(decode_base64("Zm9vYmE="), bytes("fooba"));
  EXPECT_EQ(decode_base64("Zm9vYmFy"), bytes("foobar"));
  EXPECT_EQ(decode_base64("Zm9v\nYmFy\r\n"), bytes("foobar"));
  EXPECT_EQ(decode_base64("Zm9vYg"), bytes("foob"));  // padding left out
  EXPECT_EQ(decode_base64("-_8"), decode_base64("+/8="));
  std::mt19937 rng(7);
  for (int n = 0; n < 200; ++n) {
    std::vector<uint8_t> b(static_cast<size_t>(n));
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    EXPECT_EQ(decode_base64(encode_base64(b)), b) << n;
  }
  EXPECT_THROW(decode_base64("Zm9v!"), Error);
  EXPECT_THROW(decode_base64("Zg==Zg=="), Error);
  EXPECT_THROW(decode_base64("Z"), Error);
}

TEST(Media, DataUris) {
  MediaOptions o;
  EXPECT_EQ(load_media("data:image/png;base64,Zm9vYmFy", o), bytes("foobar"));
  EXPECT_EQ(load_media("DATA:IMAGE/JPEG;BASE64,Zm9v", o), bytes("foo"));
  EXPECT_TRUE(load_media("data:image/png;base64,", o).empty());
  EXPECT_NE(error_of([&] { load_media("data:image/png,rawbytes", o); }).find("base64"), std::string::npos);
  EXPECT_NE(error_of([&] { load_media("data:video/mp4;base64,Zm9v", o); }).find("video input is not supported"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_media("data:text/plain;base64,Zm9v", o); }).find("not an image"), std::string::npos);
  EXPECT_NE(error_of([&] { load_media("data:image/png;base64", o); }).find("malformed"), std::string::npos);
  o.max_bytes = 5;
  EXPECT_NE(error_of([&] { load_media("data:image/png;base64,Zm9vYmFy", o); }).find("larger"), std::string::npos);
  EXPECT_NE(error_of([&] { load_media("ftp://host/a.png", o); }).find("data:, http(s):// or file://"),
            std::string::npos);
}

TEST(Media, LocalFilesOnlyUnderTheAllowedFolder) {
  const fs::path root = fs::temp_directory_path() / ("mxlm_media_test_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "allowed" / "sub");
  fs::create_directories(root / "allowed2");
  fs::create_directories(root / "outside");
  auto write = [](const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; };
  write(root / "allowed" / "sub" / "a b.png", "inside");
  write(root / "outside" / "o.png", "outside");
  write(root / "allowed2" / "x.png", "sibling");
  fs::create_symlink(root / "outside" / "o.png", root / "allowed" / "link.png");

  MediaOptions o;
  const std::string inside = (root / "allowed" / "sub" / "a b.png").string();
  EXPECT_NE(error_of([&] { load_media("file://" + inside, o); }).find("--allowed-local-media-path"), std::string::npos);
  o.allowed_local_path = (root / "allowed").string();
  EXPECT_EQ(load_media("file://" + inside, o), bytes("inside"));
  EXPECT_EQ(load_media(inside, o), bytes("inside"));
  EXPECT_EQ(load_media("file://" + (root / "allowed" / "sub" / "a%20b.png").string(), o), bytes("inside"));
  EXPECT_EQ(load_media("file://localhost" + inside, o), bytes("inside"));
  for (const fs::path& p : {root / "outside" / "o.png", root / "allowed" / ".." / "outside" / "o.png",
                            root / "allowed" / "link.png", root / "allowed2" / "x.png"})
    EXPECT_NE(error_of([&] { load_media("file://" + p.string(), o); }).find("outside"), std::string::npos) << p;
  EXPECT_NE(
      error_of([&] { load_media("file://" + (root / "allowed" / "none.png").string(), o); }).find("does not exist"),
      std::string::npos);
  EXPECT_NE(error_of([&] { load_media("file://" + (root / "allowed" / "sub").string(), o); }).find("regular file"),
            std::string::npos);
  o.max_bytes = 3;
  EXPECT_NE(error_of([&] { load_media(inside, o); }).find("larger"), std::string::npos);
  fs::remove_all(root);
}

TEST(Media, HttpFetchWithSizeCapAndDeadline) {
  httplib::Server srv;
  const std::string small(1000, 'x'), big(5000, 'y');
  srv.Get("/small", [&](const httplib::Request&, httplib::Response& r) { r.set_content(small, "image/png"); });
  srv.Get("/big", [&](const httplib::Request&, httplib::Response& r) { r.set_content(big, "image/png"); });
  srv.Get("/chunked", [&](const httplib::Request&, httplib::Response& r) {
    r.set_chunked_content_provider("image/png", [&](size_t offset, httplib::DataSink& sink) {
      if (offset >= big.size()) {
        sink.done();
        return true;
      }
      return sink.write(big.data() + offset, 500);
    });
  });
  srv.Get("/slow", [&](const httplib::Request&, httplib::Response& r) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    r.set_content(small, "image/png");
  });
  srv.Get("/redirect", [&](const httplib::Request&, httplib::Response& r) { r.set_redirect("/small"); });
  const int port = srv.bind_to_any_port("127.0.0.1");
  ASSERT_GT(port, 0);
  std::thread t([&] { srv.listen_after_bind(); });
  const std::string base = "http://127.0.0.1:" + std::to_string(port);

  MediaOptions o;
  o.max_bytes = 2000;
  o.fetch_timeout_s = 0.5;
  EXPECT_EQ(load_media(base + "/small", o), bytes(small));
  EXPECT_EQ(load_media(base + "/redirect#frag", o), bytes(small));
  EXPECT_NE(error_of([&] { load_media(base + "/big", o); }).find("larger"), std::string::npos);
  EXPECT_NE(error_of([&] { load_media(base + "/chunked", o); }).find("larger"), std::string::npos);
  EXPECT_NE(error_of([&] { load_media(base + "/missing", o); }).find("404"), std::string::npos);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_NE(error_of([&] { load_media(base + "/slow", o); }).find("--image-fetch-timeout"), std::string::npos);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(1400));
  o.max_bytes = 6000;
  EXPECT_EQ(load_media(base + "/chunked", o), bytes(big));
  o.allowed_domains = {"example.com", "127.0.0.1"};
  EXPECT_EQ(load_media(base + "/small", o), bytes(small));
  EXPECT_NE(error_of([&] { load_media(base + "/redirect", o); }).find("redirects"), std::string::npos);
  o.allowed_domains = {"example.com"};
  EXPECT_NE(error_of([&] { load_media(base + "/small", o); }).find("not among --allowed-media-domains"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_media("http://user@127.0.0.1:1/small", o); }).find("127.0.0.1 is not among"),
            std::string::npos);
  srv.stop();
  t.join();
}

}  // namespace
}  // namespace mxlm::server
