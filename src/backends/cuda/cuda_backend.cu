/*
 * cuda_backend.cu - host side of the CUDA backend: set-up over CUDA IPC, the
 * op entry points that enqueue the kernels, and the translation of device
 * error records into result codes and messages.
 *
 * Normal mode inside one NVLink domain (every rank reaches every other by
 * load/store). Low-latency mode (ll_*.cu, protocol in cuda_common.cuh) uses a
 * second IPC-shared region per rank, allocated at init when
 * ll_max_tokens_per_rank > 0; its ops never synchronise the host.
 *
 * Memory per rank: one region (cudaMalloc, shared by IPC) whose rows are sized
 * by R * max_tokens_per_rank (see epx_cuda_region_layout): dispatch writes
 * tokens straight into their final rows, combine into per-(token, rank) slots.
 *
 * Errors found on the device (timeouts, abort, a bad expert id, headers that
 * disagree, a peer's invalid arguments, too few output rows) are written to a
 * host-mapped record, and the failed op writes none of the caller's outputs.
 * epxDispatchNotify synchronises and returns them for that call; per-call errors
 * (mismatch, invalid arguments) leave the communicator usable. Stream-ordered
 * calls (dispatch, combine, layout) return before the device knows: the record
 * is read at the next call on the communicator, which fails with it and marks
 * the communicator failed (epx_set_async_error), because ranks that already
 * issued their next call can no longer line up (they time out).
 *
 * Dead peers (core/liveness.h): every communicator has one small POSIX segment
 * (rank 0 creates it, every rank maps it and registers it with CUDA) holding a
 * liveness word per rank. A rank writes its own word when it aborts, is
 * destroyed, exits, or its device reported a fatal error; a watcher thread per
 * communicator (every EPX_LIVENESS_INTERVAL_MS) marks a peer whose process is
 * gone (kill(pid, 0), /proc start time and zombie state, for pids visible in
 * this namespace) and publishes its own device's fatal errors. Every device
 * wait reads the word of the peer it waits for with the abort flag, so a dead
 * peer ends the wait with epxPeerFailed naming it within about one interval,
 * not the hard timeout. Without the segment (shm or registration refused) the
 * words live in process-local mapped memory filled by the watcher: killed
 * peers are still seen, their aborts and destroys only at the timeout.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/cuda/bulk_copy.cuh"
#include "bootstrap/bootstrap.h"
#include "core/liveness.h"
#include "core/log.h"
#include "core/params.h"

typedef struct EpxCudaComm {
  int device;
  cudaStream_t comm_stream; /* internal work at set-up (region clearing) */
  EpxRegionLayout lay;
  char *region;             /* my region */
  char **peer_host;         /* [R] mapped peer regions (mine at [rank]) */
  unsigned char *peer_ipc;  /* [R] 1 where peer_host[r] came from cudaIpcOpenMemHandle */
  char **peers_dev;         /* device copy of peer_host */
  EpxCudaState *state;
  int *scratch_pos;         /* [maxT, R] count-exchange scratch (see kernels_hello.cu) */
  int *layout_scratch;      /* the layout kernel's accumulator (kernels_layout.cu), or NULL */
  EpxHostShared *host;      /* host view */
  EpxHostShared *host_dev;  /* device view */
  int blocks;               /* blocks of the data kernels (>= 2) */
  int send_blocks;          /* of those, the send blocks (EPX_CUDA_SEND_SHARE) */
  int send_order;           /* which blocks send (EPX_CUDA_SEND_ORDER, EPX_SEND_ORDER_*) */
  int dynamic;              /* EPX_CUDA_DYNAMIC: send warps claim their items */
  int chunk_tokens;         /* EPX_CUDA_CHUNK_TOKENS: source tokens per progress chunk */
  int combine_chunk_tokens; /* EPX_CUDA_COMBINE_CHUNK_TOKENS: the same for combine */
  int ll_pieces;            /* EPX_CUDA_LL_PIECES: flagged pieces of an LL combine row */
  int bulk;                 /* EPX_CUDA_BULK: bulk copies where aligned (1 dispatch, 2 combine) */
  int trace;      /* EPX_CUDA_TRACE: LL phase times, printed at destroy */
  unsigned int trace_fused_ops[2]; /* fused LL dispatches / combines launched (sample rows) */
  int pdl;        /* EPX_CUDA_PDL: op kernels launched as programmatic dependents */
  /* soft-timeout records logged so far (EpxSoftRecord; drain_soft_waits) */
  pthread_mutex_t soft_lock;
  unsigned long long soft_seen;
  epxComm_t comm; /* the core communicator: its wait statistics (epx_note_slow_wait) */
  /* low-latency mode */
  int ll_enabled;           /* 0: LL ops answer epxNotSupported (ll_off_reason) */
  const char *ll_off_reason;
  int ll_blocks;            /* blocks of the LL kernels */
  int ll_fused_blocks;      /* blocks of the fused LL kernels (half send, half receive) */
  int ll_variant;           /* EPX_CUDA_LL_VARIANT, read at init */
  EpxLLLayout ll_lay;
  char *ll_region;
  char **ll_peer_host;
  unsigned char *ll_peer_ipc;
  char **ll_peers_dev;
  uint64_t ll_ops;          /* LL ops issued by this host (slot of op n: n & 1) */
  int ll_slot_pending[2];   /* a send-only phase in that slot awaits epxLowLatencyRecv */
  /* liveness (see the top of this file) */
  int rank;
  pid_t owner_pid;          /* the process that made it (a forked child leaves it alone) */
  int blocking_calls;       /* threads inside a host-synchronising call (atomic) */
  int *pids;                /* [R] every rank's pid, for messages */
  epxLive *live;            /* NULL with a single rank (or without memory) */
  void *live_registered;    /* the segment, registered with CUDA; NULL if not */
  epxLiveSlot *live_mirror; /* process-local words (cudaHostAlloc) when the segment is not */
  const unsigned int *live_dev; /* device address of rank 0's word; NULL: no checks */
} EpxCudaComm;

/* Host-side state of a handle: the device arrays and the pending receive. */
typedef struct EpxCudaHandle {
  char *dev;                     /* one cudaMalloc: normal and LL arrays, LL op word */
  unsigned long long *ll_epoch;  /* device word: op number of the handle's last LL send */
  int ll_slot;                   /* host slot of a pending send-only phase */
  EpxLLDispatchRecvParams drecv; /* launched by epxLowLatencyRecv */
  EpxLLCombineRecvParams crecv;
} EpxCudaHandle;

/* What each rank publishes at set-up. */
typedef struct EpxCudaPeerInfo {
  cudaIpcMemHandle_t ipc;
  unsigned long long region_bytes;
  unsigned long long region_ptr; /* for peers inside the same process */
  int pid;
  int device;
  cudaIpcMemHandle_t ll_ipc; /* LL region (when ll_bytes > 0) */
  unsigned long long ll_bytes;
  unsigned long long ll_ptr;
  unsigned long long start_time; /* /proc start time of the process (0: unknown) */
  int live_segment;              /* rank 0: the liveness segment exists */
  int blocks, send_blocks, chunk_tokens, combine_chunk_tokens; /* must agree: peers wait on each other's blocks */
  int ll_pieces;                         /* must agree: receivers wait per piece */
} EpxCudaPeerInfo;

static EpxCudaComm *cc_of(epxComm_t comm) { return (EpxCudaComm *)comm->backend; }

static epxResult_t cuda_fail(epxComm_t comm, cudaError_t err, const char *what) {
  epxResult_t code = err == cudaErrorMemoryAllocation ? epxOutOfMemory : epxCudaError;
  return epx_error(comm, code, "%s failed: %s (%s)", what, cudaGetErrorName(err),
                   cudaGetErrorString(err));
}

#define EPX_CUDA_TRY(call, what)                 \
  do {                                           \
    cudaError_t epx_cuda_err_ = (call);          \
    if (epx_cuda_err_ != cudaSuccess) {          \
      res = cuda_fail(comm, epx_cuda_err_, what); \
      goto fail;                                 \
    }                                            \
  } while (0)

static EpxDevCtx make_ctx(epxComm_t comm) {
  EpxCudaComm *cc = cc_of(comm);
  EpxDevCtx c;
  memset(&c, 0, sizeof c);
  c.peers = cc->peers_dev;
  c.state = cc->state;
  c.host = cc->host_dev;
  c.lay = cc->lay;
  c.timeout_ns = comm->timeout_ns;
  c.soft_timeout_ns = comm->soft_timeout_ns;
  c.rank = comm->rank;
  c.nranks = comm->nranks;
  c.ranks_per_node = comm->ranks_per_node;
  c.num_experts = comm->config.num_experts;
  c.num_local_experts = comm->num_local_experts;
  c.max_tokens = comm->config.max_tokens_per_rank;
  c.max_topk = comm->config.max_topk;
  c.ll_peers = cc->ll_peers_dev;
  c.ll = cc->ll_lay;
  c.ll_max_tokens = comm->config.ll_max_tokens_per_rank;
  c.ll_pieces = cc->ll_pieces;
  c.live = cc->live_dev;
  c.trace = cc->trace;
  c.pdl = cc->pdl;
  c.send_blocks = cc->send_blocks;
  c.send_order = cc->send_order;
  c.dynamic = cc->dynamic;
  return c;
}

/* ---- liveness ---- */

/* Marks this rank's own word after a fatal device error, so that peers
 * waiting on it stop at once, naming the root cause: the peer it lost, or the
 * one that peer lost. Idempotent (the first reason stays). */
static void live_mark_failed(EpxCudaComm *cc, int code, int peer, unsigned int why) {
  if (!cc->live) return;
  if (code == epxAborted) {
    epx_live_mark(cc->live, cc->rank, EPX_PEER_ABORTED, -1, epxAborted);
    return;
  }
  int culprit = peer;
  if (code == epxPeerFailed && epx_live_why(why) == EPX_PEER_FAILED && epx_live_fail_peer(why) >= 0)
    culprit = epx_live_fail_peer(why);
  epx_live_mark(cc->live, cc->rank, EPX_PEER_FAILED, culprit, code);
}

static void drain_soft_waits(EpxCudaComm *cc);

/* The watcher's tick: a fatal error the device recorded is published to the
 * peers even while the application makes no call that would read it; waits
 * past the soft timeout are logged while they last. */
static void live_tick(void *arg) {
  EpxCudaComm *cc = (EpxCudaComm *)arg;
  drain_soft_waits(cc);
  volatile EpxErrRecord *r = &cc->host->rec;
  int code = r->code;
  if (code == epxTimeout || code == epxAborted || code == epxPeerFailed)
    live_mark_failed(cc, code, r->peer, r->why);
}

/* Communicators of this process, so that exit() can stop their kernels: the
 * CUDA runtime's teardown at exit would otherwise wait for a kernel that waits
 * for a peer (up to the hard timeout). */
