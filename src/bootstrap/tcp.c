/*
 * tcp.c - the TCP rendezvous: the unique id and root start-up, and the client
 * side of a rank (handshake, all-gather through the root).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bootstrap/bootstrap.h"
#include "bootstrap/bootstrap_impl.h"
#include "bootstrap/root.h"
#include "bootstrap/socket.h"
#include "bootstrap/wire.h"
#include "core/internal.h"
#include "core/log.h"
#include "core/params.h"

/* How long past its own deadline a rank waits for the root to say why the
 * rendezvous timed out (the root sends that at the rank's deadline). */
#define EPX_BS_ROOT_GRACE_MS 500
/* Root lifetime when the caller passes no deadline and no parameter is set. */
#define EPX_BS_DEFAULT_ROOT_MS 120000
/* How long a rank looks for the root's error frame after a write failed. */
#define EPX_BS_LAST_WORDS_MS 100
/* Pause before a new attempt after the root dropped a half-done handshake. */
#define EPX_BS_RETRY_PAUSE_MS 20

#define NS_PER_MS 1000000LL

/* Writes somewhere even when the caller passed no message buffer. */

epxResult_t epx_bootstrap_get_unique_id(epxUniqueId *id, int64_t deadline_ms, char *err,
                                        size_t errlen) {
  EPX_FIX_ERRBUF(err, errlen);
  if (!id) {
    snprintf(err, errlen, "unique_id is NULL");
    return epxInvalidArgument;
  }
  if (deadline_ms <= 0) deadline_ms = epx_param_int(EPX_PARAM_BOOTSTRAP_TIMEOUT_MS);
  if (deadline_ms <= 0) deadline_ms = EPX_BS_DEFAULT_ROOT_MS;
  if (deadline_ms > INT64_MAX / NS_PER_MS / 2) deadline_ms = INT64_MAX / NS_PER_MS / 2;

  epxBsAddr addr;
  uint8_t secret[EPX_BS_SECRET_BYTES];
  int fd = -1;
  epxResult_t res = epx_bs_pick_address(&addr, err, errlen);
  if (res != epxSuccess) return res;
  res = epx_bs_listen(&addr, &fd, err, errlen);
  if (res != epxSuccess) return res;
  if (epx_bs_random(secret, sizeof(secret)) != 0) {
    snprintf(err, errlen, "getrandom() failed for the rendezvous secret");
    close(fd);
    return epxSystemError;
  }
  epxRoot *r = epx_root_new(secret, fd, epx_now_ns() + deadline_ms * NS_PER_MS);
  if (!r) {
    explicit_bzero(secret, sizeof(secret));
    close(fd);
    snprintf(err, errlen, "out of memory for the rendezvous root");
    return epxOutOfMemory;
  }
  char where[sizeof(r->where)];
  epx_bs_addr_str(&addr, where, sizeof(where));
  memcpy(r->where, where, sizeof(where));
  res = epx_root_start(r, err, errlen); /* from here on the thread owns r */
  if (res != epxSuccess) {
    explicit_bzero(secret, sizeof(secret));
    epx_root_free(r); /* closes fd */
    return res;
  }
  epx_bs_id_encode(id, &addr, secret);
  explicit_bzero(secret, sizeof(secret));
  EPX_INFO(-1, "bootstrap root listening on %s for %lld ms", where, (long long)deadline_ms);
  return epxSuccess;
}

/* ---------------------------------------------------------------- client */

static int64_t hard_deadline(const epxBootstrap *b) {
  return b->deadline_ns + EPX_BS_ROOT_GRACE_MS * NS_PER_MS;
}

/* Turns a failed transfer into a result and message. */
static epxResult_t io_error(const epxBootstrap *b, epxSockStatus s, const char *what, char *err,
                            size_t errlen) {
  char where[80];
  epx_bs_addr_str(&b->root, where, sizeof(where));
  switch (s) {
    case EPX_SOCK_TIMEOUT:
      snprintf(err, errlen,
               "rank %d: timed out %s: the rendezvous root at %s did not answer by the "
               "deadline",
               b->rank, what, where);
      return epxTimeout;
    case EPX_SOCK_CLOSED:
      snprintf(err, errlen,
               "rank %d: the rendezvous root at %s closed the connection %s (did the process "
               "that made the id exit, or its deadline pass?)",
               b->rank, where, what);
      return epxBootstrapError;
    default:
      snprintf(err, errlen, "rank %d: socket error %s with the rendezvous root at %s: %s", b->rank,
               what, where, strerror(errno));
      return epxSystemError;
  }
}

