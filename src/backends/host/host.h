/*
 * host.h - state and helpers shared by the host backend's files.
 *
 *   shm.c           segments, layout offsets, /proc liveness
 *   sync.c          barrier, waits, the call-header exchange
 *   host_backend.c  the ops table, init/destroy/abort, handles, size hints
 *   layout.c        epxGetDispatchLayout
 *   normal.c        dispatch_notify, dispatch, combine (rounds of C tokens)
 *   low_latency.c   low-latency dispatch, combine, receive hook
 */
#ifndef EPX_HOST_HOST_H
#define EPX_HOST_HOST_H

#include <stdint.h>

#include "backends/host/shm.h"
#include "common/layout_math.h"
#include "core/internal.h"

typedef struct hostHandle hostHandle;

/* Per-communicator state (comm->backend). */
typedef struct hostComm {
  int rank, nranks, chunk;
  hostSegLayout lay;
  hostPeer *peers;         /* [R]; peers[rank] is this rank */
  char shm_name[64];
  int own_unlinked;
  uint64_t arrivals;       /* barrier numbers this rank has arrived at */
  uint64_t ll_ops;         /* low-latency ops started (numbers from 1) */
  int ll_slot_pending[2];  /* a send-only phase in that LL slot awaits its receive */
  /* scratch, sized for the config limits */
  hostHandle *handles;     /* live handles, so destroy can free their arrays */
  int *cursor;             /* [R] */
  int *peer_tokens;        /* [R] */
  float *acc, *part;       /* [max(hidden, max_topk)] */
} hostComm;

/* Per-handle state (handle->backend_private). One allocation holds it and
 * every array of the handle, so freeing is one call. */
struct hostHandle {
  epxHandle_t owner;
  struct hostHandle *prev, *next; /* live handles of the communicator, freed at destroy */
  int *raw_expert_counts;  /* [E_local]: normal, per-expert counts before alignment */
  int *peer_tokens;        /* [R]: low latency, T of every rank in the pending op */
  /* the low-latency op whose receive phase is pending (or just ran) */
  uint64_t seq;            /* call that started it */
  uint64_t barrier;        /* arrival number its data were published under */
  int slot;                /* its LL slot */
  int hidden, num_topk, num_tokens, topk_int64;
  int use_fp8, use_ue8m0;
  epxLowLatencyDispatchOutputs_t dispatch_out;
  int *stats;              /* dispatch: cumulative_local_expert_recv_stats */
  const void *topk_idx;    /* combine: the caller's arrays, kept until the receive */
  const float *topk_weights;
  void *combined_x;
};

/* 1 when slot k repeats the expert of an earlier slot of token t, so a token
 * counts once per expert. */
static inline int epx_host_repeats_earlier_slot(const void *topk, int is64, int64_t t, int K,
                                                int k, int64_t id) {
  for (int j = 0; j < k; ++j)
    if (epx_topk_get(topk, is64, t, K, j) == id) return 1;
  return 0;
}

/* FP32 row arithmetic of the combines. Rows are a multiple of 8 channels
 * (validated), and the fixed 8-wide inner loops let the compiler vectorize
 * at -O2; each element still gets exactly one epx_add_rn / epx_mul_rn, so
 * the results are bit-identical to the scalar definition. */
#define EPX_HOST_ROW_BLOCK 8

/* acc[c] = acc[c] + bf16(src[c]) */
static inline void epx_host_row_add_bf16(float *restrict acc, const uint16_t *restrict src, int n) {
  for (int c = 0; c < n; c += EPX_HOST_ROW_BLOCK)
    for (int j = 0; j < EPX_HOST_ROW_BLOCK; ++j)
      acc[c + j] = epx_add_rn(acc[c + j], epx_bf16_to_f32(src[c + j]));
}
/* acc[c] = acc[c] + w * bf16(src[c]) */
static inline void epx_host_row_add_scaled_bf16(float *restrict acc, const uint16_t *restrict src,
                                                float w, int n) {
  for (int c = 0; c < n; c += EPX_HOST_ROW_BLOCK)
    for (int j = 0; j < EPX_HOST_ROW_BLOCK; ++j)
      acc[c + j] = epx_add_rn(acc[c + j], epx_mul_rn(w, epx_bf16_to_f32(src[c + j])));
}
/* acc[c] = acc[c] + part[c] */
static inline void epx_host_row_add_f32(float *restrict acc, const float *restrict part, int n) {
  for (int c = 0; c < n; c += EPX_HOST_ROW_BLOCK)
    for (int j = 0; j < EPX_HOST_ROW_BLOCK; ++j) acc[c + j] = epx_add_rn(acc[c + j], part[c + j]);
}

static inline hostComm *epx_host_of(epxComm_t comm) { return (hostComm *)comm->backend; }