#define EPX_CUDA_MAX_LIVE_COMMS 256
static pthread_mutex_t live_comms_lock = PTHREAD_MUTEX_INITIALIZER;
static EpxCudaComm *live_comms[EPX_CUDA_MAX_LIVE_COMMS];
static pthread_once_t live_atexit_once = PTHREAD_ONCE_INIT;

static void live_at_exit(void) {
  /* Never block an exit: skip the sweep if another thread holds the lock. */
  if (pthread_mutex_trylock(&live_comms_lock) != 0) return;
  for (int i = 0; i < EPX_CUDA_MAX_LIVE_COMMS; ++i) {
    EpxCudaComm *cc = live_comms[i];
    if (!cc || cc->owner_pid != getpid()) continue;
    if (cc->live) epx_live_mark(cc->live, cc->rank, EPX_PEER_EXITED, -1, 0);
    if (cc->host) cc->host->abort = 1;
    /* Its ticks read mapped memory the runtime's teardown may unmap. */
    epx_live_stop(cc->live);
  }
  /* Another thread blocked in a notify now returns (its kernel saw the abort
   * flag); let it leave the library before the runtime is torn down. */
  int64_t until = epx_now_ns() + 500000000;
  for (int i = 0; i < EPX_CUDA_MAX_LIVE_COMMS; ++i) {
    EpxCudaComm *cc = live_comms[i];
    if (!cc || cc->owner_pid != getpid()) continue;
    while (__atomic_load_n(&cc->blocking_calls, __ATOMIC_ACQUIRE) > 0 && epx_now_ns() < until)
      usleep(100);
  }
  pthread_mutex_unlock(&live_comms_lock);
}

static void live_register_atexit(void) { atexit(live_at_exit); }

static void live_comms_add(EpxCudaComm *cc) {
  /* Registered after the CUDA runtime's own exit handler (the runtime is
   * initialised by now), so it runs before it. */
  pthread_once(&live_atexit_once, live_register_atexit);
  pthread_mutex_lock(&live_comms_lock);
  for (int i = 0; i < EPX_CUDA_MAX_LIVE_COMMS; ++i)
    if (!live_comms[i]) {
      live_comms[i] = cc;
      break;
    }
  pthread_mutex_unlock(&live_comms_lock);
}

static void live_comms_remove(EpxCudaComm *cc) {
  pthread_mutex_lock(&live_comms_lock);
  for (int i = 0; i < EPX_CUDA_MAX_LIVE_COMMS; ++i)
    if (live_comms[i] == cc) live_comms[i] = NULL;
  pthread_mutex_unlock(&live_comms_lock);
}

/* ---- error records ---- */

static const char *phase_name(int phase) {
  switch (phase) {
    case EPX_PHASE_HELLO: return "count exchange (hello)";
    case EPX_PHASE_ARRIVAL: return "data arrival";
    case EPX_PHASE_CHECK: return "call check";
    case EPX_PHASE_LL_SLOT: return "low-latency buffer slot reuse (peer's previous receive)";
    case EPX_PHASE_LL_SIGNAL: return "low-latency headers";
    case EPX_PHASE_LL_MESSAGE: return "low-latency message";
    case EPX_PHASE_LOCAL_RELEASE: return "send block's own chunk release";
    default: return "unknown phase";
  }
}

static const char *field_name(int field) {
  switch (field) {
    case EPX_FIELD_OP: return "operation";
    case EPX_FIELD_SEQ: return "call sequence number";
    case EPX_FIELD_HIDDEN: return "hidden";
    case EPX_FIELD_TOPK: return "num_topk";
    case EPX_FIELD_X_TYPE: return "x_type";
    case EPX_FIELD_IDX_TYPE: return "topk_idx_type";
    case EPX_FIELD_SCALES: return "scale_format";
    case EPX_FIELD_PATH: return "dispatch path (cached vs num_worst_tokens)";
    case EPX_FIELD_EXPERT_ID: return "expert id";
    default: return "?";
  }
}

static const char *op_name(int op) {
  return op == EPX_OP_NONE ? "epxGetDispatchLayout" : epx_op_name((epxOp_t)op);
}

/* "expected ..., seen ..." of a failed wait. Data-arrival waits compare
 * progress words, epoch << 24 | chunks sent (cuda_common.cuh, chunk progress):
 * they are shown as epoch and chunk. */
static void describe_wait(char *buf, size_t n, int phase, long long expected, long long seen) {
  if (phase == EPX_PHASE_LL_MESSAGE) { /* flags: 2 x op, + 1 when a message was sent */
    snprintf(buf, n, "expected the flag of op %lld, seen op %lld's (%s)", expected / 2, seen / 2,
             seen & 1 ? "message sent" : "nothing sent");
    return;
  }
  if (phase != EPX_PHASE_ARRIVAL) {
    snprintf(buf, n, "expected epoch %lld, seen %lld", expected, seen);
    return;
  }
  const char *what[2] = {"expected", "seen"};
  const long long v[2] = {expected, seen};
  size_t used = 0;
  for (int i = 0; i < 2 && used < n; ++i) {
    long long chunks = v[i] & (long long)EPX_PROGRESS_ALL;
    char c[32];
    if (chunks == (long long)EPX_PROGRESS_ALL) snprintf(c, sizeof c, "all chunks");
    else snprintf(c, sizeof c, "%lld chunk%s", chunks, chunks == 1 ? "" : "s");
    int k = snprintf(buf + used, n - used, "%s%s epoch %lld with %s sent", i ? ", " : "", what[i],
                     (long long)((unsigned long long)v[i] >> 24), c);
    if (k < 0) break;
    used += (size_t)k;
  }
}

/* Logs, at WARN and oldest first, the soft-timeout records the device left
 * (EpxSoftRecord in cuda_common.cuh) since the last call. Records the device
 * overwrote before they were read are counted, not lost silently. */
static void drain_soft_waits(EpxCudaComm *cc) {
  pthread_mutex_lock(&cc->soft_lock);
  for (;;) {
    volatile EpxSoftRecord *r = &cc->host->soft[cc->soft_seen % EPX_SOFT_RING];
    const unsigned long long number = r->number;
    if (number <= cc->soft_seen) break; /* the next record is not written yet */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    const int op = r->op, phase = r->phase, peer = r->peer;
    const long long waited_ns = r->waited_ns, expected = r->expected, seen = r->seen;
    const unsigned long long seq = r->seq;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (r->number != number) continue; /* rewritten while read: read it again */
    if (number > cc->soft_seen + 1)
      EPX_WARN(cc->rank, "%llu soft-timeout warnings were overwritten before they were logged",
               number - 1 - cc->soft_seen);
    char waited[128];
    describe_wait(waited, sizeof waited, phase, expected, seen);
    EPX_WARN(cc->rank, "%s seq %llu, %s: waiting %.0f ms for rank %d (%s)", op_name(op), seq,
             phase_name(phase), (double)waited_ns / 1e6, peer, waited);
    epx_note_slow_wait(cc->comm, peer, seq, waited_ns, 1);
    cc->soft_seen = number;
  }
  pthread_mutex_unlock(&cc->soft_lock);
}

/* Turns the host-mapped record into a result and message; clears non-fatal ones. */
static epxResult_t report_record(epxComm_t comm, const char *when) {
  EpxCudaComm *cc = cc_of(comm);
  volatile EpxErrRecord *r = &cc->host->rec;
  int code = r->code;
  if (code == 0) return epxSuccess;
  int fatal = code == epxTimeout || code == epxAborted || code == epxPeerFailed;
  const char *op = op_name(r->op);
  unsigned long long seq = r->seq;
  int peer = r->peer;
  long long expected = r->expected, seen = r->seen;
  char waited[128];
  describe_wait(waited, sizeof waited, r->phase, expected, seen);
  if (code == epxTimeout)
    epx_error(comm, epxTimeout,
              "%s%s (call %llu) timed out after %lld ms in phase '%s' waiting for rank %d: %s",
              when, op, seq, (long long)(comm->timeout_ns / 1000000), phase_name(r->phase), peer,
              waited);
  else if (code == epxAborted)
    epx_error(comm, epxAborted, "%s%s (call %llu) aborted in phase '%s' while waiting for rank %d (%s)",
              when, op, seq, phase_name(r->phase), peer, waited);
  else if (code == epxPeerFailed) {
    char why[192];
    unsigned int w = r->why;
    int pid = cc->pids && peer >= 0 && peer < comm->nranks ? cc->pids[peer] : -1;
    epx_describe_dead(why, sizeof why, peer, pid, epx_live_why(w), epx_live_fail_peer(w),
                      epx_live_fail_code(w));
    epx_error(comm, epxPeerFailed, "%s%s (call %llu) failed in phase '%s': %s (waiting for rank %d: %s)",
              when, op, seq, phase_name(r->phase), why, peer, waited);
  }
  else if (r->field == EPX_FIELD_CAPACITY)
    epx_error(comm, (epxResult_t)code,
              "%s%s (call %llu): %lld rows arrived but outputs->capacity_rows is %lld; outputs "
              "were left untouched",
              when, op, seq, seen, expected);
  else if (r->field == EPX_FIELD_EXPERT_ID)
    epx_error(comm, (epxResult_t)code,
              "%s%s (call %llu): rank %d's topk_idx holds expert id %lld (token %lld), outside "
              "[-1, %d)",
              when, op, seq, peer, seen, expected, comm->config.num_experts);
  else if (code == epxMismatch)
    epx_error(comm, epxMismatch,
              "%s%s (call %llu): ranks disagree on %s: this rank (%d) has %lld, rank %d has %lld",
              when, op, seq, field_name(r->field), comm->rank, expected, peer, seen);
  else if (code == epxRemoteError)
    epx_error(comm, epxRemoteError, "%s%s (call %llu): rank %d rejected its arguments", when, op,
              seq, peer);
  else
    epx_error(comm, (epxResult_t)code, "%s%s (call %llu) failed on the device (code %d)", when, op,
              seq, code);
  if (fatal) {
    epx_set_async_error(comm, (epxResult_t)code);
    live_mark_failed(cc, code, peer, r->why);
  } else {
    r->code = 0; /* reported; the next op resets the device-side claim */
  }
  return (epxResult_t)code;
}

/* At the entry of every op: an error left by an earlier stream-ordered call. */
static epxResult_t check_earlier(epxComm_t comm) {
  EpxCudaComm *cc = cc_of(comm);
  drain_soft_waits(cc);
  if (cc->host->rec.code == 0) return epxSuccess;
  epxResult_t res = report_record(comm, "an earlier call: ");
  /* Whatever it was, the ranks may now disagree about what ran: fail for good. */
  epx_set_async_error(comm, res);
  return res;
}

/* ---- lifecycle ---- */

/* After the exchange: maps the segment (ranks other than 0), records every
 * peer's process for the watcher, and gives the device its view of the words:
 * the segment registered with CUDA, or else process-local mapped words that
 * the watcher fills. Every failure here only narrows what is detected (INFO). */
