// One connection to an OpenAI-compatible chat-completions endpoint, as lm-eval's local-chat-completions
// uses it: POST the JSON body to the URL, `Authorization: Bearer <key>` (sent even when the key is empty),
// a total time limit per request, and the reply's choices[index 0].message.content.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace mxlm::eval {

struct Endpoint {
  std::string origin;  // "http://host:port"
  std::string path;    // "/v1/chat/completions"
  std::string url() const { return origin + path; }
};

// Accepts the full URL as lm-eval takes it (".../v1/chat/completions"), a base ending in "/v1", or a bare
// "http[s]://host[:port]" (then "/v1/chat/completions" is appended). Throws mxlm::Error on anything else.
Endpoint parse_endpoint(const std::string& url);

struct ChatReply {
  std::string content;          // "" when the server sent null content or no usable choices
  bool content_missing = false;  // null content, or choices absent/malformed (lm-eval maps both to "")
  std::string finish_reason;
  std::string model;             // the server's "model" field
  int64_t prompt_tokens = -1;    // from "usage", -1 when absent
  int64_t completion_tokens = -1;
};

// Extracts the reply from a response body; throws mxlm::Error when the body is not JSON.
ChatReply parse_chat_reply(const std::string& body);

class ChatClient {
 public:
  ChatClient(const Endpoint& endpoint, std::string api_key, double timeout_seconds);

  // One attempt. Throws mxlm::Error for transport errors, the time limit, non-2xx statuses and bodies
  // that are not JSON (all of which lm-eval retries).
  ChatReply post(const std::string& body);

  // Thread-safe: aborts the request in flight if it has run past its deadline or `force` is set.
  void abort_if_overdue(std::chrono::steady_clock::time_point now, bool force);

 private:
  Endpoint endpoint_;
  std::string api_key_;
  double timeout_seconds_;
  std::unique_ptr<httplib::Client> client_;
  std::mutex mutex_;
  std::optional<std::chrono::steady_clock::time_point> deadline_;
  std::atomic<bool> timed_out_{false};
  std::atomic<bool> aborted_{false};
};

}  // namespace mxlm::eval
