/*
 * epx.h - expert-parallel exchange: dispatch and combine for Mixture-of-Experts.
 *
 * The one public header of epx. It compiles as C11 and as C++.
 *
 * Ranks, experts, tokens
 *   A communicator (epxComm_t) joins R ranks (GPUs, or processes on the host
 *   backend). E experts are spread evenly: expert e lives on rank e / (E / R) and
 *   is local expert e % (E / R) there. Every data-path call is COLLECTIVE: every
 *   rank of the communicator makes the same sequence of calls, with the same
 *   operation, hidden size, top-k and dtypes (token counts may differ).
 *
 * Memory
 *   Every pointer argument is caller-owned and must stay valid until the work
 *   that uses it has completed. On the CUDA backend pointers are device memory
 *   and calls are stream-ordered: a call returns once its work is enqueued on
 *   `stream`, and outputs are ready when the stream reaches that point. On the
 *   host backend pointers are ordinary host memory, `stream` is ignored, and a
 *   call returns once its outputs are written.
 *
 * Errors
 *   Every call returns an epxResult_t. On failure nothing the caller owns is
 *   modified (after epxTimeout, epxPeerFailed or epxAborted, outputs of the
 *   failed call are undefined), a message naming the argument or peer is kept for
 *   epxCommGetLastError(), and the communicator stays usable unless the result is
 *   epxTimeout, epxPeerFailed or epxAborted (then only epxCommDestroy is valid).
 *   A collective call whose arguments are invalid on one rank still takes part in
 *   the exchange as an empty participant, so that every rank returns an error for
 *   that call (epxInvalidArgument on the faulty rank, epxRemoteError on the
 *   others) and the next valid call is exact everywhere.
 *
 * Threads
 *   A communicator may be used by one thread at a time. epxCommAbort() and
 *   epxCommGetAsyncError() may be called from any thread at any time.
 *   Different communicators are independent.
 */
#ifndef EPX_H
#define EPX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- version */

#define EPX_VERSION_MAJOR 0
#define EPX_VERSION_MINOR 1
#define EPX_VERSION_PATCH 0
/* Single integer for compile-time comparisons: 0.1.0 -> 100. */
#define EPX_VERSION_CODE (EPX_VERSION_MAJOR * 10000 + EPX_VERSION_MINOR * 100 + EPX_VERSION_PATCH)

/* ----------------------------------------------------------- result codes */

/* Values are pinned: they never change between releases. */
typedef enum epxResult {
  epxSuccess = 0,
  epxInvalidArgument = 1, /* an argument is out of range, NULL or misaligned */
  epxInvalidUsage = 2,    /* a call out of order: stale or foreign handle, use after abort */
  epxSystemError = 3,     /* an operating-system call failed (errno in the message) */
  epxCudaError = 4,       /* a CUDA call failed */
  epxOutOfMemory = 5,     /* host or device allocation failed */
  epxTimeout = 6,         /* a wait on a peer passed the hard timeout */
  epxPeerFailed = 7,      /* a peer process died or reported a fatal error */
  epxAborted = 8,         /* epxCommAbort() was called */
  epxMismatch = 9,        /* ranks disagree on a setting or on the call being made */
  epxNotSupported = 10,   /* valid request this build or backend cannot serve */
  epxInternalError = 11,  /* a bug in epx: please report it with the message */
  epxBootstrapError = 12, /* rendezvous failed: bad id, refused handshake, protocol error */
  epxRemoteError = 13,    /* another rank rejected its arguments for this call */
  epxNumResults = 14
} epxResult_t;

/* Static description of a result code; never NULL. */
const char *epxGetErrorString(epxResult_t result);

/* Library version as EPX_VERSION_CODE of the loaded library (may differ from the header). */
epxResult_t epxGetVersion(int *version);

/* ------------------------------------------------------------------ types */

typedef struct epxComm *epxComm_t;     /* opaque communicator */
typedef struct epxHandle *epxHandle_t; /* opaque per-dispatch routing state */

