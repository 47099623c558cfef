#include "server/http.h"

#include <sys/socket.h>

namespace mxlm::server {

std::shared_ptr<int> remember_listen_socket(httplib::Server& server) {
  auto slot = std::make_shared<int>(-1);
  server.set_socket_options([slot](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    *slot = sock;
  });
  return slot;
}

bool raise_listen_backlog(const std::shared_ptr<int>& sock, int backlog) {
  return *sock >= 0 && ::listen(*sock, backlog) == 0;
}

}  // namespace mxlm::server
