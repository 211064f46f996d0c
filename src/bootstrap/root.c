/*
 * root.c - the rendezvous root (see root.h): admission, all-gather relay,
 * failure reporting, and the poll() loop of its service thread.
 */
#include "bootstrap/root.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "bootstrap/bootstrap.h"
#include "bootstrap/socket.h"
#include "core/internal.h"
#include "core/log.h"

/* One recv() per ready connection per loop turn, so no peer monopolises the loop. */
#define EPX_ROOT_READ_BYTES (64 * 1024)
/* Connections taken from the backlog per loop turn. */
#define EPX_ROOT_ACCEPT_BURST 64
/* Pause after accept() runs out of descriptors, so the loop does not spin. */
#define EPX_ROOT_ACCEPT_PAUSE_MS 100
/* Longest single poll() sleep; deadlines are recomputed after each. */
#define EPX_ROOT_POLL_CAP_MS 1000

#define NS_PER_MS 1000000LL

static atomic_int g_live_roots;
static atomic_ullong g_refused_total;
static atomic_int g_undelivered; /* frames queued for ranks, not yet written or dropped */

int epx_bootstrap_live_roots(void) { return atomic_load(&g_live_roots); }
uint64_t epx_bootstrap_refused_total(void) { return atomic_load(&g_refused_total); }
int epx_bootstrap_root_undelivered(void) { return atomic_load(&g_undelivered); }

void epx_bootstrap_root_drain(int max_ms) {
  if (atomic_load(&g_live_roots) == 0) return;
  int64_t end = epx_now_ns() + (int64_t)max_ms * NS_PER_MS;
  while (atomic_load(&g_undelivered) > 0 && atomic_load(&g_live_roots) > 0 && epx_now_ns() < end) {
    struct timespec ts = {0, 1000000L};
    nanosleep(&ts, NULL);
  }
}

/* ------------------------------------------------------------ output queue */

static epxBsBlob *blob_new(uint32_t len) {
  epxBsBlob *b = (epxBsBlob *)malloc(sizeof(epxBsBlob) + (len ? len : 1));
  if (!b) return NULL;
  b->refs = 1;
  b->len = len;
  return b;
}

static void blob_unref(epxBsBlob *b) {
  if (b && --b->refs == 0) free(b);
}

/* Queues a frame; takes a reference on payload. 0, or -1 when out of memory.
 * After the WELCOME (c->authed) the frame is sealed with the connection's key
 * and next sequence number: frames leave in queue order, so in sequence. */
static int queue_frame(epxRootConn *c, epxBsFrameType type, uint32_t rank, epxBsBlob *payload) {
  epxBsOut *o = (epxBsOut *)calloc(1, sizeof(*o));
  if (!o) return -1;
  uint32_t plen = payload ? payload->len : 0;
  if (c->authed) {
    epx_bs_frame_seal(c->key, EPX_BS_DIR_TO_CLIENT, c->tx_seq++, type, rank,
                      payload ? payload->data : NULL, plen, o->hdr, o->mac);
    o->has_mac = 1;
  } else {
    epx_bs_header_encode(o->hdr, type, rank, plen);
  }
  if (payload) payload->refs++;
  o->payload = payload;
  /* Frames owed to ranks are counted until written, so a rank in the root's
   * process can wait for them before it exits (epx_bootstrap_root_drain). */
  o->to_rank = c->state == EPX_RC_RANK;
  if (o->to_rank) atomic_fetch_add(&g_undelivered, 1);
  if (c->out_tail)
    c->out_tail->next = o;
  else
    c->out_head = o;
  c->out_tail = o;
  return 0;
}

static int queue_bytes(epxRootConn *c, epxBsFrameType type, uint32_t rank, const void *data,
                       uint32_t len) {
  epxBsBlob *b = blob_new(len);
  if (!b) return -1;
  if (len) memcpy(b->data, data, len);
  int rc = queue_frame(c, type, rank, b);
  blob_unref(b);
  return rc;
}

static void queue_error(epxRootConn *c, epxResult_t code, const char *msg) {
  uint8_t buf[EPX_BS_ERROR_MAX_PAYLOAD];
  size_t n = epx_bs_error_encode(buf, sizeof(buf), code, msg);
  /* Out of memory here only loses the explanation: the connection closes anyway. */
  (void)queue_bytes(c, EPX_BS_ERROR, c->state == EPX_RC_RANK ? (uint32_t)c->rank : EPX_BS_NO_RANK,
                    buf, (uint32_t)n);
}

