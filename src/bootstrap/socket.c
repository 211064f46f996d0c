/*
 * socket.c - addresses, listening, connecting and deadline-bounded I/O for the
 * TCP bootstrap (see socket.h).
 */
#include "bootstrap/socket.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"
#include "core/params.h"

/* First and largest pause between connection attempts the root refused. */
#define EPX_CONNECT_BACKOFF_MIN_MS 10
#define EPX_CONNECT_BACKOFF_MAX_MS 200

int epx_bs_random(void *buf, size_t len) {
  uint8_t *p = (uint8_t *)buf;
  while (len > 0) {
    ssize_t n = getrandom(p, len, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

int epx_bs_poll_ms(int64_t deadline_ns, int64_t now_ns, int cap_ms) {
  if (deadline_ns <= now_ns) return 0;
  int64_t ms = (deadline_ns - now_ns + 999999) / 1000000;
  return ms > cap_ms ? cap_ms : (int)ms;
}

static void addr_from_sockaddr(const struct sockaddr *sa, epxBsAddr *addr) {
  memset(addr, 0, sizeof(*addr));
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
    addr->family = 4;
    addr->port = ntohs(in->sin_port);
    memcpy(addr->addr, &in->sin_addr, 4);
  } else {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
    addr->family = 6;
    addr->port = ntohs(in6->sin6_port);
    addr->scope_id = in6->sin6_scope_id;
    memcpy(addr->addr, &in6->sin6_addr, 16);
  }
}

static socklen_t addr_to_sockaddr(const epxBsAddr *addr, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof(*ss));
  if (addr->family == 4) {
    struct sockaddr_in *in = (struct sockaddr_in *)(void *)ss;
    in->sin_family = AF_INET;
    in->sin_port = htons(addr->port);
    memcpy(&in->sin_addr, addr->addr, 4);
    return sizeof(*in);
  }
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)(void *)ss;
  in6->sin6_family = AF_INET6;
  in6->sin6_port = htons(addr->port);
  in6->sin6_scope_id = addr->scope_id;
  memcpy(&in6->sin6_addr, addr->addr, 16);
  return sizeof(*in6);
}

void epx_bs_addr_str(const epxBsAddr *addr, char *out, size_t cap) {
  char ip[INET6_ADDRSTRLEN] = "?";
  if (addr->family == 4) {
    inet_ntop(AF_INET, addr->addr, ip, sizeof(ip));
    snprintf(out, cap, "%s:%u", ip, addr->port);
  } else {
    inet_ntop(AF_INET6, addr->addr, ip, sizeof(ip));
    snprintf(out, cap, "[%s]:%u", ip, addr->port);
  }
}

void epx_bs_peer_str(int fd, char *out, size_t cap) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  if (getpeername(fd, (struct sockaddr *)&ss, &len) != 0 ||
      (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)) {
    snprintf(out, cap, "(unknown peer)");
    return;
  }
  epxBsAddr a;
  addr_from_sockaddr((const struct sockaddr *)&ss, &a);
  epx_bs_addr_str(&a, out, cap);
}

static void set_loopback(epxBsAddr *addr) {
  memset(addr, 0, sizeof(*addr));
  addr->family = 4;
  addr->addr[0] = 127;
  addr->addr[3] = 1;
}