static const char *frame_name(unsigned type) {
  switch (type) {
    case EPX_BS_READY:
      return "READY";
    case EPX_BS_RESULT:
      return "RESULT";
    case EPX_BS_ERROR:
      return "ERROR";
    default:
      return "unexpected";
  }
}

/* A frame after the WELCOME failed its MAC check: injected, altered or
 * replayed between the root and us. Nothing of it is used. */
static epxResult_t auth_failed(const epxBootstrap *b, unsigned type, const char *what, char *err,
                               size_t errlen) {
  char where[80];
  epx_bs_addr_str(&b->root, where, sizeof(where));
  snprintf(err, errlen,
           "rank %d: frame authentication failed (%s): the %s frame (sequence %llu) from the "
           "rendezvous root at %s does not carry a valid MAC: it was forged, altered or "
           "replayed on the way, so the connection is not trusted",
           b->rank, what, frame_name(type), (unsigned long long)b->rx_seq, where);
  return epxBootstrapError;
}

/* Reads a frame of type `want` whose payload is exactly `len` bytes into buf,
 * or the root's ERROR frame, which becomes the result and message. After the
 * WELCOME (b->authed) every frame must end with a valid MAC trailer (wire.h),
 * checked before anything of it is used; a bad one fails with "frame
 * authentication failed" and leaves buf zeroed. `*closed` (if given) is set
 * when the root closed the connection without saying why. */
static epxResult_t read_frame_by(epxBootstrap *b, epxBsFrameType want, void *buf, uint32_t len,
                                 const char *what, int64_t deadline_ns, int *closed, int *from_root,
                                 char *err, size_t errlen) {
  uint8_t hdr[EPX_BS_HEADER_BYTES];
  uint8_t mac[EPX_BS_MAC_BYTES];
  epxBsHeader h;
  uint32_t tlen = b->authed ? EPX_BS_MAC_BYTES : 0; /* trailer */
  if (closed) *closed = 0;
  if (from_root) *from_root = 0;
  epxSockStatus s = epx_bs_recv_all(b->fd, hdr, sizeof(hdr), deadline_ns);
  if (s != EPX_SOCK_OK) {
    if (closed) *closed = s == EPX_SOCK_CLOSED;
    return io_error(b, s, what, err, errlen);
  }
  epxBsHeaderStatus st = epx_bs_header_decode(
      hdr, EPX_BS_TYPE_BIT(want) | EPX_BS_TYPE_BIT(EPX_BS_ERROR), (uint32_t)b->nranks, &h);
  if (st == EPX_BS_HDR_BAD_VERSION && h.magic == EPX_BS_FRAME_MAGIC) {
    snprintf(err, errlen,
             "rank %d: the rendezvous root speaks bootstrap protocol version %u, this rank %u: "
             "every rank must load the same epx",
             b->rank, h.version, EPX_BS_PROTOCOL_VERSION);
    return epxBootstrapError;
  }
  if (st != EPX_BS_HDR_OK) {
    snprintf(err, errlen, "rank %d: bad frame from the rendezvous root %s: %s (type %u, length %u)",
             b->rank, what, epx_bs_header_status_str(st), h.type, h.len);
    return epxBootstrapError;
  }
  if (h.type == EPX_BS_ERROR) {
    uint8_t payload[EPX_BS_ERROR_MAX_LEN];
    char msg[EPX_BS_ERROR_TEXT_MAX + 1];
    if (h.len < tlen) return auth_failed(b, h.type, what, err, errlen); /* no room for a MAC */
    s = epx_bs_recv_all(b->fd, payload, h.len, deadline_ns);
    if (s != EPX_SOCK_OK) return io_error(b, s, "reading the root's error report", err, errlen);
    uint32_t plen = h.len - tlen;
    if (b->authed) {
      if (!epx_bs_frame_check(b->key, EPX_BS_DIR_TO_CLIENT, b->rx_seq, hdr, payload, plen,
                              payload + plen))
        return auth_failed(b, h.type, what, err, errlen);
      b->rx_seq++;
    }
    epxResult_t code = epx_bs_error_decode(payload, plen, msg, sizeof(msg));
    snprintf(err, errlen, "rank %d: rendezvous failed: %s", b->rank, msg);
    if (from_root) *from_root = 1;
    return code;
  }
  if (h.len != len + tlen || (want != EPX_BS_CHALLENGE && h.rank != (uint32_t)b->rank)) {
    snprintf(err, errlen,
             "rank %d: the rendezvous root sent a frame for rank %u with %u bytes %s, expected "
             "%u bytes (protocol error)",
             b->rank, h.rank, h.len, what, len + tlen);
    return epxBootstrapError;
  }
  s = epx_bs_recv_all(b->fd, buf, len, deadline_ns);
  if (s == EPX_SOCK_OK && tlen) s = epx_bs_recv_all(b->fd, mac, tlen, deadline_ns);
  if (s != EPX_SOCK_OK) return io_error(b, s, what, err, errlen);
  if (b->authed) {
    if (!epx_bs_frame_check(b->key, EPX_BS_DIR_TO_CLIENT, b->rx_seq, hdr, buf, len, mac)) {
      if (len) memset(buf, 0, len); /* the caller must not see unauthenticated bytes */
      return auth_failed(b, h.type, what, err, errlen);
    }
    b->rx_seq++;
  }
  return epxSuccess;
}