static void live_attach(epxComm_t comm, EpxCudaComm *cc, const EpxCudaPeerInfo *all) {
  const int R = comm->nranks, me = comm->rank;
  char why[256] = "rank 0 could not create it";
  if (me != 0 && (!all[0].live_segment ||
                  epx_live_seg_open(cc->live, comm->uid, why, sizeof why) != 0))
    EPX_INFO(me, "CUDA backend: no liveness segment (%s); a dead peer is seen through this rank's "
             "watcher only, and its abort or destroy at the timeout", why);
  for (int r = 0; r < R; ++r) {
    int other_process = r != me && all[r].pid != all[me].pid;
    int watch = other_process && epx_proc_visible((pid_t)all[r].pid, all[r].start_time);
    if (other_process && !watch)
      EPX_INFO(me, "CUDA backend: rank %d (pid %d) is not visible in /proc here; its death will "
               "be seen only through its liveness word or the timeout", r, all[r].pid);
    epx_live_set_peer(cc->live, r, (pid_t)all[r].pid, all[r].start_time, watch);
  }
  size_t bytes = 0, off = 0;
  void *seg = epx_live_seg_mapping(cc->live, &bytes, &off);
  if (seg) {
    void *dev = NULL;
    cudaError_t e = cudaHostRegister(seg, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
    if (e == cudaSuccess) {
      e = cudaHostGetDevicePointer(&dev, seg, 0);
      if (e == cudaSuccess) {
        cc->live_registered = seg;
        cc->live_dev = (const unsigned int *)((char *)dev + off);
        EPX_INFO(me, "CUDA backend: liveness segment mapped for the device (%zu bytes)", bytes);
        return;
      }
      cudaHostUnregister(seg);
    }
    (void)cudaGetLastError();
    EPX_INFO(me, "CUDA backend: the liveness segment cannot be mapped for the device (%s); "
             "kernels read process-local words the watcher copies from it",
             cudaGetErrorString(e));
  }
  epxLiveSlot *mirror = NULL;
  void *dev = NULL;
  size_t mb = epx_live_slots_bytes(R);
  cudaError_t e = cudaHostAlloc((void **)&mirror, mb, cudaHostAllocMapped);
  if (e == cudaSuccess) {
    memset((void *)mirror, 0, mb);
    e = cudaHostGetDevicePointer(&dev, mirror, 0);
    if (e != cudaSuccess) {
      cudaFreeHost(mirror);
      mirror = NULL;
    }
  }
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    EPX_INFO(me, "CUDA backend: no mapped memory for the liveness words (%s): dead peers are "
             "seen only at the timeout", cudaGetErrorString(e));
    return;
  }
  cc->live_mirror = mirror;
  cc->live_dev = (const unsigned int *)dev;
  epx_live_set_mirror(cc->live, mirror);
  EPX_INFO(me, "CUDA backend: liveness words are process-local (filled by the watcher)");
}

/* Starts the watcher (EPX_LIVENESS_INTERVAL_MS; 0 = none). */
static void live_start(epxComm_t comm, EpxCudaComm *cc) {
  int ms = (int)epx_param_int(EPX_PARAM_LIVENESS_INTERVAL_MS);
  if (ms <= 0) {
    EPX_INFO(comm->rank, "CUDA backend: EPX_LIVENESS_INTERVAL_MS=0: no watcher; a killed peer is "
             "seen only at the timeout");
    return;
  }
  int err = epx_live_start(cc->live, ms, live_tick, cc);
  if (err != 0)
    EPX_INFO(comm->rank, "CUDA backend: cannot start the liveness watcher (%s); a killed peer is "
             "seen only at the timeout", strerror(err));
}

/* EPX_CUDA_CHUNK_TOKENS (at least 16), or by default 512 tokens at 2 ranks
 * and 256 above. 4xH200, 32 SMs, T=4096: at EP4 256 beat 512 (combine 621 vs
 * 653 us, FP8 dispatch 309 vs 333), at EP2 512 beat 256 (dispatch 219 vs 231,
 * FP8 149 vs 173); 128 was slower everywhere (a fence per block and chunk). */
static int chunk_tokens_param(int nranks) {
  int64_t v = epx_param_int(EPX_PARAM_CUDA_CHUNK_TOKENS);
  if (v <= 0) return nranks <= 2 ? 512 : 256;
  return v < 16 ? 16 : v > (1 << 20) ? (1 << 20) : (int)v;
}

/* EPX_CUDA_COMBINE_CHUNK_TOKENS (at least 16), or by default 256. A chunk
 * of its own: its best size differs from the dispatch's. 4xH200, EP4, 32 SMs,
 * one sitting each: with the chunk bounds found ahead (490ae11) 548 us at
 * 256-token chunks, 563 at 512, 608 at 1024; with the last-warp release and
 * the four-rank reduce (7b847dd) 530 at 256, 540 at 512, 889 at 128 (the
 * reduce warps then take one token per chunk, ~28 us each, half of them idle). */
static int combine_chunk_tokens_param(void) {
  int64_t v = epx_param_int(EPX_PARAM_CUDA_COMBINE_CHUNK_TOKENS);
  if (v <= 0) return 256;
  return v < 16 ? 16 : v > (1 << 20) ? (1 << 20) : (int)v;
}

static void cuda_size_hints(const epxConfig_t *config, int nranks, epxSizeHints_t *hints) {
  int El = config->num_experts / nranks;
  EpxRegionLayout lay = epx_cuda_region_layout(nranks, config->max_tokens_per_rank, config->hidden,
                                               config->max_topk, El, chunk_tokens_param(nranks),
                                               combine_chunk_tokens_param());
  size_t T = (size_t)config->max_tokens_per_rank, R = (size_t)nranks;
  int rpn = config->ranks_per_node > 0 ? config->ranks_per_node : nranks;
  hints->comm_buffer_bytes =
      lay.total + sizeof(int) * T * R /* count-exchange scratch */ +
      sizeof(int) * epx_cuda_layout_scratch_ints(config->num_experts, nranks, rpn);
  size_t llT = (size_t)config->ll_max_tokens_per_rank;
  hints->ll_buffer_bytes =
      llT ? epx_cuda_ll_layout(nranks, (int)llT, config->hidden, config->max_topk, El).total : 0;
  hints->handle_bytes = T * R /* is_token_in_rank */ + 4 * T * R /* send_row */ +
                        4 * R * R + 4 * R * T /* recv_src_idx */ + 4 * (size_t)El +
                        12 * (size_t)El * R * llT /* LL row tables */ +
                        4 * (size_t)El + 8 * (size_t)El * R + 8 /* LL counts, ranges, op */ +
                        10 * 256;
}

static void release(epxComm_t comm) {
  EpxCudaComm *cc = cc_of(comm);
  if (!cc) return;
  live_comms_remove(cc);
  /* Peers still waiting for this rank stop at once, naming the destroy. */
  if (cc->live) epx_live_mark(cc->live, cc->rank, EPX_PEER_DESTROYED, -1, 0);
  if (cc->host) cc->host->abort = 1; /* in-flight waits of this rank return */
  cudaSetDevice(cc->device);
  /* cudaFree waits for this device's in-flight kernels; with the abort flag
   * set, none of them is waiting on a peer. */
  cudaDeviceSynchronize();
  /* No kernel reads the words any more; the watcher (which reads cc->host)
   * stops before anything it uses is freed. */
  if (cc->live_registered) cudaHostUnregister(cc->live_registered);
  epx_live_free(cc->live);
  cc->live = NULL;
  if (cc->host) drain_soft_waits(cc); /* the watcher has stopped; nothing writes the ring now */
  if (cc->live_mirror) cudaFreeHost(cc->live_mirror);
  free(cc->pids);
  if (cc->peer_host) {
    for (int r = 0; r < comm->nranks; ++r)
      if (cc->peer_ipc && cc->peer_ipc[r]) cudaIpcCloseMemHandle(cc->peer_host[r]);
  }
  free(cc->peer_host);
  free(cc->peer_ipc);
  if (cc->peers_dev) cudaFree(cc->peers_dev);
  if (cc->state) cudaFree(cc->state);
  if (cc->scratch_pos) cudaFree(cc->scratch_pos);
  if (cc->layout_scratch) cudaFree(cc->layout_scratch);
  if (cc->region) cudaFree(cc->region);
  if (cc->ll_peer_host) {
    for (int r = 0; r < comm->nranks; ++r)
      if (cc->ll_peer_ipc && cc->ll_peer_ipc[r]) cudaIpcCloseMemHandle(cc->ll_peer_host[r]);
  }
  free(cc->ll_peer_host);
  free(cc->ll_peer_ipc);
  if (cc->ll_peers_dev) cudaFree(cc->ll_peers_dev);
  if (cc->ll_region) cudaFree(cc->ll_region);
  if (comm->ll_combine_buffer) cudaFree(comm->ll_combine_buffer);
  comm->ll_combine_buffer = NULL;
  if (cc->host) cudaFreeHost(cc->host);
  if (cc->comm_stream) cudaStreamDestroy(cc->comm_stream);
  pthread_mutex_destroy(&cc->soft_lock);
  free(cc);
  comm->backend = NULL;
}

/* Loads every kernel of the backend on the current device (see
 * epx_cuda_preload_hello in cuda_common.cuh): after this, no launch of an op
 * loads code, so none waits for a running kernel (and so for a peer). */
