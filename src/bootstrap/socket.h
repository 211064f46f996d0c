/*
 * socket.h - the operating-system side of the TCP bootstrap: choosing and
 * binding the listening address, connecting, and reads/writes that each end
 * at a deadline (absolute epx_now_ns() time). Sockets are non-blocking and
 * close-on-exec; writes never raise SIGPIPE.
 */
#ifndef EPX_BOOTSTRAP_SOCKET_H
#define EPX_BOOTSTRAP_SOCKET_H

#include <stddef.h>
#include <stdint.h>

#include "bootstrap/wire.h"
#include "epx.h"

/* Outcome of a deadline-bounded transfer. */
typedef enum epxSockStatus {
  EPX_SOCK_OK = 0,
  EPX_SOCK_TIMEOUT, /* the deadline passed first */
  EPX_SOCK_CLOSED,  /* the peer closed (EOF) or reset the connection */
  EPX_SOCK_ERROR    /* another system error; errno is kept */
} epxSockStatus;

/* Fills buf (len bytes) from the kernel's random source. 0 on success, -1 (errno). */
int epx_bs_random(void *buf, size_t len);

/* Picks the address the root listens on: EPX_SOCKET_IFNAME, else 127.0.0.1 when
 * EPX_SOCKET_LOOPBACK=1, else the first up non-loopback IPv4 interface, else
 * loopback. Port is left 0. */
epxResult_t epx_bs_pick_address(epxBsAddr *addr, char *err, size_t errlen);

/* Binds and listens on addr (port 0 picks one; the chosen port is written back). */
epxResult_t epx_bs_listen(epxBsAddr *addr, int *fd_out, char *err, size_t errlen);

/* "ip:port" (IPv6 in brackets) for messages. */
void epx_bs_addr_str(const epxBsAddr *addr, char *out, size_t cap);
/* The same for a connected socket's peer. */
void epx_bs_peer_str(int fd, char *out, size_t cap);

/* Connects to addr, retrying refused or unreachable attempts until the deadline. */
epxResult_t epx_bs_connect(const epxBsAddr *addr, int64_t deadline_ns, int *fd_out, char *err,
                           size_t errlen);

/* Writes two buffers back to back (header and payload) by the deadline. */
epxSockStatus epx_bs_send_all(int fd, const void *a, size_t alen, const void *b, size_t blen,
                              int64_t deadline_ns);
/* Writes n <= 4 buffers back to back (header, payload, MAC trailer) by the deadline. */
epxSockStatus epx_bs_send_parts(int fd, const void *const *bufs, const size_t *lens, int n,
                                int64_t deadline_ns);
/* Reads exactly len bytes by the deadline. */
epxSockStatus epx_bs_recv_all(int fd, void *buf, size_t len, int64_t deadline_ns);

/* Milliseconds poll() should wait to reach deadline_ns: rounded up, 0 when
 * passed, at most cap_ms. */
int epx_bs_poll_ms(int64_t deadline_ns, int64_t now_ns, int cap_ms);

#endif /* EPX_BOOTSTRAP_SOCKET_H */
