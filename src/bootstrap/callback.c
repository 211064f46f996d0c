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
  EPX_FIX_ERRBUF(err, errlen);
  if (out) *out = NULL;
  if (!out || !fn) {
    snprintf(err, errlen, "%s is NULL", out ? "allgather callback" : "bootstrap output pointer");
    return epxInvalidArgument;
  }
  epxBootstrap *b = NULL;
  epxResult_t created = epx_bootstrap_new(EPX_BOOTSTRAP_CALLBACK, rank, nranks, &b, err, errlen);
  if (created != epxSuccess) return created;
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
