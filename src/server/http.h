// cpp-httplib as the server uses it. Debian builds httplib as a library whose listen backlog is 5: simultaneous
// clients beyond the fifth wait for a SYN retransmit (1 s), so a burst of 32 lm-eval connections would see
// second-long first-token times. listen_with_backlog() raises the backlog after binding (Linux applies a second
// listen() on a listening socket).
#pragma once

#include <httplib.h>

namespace mxlm::server {

// Installs socket options that remember the listening socket (SO_REUSEADDR as httplib's default, but no
// SO_REUSEPORT: a second server on a busy port must fail, not share it). Call before binding; returns the slot the
// socket lands in.
std::shared_ptr<int> remember_listen_socket(httplib::Server& server);
// Re-listens on the remembered socket with a large backlog; false when there is none.
bool raise_listen_backlog(const std::shared_ptr<int>& sock, int backlog = 1024);

}  // namespace mxlm::server