static epxResult_t read_frame(epxBootstrap *b, epxBsFrameType want, void *buf, uint32_t len,
                              const char *what, int *closed, char *err, size_t errlen) {
  return read_frame_by(b, want, buf, len, what, hard_deadline(b), closed, NULL, err, errlen);
}

/* A write found the connection closed: the root may have sent its reason
 * before closing, and that explains more than "connection closed". */
static epxResult_t write_failed(epxBootstrap *b, epxSockStatus s, const char *what, int *told,
                                char *err, size_t errlen) {
  *told = 0;
  if (s == EPX_SOCK_CLOSED) {
    char why[EPX_BOOTSTRAP_ERR_BYTES];
    int from_root = 0;
    epxResult_t res = read_frame_by(b, EPX_BS_ERROR, NULL, 0, what,
                                    epx_now_ns() + EPX_BS_LAST_WORDS_MS * NS_PER_MS, NULL,
                                    &from_root, why, sizeof(why));
    if (from_root) {
      *told = 1;
      snprintf(err, errlen, "%s", why);
      return res;
    }
  }
  return io_error(b, s, what, err, errlen);
}

/* One connection and handshake. *retry is set when the root dropped the
 * connection before admitting us without saying why (e.g. under a flood of
 * other connections), so a new attempt may succeed. */
static epxResult_t handshake(epxBootstrap *b, const uint8_t secret[EPX_BS_SECRET_BYTES], int *retry,
                             char *err, size_t errlen) {
  uint8_t root_nonce[EPX_BS_NONCE_BYTES];
  uint8_t msg[EPX_BS_HELLO_BYTES];
  uint8_t hdr[EPX_BS_HEADER_BYTES];
  uint8_t mac[EPX_BS_MAC_BYTES];
  epxBsHello hello;
  *retry = 0;
  b->authed = 0;
  b->tx_seq = b->rx_seq = 0;
  epxResult_t res = epx_bs_connect(&b->root, b->deadline_ns, &b->fd, err, errlen);
  if (res != epxSuccess) {
    char tmp[EPX_BOOTSTRAP_ERR_BYTES];
    snprintf(tmp, sizeof(tmp), "rank %d: %s", b->rank, err);
    snprintf(err, errlen, "%s", tmp);
    return res;
  }
  res = read_frame(b, EPX_BS_CHALLENGE, root_nonce, EPX_BS_NONCE_BYTES,
                   "waiting for the root's challenge", retry, err, errlen);
  if (res != epxSuccess) return res;

  memset(&hello, 0, sizeof(hello));
  if (epx_bs_random(hello.client_nonce, sizeof(hello.client_nonce)) != 0) {
    snprintf(err, errlen, "rank %d: getrandom() failed for the handshake nonce", b->rank);
    return epxSystemError;
  }
  hello.nranks = (uint32_t)b->nranks;
  int64_t left_ms = (b->deadline_ns - epx_now_ns()) / NS_PER_MS;
  hello.timeout_ms = left_ms < 0 ? 0 : left_ms > UINT32_MAX ? UINT32_MAX : (uint32_t)left_ms;
  epx_bs_client_mac(secret, root_nonce, (uint32_t)b->rank, &hello, hello.mac);
  epx_bs_hello_encode(&hello, msg);
  epx_bs_header_encode(hdr, EPX_BS_HELLO, (uint32_t)b->rank, sizeof(msg));
  epxSockStatus s = epx_bs_send_all(b->fd, hdr, sizeof(hdr), msg, sizeof(msg), hard_deadline(b));
  if (s != EPX_SOCK_OK) {
    int told;
    res = write_failed(b, s, "sending the handshake", &told, err, errlen);
    *retry = s == EPX_SOCK_CLOSED && !told; /* dropped unexplained: try again */
    return res;
  }

  res = read_frame(b, EPX_BS_WELCOME, mac, EPX_BS_MAC_BYTES, "waiting to be admitted", retry, err,
                   errlen);
  if (res != epxSuccess) return res;
  uint8_t expect[EPX_BS_MAC_BYTES];
  epx_bs_root_mac(secret, hello.client_nonce, root_nonce, (uint32_t)b->rank, expect);
  if (!epx_bs_mac_equal(mac, expect)) {
    char where[80];
    epx_bs_addr_str(&b->root, where, sizeof(where));
    snprintf(err, errlen,
             "rank %d: the process at %s could not prove it holds the id's secret: it is not "
             "this rendezvous's root",
             b->rank, where);
    return epxBootstrapError;
  }
  /* From here on every frame, both ways, is authenticated (wire.h). */
  epx_bs_session_key(secret, root_nonce, hello.client_nonce, (uint32_t)b->rank,
                     (uint32_t)b->nranks, b->key);
  b->authed = 1;
  return epxSuccess;
}