/* Same definition as cudaStream_t, so a cudaStream_t converts without casts and
 * this header needs no CUDA headers. NULL is the legacy default stream. */
typedef struct CUstream_st *epxStream_t;

typedef enum epxDataType {
  epxBFloat16 = 0,
  epxFloat8E4M3 = 1,
  epxFloat32 = 2,
  epxInt32 = 3,
  epxInt64 = 4
} epxDataType_t;

/* How FP8 payload scales are stored. One scale covers 128 channels. */
typedef enum epxScaleFormat {
  epxScalesNone = 0,    /* BF16 payload, no scales */
  epxScalesFloat32 = 1, /* float32 [rows, H/128] */
  epxScalesUE8M0 = 2    /* int32 [rows, ceil(H/512)]: power-of-two scales as exponent
                           bytes, group g in byte g%4 (little-endian) of word g/4 */
} epxScaleFormat_t;

typedef enum epxBackend {
  epxBackendAuto = 0, /* CUDA when built and a device is visible, else host */
  epxBackendHost = 1, /* processes + POSIX shared memory; host pointers */
  epxBackendCuda = 2  /* GPUs; device pointers */
} epxBackend_t;

/* ------------------------------------------------------------- bootstrap */

#define EPX_UNIQUE_ID_BYTES 128
/* Opaque bytes made by one rank and handed to the others out of band. It holds
 * the rendezvous address and a random secret: treat it as a credential. */
typedef struct epxUniqueId {
  char internal[EPX_UNIQUE_ID_BYTES];
} epxUniqueId;

/* Creates a unique id and starts the rendezvous service in this process. The
 * service serves one epxCommInitRank round, then exits; it stops on its own at
 * the bootstrap deadline if the ranks never arrive. Not collective.
 * The listening interface is EPX_SOCKET_IFNAME if set, else the loopback
 * address when EPX_SOCKET_LOOPBACK=1, else the first non-loopback IPv4 one. */
epxResult_t epxGetUniqueId(epxUniqueId *unique_id);

/* All-gather supplied by the caller (torch.distributed, MPI, NCCL...): copy
 * `bytes` from `sendbuf` of every rank into `recvbuf + rank * bytes` of every
 * rank. Return 0 on success, anything else on failure. Called only during
 * epxCommInitRankWithAllGather, by the thread that called it. */
typedef int (*epxAllGatherFn)(void *user, const void *sendbuf, void *recvbuf, size_t bytes);

/* ---------------------------------------------------------------- config */

#define EPX_CONFIG_MAGIC 0x45505843u /* "EPXC" */

/* Settings fixed for the life of a communicator. Every field marked (agreed)
 * must be equal on every rank: init fails on all ranks, naming the field,
 * when they differ. Start from EPX_CONFIG_INITIALIZER. */
typedef struct epxConfig {
  size_t size;          /* sizeof(epxConfig_t) of the caller */
  unsigned int magic;   /* EPX_CONFIG_MAGIC */
  unsigned int version; /* EPX_VERSION_CODE of the caller's header */
  epxBackend_t backend; /* (agreed) */
  int ranks_per_node;   /* (agreed) ranks per NVLink domain; 0 = all ranks */
  int num_experts;      /* (agreed) E, a multiple of the rank count */
  int hidden;           /* (agreed) largest hidden size any call uses */
  int max_topk;         /* (agreed) largest top-k any call uses, 1..32 */
  int max_tokens_per_rank;    /* (agreed) largest T of a normal-mode call */
  int ll_max_tokens_per_rank; /* (agreed) T bound of low-latency calls; 0 disables them */
  int num_sms;                /* GPU SMs for normal-mode kernels; 0 = default */
  int cuda_device;            /* CUDA device ordinal; -1 = the current device */
  int timeout_ms;             /* hard timeout of every wait on a peer; 0 = default */
  int soft_timeout_ms;        /* waits longer than this are logged; 0 = default */
  int bootstrap_timeout_ms;   /* deadline for init as a whole; 0 = default */
} epxConfig_t;

