/*
 * error.c - result strings, per-communicator messages, the sticky async error.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core/internal.h"
#include "core/log.h"

static const char *const result_strings[epxNumResults] = {
    [epxSuccess] = "success",
    [epxInvalidArgument] = "invalid argument",
    [epxInvalidUsage] = "invalid usage (call out of order, stale or foreign handle)",
    [epxSystemError] = "system call failed",
    [epxCudaError] = "CUDA call failed",
    [epxOutOfMemory] = "out of memory",
    [epxTimeout] = "timed out waiting for a peer",
    [epxPeerFailed] = "a peer failed",
    [epxAborted] = "communicator aborted",
    [epxMismatch] = "ranks disagree on a setting or call",
    [epxNotSupported] = "not supported by this build or backend",
    [epxInternalError] = "internal error",
    [epxBootstrapError] = "bootstrap failed",
    [epxRemoteError] = "another rank rejected its arguments for this call",
};

EPX_API const char *epxGetErrorString(epxResult_t result) {
  if ((int)result < 0 || result >= epxNumResults) return "unknown result code";
  return result_strings[result];
}

EPX_API epxResult_t epxGetVersion(int *version) {
  if (!version) return epx_error(NULL, epxInvalidArgument, "epxGetVersion: version is NULL");
  *version = EPX_VERSION_CODE;
  return epxSuccess;
}

char *epx_thread_error_slot(void) {
  static _Thread_local char slot[EPX_ERROR_MSG_BYTES];
  return slot;
}

epxResult_t epx_error(epxComm_t comm, epxResult_t code, const char *fmt, ...) {
  char *dst = comm ? comm->last_error : epx_thread_error_slot();
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(dst, EPX_ERROR_MSG_BYTES, fmt, ap);
  va_end(ap);
  EPX_INFO(comm ? comm->rank : -1, "error %d (%s): %s", (int)code, epxGetErrorString(code), dst);
  return code;
}

void epx_set_async_error(epxComm_t comm, epxResult_t code) {
  int expected = epxSuccess;
  /* First fatal error wins: later ones are consequences of it. */
  atomic_compare_exchange_strong(&comm->async_error, &expected, (int)code);
}

int64_t epx_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

const char *epx_op_name(epxOp_t op) {
  switch (op) {
    case EPX_OP_DISPATCH_NOTIFY: return "dispatch_notify";
    case EPX_OP_DISPATCH: return "dispatch";
    case EPX_OP_COMBINE: return "combine";
    case EPX_OP_LL_DISPATCH: return "ll_dispatch";
    case EPX_OP_LL_COMBINE: return "ll_combine";
    default: return "none";
  }
}