static void free_out(epxBsOut *o) {
  if (o->to_rank) atomic_fetch_sub(&g_undelivered, 1);
  blob_unref(o->payload);
  free(o);
}

static void drop_output(epxRootConn *c) {
  while (c->out_head) {
    epxBsOut *o = c->out_head;
    c->out_head = o->next;
    free_out(o);
  }
  c->out_tail = NULL;
}

/* ------------------------------------------------------------ connections */

static void set_state(epxRoot *r, epxRootConn *c, epxRootConnState s) {
  if (c->state == EPX_RC_PENDING && s != EPX_RC_PENDING) r->npending--;
  c->state = s;
}

static void begin_close(epxRoot *r, epxRootConn *c, int64_t now) {
  free(c->payload);
  c->payload = NULL;
  c->in_payload = 0;
  set_state(r, c, EPX_RC_CLOSING);
  c->close_deadline_ns = now + EPX_ROOT_CLOSE_LINGER_MS * NS_PER_MS;
}

/* Refuses a connection that is not (or cannot become) a rank: counted, logged,
 * told why, closed. */
static void refuse(epxRoot *r, epxRootConn *c, int64_t now, epxResult_t code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void refuse(epxRoot *r, epxRootConn *c, int64_t now, epxResult_t code, const char *fmt,
                   ...) {
  char msg[EPX_BS_ERROR_TEXT_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  r->refused++;
  atomic_fetch_add(&g_refused_total, 1);
  EPX_INFO(-1, "bootstrap root %s: refused connection from %s: %s (%llu refused so far)", r->where,
           c->peer, msg, (unsigned long long)r->refused);
  queue_error(c, code, msg);
  begin_close(r, c, now);
}

epxRootConn *epx_root_add_conn(epxRoot *r, int fd, const char *peer, int64_t now) {
  if (r->npending >= EPX_ROOT_MAX_PENDING) {
    epxRootConn *oldest = NULL;
    for (size_t i = 0; i < r->nconns; i++) {
      epxRootConn *o = r->conns[i];
      if (o->state == EPX_RC_PENDING && (!oldest || o->serial < oldest->serial)) oldest = o;
    }
    if (oldest) {
      r->refused++;
      atomic_fetch_add(&g_refused_total, 1);
      EPX_INFO(-1, "bootstrap root %s: dropped %s: %d connections await their handshake", r->where,
               oldest->peer, EPX_ROOT_MAX_PENDING);
      set_state(r, oldest, EPX_RC_DEAD);
    }
  }
  if (r->nconns == r->capconns) {
    size_t cap = r->capconns ? 2 * r->capconns : 16;
    epxRootConn **grown = (epxRootConn **)realloc(r->conns, cap * sizeof(*grown));
    if (!grown) goto oom;
    r->conns = grown;
    r->capconns = cap;
  }
  epxRootConn *c = (epxRootConn *)calloc(1, sizeof(*c));
  if (!c) goto oom;
  c->fd = fd;
  c->rank = -1;
  c->serial = r->next_serial++;
  c->hs_deadline_ns = now + EPX_ROOT_HANDSHAKE_MS * NS_PER_MS;
  snprintf(c->peer, sizeof(c->peer), "%s", peer ? peer : "(unknown peer)");
  c->state = EPX_RC_PENDING;
  r->npending++;
  r->conns[r->nconns++] = c;
  r->accepted++;
  if (epx_bs_random(c->nonce, sizeof(c->nonce)) != 0 ||
      queue_bytes(c, EPX_BS_CHALLENGE, EPX_BS_NO_RANK, c->nonce, EPX_BS_NONCE_BYTES) != 0) {
    set_state(r, c, EPX_RC_DEAD); /* no nonce, no admission */
    return NULL;
  }
  return c;
oom:
  if (fd >= 0) close(fd);
  return NULL;
}

static void free_conn(epxRootConn *c) {
  if (c->fd >= 0) close(c->fd);
  free(c->payload);
  drop_output(c);
  explicit_bzero(c->key, sizeof(c->key));
  free(c);
}

void epx_root_sweep(epxRoot *r) {
  size_t w = 0;
  for (size_t i = 0; i < r->nconns; i++) {
    if (r->conns[i]->state == EPX_RC_DEAD)
      free_conn(r->conns[i]);
    else
      r->conns[w++] = r->conns[i];
  }
  r->nconns = w;
}

/* ---------------------------------------------------------------- session */

/* "missing ranks: 3, 5-7 (5 of 8 connected)" or, during a round, the ranks that
 * have not sent their part. */
static void describe_missing(const epxRoot *r, char *out, size_t cap) {
  char list[400];
  if (r->nranks == 0) {
    snprintf(out, cap, "no rank has connected");
  } else if (r->phase == EPX_ROOT_GATHER) {
    epx_bs_format_ranks(list, sizeof(list), r->rank_state, r->nranks, 0);
    snprintf(out, cap, "missing ranks: %s (%d of %d connected)", list, r->nconnected, r->nranks);
  } else if (r->round_count > 0) {
    epx_bs_format_ranks(list, sizeof(list), r->contributed, r->nranks, 0);
    snprintf(out, cap, "all-gather round %llu, missing ranks: %s (%d of %d sent their part)",
             (unsigned long long)r->round + 1, list, r->round_count, r->nranks);
  } else {
    snprintf(out, cap, "all ranks connected, no all-gather in progress");
  }
}

/* Ends the rendezvous: every rank still connected gets the error. */
static void fail_session(epxRoot *r, int64_t now, epxResult_t code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void fail_session(epxRoot *r, int64_t now, epxResult_t code, const char *fmt, ...) {
  if (r->phase == EPX_ROOT_FAILED || r->phase == EPX_ROOT_DONE) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->fail_msg, sizeof(r->fail_msg), fmt, ap);
  va_end(ap);
  r->fail_code = code;
  r->phase = EPX_ROOT_FAILED;
  EPX_INFO(-1, "bootstrap root %s: rendezvous failed (%s): %s", r->where, epxGetErrorString(code),
           r->fail_msg);
  for (size_t i = 0; i < r->nconns; i++) {
    epxRootConn *c = r->conns[i];
    if (c->state != EPX_RC_RANK) continue;
    queue_error(c, code, r->fail_msg);
    begin_close(r, c, now);
  }
  blob_unref(r->round_buf);
  r->round_buf = NULL;
}

static void fail_oom(epxRoot *r, int64_t now, const char *what) {
  fail_session(r, now, epxOutOfMemory, "the rendezvous root ran out of memory (%s)", what);
}

static void handle_hello(epxRoot *r, epxRootConn *c, int64_t now) {
  epxBsHello hello;
  uint8_t mac[EPX_BS_MAC_BYTES];
  epx_bs_hello_decode(c->payload, &hello);
  epx_bs_client_mac(r->secret, c->nonce, c->h.rank, &hello, mac);
  if (!epx_bs_mac_equal(mac, hello.mac)) {
    refuse(r, c, now, epxBootstrapError,
           "handshake refused: authentication failed (the id's secret does not match this "
           "rendezvous, or the handshake was replayed)");
    return;
  }
  uint32_t rank = c->h.rank;
  if (r->phase == EPX_ROOT_FAILED) {
    EPX_INFO(-1, "bootstrap root %s: rank %u arrived after the rendezvous failed", r->where, rank);
    queue_error(c, r->fail_code, r->fail_msg);
    begin_close(r, c, now);
    return;
  }
  if (hello.nranks < 1 || hello.nranks > EPX_BOOTSTRAP_MAX_RANKS || rank >= hello.nranks) {
    refuse(r, c, now, epxBootstrapError, "handshake refused: rank %u of %u ranks is out of range",
           rank, hello.nranks);
    return;
  }
  if (r->nranks == 0) {
    /* The first authenticated rank fixes the rank count for everyone. */
    r->by_rank = (epxRootConn **)calloc(hello.nranks, sizeof(*r->by_rank));
    r->rank_state = (uint8_t *)calloc(hello.nranks, 1);
    r->contributed = (uint8_t *)calloc(hello.nranks, 1);
    if (!r->by_rank || !r->rank_state || !r->contributed) {
      free(r->by_rank);
      free(r->rank_state);
      free(r->contributed);
      r->by_rank = NULL;
      r->rank_state = r->contributed = NULL;
      refuse(r, c, now, epxOutOfMemory, "the rendezvous root is out of memory for %u ranks",
             hello.nranks);
      return;
    }
    r->nranks = (int)hello.nranks;
  } else if ((int)hello.nranks != r->nranks) {
    refuse(r, c, now, epxMismatch,
           "handshake refused: rank %u was started with nranks=%u, but the ranks already "
           "connected use nranks=%d",
           rank, hello.nranks, r->nranks);
    return;
  }
  if (r->rank_state[rank] != 0) {
    refuse(r, c, now, epxBootstrapError, "handshake refused: rank %u is %s (duplicate rank)", rank,
           r->rank_state[rank] == 1 ? "already connected" : "already done");
    return;
  }
  uint8_t root_mac[EPX_BS_MAC_BYTES];
  epx_bs_root_mac(r->secret, hello.client_nonce, c->nonce, rank, root_mac);
  set_state(r, c, EPX_RC_RANK);
  c->rank = (int)rank;
  c->client_deadline_ns = now + (int64_t)hello.timeout_ms * NS_PER_MS;
  r->by_rank[rank] = c;
  r->rank_state[rank] = 1;
  r->nconnected++;
  if (queue_bytes(c, EPX_BS_WELCOME, rank, root_mac, EPX_BS_MAC_BYTES) != 0) {
    fail_oom(r, now, "welcome"); /* its ERROR goes out unauthenticated, in place of the WELCOME */
    return;
  }
  /* Every frame after the WELCOME, both ways, is authenticated (wire.h). */
  epx_bs_session_key(r->secret, c->nonce, hello.client_nonce, rank, hello.nranks, c->key);
  c->authed = 1;
  EPX_TRACE(-1, "bootstrap root %s: rank %u of %d connected from %s", r->where, rank, r->nranks,
            c->peer);
  if (r->nconnected == r->nranks) {
    r->phase = EPX_ROOT_RUNNING;
    for (int i = 0; i < r->nranks; i++) {
      if (queue_frame(r->by_rank[i], EPX_BS_READY, (uint32_t)i, NULL) != 0) {
        fail_oom(r, now, "ready");
        return;
      }
    }
  }
}

static void handle_data(epxRoot *r, epxRootConn *c, const uint8_t *data, uint32_t len,
                        int64_t now) {
  char list[400];
  if (r->phase != EPX_ROOT_RUNNING) {
    fail_session(r, now, epxBootstrapError,
                 "rank %d sent all-gather data before every rank had connected (protocol error)",
                 c->rank);
    return;
  }
  if (r->nleft > 0) {
    epx_bs_format_ranks(list, sizeof(list), r->rank_state, r->nranks, 2);
    fail_session(r, now, epxPeerFailed,
                 "rank %d started all-gather round %llu, but ranks %s had already finished "
                 "with the rendezvous (the ranks made different sequences of bootstrap calls)",
                 c->rank, (unsigned long long)r->round + 1, list);
    return;
  }
  if (r->round_count == 0) {
    uint64_t total = (uint64_t)len * (uint64_t)r->nranks;
    if (total > UINT32_MAX - EPX_BS_MAC_BYTES) { /* the RESULT's length field counts the trailer */
      fail_session(r, now, epxBootstrapError,
                   "all-gather round %llu: %u bytes from each of %d ranks is more than one frame "
                   "can carry",
                   (unsigned long long)r->round + 1, len, r->nranks);
      return;
    }
    r->round_buf = blob_new((uint32_t)total);
    if (!r->round_buf) {
      fail_oom(r, now, "all-gather buffer");
      return;
    }
    r->round_bytes = len;
    memset(r->contributed, 0, (size_t)r->nranks);
  } else if (len != r->round_bytes) {
    fail_session(r, now, epxMismatch,
                 "all-gather round %llu: rank %d sent %u bytes, other ranks sent %u (the ranks "
                 "made different bootstrap calls)",
                 (unsigned long long)r->round + 1, c->rank, len, r->round_bytes);
    return;
  }
  if (r->contributed[c->rank]) {
    fail_session(r, now, epxBootstrapError,
                 "all-gather round %llu: rank %d sent its part twice (protocol error)",
                 (unsigned long long)r->round + 1, c->rank);
    return;
  }
  if (len) memcpy(r->round_buf->data + (size_t)c->rank * len, data, len);
  r->contributed[c->rank] = 1;
  if (++r->round_count < r->nranks) return;

  /* Round complete: every rank gets the same shared buffer. */
  for (int i = 0; i < r->nranks; i++) {
    if (queue_frame(r->by_rank[i], EPX_BS_RESULT, (uint32_t)i, r->round_buf) != 0) {
      fail_oom(r, now, "result");
      return;
    }
  }
  blob_unref(r->round_buf);
  r->round_buf = NULL;
  r->round_count = 0;
  r->round++;
}

/* A complete frame arrived on c. */
static void handle_frame(epxRoot *r, epxRootConn *c, int64_t now) {
  if (c->h.type == EPX_BS_HELLO) {
    handle_hello(r, c, now);
    return;
  }
  /* DATA, from an admitted rank: the header check guarantees the trailer's
   * room. Nothing of the payload is looked at before the trailer checks out. */
  uint32_t len = c->h.len - EPX_BS_MAC_BYTES;
  if (!c->authed || !epx_bs_frame_check(c->key, EPX_BS_DIR_TO_ROOT, c->rx_seq, c->hdr,
                                        c->payload, len, c->payload + len)) {
    /* Injected, altered or replayed on the way: hostile traffic, counted
     * like a refused connection. The rank's stream is lost, and the
     * rendezvous cannot complete without it. */
    r->refused++;
    atomic_fetch_add(&g_refused_total, 1);
    EPX_INFO(-1, "bootstrap root %s: frame authentication failed on rank %d's connection from %s "
             "(%llu refused so far)",
             r->where, c->rank, c->peer, (unsigned long long)r->refused);
    fail_session(r, now, epxBootstrapError,
                 "frame authentication failed: a DATA frame (sequence %llu) on rank %d's "
                 "connection from %s does not carry a valid MAC: it was forged, altered or "
                 "replayed on the way (the rendezvous cannot trust that connection)",
                 (unsigned long long)c->rx_seq, c->rank, c->peer);
    return;
  }
  c->rx_seq++;
  handle_data(r, c, c->payload, len, now);
}

void epx_root_input(epxRoot *r, epxRootConn *c, const uint8_t *data, size_t n, int64_t now) {
  while (n > 0) {
    if (c->state != EPX_RC_PENDING && c->state != EPX_RC_RANK) return; /* discard */
    if (!c->in_payload) {
      size_t take = EPX_BS_HEADER_BYTES - c->hdr_got;
      if (take > n) take = n;
      memcpy(c->hdr + c->hdr_got, data, take);
      c->hdr_got += take;
      data += take;
      n -= take;
      if (c->hdr_got < EPX_BS_HEADER_BYTES) return;
      c->hdr_got = 0;
      uint32_t allowed = EPX_BS_TYPE_BIT(c->state == EPX_RC_PENDING ? EPX_BS_HELLO : EPX_BS_DATA);
      epxBsHeaderStatus st = epx_bs_header_decode(c->hdr, allowed, 0, &c->h);
      if (st != EPX_BS_HDR_OK) {
        if (c->state == EPX_RC_PENDING) {
          refuse(r, c, now, epxBootstrapError, "handshake refused: %s (type %u, length %u)",
                 epx_bs_header_status_str(st), c->h.type, c->h.len);
        } else {
          fail_session(r, now, epxBootstrapError,
                       "rank %d sent a bad frame: %s (type %u, length %u)", c->rank,
                       epx_bs_header_status_str(st), c->h.type, c->h.len);
        }
        return;
      }
      if (c->state == EPX_RC_RANK && c->h.rank != (uint32_t)c->rank) {
        fail_session(r, now, epxBootstrapError,
                     "rank %d sent a frame marked rank %u (protocol error)", c->rank, c->h.rank);
        return;
      }
      if (c->h.len > 0) {
        /* The length is bounded by the header check: at most one upload. */
        c->payload = (uint8_t *)malloc(c->h.len);
        if (!c->payload) {
          if (c->state == EPX_RC_PENDING)
            begin_close(r, c, now);
          else
            fail_oom(r, now, "frame");
          return;
        }
        c->pay_got = 0;
        c->in_payload = 1;
        continue;
      }
      handle_frame(r, c, now);
      continue;
    }
    size_t take = c->h.len - c->pay_got;
    if (take > n) take = n;
    memcpy(c->payload + c->pay_got, data, take);
    c->pay_got += take;
    data += take;
    n -= take;
    if (c->pay_got < c->h.len) return;
    c->in_payload = 0;
    handle_frame(r, c, now);
    free(c->payload);
    c->payload = NULL;
  }
}

void epx_root_peer_closed(epxRoot *r, epxRootConn *c, int64_t now) {
  char why[600];
  drop_output(c);
  switch (c->state) {
    case EPX_RC_PENDING:
      r->refused++;
      atomic_fetch_add(&g_refused_total, 1);
      EPX_INFO(-1, "bootstrap root %s: %s closed before the handshake (%llu refused so far)",
               r->where, c->peer, (unsigned long long)r->refused);
      set_state(r, c, EPX_RC_DEAD);
      return;
    case EPX_RC_CLOSING:
    case EPX_RC_DEAD:
      set_state(r, c, EPX_RC_DEAD);
      return;
    case EPX_RC_RANK:
      break;
  }
  int rank = c->rank;
  set_state(r, c, EPX_RC_DEAD);
  r->by_rank[rank] = NULL;
  r->rank_state[rank] = 2;
  r->nleft++;
  if (r->phase == EPX_ROOT_GATHER) {
    describe_missing(r, why, sizeof(why));
    fail_session(r, now, epxPeerFailed,
                 "rank %d closed its connection before every rank had connected (%s)", rank, why);
  } else if (r->phase == EPX_ROOT_RUNNING && r->round_count > 0) {
    describe_missing(r, why, sizeof(why));
    fail_session(r, now, epxPeerFailed,
                 "rank %d closed its connection during an all-gather (%s); it may have died", rank,
                 why);
  } else if (r->phase == EPX_ROOT_RUNNING && r->nleft == r->nranks) {
    r->phase = EPX_ROOT_DONE; /* every rank is finished with us */
  }
}

void epx_root_flush(epxRoot *r, epxRootConn *c, int64_t now) {
  if (c->fd < 0) {
    drop_output(c);
  }
  while (c->out_head) {
    epxBsOut *o = c->out_head;
    size_t plen = o->payload ? o->payload->len : 0;
    size_t mlen = o->has_mac ? EPX_BS_MAC_BYTES : 0;
    const uint8_t *part[3] = {o->hdr, o->payload ? o->payload->data : NULL, o->mac};
    size_t plens[3] = {EPX_BS_HEADER_BYTES, plen, mlen};
    struct iovec iov[3];
    int n = 0;
    size_t start = 0;
    for (int i = 0; i < 3; i++) {
      if (o->sent < start + plens[i]) {
        size_t off = o->sent > start ? o->sent - start : 0;
        iov[n].iov_base = (void *)(part[i] + off);
        iov[n++].iov_len = plens[i] - off;
      }
      start += plens[i];
    }
    struct msghdr m;
    memset(&m, 0, sizeof(m));
    m.msg_iov = iov;
    m.msg_iovlen = (size_t)n;
    ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      epx_root_peer_closed(r, c, now); /* EPIPE, ECONNRESET...: the peer is gone */
      return;
    }
    o->sent += (size_t)w;
    if (o->sent < EPX_BS_HEADER_BYTES + plen + mlen) return; /* the socket buffer is full */
    c->out_head = o->next;
    if (!c->out_head) c->out_tail = NULL;
    free_out(o);
  }
  if (c->state == EPX_RC_CLOSING && !c->wr_shut) {
    if (c->fd < 0) {
      set_state(r, c, EPX_RC_DEAD);
      return;
    }
    /* Half-close, then wait for the peer's EOF: closing with unread input
     * would reset the connection and could destroy the error frame in flight. */
    shutdown(c->fd, SHUT_WR);
    c->wr_shut = 1;
  }
}

/* Whether rank connection c is blocked on the root (so its deadline matters). */
static int conn_waiting(const epxRoot *r, const epxRootConn *c) {
  if (r->phase == EPX_ROOT_GATHER) return 1;
  return r->phase == EPX_ROOT_RUNNING && r->round_count > 0 && r->contributed[c->rank];
}

void epx_root_tick(epxRoot *r, int64_t now) {
  char why[600];
  for (size_t i = 0; i < r->nconns; i++) {
    epxRootConn *c = r->conns[i];
    if (c->state == EPX_RC_PENDING && now >= c->hs_deadline_ns) {
      refuse(r, c, now, epxTimeout, "handshake not completed within %d ms", EPX_ROOT_HANDSHAKE_MS);
    } else if (c->state == EPX_RC_CLOSING && now >= c->close_deadline_ns) {
      set_state(r, c, EPX_RC_DEAD);
    } else if (c->state == EPX_RC_RANK && now >= c->client_deadline_ns && conn_waiting(r, c)) {
      /* The client is about to give up: tell it (and everyone) what it waited for. */
      describe_missing(r, why, sizeof(why));
      fail_session(r, now, epxTimeout, "rank %d's bootstrap deadline passed; %s", c->rank, why);
    }
  }
  if (now >= r->deadline_ns && r->phase != EPX_ROOT_FAILED && r->phase != EPX_ROOT_DONE) {
    describe_missing(r, why, sizeof(why));
    fail_session(r, now, epxTimeout, "the rendezvous root's deadline passed; %s", why);
  }
}

int64_t epx_root_next_event(const epxRoot *r, int64_t now) {
  int64_t t = r->deadline_ns;
  if (r->accept_pause_until_ns > now && r->accept_pause_until_ns < t) t = r->accept_pause_until_ns;
  for (size_t i = 0; i < r->nconns; i++) {
    const epxRootConn *c = r->conns[i];
    int64_t d = INT64_MAX;
    if (c->state == EPX_RC_PENDING) d = c->hs_deadline_ns;
    if (c->state == EPX_RC_CLOSING) d = c->close_deadline_ns;
    if (c->state == EPX_RC_RANK && conn_waiting(r, c)) d = c->client_deadline_ns;
    if (d < t) t = d;
  }
  return t;
}

int epx_root_finished(const epxRoot *r, int64_t now) {
  return r->phase == EPX_ROOT_DONE || now >= r->deadline_ns;
}

/* ------------------------------------------------------------- lifecycle */

epxRoot *epx_root_new(const uint8_t secret[EPX_BS_SECRET_BYTES], int listen_fd,
                      int64_t deadline_ns) {
  epxRoot *r = (epxRoot *)calloc(1, sizeof(*r));
  if (!r) return NULL;
  r->readbuf = (uint8_t *)malloc(EPX_ROOT_READ_BYTES);
  if (!r->readbuf) {
    free(r);
    return NULL;
  }
  memcpy(r->secret, secret, EPX_BS_SECRET_BYTES);
  r->listen_fd = listen_fd;
  r->deadline_ns = deadline_ns;
  snprintf(r->where, sizeof(r->where), "(no socket)");
  return r;
}

void epx_root_free(epxRoot *r) {
  if (!r) return;
  for (size_t i = 0; i < r->nconns; i++) free_conn(r->conns[i]);
  if (r->listen_fd >= 0) close(r->listen_fd);
  free(r->conns);
  free(r->by_rank);
  free(r->rank_state);
  free(r->contributed);
  blob_unref(r->round_buf);
  free(r->readbuf);
  explicit_bzero(r->secret, sizeof(r->secret));
  free(r);
}

static void accept_burst(epxRoot *r, int64_t now) {
  for (int i = 0; i < EPX_ROOT_ACCEPT_BURST; i++) {
    int fd = accept4(r->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        EPX_INFO(-1, "bootstrap root %s: accept: %s; pausing %d ms", r->where, strerror(errno),
                 EPX_ROOT_ACCEPT_PAUSE_MS);
        r->accept_pause_until_ns = now + EPX_ROOT_ACCEPT_PAUSE_MS * NS_PER_MS;
      }
      return; /* EAGAIN: backlog empty */
    }
    char peer[64];
    epx_bs_peer_str(fd, peer, sizeof(peer));
    epxRootConn *c = epx_root_add_conn(r, fd, peer, now);
    if (c) epx_root_flush(r, c, now); /* the challenge goes out at once */
  }
}