static cudaError_t epx_cuda_preload_kernels(void) {
  cudaError_t (*const preload[])(void) = {
      epx_cuda_preload_hello,           epx_cuda_preload_dispatch,
      epx_cuda_preload_combine,         epx_cuda_preload_layout,
      epx_cuda_preload_ll_dispatch_send, epx_cuda_preload_ll_dispatch_recv,
      epx_cuda_preload_ll_combine_send,  epx_cuda_preload_ll_combine_recv};
  for (size_t i = 0; i < sizeof preload / sizeof preload[0]; ++i) {
    cudaError_t e = preload[i]();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

static epxResult_t cuda_init(epxComm_t comm, struct epxBootstrap *boot) {
  epxResult_t res = epxSuccess;
  const int R = comm->nranks, me = comm->rank;
  char err[EPX_ERROR_MSG_BYTES] = "";
  EpxCudaPeerInfo *all = NULL;
  EpxCudaComm *cc = (EpxCudaComm *)calloc(1, sizeof *cc);
  if (!cc) return epx_error(comm, epxOutOfMemory, "cannot allocate the CUDA backend state");
  comm->backend = cc;
  cc->rank = me;
  cc->owner_pid = getpid();
  pthread_mutex_init(&cc->soft_lock, NULL);
  cc->comm = comm;

  if (R > EPX_CUDA_MAX_RANKS) {
    res = epx_error(comm, epxNotSupported, "the CUDA backend serves at most %d ranks (got %d)",
                    EPX_CUDA_MAX_RANKS, R);
    goto fail;
  }
  {
    int count = 0;
    EPX_CUDA_TRY(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (comm->config.cuda_device >= 0) {
      if (comm->config.cuda_device >= count) {
        res = epx_error(comm, epxInvalidArgument, "config.cuda_device is %d but %d devices are visible",
                        comm->config.cuda_device, count);
        goto fail;
      }
      cc->device = comm->config.cuda_device;
    } else {
      EPX_CUDA_TRY(cudaGetDevice(&cc->device), "cudaGetDevice");
    }
    EPX_CUDA_TRY(cudaSetDevice(cc->device), "cudaSetDevice");
    /* Before any kernel of this communicator can wait for a peer. */
    EPX_CUDA_TRY(epx_cuda_preload_kernels(), "loading the kernels (cudaFuncGetAttributes)");
    cudaDeviceProp prop;
    EPX_CUDA_TRY(cudaGetDeviceProperties(&prop, cc->device), "cudaGetDeviceProperties");
    size_t smem = epx_cuda_hello_smem_bytes(R, comm->config.num_experts);
    if (smem > prop.sharedMemPerBlockOptin) {
      res = epx_error(comm, epxNotSupported,
                      "the count exchange needs %zu bytes of shared memory for %d ranks and %d "
                      "experts; the device allows %zu",
                      smem, R, comm->config.num_experts, (size_t)prop.sharedMemPerBlockOptin);
      goto fail;
    }
    cc->blocks = comm->config.num_sms > 0 ? comm->config.num_sms : EPX_CUDA_DEFAULT_BLOCKS;
    if (cc->blocks > prop.multiProcessorCount) cc->blocks = prop.multiProcessorCount;
    if (cc->blocks > EPX_CUDA_MAX_BLOCKS) cc->blocks = EPX_CUDA_MAX_BLOCKS;
    /* One launch holds send and consume blocks: at least one of each. */
    if (cc->blocks < 2) cc->blocks = 2;
    {
      int64_t share = epx_param_int(EPX_PARAM_CUDA_SEND_SHARE);
      if (share < 1 || share > 99) {
        EPX_WARN(me, "EPX_CUDA_SEND_SHARE=%lld is not in [1, 99]: using 50", (long long)share);
        share = 50;
      }
      cc->send_blocks = (int)(cc->blocks * share / 100);
      if (cc->send_blocks < 1) cc->send_blocks = 1;
      if (cc->send_blocks > cc->blocks - 1) cc->send_blocks = cc->blocks - 1;
    }
    cc->send_order = (int)epx_param_int(EPX_PARAM_CUDA_SEND_ORDER);
    if (cc->send_order < EPX_SEND_ORDER_FIRST || cc->send_order > EPX_SEND_ORDER_SPREAD) {
      EPX_WARN(me, "EPX_CUDA_SEND_ORDER=%d is not 0, 1 or 2: using 0", cc->send_order);
      cc->send_order = EPX_SEND_ORDER_FIRST;
    }
    cc->dynamic = epx_param_int(EPX_PARAM_CUDA_DYNAMIC) != 0;
    cc->chunk_tokens = chunk_tokens_param(R);
    cc->combine_chunk_tokens = combine_chunk_tokens_param();
    cc->ll_pieces = (int)epx_param_int(EPX_PARAM_CUDA_LL_PIECES);
    if (cc->ll_pieces < 1 || cc->ll_pieces > EPX_LL_COMBINE_PIECES) {
      EPX_WARN(me, "EPX_CUDA_LL_PIECES=%d is not in [1, %d]: using 1", cc->ll_pieces,
               EPX_LL_COMBINE_PIECES);
      cc->ll_pieces = 1;
    }
    cc->bulk = (int)epx_param_int(EPX_PARAM_CUDA_BULK);
    /* LL kernels are latency-bound: spread them over every SM. */
    cc->ll_blocks = prop.multiProcessorCount;
    /* 1: a send kernel, then a receive kernel; 2 (default): send and receive
     * fused into one cooperative launch when there is no hook, send blocks
     * and receive blocks side by side (ll_fused_blocks). 2xH200, EP2, T=128,
     * BF16 dispatch/combine, when each block sent then received: 1 =
     * 31.9/50.0 us, 2 = 29.9/50.0 us. (0, one warp per message with no
     * batched loads, was 58/57 us before it was dropped.) Variant 2 was 10x
     * slower until the device waits stopped reading host memory every 64
     * polls: those PCIe reads queued in front of the system fences of the
     * blocks still sending. */
    cc->ll_variant = (int)epx_param_int(EPX_PARAM_CUDA_LL_VARIANT);
    cc->trace = epx_param_int(EPX_PARAM_CUDA_TRACE) != 0;
    cc->pdl = epx_param_int(EPX_PARAM_CUDA_PDL) != 0;
    if (cc->ll_variant < 1 || cc->ll_variant > 2) {
      EPX_WARN(me, "EPX_CUDA_LL_VARIANT=%d is not 1 or 2: using 2", cc->ll_variant);
      cc->ll_variant = 2;
    }
    if (comm->config.ll_max_tokens_per_rank > 0) {
      /* The send kernel keeps E x ceil(T/32) bitmask words in shared memory;
       * 8 KB stay for its static shared memory. */
      size_t mask = epx_cuda_ll_mask_bytes(comm->config.num_experts,
                                           comm->config.ll_max_tokens_per_rank);
      if (mask + 8192 > prop.sharedMemPerBlockOptin)
        cc->ll_off_reason = "num_experts x ll_max_tokens_per_rank is too large for the send "
                            "kernel's shared-memory bitmasks";
      else if ((size_t)comm->num_local_experts * (size_t)R * 4 + 8192 > prop.sharedMemPerBlockOptin)
        cc->ll_off_reason = "num_experts is too large for the receive kernel's shared memory";
      else
        cc->ll_enabled = 1;
      /* The fused grid: a send block and a receive block on every SM when
       * two fit (all resident: a cooperative launch), else one per SM split
       * in halves. */
      if (cc->ll_enabled) {
        size_t rsmem = (size_t)comm->num_local_experts * (size_t)R * 4;
        int per_sm = 0;
        EPX_CUDA_TRY(epx_cuda_ll_fused_blocks_per_sm(mask > rsmem ? mask : rsmem,
                                                     sizeof(int) * ((size_t)comm->num_local_experts + 1),
                                                     &per_sm),
                     "sizing the fused low-latency kernels (occupancy)");
        cc->ll_fused_blocks = (per_sm >= 2 ? 2 : 1) * cc->ll_blocks;
        if (cc->ll_fused_blocks < 2) cc->ll_fused_blocks = 2;
      }
    } else {
      cc->ll_off_reason = "config.ll_max_tokens_per_rank is 0";
    }
  }
  EPX_CUDA_TRY(cudaStreamCreateWithFlags(&cc->comm_stream, cudaStreamNonBlocking), "cudaStreamCreate");

  cc->lay = epx_cuda_region_layout(R, comm->config.max_tokens_per_rank, comm->config.hidden,
                                   comm->config.max_topk, comm->num_local_experts, cc->chunk_tokens,
                                   cc->combine_chunk_tokens);
  EPX_CUDA_TRY(cudaMalloc((void **)&cc->region, cc->lay.total), "cudaMalloc (region)");
  /* Hello and progress words start at epoch 0 < every epoch a peer waits for. */
  EPX_CUDA_TRY(cudaMemsetAsync(cc->region, 0, cc->lay.total, cc->comm_stream), "cudaMemsetAsync");
  EPX_CUDA_TRY(cudaMalloc((void **)&cc->scratch_pos,
                          sizeof(int) * (size_t)R * (size_t)comm->config.max_tokens_per_rank),
               "cudaMalloc (scratch)");
  {
    size_t ints = epx_cuda_layout_scratch_ints(comm->config.num_experts, R, comm->ranks_per_node);
    if (ints) {
      EPX_CUDA_TRY(cudaMalloc((void **)&cc->layout_scratch, sizeof(int) * ints),
                   "cudaMalloc (layout scratch)");
      /* the layout kernel's accumulator starts at zero, and each call leaves it so */
      EPX_CUDA_TRY(cudaMemset(cc->layout_scratch, 0, sizeof(int) * ints), "cudaMemset (layout scratch)");
    }
  }
  EPX_CUDA_TRY(cudaMalloc((void **)&cc->state, sizeof(EpxCudaState)), "cudaMalloc (state)");
  if (cc->ll_enabled) {
    cc->ll_lay = epx_cuda_ll_layout(R, comm->config.ll_max_tokens_per_rank, comm->config.hidden,
                                    comm->config.max_topk, comm->num_local_experts);
    EPX_CUDA_TRY(cudaMalloc((void **)&cc->ll_region, cc->ll_lay.total), "cudaMalloc (LL region)");
    /* Signal and ack words start at op 0 < every op a peer waits for. */
    EPX_CUDA_TRY(cudaMemsetAsync(cc->ll_region, 0, cc->ll_lay.total, cc->comm_stream),
                 "cudaMemsetAsync (LL region)");
  }
  EPX_CUDA_TRY(cudaMemsetAsync(cc->state, 0, sizeof(EpxCudaState), cc->comm_stream), "cudaMemsetAsync");
  EPX_CUDA_TRY(cudaStreamSynchronize(cc->comm_stream), "cudaStreamSynchronize");
  {
    size_t host_bytes = sizeof(EpxHostShared) + sizeof(int) * (size_t)comm->num_local_experts;
    EPX_CUDA_TRY(cudaHostAlloc((void **)&cc->host, host_bytes, cudaHostAllocMapped),
                 "cudaHostAlloc (error record)");
    memset((void *)cc->host, 0, host_bytes);
    EPX_CUDA_TRY(cudaHostGetDevicePointer((void **)&cc->host_dev, cc->host, 0),
                 "cudaHostGetDevicePointer");
  }

  /* The liveness segment: rank 0 creates it now, the others open it once the
   * exchange below says it exists. Its absence is not an error. */
  if (R > 1) {
    cc->live = epx_live_new(me, R);
    if (cc->live && me == 0) {
      char why[256] = "";
      if (epx_live_seg_create(cc->live, comm->uid, why, sizeof why) != 0)
        EPX_INFO(me, "CUDA backend: no liveness segment (%s); a dead peer is seen through this "
                 "rank's watcher only, and its abort or destroy at the timeout", why);
    }
  }

  /* Exchange the regions. */
  {
    EpxCudaPeerInfo mine;
    memset(&mine, 0, sizeof mine);
    EPX_CUDA_TRY(cudaIpcGetMemHandle(&mine.ipc, cc->region), "cudaIpcGetMemHandle");
    mine.region_bytes = cc->lay.total;
    mine.region_ptr = (unsigned long long)(uintptr_t)cc->region;
    mine.pid = (int)getpid();
    mine.device = cc->device;
    uint64_t start_time = 0;
    epx_proc_stat(0, &start_time, NULL);
    mine.start_time = start_time;
    mine.blocks = cc->blocks;
    mine.send_blocks = cc->send_blocks;
    mine.chunk_tokens = cc->chunk_tokens;
    mine.combine_chunk_tokens = cc->combine_chunk_tokens;
    mine.ll_pieces = cc->ll_pieces;
    if (me == 0 && cc->live) {
      size_t b = 0, o = 0;
      mine.live_segment = epx_live_seg_mapping(cc->live, &b, &o) != NULL;
    }
    if (cc->ll_enabled) {
      EPX_CUDA_TRY(cudaIpcGetMemHandle(&mine.ll_ipc, cc->ll_region), "cudaIpcGetMemHandle (LL)");
      mine.ll_bytes = cc->ll_lay.total;
      mine.ll_ptr = (unsigned long long)(uintptr_t)cc->ll_region;
    }
    all = (EpxCudaPeerInfo *)calloc((size_t)R, sizeof *all);
    cc->peer_host = (char **)calloc((size_t)R, sizeof(char *));
    cc->peer_ipc = (unsigned char *)calloc((size_t)R, 1);
    cc->ll_peer_host = (char **)calloc((size_t)R, sizeof(char *));
    cc->ll_peer_ipc = (unsigned char *)calloc((size_t)R, 1);
    if (!all || !cc->peer_host || !cc->peer_ipc || !cc->ll_peer_host || !cc->ll_peer_ipc) {
      res = epx_error(comm, epxOutOfMemory, "cannot allocate the peer table");
      goto fail;
    }
    res = epx_bootstrap_allgather(boot, &mine, all, sizeof mine, err, sizeof err);
    if (res != epxSuccess) {
      epx_error(comm, res, "exchanging CUDA IPC handles: %s", err);
      goto fail;
    }
    cc->pids = (int *)calloc((size_t)R, sizeof(int));
    if (!cc->pids) {
      res = epx_error(comm, epxOutOfMemory, "cannot allocate the peer table");
      goto fail;
    }
    for (int r = 0; r < R; ++r) cc->pids[r] = all[r].pid;
    if (cc->live) live_attach(comm, cc, all);
    for (int r = 0; r < R; ++r) {
      if (all[r].region_bytes != mine.region_bytes || all[r].ll_bytes != mine.ll_bytes) {
        res = epx_error(comm, epxMismatch,
                        "rank %d's regions have %llu + %llu bytes, this rank's %llu + %llu", r,
                        all[r].region_bytes, all[r].ll_bytes, mine.region_bytes, mine.ll_bytes);
        goto fail;
      }
      if (all[r].blocks != mine.blocks || all[r].send_blocks != mine.send_blocks ||
          all[r].chunk_tokens != mine.chunk_tokens ||
          all[r].combine_chunk_tokens != mine.combine_chunk_tokens) {
        res = epx_error(comm, epxMismatch,
                        "rank %d runs %d data blocks (%d sending) with %d/%d-token chunks, this rank "
                        "%d (%d) with %d/%d: set config.num_sms, EPX_CUDA_SEND_SHARE, "
                        "EPX_CUDA_CHUNK_TOKENS and EPX_CUDA_COMBINE_CHUNK_TOKENS alike on every rank",
                        r, all[r].blocks, all[r].send_blocks, all[r].chunk_tokens,
                        all[r].combine_chunk_tokens, mine.blocks, mine.send_blocks, mine.chunk_tokens,
                        mine.combine_chunk_tokens);
        goto fail;
      }
      if (all[r].ll_pieces != mine.ll_pieces) {
        res = epx_error(comm, epxMismatch,
                        "rank %d sends low-latency combine rows in %d pieces, this rank in %d: "
                        "set EPX_CUDA_LL_PIECES alike on every rank",
                        r, all[r].ll_pieces, mine.ll_pieces);
        goto fail;
      }
      if (r == me) {
        cc->peer_host[r] = cc->region;
      } else if (all[r].pid == mine.pid) {
        /* Same process (ranks as threads): IPC cannot open our own handles;
         * the pointer is valid here, given peer access between the devices. */
        if (all[r].device != cc->device) {
          cudaError_t e = cudaDeviceEnablePeerAccess(all[r].device, 0);
          if (e == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError();
          else EPX_CUDA_TRY(e, "cudaDeviceEnablePeerAccess");
        }
        cc->peer_host[r] = (char *)(uintptr_t)all[r].region_ptr;
      } else {
        void *p = NULL;
        cudaError_t e = cudaIpcOpenMemHandle(&p, all[r].ipc, cudaIpcMemLazyEnablePeerAccess);
        if (e != cudaSuccess) {
          res = epx_error(comm, epxCudaError,
                          "cudaIpcOpenMemHandle of rank %d's region (pid %d, device %d) failed: %s; "
                          "are the GPUs in one NVLink/P2P domain?",
                          r, all[r].pid, all[r].device, cudaGetErrorString(e));
          goto fail;
        }
        cc->peer_host[r] = (char *)p;
        cc->peer_ipc[r] = 1;
      }
      if (!cc->ll_enabled) continue;
      if (r == me) {
        cc->ll_peer_host[r] = cc->ll_region;
      } else if (all[r].pid == mine.pid) {
        cc->ll_peer_host[r] = (char *)(uintptr_t)all[r].ll_ptr; /* peer access enabled above */
      } else {
        void *p = NULL;
        cudaError_t e = cudaIpcOpenMemHandle(&p, all[r].ll_ipc, cudaIpcMemLazyEnablePeerAccess);
        if (e != cudaSuccess) {
          res = epx_error(comm, epxCudaError,
                          "cudaIpcOpenMemHandle of rank %d's low-latency region failed: %s", r,
                          cudaGetErrorString(e));
          goto fail;
        }
        cc->ll_peer_host[r] = (char *)p;
        cc->ll_peer_ipc[r] = 1;
      }
    }
    if (cc->ll_enabled) {
      EPX_CUDA_TRY(cudaMalloc((void **)&cc->ll_peers_dev, sizeof(char *) * (size_t)R),
                   "cudaMalloc (LL peers)");
      EPX_CUDA_TRY(cudaMemcpy(cc->ll_peers_dev, cc->ll_peer_host, sizeof(char *) * (size_t)R,
                              cudaMemcpyHostToDevice),
                   "cudaMemcpy (LL peers)");
    }
    EPX_CUDA_TRY(cudaMalloc((void **)&cc->peers_dev, sizeof(char *) * (size_t)R), "cudaMalloc (peers)");
    EPX_CUDA_TRY(cudaMemcpy(cc->peers_dev, cc->peer_host, sizeof(char *) * (size_t)R,
                            cudaMemcpyHostToDevice),
                 "cudaMemcpy (peers)");
  }
  if (R > 1) {
    /* Every rank has mapped the liveness segment (or given up): drop its name,
     * so nothing is left in /dev/shm whatever happens to the processes. */
    res = epx_bootstrap_barrier(boot, err, sizeof err);
    if (res != epxSuccess) {
      epx_error(comm, res, "barrier after mapping the liveness segment: %s", err);
      goto fail;
    }
    if (cc->live) {
      epx_live_seg_unlink(cc->live);
      live_start(comm, cc);
    }
  }
  live_comms_add(cc);
  free(all);
  comm->normal_sms = cc->blocks;
  comm->ll_sms = cc->ll_enabled ? cc->ll_blocks : 0;
  EPX_INFO(me,
           "CUDA backend on device %d: region %zu bytes, %d blocks per data kernel", cc->device,
           cc->lay.total, cc->blocks);
  return epxSuccess;

fail:
  free(all);
  release(comm);
  return res;
}

/* EPX_CUDA_TRACE_FILE: the per-op samples of the last EPX_TRACE_RING fused LL
 * ops of each kind, as CSV in <prefix>.rank<r>.csv: kind, op, send start,
 * then each point, absolute %globaltimer ns (0: not recorded; a value far
 * from the start is a stale one of an op EPX_TRACE_RING earlier). */
static void write_trace_samples(epxComm_t comm, const EpxCudaState *st) {
  static const char *const points[EPX_TRACE_POINTS] = {
      "prep", "slot_free", "headers_posted", "block0_sent", "blockN_sent", "last_block_sent",
      "last_send_block_started", "recv_start", "headers_in", "block0_placed", "acks_posted"};
  const char *prefix = epx_param_str(EPX_PARAM_CUDA_TRACE_FILE);
  if (!prefix || !*prefix) return;
  EpxCudaComm *cc = cc_of(comm);
  char path[4096];
  snprintf(path, sizeof path, "%s.rank%d.csv", prefix, comm->rank);
  FILE *f = fopen(path, "w");
  if (!f) {
    EPX_WARN(comm->rank, "EPX_CUDA_TRACE_FILE: cannot write %s", path);
    return;
  }
  fprintf(f, "kind,op,start");
  for (int pt = 0; pt < EPX_TRACE_POINTS; ++pt) fprintf(f, ",%s", points[pt]);
  fprintf(f, "\n");
  static const char *const kinds[2] = {"ll_dispatch_fused", "ll_combine_fused"};
  for (int k = 0; k < 2; ++k) {
    const unsigned int n = cc->trace_fused_ops[k];
    for (unsigned int op = n > EPX_TRACE_RING ? n - EPX_TRACE_RING : 0; op < n; ++op) {
      const unsigned long long *row = st->trace_ring[k][op % EPX_TRACE_RING];
      fprintf(f, "%s,%u", kinds[k], op);
      for (int col = 0; col <= EPX_TRACE_POINTS; ++col) fprintf(f, ",%llu", row[col]);
      fprintf(f, "\n");
    }
  }
  fclose(f);
}

/* One role's blocks of a normal op: the mean finish time of the earliest,
 * median and latest block, with the block and SM of the extremes. */
static void print_trace_role(const EpxCudaState *st, int k, int blocks, unsigned long long nops,
                             int send, char *line, size_t cap) {
  double t[EPX_CUDA_MAX_BLOCKS];
  int b_of[EPX_CUDA_MAX_BLOCKS], n = 0;
  for (int b = 0; b < blocks && b < EPX_CUDA_MAX_BLOCKS; ++b) {
    if ((int)(st->trace_block_sm[k][b] >> 31) != send) continue;
    t[n] = (double)st->trace_block_sum[k][b] / (double)nops / 1000.0;
    b_of[n++] = b;
  }
  if (n == 0) return;
  /* insertion sort by time (at most a few hundred blocks, once at destroy) */
  for (int i = 1; i < n; ++i)
    for (int j = i; j > 0 && t[j] < t[j - 1]; --j) {
      double tt = t[j];
      t[j] = t[j - 1];
      t[j - 1] = tt;
      int bb = b_of[j];
      b_of[j] = b_of[j - 1];
      b_of[j - 1] = bb;
    }
  size_t len = strlen(line);
  snprintf(line + len, cap - len, " %s blocks: first %.1f (block %d, SM %u), median %.1f, last %.1f (block %d, SM %u);",
           send ? "send" : "consume", t[0], b_of[0], st->trace_block_sm[k][b_of[0]] & 0x7fffffffu,
           t[n / 2], t[n - 1], b_of[n - 1], st->trace_block_sm[k][b_of[n - 1]] & 0x7fffffffu);
}

/* EPX_CUDA_TRACE: per-block finish times of the normal ops (trace_block_*). */
static void print_trace_blocks(epxComm_t comm, const EpxCudaState *st) {
  EpxCudaComm *cc = cc_of(comm);
  static const int kinds[2] = {EPX_TRACE_DISPATCH, EPX_TRACE_COMBINE};
  static const char *const names[2] = {"dispatch", "combine"};
  for (int k = 0; k < 2; ++k) {
    const unsigned long long nops = st->trace_n[kinds[k]];
    if (!nops) continue;
    char line[512];
    snprintf(line, sizeof line, "epx trace rank %d: %s, mean us from send start, per block:", comm->rank,
             names[k]);
    print_trace_role(st, k, cc->blocks, nops, 1, line, sizeof line);
    print_trace_role(st, k, cc->blocks, nops, 0, line, sizeof line);
    fprintf(stderr, "%s\n", line);
  }
}

/* EPX_CUDA_TRACE: the mean time from the start of each LL op's send kernel to
 * each point (cuda_common.cuh), per kind, on this rank. Reads the device state
 * only when the stream work is done and nothing failed. */
static void print_trace(epxComm_t comm) {
  static const char *const kind_names[EPX_TRACE_KINDS] = {
      "LL dispatch", "LL combine", "dispatch", "combine", "LL dispatch (fused)", "LL combine (fused)"};
  static const char *const ll_points[EPX_TRACE_POINTS] = {
      "prep", "slot free", "headers posted", "block 0 sent", "block N sent", "last block sent",
      "last send block started", "recv start", "| from recv start: headers in", "block 0 placed",
      "acks posted"};
  static const char *const normal_points[EPX_TRACE_POINTS] = {
      "hello done", "data start", NULL, "send block 0 done", "send block N done",
      "last send block done", NULL, "consume start", "| from consume start: first chunk in",
      "consume block 0 done", "last consume block done"};
  EpxCudaComm *cc = cc_of(comm);
  if (!cc || !cc->trace || !cc->state || atomic_load(&comm->async_error) != epxSuccess) return;
  EpxCudaState st;
  if (cudaStreamSynchronize(cc->comm_stream) != cudaSuccess ||
      cudaMemcpy(&st, cc->state, sizeof st, cudaMemcpyDeviceToHost) != cudaSuccess)
    return;
  for (int k = 0; k < EPX_TRACE_KINDS; ++k) {
    if (!st.trace_n[k]) continue;
    char line[512];
    int len = snprintf(line, sizeof line, "epx trace rank %d: %s, %llu ops, mean us from send start:",
                       comm->rank, kind_names[k], st.trace_n[k]);
    const char *const *names = k == EPX_TRACE_DISPATCH || k == EPX_TRACE_COMBINE ? normal_points : ll_points;
    for (int pt = 0; pt < EPX_TRACE_POINTS && len > 0 && (size_t)len < sizeof line; ++pt) {
      if (!names[pt]) continue;
      len += snprintf(line + len, sizeof line - (size_t)len, " %s %.1f;", names[pt],
                      (double)st.trace_sum[k][pt] / (double)st.trace_n[k] / 1000.0);
    }
    fprintf(stderr, "%s\n", line);
  }
  print_trace_blocks(comm, &st);
  write_trace_samples(comm, &st);
}

static void cuda_destroy(epxComm_t comm) {
  print_trace(comm);
  release(comm);
}

static void cuda_abort(epxComm_t comm) {
  EpxCudaComm *cc = cc_of(comm);
  if (cc && cc->host) cc->host->abort = 1; /* read by every device wait (volatile) */
  /* Peers' waits on this rank read this word. */
  if (cc && cc->live) epx_live_mark(cc->live, cc->rank, EPX_PEER_ABORTED, -1, epxAborted);
}

/* ---- handles ---- */

static epxResult_t cuda_handle_alloc(epxComm_t comm, epxHandle_t h) {
  EpxCudaComm *cc = cc_of(comm);
  size_t T = (size_t)comm->config.max_tokens_per_rank, R = (size_t)comm->nranks;
  size_t El = (size_t)comm->num_local_experts;
  size_t llrows = El * R * (size_t)comm->config.ll_max_tokens_per_rank;
  size_t off_itr = 0;
  size_t off_send = epx_cuda_align(off_itr + T * R, 256);
  size_t off_mat = epx_cuda_align(off_send + 4 * T * R, 256);
  size_t off_src = epx_cuda_align(off_mat + 4 * R * R, 256);
  size_t off_exp = epx_cuda_align(off_src + 4 * R * T, 256);
  size_t off_ll_rank = epx_cuda_align(off_exp + 4 * El, 256);
  size_t off_ll_tok = epx_cuda_align(off_ll_rank + 4 * llrows, 256);
  size_t off_ll_kmask = epx_cuda_align(off_ll_tok + 4 * llrows, 256);
  size_t off_ll_count = epx_cuda_align(off_ll_kmask + 4 * llrows, 256);
  size_t off_ll_range = epx_cuda_align(off_ll_count + 4 * El, 256);
  size_t off_ll_epoch = epx_cuda_align(off_ll_range + 8 * El * R, 256);
  size_t total = epx_cuda_align(off_ll_epoch + 8, 256);
  char *base = NULL;
  EpxCudaHandle *hh = (EpxCudaHandle *)calloc(1, sizeof *hh);
  if (!hh) return epx_error(comm, epxOutOfMemory, "cannot allocate the handle state");
  cudaSetDevice(cc->device);
  cudaError_t e = cudaMalloc((void **)&base, total);
  if (e != cudaSuccess) {
    free(hh);
    return cuda_fail(comm, e, "cudaMalloc (handle)");
  }
  /* Op word 0 and empty LL tables: a never-dispatched handle sends nothing. */
  e = cudaMemset(base, 0, total);
  if (e != cudaSuccess) {
    cudaFree(base);
    free(hh);
    return cuda_fail(comm, e, "cudaMemset (handle)");
  }
  hh->dev = base;
  hh->ll_epoch = (unsigned long long *)(base + off_ll_epoch);
  h->backend_private = hh;
  h->is_token_in_rank = (uint8_t *)(base + off_itr);
  h->send_row = (int *)(base + off_send);
  h->rank_prefix_matrix = (int *)(base + off_mat);
  h->recv_src_idx = (int *)(base + off_src);
  h->num_recv_per_expert = (int *)(base + off_exp);
  h->ll_row_src_rank = (int *)(base + off_ll_rank);
  h->ll_row_src_token = (int *)(base + off_ll_tok);
  h->ll_row_kmask = (uint32_t *)(base + off_ll_kmask);
  h->ll_recv_count = (int *)(base + off_ll_count);
  h->ll_layout_range = (int64_t *)(base + off_ll_range);
  return epxSuccess;
}

static void cuda_handle_free(epxComm_t comm, epxHandle_t h) {
  EpxCudaComm *cc = cc_of(comm);
  EpxCudaHandle *hh = (EpxCudaHandle *)h->backend_private;
  if (cc) cudaSetDevice(cc->device);
  if (hh) {
    if (hh->dev) cudaFree(hh->dev);
    free(hh);
  }
  epx_handle_forget_arrays(h);
}

/* ---- ops ---- */

static int hello_flags(const epxCall_t *call, int has_topk, int has_weights) {
  if (call->local_invalid) return EPX_HELLO_INVALID;
  return (has_topk ? EPX_HELLO_HAS_TOPK : 0) | (has_weights ? EPX_HELLO_HAS_WEIGHTS : 0);
}

static epxResult_t cuda_layout(epxComm_t comm, const void *topk_idx, epxDataType_t idx_type,
                               int num_tokens, int num_topk, const epxLayout_t *layout,
                               epxStream_t stream) {
  epxResult_t res = check_earlier(comm);
  if (res != epxSuccess) return res;
  EpxLayoutParams p;
  memset(&p, 0, sizeof p);
  p.ctx = make_ctx(comm);
  p.topk_idx = topk_idx;
  p.topk_is_int64 = idx_type == epxInt64;
  p.num_tokens = num_tokens;
  p.num_topk = num_topk;
  p.num_tokens_per_rank = layout->num_tokens_per_rank;
  p.num_tokens_per_node = layout->num_tokens_per_node;
  p.num_tokens_per_expert = layout->num_tokens_per_expert;
  p.is_token_in_rank = layout->is_token_in_rank;
  p.scratch = cc_of(comm)->layout_scratch;
  cudaError_t e = epx_cuda_launch_layout(&p, (cudaStream_t)stream);
  if (e != cudaSuccess) return cuda_fail(comm, e, "epxGetDispatchLayout: kernel launch");
  return epxSuccess;
}

static EpxHelloParams dispatch_hello(epxComm_t comm, const epxCall_t *call,
                                     const epxDispatchArgs_t *a, epxHandle_t h, int counted) {
  EpxHelloParams p;
  memset(&p, 0, sizeof p);
  p.ctx = make_ctx(comm);
  p.seq = call->seq;
  p.op = call->op;
  if (call->local_invalid) {
    p.flags = EPX_HELLO_INVALID;
    return p;
  }
  p.flags = hello_flags(call, a->topk_idx != NULL, a->topk_weights != NULL);
  p.hidden = a->hidden;
  p.topk = a->num_topk;
  p.x_type = a->x_type;
  p.idx_type = a->topk_idx_type;
  p.scale_format = a->scale_format;
  p.path = counted ? EPX_PATH_COUNTED : EPX_PATH_CACHED;
  p.counted = counted;
  p.topk_idx = a->topk_idx;
  p.topk_is_int64 = a->topk_idx_type == epxInt64;
  p.num_tokens = a->num_tokens;
  p.expert_alignment = a->expert_alignment;
  p.scratch_pos = cc_of(comm)->scratch_pos;
  p.is_token_in_rank = h->is_token_in_rank;
  p.send_row = h->send_row;
  p.rank_prefix_matrix = h->rank_prefix_matrix;
  p.num_recv_per_expert = h->num_recv_per_expert;
  return p;
}

static void fill_handle(epxComm_t comm, const epxCall_t *call, const epxDispatchArgs_t *a,
                        epxHandle_t h, int64_t num_recv) {
  (void)comm;
  h->state = epxHandleNormal;
  h->num_tokens = a->num_tokens;
  h->num_topk = a->num_topk;
  h->hidden = a->hidden;
  h->topk_is_int64 = a->topk_idx_type == epxInt64;
  h->num_recv_tokens = num_recv;
  h->expert_alignment = a->expert_alignment;
  h->filled_seq = call->seq;
}

static epxResult_t dispatch_notify_impl(epxComm_t comm, const epxCall_t *call,
                                        const epxDispatchArgs_t *args, epxHandle_t handle,
                                        int64_t *num_recv_tokens, int *num_recv_tokens_per_expert,
                                        epxStream_t stream) {
  EpxCudaComm *cc = cc_of(comm);
  epxResult_t res = check_earlier(comm);
  if (res != epxSuccess) return res;
  EpxHelloParams p = dispatch_hello(comm, call, args, handle, !call->local_invalid);
  p.write_host = 1;
  cc->host->status = -1;
  cudaError_t e = epx_cuda_launch_hello(&p, (cudaStream_t)stream);
  if (e != cudaSuccess) return cuda_fail(comm, e, "epxDispatchNotify: kernel launch");
  /* Host sync: the caller sizes its outputs from these counts. The kernel's
   * waits are bounded (timeout, abort), so this returns. */
  e = cudaStreamSynchronize((cudaStream_t)stream);
  if (e != cudaSuccess) {
    epx_set_async_error(comm, epxCudaError);
    return cuda_fail(comm, e, "epxDispatchNotify: cudaStreamSynchronize");
  }
  int code = cc->host->rec.code;
  if (code == epxTimeout || code == epxAborted || code == epxPeerFailed)
    return report_record(comm, "");
  if (cc->host->status != 0) {
    /* This rank's own invalid arguments: the core keeps the validation message. */
    if (call->local_invalid) {
      cc->host->rec.code = 0;
      return epxInvalidArgument;
    }
    if (code != 0) return report_record(comm, "");
    return epx_error(comm, epxInternalError, "epxDispatchNotify: the count exchange reported %d",
                     cc->host->status);
  }
  *num_recv_tokens = cc->host->n_recv;
  if (num_recv_tokens_per_expert)
    memcpy(num_recv_tokens_per_expert, (const void *)cc->host->per_expert,
           sizeof(int) * (size_t)comm->num_local_experts);
  fill_handle(comm, call, args, handle, cc->host->n_recv);
  return epxSuccess;
}

/* The notify blocks in a stream synchronisation: the exit handler lets such a
 * call leave before the process goes on exiting (live_at_exit). */
static epxResult_t cuda_dispatch_notify(epxComm_t comm, const epxCall_t *call,
                                        const epxDispatchArgs_t *args, epxHandle_t handle,
                                        int64_t *num_recv_tokens, int *num_recv_tokens_per_expert,
                                        epxStream_t stream) {
  EpxCudaComm *cc = cc_of(comm);
  __atomic_add_fetch(&cc->blocking_calls, 1, __ATOMIC_ACQ_REL);
  epxResult_t res = dispatch_notify_impl(comm, call, args, handle, num_recv_tokens,
                                         num_recv_tokens_per_expert, stream);
  __atomic_sub_fetch(&cc->blocking_calls, 1, __ATOMIC_ACQ_REL);
  return res;
}

static epxResult_t cuda_dispatch(epxComm_t comm, const epxCall_t *call,
                                 const epxDispatchArgs_t *a, epxHandle_t h,
                                 const epxDispatchOutputs_t *o, epxStream_t stream) {
  EpxCudaComm *cc = cc_of(comm);
  cudaStream_t s = (cudaStream_t)stream;
  epxResult_t res = check_earlier(comm);
  if (res != epxSuccess) return res;
  const int invalid = call->local_invalid;
  const int counted = !invalid && h->state != epxHandleNormal;

  EpxHelloParams hp = dispatch_hello(comm, call, a, h, counted);
  EpxDispatchParams dp;
  memset(&dp, 0, sizeof dp);
  dp.ctx = hp.ctx;
  dp.seq = call->seq;
  dp.invalid = invalid;
  if (!invalid) {
    int fp8 = a->x_type == epxFloat8E4M3;
    dp.x = a->x;
    dp.x_scales = a->x_scales;
    dp.topk_idx = a->topk_idx;
    dp.topk_weights = a->topk_weights;
    dp.topk_is_int64 = a->topk_idx_type == epxInt64;
    dp.num_tokens = a->num_tokens;
    dp.num_topk = a->num_topk;
    dp.payload_bytes = (int)epx_payload_row_bytes(a->hidden, fp8);
    dp.scale_bytes = fp8 ? (int)epx_scale_row_bytes(a->hidden, a->scale_format) : 0;
    dp.send_row = h->send_row;
    dp.num_worst_tokens = a->num_worst_tokens;
    dp.capacity_rows = o->capacity_rows;
    dp.rank_prefix_matrix = h->rank_prefix_matrix;
    dp.handle_per_expert = h->num_recv_per_expert;
    dp.handle_recv_src_idx = h->recv_src_idx;
    dp.recv_x = o->recv_x;
    dp.recv_x_scales = o->recv_x_scales;
    dp.recv_topk_idx = o->recv_topk_idx;
    dp.recv_topk_weights = o->recv_topk_weights;
    dp.recv_src_idx = o->recv_src_idx;
    dp.recv_rank_prefix = o->recv_rank_prefix;
    dp.num_recv_tokens_per_expert = o->num_recv_tokens_per_expert;
    dp.num_recv_tokens = o->num_recv_tokens;
    dp.bulk = (cc->bulk & 1) && epx_bulk_ok(a->x, o->recv_x, dp.payload_bytes);
  }
  cudaError_t e = epx_cuda_launch_hello(&hp, s);
  if (e == cudaSuccess) e = epx_cuda_launch_dispatch(&dp, cc->blocks, s);
  if (e != cudaSuccess) {
    /* Some kernels of the op may be queued: the ranks no longer line up. */
    epx_set_async_error(comm, epxCudaError);
    return cuda_fail(comm, e, "epxDispatch: kernel launch");
  }
  if (invalid) return epxInvalidArgument; /* the core keeps the validation message */
  if (counted) fill_handle(comm, call, a, h, -1); /* N_recv stays on the device */
  return epxSuccess;
}

static epxResult_t cuda_combine(epxComm_t comm, const epxCall_t *call, const epxCombineArgs_t *a,
                                epxHandle_t h, const epxCombineOutputs_t *o, epxStream_t stream) {
  EpxCudaComm *cc = cc_of(comm);
  cudaStream_t s = (cudaStream_t)stream;
  epxResult_t res = check_earlier(comm);
  if (res != epxSuccess) return res;
  const int invalid = call->local_invalid;
  EpxHelloParams hp;
  memset(&hp, 0, sizeof hp);
  hp.ctx = make_ctx(comm);
  hp.seq = call->seq;
  hp.op = call->op;
  EpxCombineParams cp;
  memset(&cp, 0, sizeof cp);
  cp.ctx = hp.ctx;
  cp.seq = call->seq;
  cp.invalid = invalid;
  if (invalid) {
    hp.flags = EPX_HELLO_INVALID;
  } else {
    hp.flags = hello_flags(call, 0, a->topk_weights != NULL);
    hp.hidden = a->hidden;
    hp.topk = a->topk_weights ? a->num_topk : 0;
    cp.x = a->x;
    cp.topk_weights = a->topk_weights;
    cp.hidden = a->hidden;
    cp.num_topk = a->num_topk;
    cp.num_tokens = h->num_tokens;
    cp.has_weights = a->topk_weights != NULL;
    cp.rank_prefix_matrix = h->rank_prefix_matrix;
    cp.recv_src_idx = h->recv_src_idx;
    cp.is_token_in_rank = h->is_token_in_rank;
    cp.send_row = h->send_row;
    cp.bias0 = a->bias[0];
    cp.bias1 = a->bias[1];
    cp.combined_x = o->combined_x;
    cp.combined_topk_weights = o->combined_topk_weights;
    cp.bulk = (cc->bulk & 2) && epx_bulk_ok(a->x, a->x, (long long)a->hidden * 2);
    cp.chunk_tokens = cc->combine_chunk_tokens;
  }
  cudaError_t e = epx_cuda_launch_hello(&hp, s);
  if (e == cudaSuccess) e = epx_cuda_launch_combine(&cp, cc->blocks, s);
  if (e != cudaSuccess) {
    epx_set_async_error(comm, epxCudaError);
    return cuda_fail(comm, e, "epxCombine: kernel launch");
  }
  return invalid ? epxInvalidArgument : epxSuccess;
}

/* ---- low-latency mode ---- */

static epxResult_t ll_check(epxComm_t comm, const char *fn) {
  EpxCudaComm *cc = cc_of(comm);
  if (!cc->ll_enabled)
    return epx_error(comm, epxNotSupported, "%s: low-latency mode is off on the CUDA backend: %s",
                     fn, cc->ll_off_reason ? cc->ll_off_reason : "?");
  return check_earlier(comm);
}

/* The slot the next LL op uses; a third send-only phase before the oldest is
 * received would overwrite it. Limitation: this rank refuses it before taking
 * part, so its peers' call then times out (the host backend fails it on every
 * rank through its header exchange). */
static epxResult_t ll_take_slot(epxComm_t comm, const char *fn, int *slot) {
  EpxCudaComm *cc = cc_of(comm);
  int s = (int)((cc->ll_ops + 1) & 1u);
  if (cc->ll_slot_pending[s])
    return epx_error(comm, epxInvalidUsage,
                     "%s: two send-only low-latency phases already await epxLowLatencyRecv; "
                     "receive the older one first",
                     fn);
  ++cc->ll_ops;
  *slot = s;
  return epxSuccess;
}

/* Start of an LL op: the mode is on, nothing failed earlier, and the op takes
 * its buffer slot (a locally invalid call takes part without claiming one). */
static epxResult_t ll_begin(epxComm_t comm, const epxCall_t *call, const char *fn, int *slot) {
  epxResult_t res = ll_check(comm, fn);
  if (res != epxSuccess) return res;
  *slot = 0;
  if (call->local_invalid) {
    ++cc_of(comm)->ll_ops;
    return epxSuccess;
  }
  return ll_take_slot(comm, fn, slot);
}

static epxResult_t ll_launch_failed(epxComm_t comm, cudaError_t e, const char *what) {
  /* A kernel of the op may be queued: the ranks no longer line up. */
  epx_set_async_error(comm, epxCudaError);
  return cuda_fail(comm, e, what);
}

static epxResult_t cuda_ll_dispatch(epxComm_t comm, const epxCall_t *call,
                                    const epxLowLatencyDispatchArgs_t *a, epxHandle_t h,
                                    const epxLowLatencyDispatchOutputs_t *o, epxStream_t stream) {
  EpxCudaComm *cc = cc_of(comm);
  cudaStream_t st = (cudaStream_t)stream;
  int slot = 0;
  epxResult_t res = ll_begin(comm, call, "epxLowLatencyDispatch", &slot);
  if (res != epxSuccess) return res;
  const int invalid = call->local_invalid;
  EpxLLDispatchSendParams sp;
  memset(&sp, 0, sizeof sp);
  sp.ctx = make_ctx(comm);
  sp.seq = call->seq;
  sp.invalid = invalid;
  EpxLLDispatchRecvParams rp;
  memset(&rp, 0, sizeof rp);
  rp.ctx = sp.ctx;
  rp.seq = call->seq;
  rp.invalid = invalid;
  rp.epoch_src = &cc->state->ll_epoch; /* the send kernel just advanced it (stream order) */
  int send_blocks = 1;
  EpxCudaHandle *hh = NULL;
  if (!invalid) {
    hh = (EpxCudaHandle *)h->backend_private;
    sp.x = a->x;
    sp.topk_idx = a->topk_idx;
    sp.topk_is_int64 = a->topk_idx_type == epxInt64;
    sp.num_tokens = a->num_tokens;
    sp.hidden = a->hidden;
    sp.num_topk = a->num_topk;
    sp.fp8 = a->use_fp8 != 0;
    sp.round_scale = a->round_scale != 0;
    sp.ue8m0 = a->use_ue8m0 != 0;
    sp.handle_epoch = hh->ll_epoch;
    /* block 0 writes the headers, one more block per token up to the SMs */
    send_blocks = a->num_tokens + 1 < cc->ll_blocks ? a->num_tokens + 1 : cc->ll_blocks;
    rp.epoch_src = hh->ll_epoch;
    rp.hidden = a->hidden;
    rp.num_topk = a->num_topk;
    rp.fp8 = sp.fp8;
    rp.ue8m0 = sp.ue8m0;
    rp.recv_x = o->recv_x;
    rp.recv_x_scales = o->recv_x_scales;
    rp.recv_count = o->recv_count;
    rp.recv_src_info = o->recv_src_info;
    rp.recv_layout_range = (long long *)o->recv_layout_range;
    rp.stats = a->cumulative_local_expert_recv_stats;
    rp.row_src_rank = h->ll_row_src_rank;
    rp.row_src_token = h->ll_row_src_token;
    rp.row_kmask = h->ll_row_kmask;
    rp.h_recv_count = h->ll_recv_count;
    rp.h_layout_range = (long long *)h->ll_layout_range;
  }
  const int fused = cc->ll_variant >= 2 && (invalid || !a->return_recv_hook);
  if (fused && cc->trace) { /* their own trace kind, and a sample row */
    sp.ctx.trace = rp.ctx.trace = 2;
    sp.ctx.trace_op = rp.ctx.trace_op = cc->trace_fused_ops[0]++;
  }
  cudaError_t e = fused ? epx_cuda_launch_ll_dispatch_fused(&sp, &rp, cc->ll_fused_blocks, st)
                        : epx_cuda_launch_ll_dispatch_send(&sp, send_blocks, st);
  if (e != cudaSuccess) return ll_launch_failed(comm, e, "epxLowLatencyDispatch: send kernel launch");
  if (!fused && (invalid || !a->return_recv_hook)) {
    e = epx_cuda_launch_ll_dispatch_recv(&rp, cc->ll_blocks, st);
    if (e != cudaSuccess)
      return ll_launch_failed(comm, e, "epxLowLatencyDispatch: receive kernel launch");
  }
  if (invalid) return epxInvalidArgument; /* the core keeps the validation message */
  h->state = epxHandleLowLatency;
  h->num_tokens = a->num_tokens;
  h->num_topk = a->num_topk;
  h->hidden = a->hidden;
  h->topk_is_int64 = sp.topk_is_int64;
  h->num_recv_tokens = -1; /* on the device only */
  h->filled_seq = call->seq;
  if (a->return_recv_hook) {
    hh->drecv = rp;
    hh->ll_slot = slot;
    cc->ll_slot_pending[slot] = 1;
    h->pending_op = EPX_OP_LL_DISPATCH;
    h->recv_pending = 1;
  } else {
    h->pending_op = EPX_OP_NONE;
    h->recv_pending = 0;
  }
  return epxSuccess;
}

static epxResult_t cuda_ll_combine(epxComm_t comm, const epxCall_t *call,
                                   const epxLowLatencyCombineArgs_t *a, epxHandle_t h,
                                   void *combined_x, epxStream_t stream) {
  EpxCudaComm *cc = cc_of(comm);
  cudaStream_t st = (cudaStream_t)stream;
  int slot = 0;
  epxResult_t res = ll_begin(comm, call, "epxLowLatencyCombine", &slot);
  if (res != epxSuccess) return res;
  const int invalid = call->local_invalid;
  EpxLLCombineSendParams sp;
  memset(&sp, 0, sizeof sp);
  sp.ctx = make_ctx(comm);
  sp.seq = call->seq;
  sp.invalid = invalid;
  EpxLLCombineRecvParams rp;
  memset(&rp, 0, sizeof rp);
  rp.ctx = sp.ctx;
  rp.seq = call->seq;
  rp.invalid = invalid;
  rp.epoch_src = &cc->state->ll_epoch;
  EpxCudaHandle *hh = NULL;
  if (!invalid) {
    hh = (EpxCudaHandle *)h->backend_private;
    sp.x = a->zero_copy ? comm->ll_combine_buffer : a->x;
    sp.hidden = a->hidden;
    sp.num_topk = a->num_topk;
    sp.row_src_rank = h->ll_row_src_rank;
    sp.row_src_token = h->ll_row_src_token;
    sp.row_kmask = h->ll_row_kmask;
    sp.h_recv_count = h->ll_recv_count;
    sp.handle_epoch = hh->ll_epoch;
    rp.epoch_src = hh->ll_epoch;
    rp.topk_idx = a->topk_idx;
    rp.topk_is_int64 = a->topk_idx_type == epxInt64;
    rp.topk_weights = a->topk_weights;
    rp.num_tokens = a->num_tokens;
    rp.hidden = a->hidden;
    rp.num_topk = a->num_topk;
    rp.combined_x = combined_x;
  }
  const int fused = cc->ll_variant >= 2 && (invalid || !a->return_recv_hook);
  if (fused && cc->trace) { /* their own trace kind, and a sample row */
    sp.ctx.trace = rp.ctx.trace = 2;
    sp.ctx.trace_op = rp.ctx.trace_op = cc->trace_fused_ops[1]++;
  }
  cudaError_t e = fused ? epx_cuda_launch_ll_combine_fused(&sp, &rp, cc->ll_fused_blocks, st)
                        : epx_cuda_launch_ll_combine_send(&sp, cc->ll_blocks, st);
  if (e != cudaSuccess) return ll_launch_failed(comm, e, "epxLowLatencyCombine: send kernel launch");
  if (!fused && (invalid || !a->return_recv_hook)) {
    e = epx_cuda_launch_ll_combine_recv(&rp, cc->ll_blocks, st);
    if (e != cudaSuccess)
      return ll_launch_failed(comm, e, "epxLowLatencyCombine: receive kernel launch");
  }
  if (invalid) return epxInvalidArgument;
  if (a->return_recv_hook) {
    hh->crecv = rp;
    hh->ll_slot = slot;
    cc->ll_slot_pending[slot] = 1;
    h->pending_op = EPX_OP_LL_COMBINE;
    h->recv_pending = 1;
  }
  return epxSuccess;
}

static epxResult_t cuda_ll_recv(epxComm_t comm, epxHandle_t h, epxStream_t stream) {
  EpxCudaComm *cc = cc_of(comm);
  EpxCudaHandle *hh = (EpxCudaHandle *)h->backend_private;
  epxResult_t res = ll_check(comm, "epxLowLatencyRecv");
  if (res != epxSuccess) return res;
  cudaError_t e;
  if (h->pending_op == EPX_OP_LL_DISPATCH) {
    e = epx_cuda_launch_ll_dispatch_recv(&hh->drecv, cc->ll_blocks, (cudaStream_t)stream);
  } else if (h->pending_op == EPX_OP_LL_COMBINE) {
    e = epx_cuda_launch_ll_combine_recv(&hh->crecv, cc->ll_blocks, (cudaStream_t)stream);
  } else {
    return epx_error(comm, epxInvalidUsage,
                     "epxLowLatencyRecv: the handle's pending phase is %s, not a low-latency send",
                     epx_op_name(h->pending_op));
  }
  if (e != cudaSuccess) return ll_launch_failed(comm, e, "epxLowLatencyRecv: kernel launch");
  cc->ll_slot_pending[hh->ll_slot] = 0;
  h->recv_pending = 0;
  h->pending_op = EPX_OP_NONE;
  return epxSuccess;
}

/* The zero-copy buffer [E_local, R * llT, H_config] BF16, allocated on the
 * first request (never on the hot path) and freed at destroy. */
static epxResult_t cuda_ll_combine_buffer(epxComm_t comm, void **buffer) {
  EpxCudaComm *cc = cc_of(comm);
  if (!cc->ll_enabled)
    return epx_error(comm, epxNotSupported,
                     "epxLowLatencyGetCombineBuffer: low-latency mode is off on the CUDA backend: %s",
                     cc->ll_off_reason ? cc->ll_off_reason : "?");
  if (!comm->ll_combine_buffer) {
    size_t bytes = (size_t)comm->num_local_experts *
                   (size_t)epx_ll_rows_per_expert(comm->nranks, comm->config.ll_max_tokens_per_rank) *
                   epx_payload_row_bytes(comm->config.hidden, 0);
    void *p = NULL;
    cudaSetDevice(cc->device);
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 16);
    if (e != cudaSuccess) return cuda_fail(comm, e, "epxLowLatencyGetCombineBuffer: cudaMalloc");
    comm->ll_combine_buffer = p;
  }
  *buffer = comm->ll_combine_buffer;
  return epxSuccess;
}

/* The soft-timeout records the device left, into the log and the wait statistics. */
static void cuda_poll_events(epxComm_t comm) {
  EpxCudaComm *cc = cc_of(comm);
  if (cc && cc->host) drain_soft_waits(cc);
}

static epxBackendOps make_ops(void) {
  epxBackendOps o;
  memset(&o, 0, sizeof o);
  o.name = "cuda";
  o.size_hints = cuda_size_hints;
  o.init = cuda_init;
  o.destroy = cuda_destroy;
  o.abort = cuda_abort;
  o.handle_alloc = cuda_handle_alloc;
  o.handle_free = cuda_handle_free;
  o.layout = cuda_layout;
  o.dispatch_notify = cuda_dispatch_notify;
  o.dispatch = cuda_dispatch;
  o.combine = cuda_combine;
  o.ll_dispatch = cuda_ll_dispatch;
  o.ll_combine = cuda_ll_combine;
  o.ll_recv = cuda_ll_recv;
  o.ll_combine_buffer = cuda_ll_combine_buffer;
  o.poll_events = cuda_poll_events;
  return o;
}

static const epxBackendOps cuda_ops = make_ops();

extern "C" const epxBackendOps *epx_cuda_backend_ops(void) { return &cuda_ops; }

extern "C" int epx_cuda_backend_available(void) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count > 0;
}
