/*
 * bootstrap_impl.h - the epxBootstrap object shared by the TCP and callback
 * implementations; bootstrap.c dispatches on `kind`.
 */
#ifndef EPX_BOOTSTRAP_IMPL_H
#define EPX_BOOTSTRAP_IMPL_H

#include <stdint.h>

#include "bootstrap/bootstrap.h"
#include "bootstrap/wire.h"

typedef enum epxBootstrapKind {
  EPX_BOOTSTRAP_TCP = 1,
  EPX_BOOTSTRAP_CALLBACK = 2
} epxBootstrapKind;

/* A failed exchange leaves the streams out of step, so the first error is kept
 * and returned by every later call. */
#define EPX_BOOTSTRAP_ERR_BYTES 1280
/* Longest wait, in destroy or a failed create, for a root in this process to
 * write what it owes the other ranks (a stalled peer must not hold us longer). */
#define EPX_BOOTSTRAP_DRAIN_MS 1000

struct epxBootstrap {
  epxBootstrapKind kind;
  int rank, nranks;
  epxResult_t broken;
  char broken_msg[EPX_BOOTSTRAP_ERR_BYTES];
  /* TCP */
  int fd;
  int64_t deadline_ns;
  epxBsAddr root;
  uint64_t rounds; /* all-gathers completed, for messages */
  /* Session (wire.h): set once the root's WELCOME checked out. */
  int authed;
  uint8_t key[EPX_BS_KEY_BYTES];
  uint64_t tx_seq, rx_seq; /* authenticated frames sent / accepted so far */
  /* callback */
  epxAllGatherFn fn;
  void *user;
};

/* Callers may pass no error buffer; messages then go to a one-byte scratch. */
#define EPX_FIX_ERRBUF(err, errlen) \
  char fixerr_[1];                  \
  if (!(err) || (errlen) == 0) {    \
    (err) = fixerr_;                \
    (errlen) = sizeof(fixerr_);     \
  }

/* Checks the rank range and allocates a bootstrap of `kind` with the fields
 * both implementations share; *out is NULL on failure. */
epxResult_t epx_bootstrap_new(int kind, int rank, int nranks, epxBootstrap **out, char *err,
                              size_t errlen);

epxResult_t epx_bootstrap_tcp_allgather(epxBootstrap *b, const void *send, void *recv, size_t bytes,
                                        char *err, size_t errlen);
epxResult_t epx_bootstrap_callback_allgather(epxBootstrap *b, const void *send, void *recv,
                                             size_t bytes, char *err, size_t errlen);

#endif /* EPX_BOOTSTRAP_IMPL_H */
