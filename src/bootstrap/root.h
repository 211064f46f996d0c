/*
 * root.h - the rendezvous root: a poll()-driven service thread that admits
 * ranks through the challenge-response of wire.h and relays their
 * all-gathers (star topology).
 *
 * The protocol logic is separate from the I/O loop: each connection is a
 * small state machine fed with the bytes read from its socket
 * (epx_root_input) and drained by epx_root_flush, with time passed in as an
 * argument. The fuzzer drives these functions directly with fd = -1
 * connections (output is discarded) and no thread.
 *
 * Lifetime: the thread exits and frees everything once every rank has
 * connected and then closed its connection, or when the root deadline
 * passes. After a failure it stays until the deadline, telling ranks that
 * arrive late why the rendezvous failed.
 */
#ifndef EPX_BOOTSTRAP_ROOT_H
#define EPX_BOOTSTRAP_ROOT_H

#include <stddef.h>
#include <stdint.h>

#include "bootstrap/wire.h"
#include "epx.h"

/* Connections that have not completed the handshake, at most; past this the
 * oldest is dropped, so a flood cannot lock the ranks out. */
#define EPX_ROOT_MAX_PENDING 128
/* Time a connection gets, from accept, to prove it knows the secret. */
#define EPX_ROOT_HANDSHAKE_MS 5000
/* Time a refused or failed connection gets to read its error frame. */
#define EPX_ROOT_CLOSE_LINGER_MS 1000

/* A payload shared by the frames that carry it (one RESULT goes to every rank). */
typedef struct epxBsBlob {
  int refs;
  uint32_t len;
  uint8_t data[];
} epxBsBlob;

typedef struct epxBsOut {
  struct epxBsOut *next;
  uint8_t hdr[EPX_BS_HEADER_BYTES];
  epxBsBlob *payload; /* NULL: header only */
  uint8_t mac[EPX_BS_MAC_BYTES]; /* the trailer, when has_mac (one per connection: */
  int has_mac;                   /* a shared RESULT payload gets a MAC per rank) */
  size_t sent;                   /* bytes of header + payload + trailer already written */
  int to_rank;                   /* counted in epx_bootstrap_root_undelivered() */
} epxBsOut;

typedef enum epxRootConnState {
  EPX_RC_PENDING = 0, /* challenged, waiting for a valid HELLO */
  EPX_RC_RANK,        /* authenticated as a rank */
  EPX_RC_CLOSING,     /* refused or failed: flush the error frame, then close */
  EPX_RC_DEAD         /* to be freed by epx_root_sweep */
} epxRootConnState;

typedef struct epxRootConn {
  int fd; /* -1 for connections driven by the fuzzer */
  epxRootConnState state;
  int rank;        /* valid in EPX_RC_RANK */
  uint64_t serial; /* accept order: the oldest pending one is evicted first */
  int64_t hs_deadline_ns;
  int64_t client_deadline_ns; /* when the client stops waiting (from its HELLO) */
  int64_t close_deadline_ns;
  int wr_shut;
  uint8_t nonce[EPX_BS_NONCE_BYTES];
  /* Session (wire.h): set when the HELLO is verified; from the WELCOME on,
   * every frame queued here carries a trailer and every DATA frame read must. */
  int authed;
  uint8_t key[EPX_BS_KEY_BYTES];
  uint64_t tx_seq, rx_seq; /* authenticated frames queued / accepted so far */
  char peer[64];
  /* frame being read */
  uint8_t hdr[EPX_BS_HEADER_BYTES];
  size_t hdr_got;
  int in_payload;
  epxBsHeader h;
  uint8_t *payload;
  size_t pay_got;
  /* frames waiting to be written */
  epxBsOut *out_head, *out_tail;
} epxRootConn;

typedef enum epxRootPhase {
  EPX_ROOT_GATHER = 0, /* ranks are arriving */
  EPX_ROOT_RUNNING,    /* all arrived (READY sent): relaying all-gathers */
  EPX_ROOT_FAILED,     /* an error was sent to every rank */
  EPX_ROOT_DONE        /* every rank closed: exit */
} epxRootPhase;

typedef struct epxRoot {
  uint8_t secret[EPX_BS_SECRET_BYTES];
  int listen_fd;
  char where[80]; /* listening address, for messages */
  int64_t deadline_ns;
  int64_t accept_pause_until_ns; /* out of descriptors: stop accepting briefly */
  epxRootPhase phase;
  int nranks; /* 0 until the first rank authenticates */
  epxRootConn **conns;
  size_t nconns, capconns;
  int npending;
  uint64_t next_serial;
  epxRootConn **by_rank; /* [nranks] */
  uint8_t *rank_state;   /* [nranks]: 0 never connected, 1 connected, 2 left */
  uint8_t *contributed;  /* [nranks]: sent its part of the current round */
  int nconnected, nleft;
  uint64_t round; /* all-gather rounds completed */
  uint32_t round_bytes;
  int round_count;
  epxBsBlob *round_buf;
  epxResult_t fail_code;
  char fail_msg[EPX_BS_ERROR_TEXT_MAX + 1];
  uint64_t accepted, refused;
  uint8_t *readbuf; /* EPX_ROOT_READ_BYTES */
} epxRoot;

/* Takes ownership of listen_fd (-1: none). NULL when out of memory. */
epxRoot *epx_root_new(const uint8_t secret[EPX_BS_SECRET_BYTES], int listen_fd,
                      int64_t deadline_ns);
void epx_root_free(epxRoot *r);
/* Adopts a connected socket and queues its challenge; closes fd and returns
 * NULL when out of memory. */
epxRootConn *epx_root_add_conn(epxRoot *r, int fd, const char *peer, int64_t now_ns);
/* Bytes read from c's socket. */
void epx_root_input(epxRoot *r, epxRootConn *c, const uint8_t *data, size_t n, int64_t now_ns);
/* c's peer closed or reset the connection. */
void epx_root_peer_closed(epxRoot *r, epxRootConn *c, int64_t now_ns);
/* Writes what c's socket takes now (fd < 0: discards the queue). */
void epx_root_flush(epxRoot *r, epxRootConn *c, int64_t now_ns);
/* Handles every deadline that has passed. */
void epx_root_tick(epxRoot *r, int64_t now_ns);
/* Earliest time epx_root_tick has something to do. */
int64_t epx_root_next_event(const epxRoot *r, int64_t now_ns);
/* Frees the connections marked dead. */
void epx_root_sweep(epxRoot *r);
int epx_root_finished(const epxRoot *r, int64_t now_ns);
/* Starts the detached service thread, which then owns r. */
epxResult_t epx_root_start(epxRoot *r, char *err, size_t errlen);

/* Root threads running in this process, and connections all roots of this
 * process refused; for tests. */
int epx_bootstrap_live_roots(void);
uint64_t epx_bootstrap_refused_total(void);
/* Frames the roots of this process have queued for ranks and not yet written. */
int epx_bootstrap_root_undelivered(void);
/* The root lives in the process of one rank, and dies with it. Before that
 * rank lets go of the bootstrap (and may exit), this waits, at most max_ms,
 * until the root has written what it owes the other ranks: their last
 * all-gather result or the error that explains a failure. Returns at once when
 * this process runs no root. */
void epx_bootstrap_root_drain(int max_ms);

#endif /* EPX_BOOTSTRAP_ROOT_H */
