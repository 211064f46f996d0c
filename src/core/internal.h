/*
 * internal.h - the host runtime's view of a communicator, a handle and a backend.
 *
 * Layers: include/epx.h (public) -> src/core (lifecycle, validation, errors,
 * parameters, logging) -> src/bootstrap (rendezvous) -> src/backends/<name>
 * (host: processes + shared memory; cuda: GPUs) -> kernels.
 * The core validates every argument before a backend sees it, so backends
 * trust their inputs.
 */
#ifndef EPX_CORE_INTERNAL_H
#define EPX_CORE_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>

#include "epx.h"

/* The CUDA backend includes this header from C++ (nvcc), where C11 atomics do
 * not exist; std::atomic<int> has the same size and layout under GCC and Clang,
 * so both languages agree on struct epxComm. */
#ifdef __cplusplus
#include <atomic>
typedef std::atomic<int> epx_atomic_int;
extern "C" {
#else
#include <stdatomic.h>
typedef atomic_int epx_atomic_int;
#endif

/* Marks the definitions of public functions: the library hides everything else. */
#define EPX_API __attribute__((visibility("default")))

#define EPX_COMM_MAGIC 0x45505843414d4d31ull   /* marks a live communicator */
#define EPX_HANDLE_MAGIC 0x455058484e444c31ull /* marks a live handle */
#define EPX_DEAD_MAGIC 0xdeaddeaddeaddeadull   /* written on destroy: use-after-free is caught */
#define EPX_ERROR_MSG_BYTES 512
/* Wire protocol of the bootstrap and of the host backend's shared memory;
 * ranks refuse each other when it differs. */
#define EPX_PROTOCOL_VERSION 1

/* Collective operations, as recorded in call headers so ranks can check that
 * they are making the same call. */
typedef enum epxOp {
  EPX_OP_NONE = 0,
  EPX_OP_DISPATCH_NOTIFY = 1,
  EPX_OP_DISPATCH = 2,
  EPX_OP_COMBINE = 3,
  EPX_OP_LL_DISPATCH = 4,
  EPX_OP_LL_COMBINE = 5
} epxOp_t;

const char *epx_op_name(epxOp_t op);

/* What every collective backend call receives besides its arguments. */
typedef struct epxCall {
  epxOp_t op;
  uint64_t seq;      /* collective call number on this communicator, from 1 */
  int local_invalid; /* this rank's arguments failed validation: take part empty,
                        touch no argument, and make every rank fail the call */
} epxCall_t;

struct epxBackendOps;
struct epxBootstrap;

struct epxComm {
  uint64_t magic;
  int rank, nranks, ranks_per_node, num_nodes;
  int num_local_experts;
  epxConfig_t config;  /* resolved: defaults filled in, backend never Auto */
  uint64_t uid;        /* random id of this communicator, equal on every rank */
  uint64_t seq;        /* collective calls issued so far */
  int64_t timeout_ns, soft_timeout_ns;
  epx_atomic_int abort_flag;  /* set by epxCommAbort, read by every wait */
  epx_atomic_int async_error; /* sticky epxResult_t of a fatal failure */
  const struct epxBackendOps *ops;
  void *backend; /* backend-private state */
  void *ll_combine_buffer; /* lazily allocated zero-copy buffer (backend memory) */
  int normal_sms, ll_sms;  /* set by the backend's init (epxCommInfo_t) */
  /* Per-peer waits past the soft timeout (epxCommGetPeerWaitStats): written by
   * the backends (epx_note_slow_wait), from a watcher thread too. */
  pthread_mutex_t stats_lock;
  epxPeerWaitStats_t *wait_stats; /* [nranks] */
  char last_error[EPX_ERROR_MSG_BYTES];
};

/* A wait on `peer` in call `seq` passed the soft timeout after waited_ns
 * (new_wait = 1), or such a wait, already counted, ended after waited_ns
 * (new_wait = 0: only the longest wait may grow). */
void epx_note_slow_wait(epxComm_t comm, int peer, uint64_t seq, int64_t waited_ns, int new_wait);

/* Routing state carried from a dispatch to its combine. Arrays live in
 * backend memory (host memory for the host backend, device memory for CUDA),
 * sized for the communicator's limits at creation. */
struct epxHandle {
  uint64_t magic;
  epxComm_t comm;
  uint64_t comm_uid;
  epxHandleState_t state;
  int num_tokens, num_topk, hidden;
  int topk_is_int64;
  int64_t num_recv_tokens; /* normal: N_recv (host copy; -1 when only on device) */
  int expert_alignment;
  uint64_t filled_seq;     /* call that filled it */
  int recv_pending;        /* low latency: a send-only phase awaits its receive */
  epxOp_t pending_op;
  /* normal mode */
  uint8_t *is_token_in_rank;  /* [maxT, R] */
  int *send_row;              /* [maxT, R]: row of token t on rank r, -1 if not sent */
  int *rank_prefix_matrix;    /* [R, R]: [s][r] = rows on r from sources <= s */
  int *recv_src_idx;          /* [R * maxT] */
  int *num_recv_per_expert;   /* [E_local], aligned */
  /* low-latency mode */
  int *ll_row_src_rank;       /* [E_local, R * llT] */
  int *ll_row_src_token;      /* [E_local, R * llT] */
  uint32_t *ll_row_kmask;     /* [E_local, R * llT]: top-k slots of the token naming this expert */
  int *ll_recv_count;         /* [E_local] */
  int64_t *ll_layout_range;   /* [E_local, R] */
  void *backend_private;      /* backend scratch tied to the handle */
};

/* Forgets every backend array and the private pointer of a handle (after the
 * backend freed them, or when their memory went away). */
void epx_handle_forget_arrays(epxHandle_t h);

/* A backend implements every operation for validated arguments. Collective
 * entries receive an epxCall_t; when call->local_invalid is set they must take
 * part without reading the arguments and fail on every rank. */
typedef struct epxBackendOps {
  const char *name;
  /* Internal memory a communicator and a handle of this backend would hold for
   * a resolved config (fills comm_buffer_bytes, ll_buffer_bytes, handle_bytes). */
  void (*size_hints)(const epxConfig_t *config, int nranks, epxSizeHints_t *hints);
  epxResult_t (*init)(epxComm_t comm, struct epxBootstrap *bootstrap);
  void (*destroy)(epxComm_t comm); /* local, never blocks on peers */
  void (*abort)(epxComm_t comm);   /* make in-flight waits return; any thread */
  epxResult_t (*handle_alloc)(epxComm_t comm, epxHandle_t handle);
  void (*handle_free)(epxComm_t comm, epxHandle_t handle);
  epxResult_t (*layout)(epxComm_t comm, const void *topk_idx, epxDataType_t idx_type,
                        int num_tokens, int num_topk, const epxLayout_t *layout,
                        epxStream_t stream);
  epxResult_t (*dispatch_notify)(epxComm_t comm, const epxCall_t *call,
                                 const epxDispatchArgs_t *args, epxHandle_t handle,
                                 int64_t *num_recv_tokens, int *num_recv_tokens_per_expert,
                                 epxStream_t stream);
  epxResult_t (*dispatch)(epxComm_t comm, const epxCall_t *call, const epxDispatchArgs_t *args,
                          epxHandle_t handle, const epxDispatchOutputs_t *outputs,
                          epxStream_t stream);
  epxResult_t (*combine)(epxComm_t comm, const epxCall_t *call, const epxCombineArgs_t *args,
                         epxHandle_t handle, const epxCombineOutputs_t *outputs,
                         epxStream_t stream);
  epxResult_t (*ll_dispatch)(epxComm_t comm, const epxCall_t *call,
                             const epxLowLatencyDispatchArgs_t *args, epxHandle_t handle,
                             const epxLowLatencyDispatchOutputs_t *outputs, epxStream_t stream);
  epxResult_t (*ll_combine)(epxComm_t comm, const epxCall_t *call,
                            const epxLowLatencyCombineArgs_t *args, epxHandle_t handle,
                            void *combined_x, epxStream_t stream);
  epxResult_t (*ll_recv)(epxComm_t comm, epxHandle_t handle, epxStream_t stream);
  epxResult_t (*ll_combine_buffer)(epxComm_t comm, void **buffer);
  /* Optional (NULL: none): take in what the device left for the host (the
   * CUDA backend's soft-timeout records), before the core reports on it. */
  void (*poll_events)(epxComm_t comm);
} epxBackendOps;

extern const epxBackendOps epx_host_backend_ops;
/* NULL when the library was built without CUDA. */
const epxBackendOps *epx_cuda_backend_ops(void);
/* 1 when built with CUDA and at least one device is visible. */
int epx_cuda_backend_available(void);

/* ---- errors ---- */

/* Records a formatted message on comm (or the thread's init slot when comm is
 * NULL) and returns `code`, so call sites read `return epx_error(...)`. */
epxResult_t epx_error(epxComm_t comm, epxResult_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Marks a failure that leaves the communicator unusable (timeouts, dead peers). */
void epx_set_async_error(epxComm_t comm, epxResult_t code);
/* Thread-local message slot for failures before a communicator exists. */
char *epx_thread_error_slot(void);

#define EPX_CHECK(call)                       \
  do {                                        \
    epxResult_t epx_check_res_ = (call);      \
    if (epx_check_res_ != epxSuccess) {       \
      res = epx_check_res_;                   \
      goto fail;                              \
    }                                         \
  } while (0)

/* ---- time ---- */

int64_t epx_now_ns(void); /* CLOCK_MONOTONIC */

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* EPX_CORE_INTERNAL_H */
