// cpp-httplib as the server uses it. Its default listen backlog (5) makes simultaneous clients beyond the fifth
// wait for a SYN retransmit (1 s): a burst of 32 connections from lm-eval would see second-long first-token
// times. Every file of the server and its benchmark includes httplib through here, so the setting is the same in
// each of them (the eval layer only uses httplib's client, which does not read it).
#pragma once

#ifndef CPPHTTPLIB_LISTEN_BACKLOG
#define CPPHTTPLIB_LISTEN_BACKLOG 1024
#endif
#include <httplib.h>