epxResult_t epx_bs_pick_address(epxBsAddr *addr, char *err, size_t errlen) {
  const char *ifname = epx_param_str(EPX_PARAM_SOCKET_IFNAME);
  int want_if = ifname && ifname[0] != '\0';
  if (!want_if && epx_param_int(EPX_PARAM_SOCKET_LOOPBACK) == 1) {
    set_loopback(addr);
    return epxSuccess;
  }
  struct ifaddrs *list = NULL;
  if (getifaddrs(&list) != 0) {
    int e = errno;
    if (want_if) {
      snprintf(err, errlen, "getifaddrs failed while looking for EPX_SOCKET_IFNAME=%s: %s", ifname,
               strerror(e));
      return epxSystemError;
    }
    set_loopback(addr);
    return epxSuccess;
  }
  const struct ifaddrs *v4 = NULL, *v6 = NULL;
  for (const struct ifaddrs *it = list; it; it = it->ifa_next) {
    if (!it->ifa_addr || !(it->ifa_flags & IFF_UP)) continue;
    int fam = it->ifa_addr->sa_family;
    if (fam != AF_INET && fam != AF_INET6) continue;
    if (want_if) {
      if (strcmp(it->ifa_name, ifname) != 0) continue;
    } else if ((it->ifa_flags & IFF_LOOPBACK) || fam != AF_INET) {
      continue; /* the default is IPv4 only, as documented in epx.h */
    }
    if (fam == AF_INET && !v4) v4 = it;
    if (fam == AF_INET6 && !v6) v6 = it;
  }
  /* IPv4 first on a named interface: it needs no scope and crosses more networks. */
  const struct ifaddrs *pick = v4 ? v4 : v6;
  if (pick) {
    addr_from_sockaddr(pick->ifa_addr, addr);
    addr->port = 0;
    if (addr->family == 6 && addr->scope_id == 0) addr->scope_id = if_nametoindex(pick->ifa_name);
  }
  freeifaddrs(list);
  if (pick) return epxSuccess;
  if (want_if) {
    snprintf(err, errlen,
             "EPX_SOCKET_IFNAME=%s: no such interface, or it is down or has no IP address", ifname);
    return epxBootstrapError;
  }
  set_loopback(addr); /* a host without networking still runs single-host jobs */
  return epxSuccess;
}

epxResult_t epx_bs_listen(epxBsAddr *addr, int *fd_out, char *err, size_t errlen) {
  struct sockaddr_storage ss;
  socklen_t sslen = addr_to_sockaddr(addr, &ss);
  char where[80];
  epx_bs_addr_str(addr, where, sizeof(where));
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    snprintf(err, errlen, "socket() for the rendezvous failed: %s", strerror(errno));
    return epxSystemError;
  }
  if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 || listen(fd, SOMAXCONN) != 0) {
    snprintf(err, errlen, "cannot listen on %s for the rendezvous: %s", where, strerror(errno));
    close(fd);
    return epxSystemError;
  }
  sslen = sizeof(ss);
  if (getsockname(fd, (struct sockaddr *)&ss, &sslen) != 0) {
    snprintf(err, errlen, "getsockname on the rendezvous socket failed: %s", strerror(errno));
    close(fd);
    return epxSystemError;
  }
  uint32_t scope = addr->scope_id;
  addr_from_sockaddr((const struct sockaddr *)&ss, addr);
  if (addr->family == 6 && addr->scope_id == 0) addr->scope_id = scope;
  *fd_out = fd;
  return epxSuccess;
}

/* One non-blocking connection attempt finished by the deadline: 0, or an errno. */
static int connect_once(const epxBsAddr *addr, int64_t deadline_ns, int *fd_out) {
  struct sockaddr_storage ss;
  socklen_t sslen = addr_to_sockaddr(addr, &ss);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return errno;
  int e = 0;
  if (connect(fd, (struct sockaddr *)&ss, sslen) != 0) {
    e = errno;
    if (e == EINPROGRESS || e == EINTR) {
      for (;;) {
        struct pollfd p = {fd, POLLOUT, 0};
        int ms = epx_bs_poll_ms(deadline_ns, epx_now_ns(), 1000);
        if (ms == 0) {
          e = ETIMEDOUT;
          break;
        }
        int rc = poll(&p, 1, ms);
        if (rc < 0 && errno == EINTR) continue;
        if (rc < 0) {
          e = errno;
          break;
        }
        if (rc == 0) continue;
        socklen_t elen = sizeof(e);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &elen) != 0) e = errno;
        break;
      }
    }
  }
  if (e != 0) {
    close(fd);
    return e;
  }
  int one = 1;
  /* Frames are small and answered at once: no Nagle delay on the handshake. */
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  *fd_out = fd;
  return 0;
}