#define EPX_CONFIG_INITIALIZER                                                                   \
  {                                                                                              \
    sizeof(epxConfig_t), EPX_CONFIG_MAGIC, EPX_VERSION_CODE, epxBackendAuto, 0, 0, 0, 8, 4096, \
        128, 0, -1, 0, 0, 0                                                                      \
  }

/* ------------------------------------------------------------ size hints */

/* Bytes of every buffer, for a config and rank count. Callable before init. */
typedef struct epxSizeHints {
  size_t size;                    /* set by the caller to sizeof(epxSizeHints_t) */
  size_t comm_buffer_bytes;       /* memory a communicator allocates for normal mode */
  size_t ll_buffer_bytes;         /* memory a communicator allocates for low latency (the
                                     zero-copy combine buffer, allocated on the first
                                     epxLowLatencyGetCombineBuffer, adds ll_recv_x_bytes_bf16) */
  size_t handle_bytes;            /* memory one epxHandle_t holds */
  int64_t max_recv_tokens;        /* worst-case N_recv of a normal dispatch: R * max T */
  size_t recv_x_bytes_per_row_bf16;       /* normal recv_x row, BF16 */
  size_t recv_x_bytes_per_row_fp8;        /* normal recv_x row, FP8 */
  size_t recv_scales_bytes_per_row_f32;   /* normal/LL scale row, float32 */
  size_t recv_scales_bytes_per_row_ue8m0; /* normal/LL scale row, UE8M0 */
  int64_t ll_recv_rows;           /* E_local * R * ll_max_tokens_per_rank */
  size_t ll_recv_x_bytes_bf16;    /* LL recv_x, BF16 */
  size_t ll_recv_x_bytes_fp8;     /* LL recv_x, FP8 */
  size_t ll_recv_scales_bytes_f32;   /* LL scales, float32 */
  size_t ll_recv_scales_bytes_ue8m0; /* LL scales, UE8M0 */
} epxSizeHints_t;

/* [in] config, nranks; [out] hints (hints->size must be set). Not collective. */
epxResult_t epxGetSizeHints(const epxConfig_t *config, int nranks, epxSizeHints_t *hints);

/* ------------------------------------------------------------- lifecycle */

/* Joins rank `rank` of `nranks` through the rendezvous named by unique_id.
 * Collective over the nranks processes; blocks until all arrive, a setting
 * differs (epxMismatch, naming the field), or the bootstrap deadline passes
 * (epxTimeout, naming the missing ranks). On failure *comm is NULL. */
epxResult_t epxCommInitRank(epxComm_t *comm, int nranks, epxUniqueId unique_id, int rank,
                            const epxConfig_t *config);

/* Same, with the caller's all-gather instead of the TCP rendezvous. */
epxResult_t epxCommInitRankWithAllGather(epxComm_t *comm, int nranks, int rank,
                                         epxAllGatherFn allgather, void *user,
                                         const epxConfig_t *config);

/* Frees everything this rank holds. Local, never blocks on peers, never
 * collective. epxCommDestroy(NULL) is a no-op. */
epxResult_t epxCommDestroy(epxComm_t comm);

/* Makes every in-flight and future wait of this communicator return epxAborted
 * (peers see epxPeerFailed). Any thread. Returns within a second. */
epxResult_t epxCommAbort(epxComm_t comm);

/* The sticky error of the communicator (epxSuccess if none). Any thread. */
epxResult_t epxCommGetAsyncError(epxComm_t comm, epxResult_t *async_error);

/* Message of the last failed call on this communicator; "" if none. Valid
 * until the next call on comm. With comm == NULL: the last init failure of the
 * calling thread. */
const char *epxCommGetLastError(epxComm_t comm);

typedef struct epxCommInfo {
  int rank, nranks, ranks_per_node, num_nodes;
  int num_experts, num_local_experts;
  int hidden, max_topk, max_tokens_per_rank, ll_max_tokens_per_rank;
  epxBackend_t backend; /* the backend chosen (never Auto) */
  /* SMs the kernels of each mode occupy (one block per SM): normal dispatch and
   * combine, and the low-latency ops. 0 on the host backend or when the mode is off. */
  int normal_sms, ll_sms;
} epxCommInfo_t;

