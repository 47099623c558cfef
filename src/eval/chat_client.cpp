#include "eval/chat_client.h"

#include <nlohmann/json.hpp>

#include <cmath>

#include "core/error.h"

namespace mxlm::eval {

Endpoint parse_endpoint(const std::string& url) {
  const size_t scheme_end = url.find("://");
  if (scheme_end == std::string::npos) fail("--base-url {}: expected http://host:port/v1/chat/completions", url);
  const std::string scheme = url.substr(0, scheme_end);
  if (scheme != "http" && scheme != "https") fail("--base-url {}: only http and https are supported", url);
  const size_t path_start = url.find('/', scheme_end + 3);
  Endpoint endpoint;
  endpoint.origin = url.substr(0, path_start);
  if (endpoint.origin.size() <= scheme_end + 3) fail("--base-url {}: no host", url);
  std::string path = path_start == std::string::npos ? "" : url.substr(path_start);
  while (!path.empty() && path.back() == '/') path.pop_back();
  if (path.empty()) {
    path = "/v1/chat/completions";
  } else if (path.size() >= 3 && path.compare(path.size() - 3, 3, "/v1") == 0) {
    path += "/chat/completions";
  }
  endpoint.path = path;
  return endpoint;
}

ChatReply parse_chat_reply(const std::string& body) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(body);
  } catch (const nlohmann::json::exception&) {
    const std::string head = body.substr(0, 200);
    fail("the server's reply is not JSON: {}", head);
  }
  ChatReply reply;
  if (json.is_object()) {
    if (auto it = json.find("model"); it != json.end() && it->is_string()) reply.model = it->get<std::string>();
    if (auto usage = json.find("usage"); usage != json.end() && usage->is_object()) {
      if (auto p = usage->find("prompt_tokens"); p != usage->end() && p->is_number_integer())
        reply.prompt_tokens = p->get<int64_t>();
      if (auto c = usage->find("completion_tokens"); c != usage->end() && c->is_number_integer())
        reply.completion_tokens = c->get<int64_t>();
    }
  }
  // lm-eval places each choice by its "index" and reads message.content; with one request per call only
  // index 0 is used. Missing or malformed choices give "" (lm-eval warns and goes on).
  const nlohmann::json* chosen = nullptr;
  if (json.is_object() && json.contains("choices") && json["choices"].is_array()) {
    for (const auto& choice : json["choices"]) {
      if (choice.is_object() && choice.value("index", -1) == 0) chosen = &choice;
    }
    if (!chosen && json["choices"].size() == 1 && json["choices"][0].is_object()) chosen = &json["choices"][0];
  }
  reply.content_missing = true;
  if (chosen) {
    if (auto it = chosen->find("finish_reason"); it != chosen->end() && it->is_string())
      reply.finish_reason = it->get<std::string>();
    if (auto message = chosen->find("message"); message != chosen->end() && message->is_object()) {
      if (auto content = message->find("content"); content != message->end() && content->is_string()) {
        reply.content = content->get<std::string>();
        reply.content_missing = false;
      }
    }
  }
  return reply;
}

ChatClient::ChatClient(const Endpoint& endpoint, std::string api_key, double timeout_seconds)
    : endpoint_(endpoint), api_key_(std::move(api_key)), timeout_seconds_(timeout_seconds) {
  client_ = std::make_unique<httplib::Client>(endpoint_.origin);
  if (!client_->is_valid()) fail("cannot create an HTTP client for {}", endpoint_.origin);
  // The total limit is enforced by abort_if_overdue (a watchdog); httplib's per-read limits only back it up,
  // so they are set a little longer and the watchdog's clearer error wins.
  const auto seconds = static_cast<time_t>(std::ceil(timeout_seconds_));
  client_->set_connection_timeout(seconds, 0);
  client_->set_read_timeout(seconds + 5, 0);
  client_->set_write_timeout(seconds + 5, 0);
  client_->set_keep_alive(true);
}

ChatReply ChatClient::post(const std::string& body) {
  {
    std::lock_guard lock(mutex_);
    deadline_ = std::chrono::steady_clock::now() +
                std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                    std::chrono::duration<double>(timeout_seconds_));
    timed_out_ = false;
    aborted_ = false;
  }
  httplib::Headers headers{{"Authorization", "Bearer " + api_key_}};
  auto result = client_->Post(endpoint_.path, headers, body, "application/json");
  {
    std::lock_guard lock(mutex_);
    deadline_.reset();
  }
  if (timed_out_) fail("no complete reply within {} s", timeout_seconds_);
  if (aborted_) fail("interrupted");
  if (!result) fail("request to {} failed: {}", endpoint_.url(), httplib::to_string(result.error()));
  if (result->status < 200 || result->status >= 300) {
    const std::string head = result->body.substr(0, 300);
    fail("HTTP {} from {}: {}", result->status, endpoint_.url(), head);
  }
  return parse_chat_reply(result->body);
}

void ChatClient::abort_if_overdue(std::chrono::steady_clock::time_point now, bool force) {
  std::lock_guard lock(mutex_);
  if (!deadline_) return;
  if (now >= *deadline_) {
    timed_out_ = true;
  } else if (force) {
    aborted_ = true;
  } else {
    return;
  }
  // Shuts the socket down so the blocked Post returns with an error. Repeated on every watchdog tick until
  // the request ends, in case the first call came before the connection existed.
  client_->stop();
}

}  // namespace mxlm::eval
