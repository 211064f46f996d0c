/*
 * callback.c - the bootstrap over a caller-supplied all-gather
 * (torch.distributed, MPI, an existing NCCL communicator...).
 */
#include <stdio.h>
#include <stdlib.h>

#include "bootstrap/bootstrap.h"
#include "bootstrap/bootstrap_impl.h"

epxResult_t epx_bootstrap_callback_create(epxAllGatherFn fn, void *user, int rank, int nranks,
                                          epxBootstrap **out, char *err, size_t errlen) {
  char fixerr[1];
  if (!err || errlen == 0) {
    err = fixerr;
    errlen = sizeof(fixerr);
  }
  if (!out) {
    snprintf(err, errlen, "bootstrap output pointer is NULL");
    return epxInvalidArgument;
  }
  *out = NULL;
  if (!fn) {
    snprintf(err, errlen, "allgather callback is NULL");
    return epxInvalidArgument;
  }
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
  b->kind = EPX_BOOTSTRAP_CALLBACK;
  b->rank = rank;
  b->nranks = nranks;
  b->fd = -1;
  b->fn = fn;
  b->user = user;
  *out = b;
  return epxSuccess;
}

epxResult_t epx_bootstrap_callback_allgather(epxBootstrap *b, const void *send, void *recv,
                                             size_t bytes, char *err, size_t errlen) {
  /* Callers' all-gathers (torch, MPI) are not guaranteed to accept 0 bytes,
   * so the barrier sends one; a 0-byte gather is complete without a call. */
  if (bytes == 0) return epxSuccess;
  int rc = b->fn(b->user, send, recv, bytes);
  if (rc != 0) {
    snprintf(err, errlen, "rank %d: the caller's all-gather callback returned %d (%zu bytes)",
             b->rank, rc, bytes);
    return epxBootstrapError;
  }
  return epxSuccess;
}
