/*
 * params.h - every environment variable epx reads, in one table (params.c).
 * Values are read once, on first use; each override is logged at INFO and the
 * whole table is printed when EPX_DUMP_PARAMS=1.
 */
#ifndef EPX_CORE_PARAMS_H
#define EPX_CORE_PARAMS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum epxParam {
  EPX_PARAM_DEBUG,                /* string: WARN | INFO | TRACE */
  EPX_PARAM_TIMEOUT_MS,           /* int: hard timeout of waits on peers */
  EPX_PARAM_SOFT_TIMEOUT_MS,      /* int: waits longer than this are logged */
  EPX_PARAM_BOOTSTRAP_TIMEOUT_MS, /* int: deadline of init */
  EPX_PARAM_SOCKET_IFNAME,        /* string: interface the rendezvous binds to */
  EPX_PARAM_SOCKET_LOOPBACK,      /* int: 1 = bind the rendezvous to 127.0.0.1 */
  EPX_PARAM_HOST_CHUNK_TOKENS,    /* int: host backend tokens per shared-memory round */
  EPX_PARAM_DUMP_PARAMS,          /* int: 1 = print this table at first use */
  EPX_PARAM_CUDA_LL_VARIANT,      /* int: CUDA low-latency kernel variant (1, 2) */
  EPX_PARAM_LIVENESS_INTERVAL_MS, /* int: CUDA backend, period of the peer-liveness watcher */
  EPX_PARAM_CUDA_TRACE,           /* int: 1 = time the phases of LL ops, print at destroy */
  EPX_PARAM_CUDA_PDL,             /* int: 1 = op kernels launched as programmatic dependents */
  EPX_PARAM_CUDA_CHUNK_TOKENS,    /* int: CUDA normal mode, source tokens per progress chunk */
  EPX_PARAM_CUDA_COMBINE_CHUNK_TOKENS, /* int: CUDA normal mode, source tokens per combine chunk */
  EPX_PARAM_CUDA_SEND_SHARE,      /* int: CUDA normal mode, percent of the data blocks that send */
  EPX_PARAM_CUDA_SEND_ORDER,      /* int: CUDA normal mode, which data blocks send (0 first, 1 last, 2 spread) */
  EPX_PARAM_CUDA_DYNAMIC,         /* int: CUDA normal mode, 1 = send warps claim the items of a chunk */
  EPX_PARAM_CUDA_BULK,            /* int: CUDA normal mode, TMA bulk copies: 1 dispatch, 2 combine */
  EPX_PARAM_CUDA_LL_PIECES,       /* int: CUDA low-latency combine, flagged pieces per row */
  EPX_PARAM_CUDA_TRACE_FILE,      /* string: with EPX_CUDA_TRACE, where per-op samples go */
  EPX_PARAM_COUNT
} epxParam_t;

int64_t epx_param_int(epxParam_t p);
const char *epx_param_str(epxParam_t p); /* "" when unset and without default */
void epx_params_dump(void);

#ifdef __cplusplus
}
#endif

#endif /* EPX_CORE_PARAMS_H */