epxResult_t epxCommGetInfo(epxComm_t comm, epxCommInfo_t *info);

/* Waits on one peer that passed the soft timeout (config.soft_timeout_ms),
 * since init: which peer is slow, how often and how slow. Each is also logged
 * at WARN (EPX_DEBUG=WARN). The host backend counts every such wait; the CUDA
 * backend one per call and peer (the first of the call's device waits on it). */
typedef struct epxPeerWaitStats {
  uint64_t slow_waits;     /* waits on this peer that passed the soft timeout */
  int64_t longest_wait_ns; /* the longest of them: host backend, until it ended; CUDA,
                              when the host learnt of it (at least the soft timeout) */
  uint64_t last_slow_seq;  /* call number of the latest (calls count from 1); 0: none */
} epxPeerWaitStats_t;

/* Valid after a failure too (until epxCommDestroy). peer in [0, nranks). */
epxResult_t epxCommGetPeerWaitStats(epxComm_t comm, int peer, epxPeerWaitStats_t *stats);

/* ---------------------------------------------------------------- handles */

/* A handle carries the routing of one dispatch to the combine that undoes it
 * (and to cached re-dispatches with the same routing). It is sized for the
 * communicator's limits when created and reused across calls: creating one is
 * the only allocation, never on the hot path. Not collective. */
epxResult_t epxHandleCreate(epxComm_t comm, epxHandle_t *handle);
epxResult_t epxHandleDestroy(epxHandle_t handle); /* NULL is a no-op */

typedef enum epxHandleState {
  epxHandleEmpty = 0,      /* created, or reset: no routing yet */
  epxHandleNormal = 1,     /* filled by epxDispatchNotify / epxDispatch */
  epxHandleLowLatency = 2  /* filled by epxLowLatencyDispatch */
} epxHandleState_t;

typedef struct epxHandleInfo {
  epxHandleState_t state;
  int num_tokens;          /* T of the dispatch that filled it */
  int num_topk;
  int64_t num_recv_tokens; /* normal mode: rows received (host-visible after notify) */
  int recv_pending;        /* low latency: 1 while a send-only phase awaits epxLowLatencyRecv */
} epxHandleInfo_t;

epxResult_t epxHandleGetInfo(epxHandle_t handle, epxHandleInfo_t *info);

/* Forgets the routing; the handle becomes Empty. Not collective. */
epxResult_t epxHandleReset(epxHandle_t handle);

/* ---------------------------------------------------------------- layout */

/* Outputs of epxGetDispatchLayout; every pointer caller-owned. */
typedef struct epxLayout {
  int *num_tokens_per_rank;   /* [R]: tokens with at least one expert on rank r */
  int *num_tokens_per_node;   /* [R / ranks_per_node] or NULL: a token counts once per node */
  int *num_tokens_per_expert; /* [E] */
  uint8_t *is_token_in_rank;  /* [T, R], 0 or 1 */
} epxLayout_t;

/* Routing counts of one rank's tokens. Not collective.
 * [in] topk_idx [T, K] of type idx_type (epxInt64 or epxInt32), ids in
 * [-1, E); [out] layout. T may be 0. On the CUDA backend, layout calls of one
 * communicator share its scratch: issue them on one stream (or order them). */
epxResult_t epxGetDispatchLayout(epxComm_t comm, const void *topk_idx, epxDataType_t idx_type,
                                 int num_tokens, int num_topk, const epxLayout_t *layout,
                                 epxStream_t stream);

/* ----------------------------------------------------------- normal mode */