epxResult_t epx_bootstrap_tcp_create(const epxUniqueId *id, int rank, int nranks,
                                     int64_t deadline_ns, epxBootstrap **out, char *err,
                                     size_t errlen) {
  EPX_FIX_ERRBUF(err, errlen);
  if (out) *out = NULL;
  if (!out || !id) {
    snprintf(err, errlen, "%s is NULL", out ? "unique_id" : "bootstrap output pointer");
    return epxInvalidArgument;
  }
  epxBootstrap *b = NULL;
  epxResult_t created = epx_bootstrap_new(EPX_BOOTSTRAP_TCP, rank, nranks, &b, err, errlen);
  if (created != epxSuccess) return created;
  b->deadline_ns = deadline_ns;
  uint8_t secret[EPX_BS_SECRET_BYTES];
  epxResult_t res;
  if (epx_bs_id_decode(id, &b->root, secret, err, errlen) != 0) {
    res = epxBootstrapError;
    goto fail;
  }
  for (;;) {
    int retry = 0;
    res = handshake(b, secret, &retry, err, errlen);
    if (res == epxSuccess || !retry || epx_now_ns() >= b->deadline_ns) break;
    EPX_INFO(rank, "bootstrap: %s; retrying", err);
    close(b->fd);
    b->fd = -1;
    struct timespec ts = {0, EPX_BS_RETRY_PAUSE_MS * NS_PER_MS};
    nanosleep(&ts, NULL);
  }
  explicit_bzero(secret, sizeof(secret));
  if (res != epxSuccess) goto fail;
  res = read_frame(b, EPX_BS_READY, NULL, 0, "waiting for the other ranks to connect", NULL, err,
                   errlen);
  if (res != epxSuccess) goto fail;
  EPX_TRACE(rank, "bootstrap: all %d ranks connected", nranks);
  *out = b;
  return epxSuccess;
fail:
  explicit_bzero(secret, sizeof(secret));
  epx_bootstrap_root_drain(EPX_BOOTSTRAP_DRAIN_MS); /* see epx_bootstrap_destroy */
  if (b->fd >= 0) close(b->fd);
  explicit_bzero(b->key, sizeof(b->key));
  free(b);
  return res;
}

epxResult_t epx_bootstrap_tcp_allgather(epxBootstrap *b, const void *send, void *recv, size_t bytes,
                                        char *err, size_t errlen) {
  uint64_t total = (uint64_t)bytes * (uint64_t)b->nranks;
  if (total > UINT32_MAX - EPX_BS_MAC_BYTES) { /* the RESULT's length field counts the trailer */
    snprintf(err, errlen, "all-gather of %zu bytes from %d ranks exceeds one frame", bytes,
             b->nranks);
    return epxInvalidArgument;
  }
  char what[96];
  snprintf(what, sizeof(what), "in all-gather round %llu", (unsigned long long)b->rounds + 1);
  uint8_t hdr[EPX_BS_HEADER_BYTES], mac[EPX_BS_MAC_BYTES];
  epx_bs_frame_seal(b->key, EPX_BS_DIR_TO_ROOT, b->tx_seq++, EPX_BS_DATA, (uint32_t)b->rank, send,
                    (uint32_t)bytes, hdr, mac);
  const void *parts[3] = {hdr, send, mac};
  size_t lens[3] = {sizeof(hdr), bytes, sizeof(mac)};
  epxSockStatus s = epx_bs_send_parts(b->fd, parts, lens, 3, hard_deadline(b));
  int told;
  if (s != EPX_SOCK_OK) return write_failed(b, s, what, &told, err, errlen);
  epxResult_t res = read_frame(b, EPX_BS_RESULT, recv, (uint32_t)total, what, NULL, err, errlen);
  if (res == epxSuccess) b->rounds++;
  return res;
}