static inline unsigned char *epx_host_hdr_slot(const hostComm *hc, int peer, uint64_t seq) {
  return hc->peers[peer].base + hc->lay.hdr_off + (size_t)(seq & 1u) * hc->lay.hdr_slot_bytes;
}
static inline hostHeader *epx_host_header(const hostComm *hc, int peer, uint64_t seq) {
  return (hostHeader *)epx_host_hdr_slot(hc, peer, seq);
}
/* Tokens this peer sends to each rank, [R]; valid when the header has_counts. */
static inline int32_t *epx_host_hdr_counts(const hostComm *hc, int peer, uint64_t seq) {
  return (int32_t *)(epx_host_hdr_slot(hc, peer, seq) + hc->lay.hdr_counts_off);
}
/* Tokens this peer sends to each global expert (once per token), [E]. */
static inline int32_t *epx_host_hdr_ecounts(const hostComm *hc, int peer, uint64_t seq) {
  return (int32_t *)(epx_host_hdr_slot(hc, peer, seq) + hc->lay.hdr_ecounts_off);
}
static inline unsigned char *epx_host_norm_buf(const hostComm *hc, int peer, int round) {
  return hc->peers[peer].base + hc->lay.norm_off + (size_t)(round & 1) * hc->lay.norm_buf_bytes;
}
static inline unsigned char *epx_host_ll_slot(const hostComm *hc, int peer, int slot) {
  return hc->peers[peer].base + hc->lay.ll_off + (size_t)slot * hc->lay.ll_slot_bytes;
}

/* ---- sync.c ---- */

/* Tells peers this rank will not arrive any more (EPX_HOST_ABORTED...), and
 * for EPX_HOST_FAILED the peer and code behind it; the first reason stays. */
void epx_host_mark_dead(hostComm *hc, uint32_t why, int fail_peer, epxResult_t fail_code);

/* Publishes this rank's next arrival (release) and returns its number. */
uint64_t epx_host_arrive(hostComm *hc);
/* Waits until every rank has arrived at barrier number `target`. On failure
 * records the message (op, seq, phase, peer, expected vs seen), marks this
 * rank failed so peers stop waiting for it, and sets the async error. */
epxResult_t epx_host_wait(epxComm_t comm, uint64_t target, epxOp_t op, uint64_t seq,
                          const char *phase);
/* arrive + wait. */
epxResult_t epx_host_barrier(epxComm_t comm, epxOp_t op, uint64_t seq, const char *phase);

/* The opening of every collective op: publishes `mine` (with the count arrays
 * already written by the caller when mine->has_counts) in the slot of
 * call->seq, waits for every rank's header and checks them all. Returns
 * epxSuccess when every rank may go on; otherwise the code this rank returns
 * (the rejecting rank its own code, the others epxRemoteError; epxMismatch on
 * every rank when the calls differ), with the message recorded. */
epxResult_t epx_host_exchange(epxComm_t comm, const epxCall_t *call, hostHeader *mine);

/* Writes the header for a rank that takes part only to fail the call. */
void epx_host_header_reject(hostHeader *h, const epxCall_t *call, epxResult_t code);

/* ---- ops, by file ---- */

epxResult_t epx_host_layout(epxComm_t comm, const void *topk_idx, epxDataType_t idx_type,
                            int num_tokens, int num_topk, const epxLayout_t *layout,
                            epxStream_t stream);
epxResult_t epx_host_dispatch_notify(epxComm_t comm, const epxCall_t *call,
                                     const epxDispatchArgs_t *args, epxHandle_t handle,
                                     int64_t *num_recv_tokens, int *num_recv_tokens_per_expert,
                                     epxStream_t stream);
epxResult_t epx_host_dispatch(epxComm_t comm, const epxCall_t *call, const epxDispatchArgs_t *args,
                              epxHandle_t handle, const epxDispatchOutputs_t *outputs,
                              epxStream_t stream);
epxResult_t epx_host_combine(epxComm_t comm, const epxCall_t *call, const epxCombineArgs_t *args,
                             epxHandle_t handle, const epxCombineOutputs_t *outputs,
                             epxStream_t stream);
epxResult_t epx_host_ll_dispatch(epxComm_t comm, const epxCall_t *call,
                                 const epxLowLatencyDispatchArgs_t *args, epxHandle_t handle,
                                 const epxLowLatencyDispatchOutputs_t *outputs,
                                 epxStream_t stream);
epxResult_t epx_host_ll_combine(epxComm_t comm, const epxCall_t *call,
                                const epxLowLatencyCombineArgs_t *args, epxHandle_t handle,
                                void *combined_x, epxStream_t stream);
epxResult_t epx_host_ll_recv(epxComm_t comm, epxHandle_t handle, epxStream_t stream);

#endif /* EPX_HOST_HOST_H */