typedef struct epxDispatchArgs {
  const void *x;                 /* [T, H]: BF16 or FP8 E4M3 */
  epxDataType_t x_type;          /* epxBFloat16 or epxFloat8E4M3 */
  const void *x_scales;          /* FP8 only: see epxScaleFormat_t */
  epxScaleFormat_t scale_format; /* epxScalesNone for BF16 */
  const void *topk_idx;          /* [T, K]; may be NULL in a cached re-dispatch */
  epxDataType_t topk_idx_type;   /* epxInt64 or epxInt32 */
  const float *topk_weights;     /* [T, K] or NULL */
  int num_tokens;                /* T, 0..max_tokens_per_rank */
  int hidden;                    /* H, <= config hidden, H*elem_size % 16 == 0 */
  int num_topk;                  /* K, 1..max_topk */
  int expert_alignment;          /* per-expert counts rounded up to this; 0 or 1 = none */
  int64_t num_worst_tokens;      /* > 0: no host sync, outputs sized to this many rows */
} epxDispatchArgs_t;

typedef struct epxDispatchOutputs {
  void *recv_x;                     /* [rows, H], x_type */
  void *recv_x_scales;              /* [rows, ...] per scale_format, or NULL for BF16 */
  void *recv_topk_idx;              /* [rows, K], topk_idx_type: local expert ids, -1 elsewhere; may be NULL */
  float *recv_topk_weights;         /* [rows, K], 0 where the id is -1; may be NULL */
  int *recv_src_idx;                /* [rows]: source token index; may be NULL */
  int *recv_rank_prefix;            /* [R]: rows from source s end at prefix[s] (inclusive sum); may be NULL */
  int *num_recv_tokens_per_expert;  /* [E_local], each rounded up to expert_alignment; may be NULL */
  int *num_recv_tokens;             /* [1]: N_recv; may be NULL */
  int64_t capacity_rows;            /* rows allocated in the [rows, ...] outputs */
} epxDispatchOutputs_t;

/* Count exchange of a dispatch (collective): fills `handle` with the routing
 * of args->topk_idx and returns the receive sizes to the host, so outputs can
 * be allocated exactly. Blocks the host until the counts are known.
 * [out] num_recv_tokens: N_recv of this rank;
 * [out] num_recv_tokens_per_expert: [E_local] host array or NULL (aligned). */
epxResult_t epxDispatchNotify(epxComm_t comm, const epxDispatchArgs_t *args, epxHandle_t handle,
                              int64_t *num_recv_tokens, int *num_recv_tokens_per_expert,
                              epxStream_t stream);

/* Moves every token to the ranks that hold its experts (collective).
 * Three ways to call it:
 *  - handle filled by epxDispatchNotify, or by an earlier dispatch (cached
 *    re-dispatch with the same routing): no count exchange; capacity_rows >= N_recv.
 *  - handle Empty and args->num_worst_tokens > 0: the count exchange runs inside
 *    the call with no host synchronisation (CUDA-graph safe); rows past N_recv
 *    get recv_topk_idx = -1; capacity_rows >= num_worst_tokens.
 *  - handle Empty and num_worst_tokens == 0: epxInvalidUsage (call Notify first).
 * Receive order: by source rank ascending, then by source token index. */
epxResult_t epxDispatch(epxComm_t comm, const epxDispatchArgs_t *args, epxHandle_t handle,
                        const epxDispatchOutputs_t *outputs, epxStream_t stream);

typedef struct epxCombineArgs {
  const void *x;             /* [N_recv, H] BF16, in the dispatch receive order */
  const float *topk_weights; /* [N_recv, K] or NULL */
  const void *bias[2];       /* up to two [T, H] BF16 biases, or NULL */
  int hidden;
  int num_topk;              /* K of topk_weights */
} epxCombineArgs_t;

typedef struct epxCombineOutputs {
  void *combined_x;              /* [T, H] BF16 */
  float *combined_topk_weights;  /* [T, K] or NULL */
} epxCombineOutputs_t;

/* Sends every received row back to its source and sums it there (collective):
 * combined_x[t] = sum over the ranks r that received t of x_r[row of t on r],
 * plus the biases, accumulated in FP32 (within a node first, nodes ascending)
 * and rounded to BF16 once. Tokens sent nowhere get the biases alone. */