epxResult_t epx_bs_connect(const epxBsAddr *addr, int64_t deadline_ns, int *fd_out, char *err,
                           size_t errlen) {
  char where[80];
  epx_bs_addr_str(addr, where, sizeof(where));
  int backoff_ms = EPX_CONNECT_BACKOFF_MIN_MS;
  int attempts = 0;
  for (;;) {
    int e = connect_once(addr, deadline_ns, fd_out);
    attempts++;
    if (e == 0) return epxSuccess;
    int retry = e == ECONNREFUSED || e == ENETUNREACH || e == EHOSTUNREACH || e == ETIMEDOUT ||
                e == ECONNRESET || e == EAGAIN || e == EINTR;
    int64_t now = epx_now_ns();
    if (!retry) {
      snprintf(err, errlen, "cannot connect to the rendezvous at %s: %s", where, strerror(e));
      return epxSystemError;
    }
    if (now >= deadline_ns) {
      snprintf(err, errlen,
               "could not reach the rendezvous at %s by the deadline (%d attempts, last: %s); is "
               "the process that made the id alive, and the id from this run?",
               where, attempts, strerror(e));
      return epxTimeout;
    }
    /* The root may be briefly unreachable (busy backlog, network blip): wait and retry. */
    int ms = epx_bs_poll_ms(deadline_ns, now, backoff_ms);
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    backoff_ms =
        backoff_ms * 2 > EPX_CONNECT_BACKOFF_MAX_MS ? EPX_CONNECT_BACKOFF_MAX_MS : backoff_ms * 2;
  }
}

/* Waits until fd is ready for `events` or the deadline passes. */
static epxSockStatus wait_fd(int fd, short events, int64_t deadline_ns) {
  for (;;) {
    int ms = epx_bs_poll_ms(deadline_ns, epx_now_ns(), 1000);
    if (ms == 0) return EPX_SOCK_TIMEOUT;
    struct pollfd p = {fd, events, 0};
    int rc = poll(&p, 1, ms);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return EPX_SOCK_ERROR;
    if (rc > 0) return EPX_SOCK_OK; /* errors and hang-ups surface in the next read/write */
  }
}

epxSockStatus epx_bs_send_parts(int fd, const void *const *bufs, const size_t *lens, int n,
                                int64_t deadline_ns) {
  size_t done = 0, total = 0;
  if (n > 4) n = 4;
  for (int i = 0; i < n; i++) total += lens[i];
  while (done < total) {
    struct iovec iov[4];
    int k = 0;
    size_t start = 0;
    for (int i = 0; i < n; i++) {
      if (done < start + lens[i]) {
        size_t off = done > start ? done - start : 0;
        iov[k].iov_base = (char *)bufs[i] + off;
        iov[k++].iov_len = lens[i] - off;
      }
      start += lens[i];
    }
    struct msghdr m;
    memset(&m, 0, sizeof(m));
    m.msg_iov = iov;
    m.msg_iovlen = (size_t)k;
    ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      done += (size_t)w;
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      epxSockStatus s = wait_fd(fd, POLLOUT, deadline_ns);
      if (s != EPX_SOCK_OK) return s;
      continue;
    }
    if (w < 0 && (errno == EPIPE || errno == ECONNRESET)) return EPX_SOCK_CLOSED;
    return EPX_SOCK_ERROR;
  }
  return EPX_SOCK_OK;
}

epxSockStatus epx_bs_send_all(int fd, const void *a, size_t alen, const void *b, size_t blen,
                              int64_t deadline_ns) {
  const void *bufs[2] = {a, b};
  size_t lens[2] = {alen, blen};
  return epx_bs_send_parts(fd, bufs, lens, 2, deadline_ns);
}

epxSockStatus epx_bs_recv_all(int fd, void *buf, size_t len, int64_t deadline_ns) {
  size_t done = 0;
  while (done < len) {
    ssize_t r = recv(fd, (char *)buf + done, len - done, MSG_DONTWAIT);
    if (r > 0) {
      done += (size_t)r;
      continue;
    }
    if (r == 0) return EPX_SOCK_CLOSED;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      epxSockStatus s = wait_fd(fd, POLLIN, deadline_ns);
      if (s != EPX_SOCK_OK) return s;
      continue;
    }
    if (errno == ECONNRESET) return EPX_SOCK_CLOSED;
    return EPX_SOCK_ERROR;
  }
  return EPX_SOCK_OK;
}
