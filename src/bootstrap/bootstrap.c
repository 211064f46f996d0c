/*
 * bootstrap.c - the calls shared by both bootstraps: argument checks, the
 * sticky failure, barrier, accessors and destroy.
 */
#include "bootstrap/bootstrap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bootstrap/bootstrap_impl.h"
#include "bootstrap/root.h"

epxResult_t epx_bootstrap_allgather(epxBootstrap *b, const void *send, void *recv, size_t bytes,
                                    char *err, size_t errlen) {
  char fixerr[1];
  if (!err || errlen == 0) {
    err = fixerr;
    errlen = sizeof(fixerr);
  }
  if (!b) {
    snprintf(err, errlen, "bootstrap is NULL");
    return epxInvalidArgument;
  }
  if (b->broken != epxSuccess) {
    snprintf(err, errlen, "%s", b->broken_msg);
    return b->broken;
  }
  if (bytes > EPX_BOOTSTRAP_MAX_PAYLOAD) {
    snprintf(err, errlen, "bootstrap all-gather of %zu bytes exceeds the %u-byte limit", bytes,
             EPX_BOOTSTRAP_MAX_PAYLOAD);
    return epxInvalidArgument;
  }
  if (bytes > 0 && (!send || !recv)) {
    snprintf(err, errlen, "bootstrap all-gather buffer is NULL");
    return epxInvalidArgument;
  }
  epxResult_t res = b->kind == EPX_BOOTSTRAP_TCP
                        ? epx_bootstrap_tcp_allgather(b, send, recv, bytes, err, errlen)
                        : epx_bootstrap_callback_allgather(b, send, recv, bytes, err, errlen);
  if (res != epxSuccess && res != epxInvalidArgument) {
    /* The ranks are now out of step: every later exchange must fail too. */
    b->broken = res;
    snprintf(b->broken_msg, sizeof(b->broken_msg), "%s", err);
  }
  return res;
}

epxResult_t epx_bootstrap_barrier(epxBootstrap *b, char *err, size_t errlen) {
  if (!b || b->kind == EPX_BOOTSTRAP_TCP)
    return epx_bootstrap_allgather(b, NULL, NULL, 0, err, errlen);
  /* Callbacks get a 1-byte token per rank (see callback.c). */
  uint8_t token = 1;
  uint8_t *all = (uint8_t *)malloc((size_t)b->nranks);
  if (!all) {
    if (err && errlen) snprintf(err, errlen, "out of memory for the bootstrap barrier");
    return epxOutOfMemory;
  }
  epxResult_t res = epx_bootstrap_allgather(b, &token, all, 1, err, errlen);
  free(all);
  return res;
}

int epx_bootstrap_rank(const epxBootstrap *b) { return b ? b->rank : -1; }
int epx_bootstrap_nranks(const epxBootstrap *b) { return b ? b->nranks : 0; }

void epx_bootstrap_destroy(epxBootstrap *b) {
  if (!b) return;
  if (b->kind == EPX_BOOTSTRAP_TCP) {
    /* If the root runs in this process, let it finish writing to the other
     * ranks first: this process may exit next, taking the root with it. */
    epx_bootstrap_root_drain(EPX_BOOTSTRAP_DRAIN_MS);
  }
  /* For TCP, closing is the "done" signal the root counts. */
  if (b->fd >= 0) close(b->fd);
  explicit_bzero(b->key, sizeof(b->key));
  free(b);
}

epxResult_t epx_bootstrap_new(int kind, int rank, int nranks, epxBootstrap **out, char *err,
                              size_t errlen) {
  if (!out) {
    snprintf(err, errlen, "bootstrap output pointer is NULL");
    return epxInvalidArgument;
  }
  *out = NULL;
  if (nranks < 1 || nranks > EPX_BOOTSTRAP_MAX_RANKS || rank < 0 || rank >= nranks) {
    snprintf(err, errlen, "rank %d of nranks %d is out of range (nranks must be 1..%d)", rank,
             nranks, EPX_BOOTSTRAP_MAX_RANKS);
    return epxInvalidArgument;
  }
  epxBootstrap *b = (epxBootstrap *)calloc(1, sizeof(*b));
  if (!b) {
    snprintf(err, errlen, "out of memory for the bootstrap");
    return epxOutOfMemory;
  }
  b->kind = kind;
  b->rank = rank;
  b->nranks = nranks;
  b->fd = -1;
  *out = b;
  return epxSuccess;
}