epxResult_t epxCombine(epxComm_t comm, const epxCombineArgs_t *args, epxHandle_t handle,
                       const epxCombineOutputs_t *outputs, epxStream_t stream);

/* ------------------------------------------------------ low-latency mode */

typedef struct epxLowLatencyDispatchArgs {
  const void *x;               /* [T, H] BF16 */
  const void *topk_idx;        /* [T, K] */
  epxDataType_t topk_idx_type; /* epxInt64 or epxInt32 */
  int num_tokens;              /* T, 0..ll_max_tokens_per_rank */
  int hidden;
  int num_topk;
  int use_fp8;                 /* cast to FP8 E4M3 with one scale per 128 channels */
  int round_scale;             /* FP8: scales rounded up to a power of two */
  int use_ue8m0;               /* FP8: scales stored as UE8M0 (needs round_scale) */
  int *cumulative_local_expert_recv_stats; /* [E_local] int32, added to; or NULL */
  int return_recv_hook;        /* 1: only send; epxLowLatencyRecv completes the call */
} epxLowLatencyDispatchArgs_t;

/* Output layout: for local expert e, rows [0, recv_count[e]) of
 * recv_x[e] are valid; rows from one source rank are contiguous, sources
 * ascending, tokens ascending within a source. Rows per expert: R * ll_max_tokens. */
typedef struct epxLowLatencyDispatchOutputs {
  void *recv_x;               /* [E_local, R * maxT, H]: FP8 or BF16 */
  void *recv_x_scales;        /* [E_local, R * maxT, H/128] float32 or [.., ceil(H/512)] int32 */
  int *recv_count;            /* [E_local] */
  int *recv_src_info;         /* [E_local, R * maxT]: source token index per row; or NULL */
  int64_t *recv_layout_range; /* [E_local, R]: (first_row << 32) | count; or NULL */
} epxLowLatencyDispatchOutputs_t;

epxResult_t epxLowLatencyDispatch(epxComm_t comm, const epxLowLatencyDispatchArgs_t *args,
                                  epxHandle_t handle,
                                  const epxLowLatencyDispatchOutputs_t *outputs,
                                  epxStream_t stream);

typedef struct epxLowLatencyCombineArgs {
  const void *x;               /* [E_local, R * maxT, H] BF16 expert outputs; NULL with zero_copy */
  const void *topk_idx;        /* [T, K], the dispatch's */
  epxDataType_t topk_idx_type;
  const float *topk_weights;   /* [T, K] */
  int num_tokens;
  int hidden;
  int num_topk;
  int zero_copy;               /* 1: expert outputs already in epxLowLatencyGetCombineBuffer */
  int return_recv_hook;
} epxLowLatencyCombineArgs_t;

/* combined_x[t] = sum_k topk_weights[t,k] * out[row of t for expert k], over
 * k with topk_idx[t,k] >= 0, FP32 in k order, rounded to BF16 once.
 * topk_idx must be the dispatch's (a slot may be -1 here where it was not):
 * the CUDA backend waits for every valid slot's row, so a slot the dispatch
 * did not send ends in epxTimeout.
 * [out] combined_x [T, H] BF16, caller-owned. */
epxResult_t epxLowLatencyCombine(epxComm_t comm, const epxLowLatencyCombineArgs_t *args,
                                 epxHandle_t handle, void *combined_x, epxStream_t stream);

/* The receive hook of a send-only phase (return_recv_hook = 1): completes the
 * pending low-latency dispatch or combine recorded in `handle`. */
epxResult_t epxLowLatencyRecv(epxComm_t comm, epxHandle_t handle, epxStream_t stream);

/* The library's buffer [E_local, R * maxT, H] BF16 into which expert outputs
 * may be written for a zero-copy combine. Valid until epxCommDestroy. */
epxResult_t epxLowLatencyGetCombineBuffer(epxComm_t comm, void **buffer);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* EPX_H */