static void read_conn(epxRoot *r, epxRootConn *c, int64_t now) {
  ssize_t n = recv(c->fd, r->readbuf, EPX_ROOT_READ_BYTES, MSG_DONTWAIT);
  if (n > 0) {
    epx_root_input(r, c, r->readbuf, (size_t)n, now);
  } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
    epx_root_peer_closed(r, c, now);
  }
}

static void *root_main(void *arg) {
  epxRoot *r = (epxRoot *)arg;
  struct pollfd *pfds = NULL;
  epxRootConn **pconn = NULL;
  size_t cap = 0;
  for (;;) {
    int64_t now = epx_now_ns();
    epx_root_tick(r, now);
    epx_root_sweep(r);
    if (epx_root_finished(r, now)) break;

    if (r->nconns + 1 > cap) {
      size_t ncap = (r->nconns + 1) * 2;
      struct pollfd *p = (struct pollfd *)realloc(pfds, ncap * sizeof(*p));
      if (p) pfds = p;
      epxRootConn **q = (epxRootConn **)realloc(pconn, ncap * sizeof(*q));
      if (q) pconn = q;
      if (!p || !q) {
        fail_oom(r, now, "poll set");
        break;
      }
      cap = ncap;
    }
    nfds_t n = 0;
    int listening = r->listen_fd >= 0 && r->accept_pause_until_ns <= now;
    if (listening) {
      pfds[n].fd = r->listen_fd;
      pfds[n].events = POLLIN;
      pconn[n++] = NULL;
    }
    for (size_t i = 0; i < r->nconns; i++) {
      epxRootConn *c = r->conns[i];
      pfds[n].fd = c->fd;
      pfds[n].events = POLLIN;
      if (c->out_head || (c->state == EPX_RC_CLOSING && !c->wr_shut)) pfds[n].events |= POLLOUT;
      pconn[n++] = c;
    }
    int ms = epx_bs_poll_ms(epx_root_next_event(r, now), now, EPX_ROOT_POLL_CAP_MS);
    int rc = poll(pfds, n, ms);
    if (rc < 0 && errno != EINTR) {
      fail_session(r, epx_now_ns(), epxSystemError, "the rendezvous root's poll() failed: %s",
                   strerror(errno));
      break;
    }
    if (rc <= 0) continue;
    now = epx_now_ns();
    for (nfds_t i = 0; i < n; i++) {
      short ev = pfds[i].revents;
      if (!ev) continue;
      epxRootConn *c = pconn[i];
      if (!c) {
        accept_burst(r, now);
        continue;
      }
      if (c->state == EPX_RC_DEAD) continue;
      if (ev & POLLOUT) epx_root_flush(r, c, now);
      if (c->state != EPX_RC_DEAD && (ev & (POLLIN | POLLHUP | POLLERR))) read_conn(r, c, now);
      /* Input may have queued frames (WELCOME, RESULT to everyone): send them now. */
    }
    for (size_t i = 0; i < r->nconns; i++) {
      epxRootConn *c = r->conns[i];
      if (c->state != EPX_RC_DEAD && (c->out_head || (c->state == EPX_RC_CLOSING && !c->wr_shut)))
        epx_root_flush(r, c, now);
    }
  }
  /* Last words: one non-blocking attempt to deliver queued errors, then close. */
  int64_t now = epx_now_ns();
  for (size_t i = 0; i < r->nconns; i++)
    if (r->conns[i]->state != EPX_RC_DEAD) epx_root_flush(r, r->conns[i], now);
  EPX_TRACE(-1, "bootstrap root %s: exiting (%llu connections accepted, %llu refused)", r->where,
            (unsigned long long)r->accepted, (unsigned long long)r->refused);
  free(pfds);
  free(pconn);
  epx_root_free(r);
  atomic_fetch_sub(&g_live_roots, 1);
  return NULL;
}

epxResult_t epx_root_start(epxRoot *r, char *err, size_t errlen) {
  pthread_attr_t attr;
  pthread_t tid;
  sigset_t all, old;
  if (pthread_attr_init(&attr) != 0) {
    snprintf(err, errlen, "pthread_attr_init failed for the rendezvous root");
    return epxSystemError;
  }
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  /* The service thread must not take the application's signals: it inherits
   * a fully blocked mask. */
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  atomic_fetch_add(&g_live_roots, 1);
  int rc = pthread_create(&tid, &attr, root_main, r);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&attr);
  if (rc != 0) {
    atomic_fetch_sub(&g_live_roots, 1);
    snprintf(err, errlen, "cannot start the rendezvous root thread: %s", strerror(rc));
    return epxSystemError;
  }
  return epxSuccess;
}
