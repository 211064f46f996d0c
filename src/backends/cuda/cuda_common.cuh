/*
 * cuda_common.cuh - what the CUDA backend's host code and kernels share: the
 * layout of each rank's peer-visible region, the device/host state words, the
 * error record, the memory-ordering primitives and the bounded wait.
 *
 * Protocol of every collective op (normal mode), with op epoch e counted on the
 * device (so a replayed CUDA graph advances it too):
 *   1. hello: each rank writes a message (call header, and in the counted path
 *      its per-destination token counts) into slot [e % 2][me] of every peer's
 *      region and release-stores the slot's epoch = e; it then acquires every
 *      peer's slot [e % 2][src] == e. A peer posts hello e only once its
 *      previous op has consumed its region (stream order), so after the hello
 *      every peer's region is free for op e: no separate release flags.
 *   2. data, one launch: send blocks write payload rows straight into the
 *      peer's region (dispatch: at their final receive row; combine: at slot
 *      token * R + me of the source) in chunks of source tokens, and after
 *      each chunk release-store a progress word into every peer's region
 *      (see "chunk progress" below).
 *   3. consume, in the same launch: the other blocks acquire the progress
 *      words of a chunk from every peer, then copy or reduce that chunk into
 *      the caller's outputs while later chunks are still in flight.
 * Two hello slots suffice: a rank posts hello e + 2 (slot e % 2) only after
 * hello e + 1 of every peer, which a peer posts only once its op e (hello e
 * included) has finished on its stream.
 *
 * Tried and dropped (2xH200, EP2, 32 SMs): the same one launch with chunks of
 * 2-16 tokens, flagged per chunk. It was exact but slower than a send kernel
 * followed by a consume kernel (dispatch 341 vs 250 us, combine 386 vs 329 at
 * 4 tokens a chunk): the per-chunk system fences of the senders cost more
 * than the overlap saved. Chunks are now hundreds of tokens (EPX_CUDA_CHUNK_TOKENS).
 */
#ifndef EPX_CUDA_COMMON_CUH
#define EPX_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "common/layout_math.h"
#include "common/numerics.h"
#include "epx.h"

#include "core/internal.h"
#include "core/liveness.h"

/* Ranks one NVLink-domain communicator of this backend serves: the count
 * exchange keeps an R x R matrix in shared memory. */
#define EPX_CUDA_MAX_RANKS 64
/* Hello slots per source: double-buffered by epoch parity (see above). */
#define EPX_CUDA_HELLO_SLOTS 2
/* Block size of the count exchange (one block: T is small next to the payload). */
#define EPX_CUDA_HELLO_THREADS 1024
/* Block size of the data kernels: 16 warps, one token or row per warp at a time. */
#define EPX_CUDA_DATA_THREADS 512
#define EPX_CUDA_DATA_WARPS (EPX_CUDA_DATA_THREADS / 32)
/* Blocks of the data kernels when config.num_sms is 0. */
#define EPX_CUDA_DEFAULT_BLOCKS 32
/* 16-byte vectors each lane keeps in flight per round of a row copy. */
#define EPX_CUDA_COPY_UNROLL 4
/* Most blocks a normal-mode data kernel may have (one progress word per block
 * and source in the region; the SM count of any current GPU is below it). */
#define EPX_CUDA_MAX_BLOCKS 256
/* Progress word value meaning "every chunk of this op is sent". */
#define EPX_PROGRESS_ALL 0xffffffull
/* A spinning thread looks at the clock and the sticky fatal flag once per this
 * many polls ... */
#define EPX_CUDA_POLL_CHECK_EVERY 64
/* ... and at the host-mapped words (abort flag, the liveness word of the peer it
 * waits for) once per this much waiting (ns): abort and dead peers are seen
 * within about this much more time. */
#define EPX_CUDA_HOST_CHECK_NS 100000LL

/* Hello flags. */
#define EPX_HELLO_INVALID 1     /* this rank's arguments failed validation */
#define EPX_HELLO_BAD_ID 2      /* this rank's topk_idx holds an id outside [-1, E) */
#define EPX_HELLO_HAS_TOPK 4
#define EPX_HELLO_HAS_WEIGHTS 8

/* Path of a dispatch: cached (handle filled earlier) or counted (count exchange
 * inside the call, num_worst_tokens mode); a notify is op DISPATCH_NOTIFY. */
#define EPX_PATH_CACHED 0
#define EPX_PATH_COUNTED 1

/* Phases named in error records. */
enum {
  EPX_PHASE_NONE = 0,
  EPX_PHASE_HELLO = 1,   /* waiting for a peer's hello (count exchange) */
  EPX_PHASE_ARRIVAL = 2, /* waiting for a peer's data to arrive */
  EPX_PHASE_CHECK = 3,   /* the headers of this call disagree */
  EPX_PHASE_LL_SLOT = 4, /* low latency: waiting for a peer to free the buffer slot */
  EPX_PHASE_LL_SIGNAL = 5, /* low latency: waiting for a peer's headers */
  EPX_PHASE_LL_MESSAGE = 6, /* low latency: waiting for one message's flag (2 x op + 1 when sent) */
  EPX_PHASE_LOCAL_RELEASE = 7 /* a send block's warp waiting for its own block's earlier chunk release */
};

/* Fields compared in the hello (named in mismatch messages). */
enum {
  EPX_FIELD_NONE = 0,
  EPX_FIELD_OP,
  EPX_FIELD_SEQ,
  EPX_FIELD_HIDDEN,
  EPX_FIELD_TOPK,
  EPX_FIELD_X_TYPE,
  EPX_FIELD_IDX_TYPE,
  EPX_FIELD_SCALES,
  EPX_FIELD_PATH,
  EPX_FIELD_EXPERT_ID,
  EPX_FIELD_CAPACITY
};

/* One hello message; counts[R] and expert_counts[E_local] follow it. `epoch`
 * is written last with release semantics; the reader acquires it first. */
typedef struct EpxHello {
  unsigned long long epoch;
  unsigned long long seq;
  int op, flags, hidden, topk;
  int x_type, idx_type, scale_format, path;
  long long bad_id;  /* first out-of-range id seen (EPX_HELLO_BAD_ID) */
  int bad_token;     /* its token */
  int pad;
} EpxHello;

/* Where everything lives in one rank's region (peers address it through their
 * IPC mapping of it). One source of truth for host allocation and kernels. */
typedef struct EpxRegionLayout {
  size_t hello_off, hello_stride; /* [2][R] hello slots */
  size_t progress_off;            /* [R source][EPX_CUDA_MAX_BLOCKS] unsigned long long */
  size_t bound_off;               /* [R source][max_chunks] int: rows sent after each chunk */
  size_t claim_off;               /* [claim_chunks] unsigned: items of my chunk claimed (EpxWork) */
  int chunk_tokens, max_chunks;   /* dispatch: source tokens per chunk; chunks of max_tokens */
  int claim_chunks;               /* chunks of max_tokens in the op with the smallest chunk */
  size_t payload_off, payload_stride;
  size_t scales_off, scales_stride;
  size_t src_off;     /* [rows] int */
  size_t topk_off;    /* [rows][max_topk] int32 local ids */
  size_t weights_off; /* [rows][max_topk] float */
  size_t total;
  long long rows;     /* R * max_tokens_per_rank */
} EpxRegionLayout;

static inline __host__ __device__ size_t epx_cuda_align(size_t n, size_t a) {
  return (n + a - 1) / a * a;
}

/* Rows: dispatch needs N_recv <= R * maxT final rows, combine one slot per
 * (source token, expert-side rank); both are R * maxT, so the ops share the
 * rows (the hello of the next op proves the previous one was consumed).
 * This first version sizes the region by max_tokens_per_rank instead of
 * chunking it through a ring: memory grows with T (see the report). */
static inline __host__ __device__ EpxRegionLayout epx_cuda_region_layout(int nranks, int max_tokens,
                                                                         int hidden, int max_topk,
                                                                         int num_local_experts,
                                                                         int chunk_tokens,
                                                                         int combine_chunk_tokens) {
  EpxRegionLayout l;
  size_t off = 0;
  const int smallest_chunk = chunk_tokens < combine_chunk_tokens ? chunk_tokens : combine_chunk_tokens;
  l.rows = (long long)nranks * max_tokens;
  l.chunk_tokens = chunk_tokens;
  l.max_chunks = (max_tokens + chunk_tokens - 1) / chunk_tokens;
  l.claim_chunks = (max_tokens + smallest_chunk - 1) / smallest_chunk;
  l.hello_off = off;
  l.hello_stride = epx_cuda_align(sizeof(EpxHello) + sizeof(int) * (size_t)(nranks + num_local_experts), 128);
  off += l.hello_stride * EPX_CUDA_HELLO_SLOTS * (size_t)nranks;
  l.progress_off = epx_cuda_align(off, 128);
  off = l.progress_off + sizeof(unsigned long long) * (size_t)nranks * EPX_CUDA_MAX_BLOCKS;
  l.bound_off = epx_cuda_align(off, 128);
  off = l.bound_off + sizeof(int) * (size_t)nranks * (size_t)(l.max_chunks > 0 ? l.max_chunks : 1);
  l.claim_off = epx_cuda_align(off, 128);
  off = l.claim_off + sizeof(unsigned) * (size_t)(l.claim_chunks > 0 ? l.claim_chunks : 1);
  l.payload_off = epx_cuda_align(off, 256);
  l.payload_stride = epx_cuda_align(epx_payload_row_bytes(hidden, 0), EPX_ROW_ALIGN_BYTES);
  off = l.payload_off + l.payload_stride * (size_t)l.rows;
  l.scales_off = epx_cuda_align(off, 256);
  l.scales_stride = epx_cuda_align(epx_scale_row_bytes(hidden, 1), EPX_ROW_ALIGN_BYTES);
  off = l.scales_off + l.scales_stride * (size_t)l.rows;
  l.src_off = epx_cuda_align(off, 256);
  off = l.src_off + sizeof(int) * (size_t)l.rows;
  l.topk_off = epx_cuda_align(off, 256);
  off = l.topk_off + sizeof(int) * (size_t)max_topk * (size_t)l.rows;
  l.weights_off = epx_cuda_align(off, 256);
  off = l.weights_off + sizeof(float) * (size_t)max_topk * (size_t)l.rows;
  l.total = epx_cuda_align(off, 4096);
  return l;
}

/* The error a device wait or check leaves for the host. */
typedef struct EpxErrRecord {
  int code;   /* epxResult_t; 0 = none */
  int op;     /* epxOp_t */
  int phase;  /* EPX_PHASE_* */
  int peer;   /* rank waited on or disagreeing; -1 if none */
  int field;  /* EPX_FIELD_* for mismatches */
  unsigned int why; /* epxPeerFailed: the peer's liveness word as seen (core/liveness.h) */
  long long expected, seen;
  unsigned long long seq;
} EpxErrRecord;

/* ---- low-latency region (ll_*.cu) ----
 *
 * A second IPC-shared allocation per rank, used only by the low-latency ops.
 * Protocol of LL op number e (counted on the device in state->ll_epoch, shared
 * by dispatch and combine, so a replayed graph advances it too):
 *   send:    every block waits until each destination r has acknowledged op
 *            e - 2 (ack[r] >= e - 2 in my region): r has finished reading slot
 *            e % 2, so it may be overwritten. Block 0 writes the headers into
 *            slot e % 2 of every destination and release-stores sig[me] = e
 *            there at once (before any message). Every message is followed
 *            by its own release-stored flag (below), so a receiver takes each
 *            message as soon as it lands: no grid barrier on either side.
 *   receive: every block acquires sig[s] >= e of every source s (the headers:
 *            counts and checks), then each warp acquires the flags of the
 *            messages it moves into the caller's outputs; the last block
 *            release-stores ack[me] = e in every source.
 * Flags (slot.flags, u64): the value 2e + 1 says "op e's message is here",
 * 2e "op e sends nothing here"; a wait is for >= 2e. Values only grow (both
 * op kinds share the encoding and the epoch), so stale flags of op e - 2 in
 * the same slot never pass. Dispatch: flag [source][token], written for every
 * token to every destination (2e + 1 where the token goes, 2e elsewhere).
 * Combine: flag [token][k][piece]: the rows travel in EPX_CUDA_LL_PIECES
 * pieces (default 1: a flag costs the sending warp a system fence, which
 * stalls it until its earlier writes are acknowledged), each flagged, so the
 * source reduces a piece as soon as it is in.
 * Dispatch messages: one per (token, destination rank), at [source][token]
 * of the destination's slot: payload (BF16, or FP8 cast in the send kernel)
 * | scales | meta (the token's K expert ids and, per id, the token's position
 * among the source's tokens naming that expert). The header carries, per
 * local expert of the destination, how many of the source's tokens name it.
 * So each receiver knows the first row of every (expert, source) block and
 * the row of every message without any atomic: rows come out in the order
 * source ascending, token ascending, exactly as the host backend's.
 * Combine messages: one per (token, top-k slot) naming an expert of the
 * sender, at [token][k] of the token's source, so the source sums them in k
 * order (the contract's FP32 order cannot be split by rank and stay exact).
 * Memory per rank (T = ll_max_tokens_per_rank = 128, H = 7168, max_topk = 8,
 * E = 256): a slot is max(R * T * (2H + H/32 + 8K, each 16-aligned),
 * T * K * 2H) + headers; two slots:
 *   EP4: 2 * max(4 * 128 * 14624, 128 * 8 * 14336) = 2 * 14.7 MB ~ 29.4 MB
 *   EP8: 2 * max(8 * 128 * 14624, 14.7 MB)         = 2 * 15.0 MB ~ 30.0 MB
 * plus the flags (max(R * T, T * K * EPX_LL_COMBINE_PIECES) u64: 32 KB) and,
 * per handle, 12 bytes per receive row (E_local * R * T rows = E * T =
 * 32768: 384 KB), and the optional zero-copy combine buffer
 * (E_local * R * T * H * 2 = 470 MB, the size of the caller's own recv_x). */
typedef struct EpxLLHeader {
  unsigned long long epoch; /* the op this header belongs to (a check) */
  unsigned long long seq;
  int op, flags, hidden, topk;
  int fp8, ue8m0, num_tokens, pad0;
  long long bad_id; /* first out-of-range id (EPX_HELLO_BAD_ID) */
  int bad_token;
  int pad1;
  /* int counts[E_local] follow (dispatch: the source's tokens per expert of the destination) */
} EpxLLHeader;

/* Most pieces of a combine row, each with its own flag (EPX_CUDA_LL_PIECES
 * picks 1..this; a piece is a multiple of 32 vectors, so a receiving warp's
 * 32-vector chunk lies in one piece). The flag space is sized for the most. */
#define EPX_LL_COMBINE_PIECES 4

typedef struct EpxLLLayout {
  size_t sig_off;        /* [R] u64: sig[s] = last op whose messages from s are complete */
  size_t ack_off;        /* [R] u64: ack[r] = last op r finished reading (in my slots) */
  size_t slot_off, slot_stride; /* 2 slots */
  size_t hdr_stride;     /* per source: EpxLLHeader + counts[E_local] */
  size_t flags_off;      /* inside a slot: per-message flags (u64, see above) */
  size_t body_off;       /* inside a slot */
  size_t msg_stride;     /* dispatch message */
  size_t msg_scales_off, msg_meta_off;
  size_t comb_row_stride; /* combine message (one BF16 row) */
  size_t total;
} EpxLLLayout;

static inline __host__ __device__ EpxLLLayout epx_cuda_ll_layout(int nranks, int ll_max_tokens,
                                                                 int hidden, int max_topk,
                                                                 int num_local_experts) {
  EpxLLLayout l;
  size_t R = (size_t)nranks, T = (size_t)ll_max_tokens, K = (size_t)max_topk;
  l.sig_off = 0;
  l.ack_off = epx_cuda_align(sizeof(unsigned long long) * R, 128);
  l.slot_off = epx_cuda_align(l.ack_off + sizeof(unsigned long long) * R, 256);
  l.hdr_stride = epx_cuda_align(sizeof(EpxLLHeader) + sizeof(int) * (size_t)num_local_experts, 64);
  l.flags_off = epx_cuda_align(l.hdr_stride * R, 256);
  size_t dispatch_flags = R * T, combine_flags = T * K * EPX_LL_COMBINE_PIECES;
  l.body_off = epx_cuda_align(
      l.flags_off + sizeof(unsigned long long) *
                        (dispatch_flags > combine_flags ? dispatch_flags : combine_flags),
      256);
  size_t payload = epx_cuda_align(epx_payload_row_bytes(hidden, 0), EPX_ROW_ALIGN_BYTES);
  size_t scales = epx_cuda_align(epx_scale_row_bytes(hidden, 1) > epx_scale_row_bytes(hidden, 2)
                                     ? epx_scale_row_bytes(hidden, 1)
                                     : epx_scale_row_bytes(hidden, 2),
                                 EPX_ROW_ALIGN_BYTES);
  l.msg_scales_off = payload;
  l.msg_meta_off = payload + scales;
  l.msg_stride = l.msg_meta_off + epx_cuda_align(2 * sizeof(int) * K, EPX_ROW_ALIGN_BYTES);
  l.comb_row_stride = payload;
  size_t dispatch_body = R * T * l.msg_stride, combine_body = T * K * l.comb_row_stride;
  l.slot_stride = epx_cuda_align(
      l.body_off + (dispatch_body > combine_body ? dispatch_body : combine_body), 256);
  l.total = epx_cuda_align(l.slot_off + 2 * l.slot_stride, 4096);
  return l;
}

/* Bytes of the dispatch send kernel's per-expert token bitmasks (E x ceil(T/32) words). */
static inline __host__ __device__ size_t epx_cuda_ll_mask_bytes(int num_experts, int num_tokens) {
  return sizeof(unsigned int) * (size_t)num_experts * (size_t)((num_tokens + 31) / 32);
}

/* Block size of the low-latency kernels. */
#define EPX_LL_THREADS 256
#define EPX_LL_WARPS (EPX_LL_THREADS / 32)

/* Soft-timeout warnings (epxConfig_t.soft_timeout_ms): the first wait of an
 * op that outlasts the soft timeout, per peer waited for, leaves a record in
 * this host-mapped ring, and the host logs it at WARN (at the watcher's tick,
 * the next call on the communicator, and destroy). The device claims record
 * n with a device-memory counter (state->soft_claim), writes it into slot
 * n % EPX_SOFT_RING and its number (n + 1) last, after a system fence. */
#define EPX_SOFT_RING 32
typedef struct EpxSoftRecord {
  unsigned long long number; /* claim number + 1; 0 = never written */
  int op, phase, peer, pad;
  long long waited_ns, expected, seen;
  unsigned long long seq;
} EpxSoftRecord;

/* Host-mapped (cudaHostAlloc mapped) words: written by kernels, read by the host
 * after the stream work (or peeked at the next call), and the abort flag the
 * host sets for every spinning kernel to see. */
typedef struct EpxHostShared {
  volatile int abort;
  int status;         /* epxResult_t of the last count exchange */
  long long n_recv;   /* N_recv of the last count exchange */
  EpxErrRecord rec;
  EpxSoftRecord soft[EPX_SOFT_RING]; /* soft-timeout warnings, for the host to log */
  int per_expert[1];  /* [E_local], aligned counts of the last count exchange */
} EpxHostShared;

/* Trace points of an op (EPX_CUDA_TRACE; the names per kind are in
 * cuda_backend.cu). Low latency: as named. Normal mode: SEND_PREP = the hello
 * (count exchange) done, SEND_SLOT = data kernel started, SEND_BLOCK0/N =
 * send block 0 / the last send block done, RECV_START = the first consume
 * block started, RECV_SIGNALS = its first chunk in, RECV_BLOCK0 = it is done. */
enum {
  /* from the start of the send kernel (block 0) */
  EPX_TRACE_SEND_PREP = 0,  /* send, block 0: bitmasks (dispatch) or row prefix (combine) built */
  EPX_TRACE_SEND_SLOT,      /* send, block 0: every destination freed the slot */
  EPX_TRACE_SEND_HEADER,    /* send, block 0: headers written */
  EPX_TRACE_SEND_BLOCK0,    /* send, block 0: its messages written */
  EPX_TRACE_SEND_BLOCKN,    /* send, the last-indexed block: its messages written */
  EPX_TRACE_SEND_SIGNALS,   /* send, last block to finish: every message and flag written */
  EPX_TRACE_SEND_LATE_START, /* send, the send block that started last: its start (launch skew) */
  EPX_TRACE_RECV_START,     /* receive, block 0: kernel started (includes any host gap of a hook) */
  /* from the start of the receive kernel (block 0) */
  EPX_TRACE_RECV_SIGNALS,   /* receive, block 0: every source's signal acquired */
  EPX_TRACE_RECV_BLOCK0,    /* receive, block 0: its messages placed */
  EPX_TRACE_RECV_END,       /* receive, last block to finish: acks posted */
  EPX_TRACE_POINTS
};
/* Fused LL ops kept as per-op samples (EpxCudaState.trace_ring). */
#define EPX_TRACE_RING 256

enum {
  EPX_TRACE_LL_DISPATCH = 0,
  EPX_TRACE_LL_COMBINE,
  EPX_TRACE_DISPATCH,
  EPX_TRACE_COMBINE,
  EPX_TRACE_LL_DISPATCH_FUSED, /* the LL kinds again, for the fused send+receive launches */
  EPX_TRACE_LL_COMBINE_FUSED,
  EPX_TRACE_KINDS
};

/* Device-memory state of this rank (not visible to peers). */
typedef struct EpxCudaState {
  unsigned long long epoch; /* collective ops begun on this communicator */
  int call_status;          /* epxResult_t the hello of the current op decided */
  int fatal;                /* sticky: a wait failed (timeout, abort); everything stops */
  int err_claim;            /* first error of an op wins the record */
  /* low-latency mode (ll_*.cu) */
  unsigned long long ll_epoch; /* low-latency ops begun (dispatch and combine share it) */
  unsigned int ll_send_done;   /* LL send and fused kernels: blocks done with the op number (epx_ll_advance_epoch) */
  unsigned int ll_recv_done;   /* last-block counter of the LL receive kernels */
  unsigned int layout_done;    /* last-block counter of the layout kernel */
  unsigned int trace_done[2];  /* EPX_CUDA_TRACE: send / consume blocks of a normal op finished */
  unsigned long long soft_claim; /* soft-timeout records claimed (EpxSoftRecord) */
  unsigned long long soft_seq[EPX_CUDA_MAX_RANKS]; /* last call warned about, per peer */
  /* EPX_CUDA_TRACE=1: where the time of the LL ops goes. trace_t0 is the
   * %globaltimer at the start of the current op's send kernel; each point adds
   * its delta to trace_sum[kind][point] (one writer per point: no atomics). */
  unsigned long long trace_t0, trace_t1; /* send and receive kernel starts */
  unsigned long long trace_late_start;   /* latest %globaltimer at which an LL send block started */
  /* Per-op samples of the fused LL launches (kinds LL_*_FUSED, in that order):
   * row trace_op % EPX_TRACE_RING holds the op's absolute %globaltimer at its
   * send start (column 0) and at each point (column 1 + point), 0 where none;
   * written to a file at destroy (EPX_CUDA_TRACE_FILE). Means hide outliers and
   * the skew between GPUs; the samples do not. */
  unsigned long long trace_ring[2][EPX_TRACE_RING][EPX_TRACE_POINTS + 1];
  unsigned long long trace_sum[EPX_TRACE_KINDS][EPX_TRACE_POINTS];
  unsigned long long trace_n[EPX_TRACE_KINDS];
  /* Normal dispatch (0) and combine (1): per block of the launch, the sum over
   * ops of its finish time from the op's start (ns), and its SM at the latest
   * op (bit 31: a send block). SMs do not move data equally fast: this shows
   * which blocks end last, and where. */
  unsigned long long trace_block_sum[2][EPX_CUDA_MAX_BLOCKS];
  unsigned int trace_block_sm[2][EPX_CUDA_MAX_BLOCKS];
} EpxCudaState;

/* What every kernel needs to know about the communicator. */
typedef struct EpxDevCtx {
  char *const *peers; /* [R] region base of every rank, mine included (device array) */
  EpxCudaState *state;
  EpxHostShared *host; /* device address of the host-mapped words */
  EpxRegionLayout lay;
  long long timeout_ns;
  long long soft_timeout_ns; /* 0: no soft-timeout warnings */
  int rank, nranks, ranks_per_node;
  int num_experts, num_local_experts;
  int max_tokens, max_topk;
  /* low-latency mode: every rank's LL region (see EpxLLLayout); NULL when off */
  char *const *ll_peers;
  EpxLLLayout ll;
  int ll_max_tokens;
  int ll_pieces; /* EPX_CUDA_LL_PIECES: flagged pieces of a combine row (1..EPX_LL_COMBINE_PIECES) */
  int trace; /* EPX_CUDA_TRACE: 0 off, 1 on, 2 on and the launch is a fused LL kernel */
  unsigned int trace_op; /* trace == 2: this op's number among the fused ops of its kind */
  int pdl;   /* EPX_CUDA_PDL: launch the op kernels as programmatic dependents */
  /* Normal-mode data kernels: send_blocks of the blocks send, the others
   * consume (copy out / reduce) chunk by chunk as the progress words allow;
   * which blocks send: send_order (epx_normal_role). */
  int send_blocks;
  int send_order;
  int dynamic; /* EPX_CUDA_DYNAMIC: send warps claim the items of a chunk (EpxWork) */
  /* Liveness words, host memory mapped for the device: rank r's at
   * live[r * EPX_LIVE_SLOT_WORDS], nonzero once r will not arrive any more
   * (aborted, destroyed, failed, or its process gone). NULL: none, waits on a
   * dead peer end only at the timeout. */
  const unsigned int *live;
} EpxDevCtx;

#ifdef __CUDACC__

/* ---- memory-ordering primitives (system scope: peers are other GPUs or
 * other processes on this GPU) ---- */

static __device__ __forceinline__ unsigned long long epx_ld_acquire_sys(const unsigned long long *p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

/* Polls read relaxed; the wait re-reads with acquire once the value is there,
 * so each wait pays one acquire, not one per poll. */
static __device__ __forceinline__ unsigned long long epx_ld_relaxed_sys(const unsigned long long *p) {
  unsigned long long v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

static __device__ __forceinline__ void epx_st_release_sys(unsigned long long *p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

static __device__ __forceinline__ int epx_ld_volatile_i32(const volatile int *p) { return *p; }

static __device__ __forceinline__ long long epx_globaltimer(void) {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/* ---- trace (EPX_CUDA_TRACE) ---- */

static __device__ __forceinline__ int epx_trace_kind(const EpxDevCtx &c, int op) {
  const int fused = c.trace == 2;
  switch (op) {
    case EPX_OP_LL_COMBINE: return fused ? EPX_TRACE_LL_COMBINE_FUSED : EPX_TRACE_LL_COMBINE;
    case EPX_OP_DISPATCH: return EPX_TRACE_DISPATCH;
    case EPX_OP_COMBINE: return EPX_TRACE_COMBINE;
    default: return fused ? EPX_TRACE_LL_DISPATCH_FUSED : EPX_TRACE_LL_DISPATCH;
  }
}

/* A fused LL op's sample: column 0 its send start, 1 + point each point. */
static __device__ __forceinline__ void epx_trace_sample(const EpxDevCtx &c, int op, int column,
                                                        unsigned long long when) {
  if (c.trace != 2) return;
  const int fused = epx_trace_kind(c, op) == EPX_TRACE_LL_COMBINE_FUSED;
  c.state->trace_ring[fused][c.trace_op % EPX_TRACE_RING][column] = when;
}

/* Called by one thread of the op's first send block, first thing. */
static __device__ __forceinline__ void epx_trace_start(const EpxDevCtx &c, int op) {
  if (!c.trace) return;
  c.state->trace_t0 = (unsigned long long)epx_globaltimer();
  ++c.state->trace_n[epx_trace_kind(c, op)];
  epx_trace_sample(c, op, 0, c.state->trace_t0);
}

/* Called by exactly one thread per op and point. */
static __device__ __forceinline__ void epx_trace(const EpxDevCtx &c, int op, int point) {
  if (!c.trace) return;
  const unsigned long long now = (unsigned long long)epx_globaltimer();
  if (point == EPX_TRACE_RECV_START) c.state->trace_t1 = now;
  epx_trace_sample(c, op, 1 + point, now);
  const unsigned long long base = point > EPX_TRACE_RECV_START ? c.state->trace_t1 : c.state->trace_t0;
  /* a fused kernel's receive blocks may start before the send block 0 that sets trace_t0 */
  if (base == 0) return; /* ... of the first op: no start to count from */
  c.state->trace_sum[epx_trace_kind(c, op)][point] += now > base ? now - base : 0ull;
}

/* Which blocks of a normal-mode data kernel send (EPX_CUDA_SEND_ORDER). The
 * block scheduler does not spread the first blocks of a launch evenly: on
 * H200 the first seven blocks of a launch landed on SMs 125-131 and sent ~30 %
 * slower than blocks on other SMs (per-block finish times, EP4). */
enum { EPX_SEND_ORDER_FIRST = 0, EPX_SEND_ORDER_LAST = 1, EPX_SEND_ORDER_SPREAD = 2 };

typedef struct EpxNormalRole {
  int send;  /* 1: a send block; 0: a consume block */
  int index; /* among the blocks of its role: progress slot, work share */
} EpxNormalRole;

static __device__ __forceinline__ EpxNormalRole epx_normal_role(const EpxDevCtx &c) {
  const int b = blockIdx.x, B = gridDim.x, S = c.send_blocks, C = B - S;
  EpxNormalRole r;
  if (c.send_order == EPX_SEND_ORDER_LAST) {
    r.send = b >= C;
    r.index = r.send ? b - C : b;
  } else if (c.send_order == EPX_SEND_ORDER_SPREAD) {
    /* S of every B blocks, evenly: block b sends when floor(b S / B) steps. */
    const int before = b * S / B, upto = (b + 1) * S / B;
    r.send = upto > before;
    r.index = r.send ? before : b - before;
  } else {
    r.send = b < S;
    r.index = r.send ? b : b - S;
  }
  return r;
}

/* The items (tokens, rows) of one chunk that one send warp moves. Fixed
 * round robin (item gwarp, then every `warps`), or with ctx.dynamic each warp
 * claims its next item from the chunk's counter in my region, zeroed by the
 * op's hello: SMs do not send equally fast (per-block finish times at EP4 ran
 * from 370 to 510 us in one dispatch), so with fixed shares the slowest block
 * sets the end; claimed items spread by speed. The claim for the next item is
 * issued before the current one moves and read only after, so its latency
 * hides behind the copy. Which warp moves an item changes nothing in the
 * results: every item has a fixed destination. */
typedef struct EpxWork {
  unsigned *counter; /* NULL: fixed round robin */
  int n, step;
  int cur;           /* the item to move now; >= n: this warp is done */
  unsigned pending;  /* lane 0: the claim of the item after it */
} EpxWork;

/* My region's claim counters, one per chunk (zeroed by each op's hello). */
static __device__ __forceinline__ unsigned *epx_work_counters(const EpxDevCtx &c) {
  return (unsigned *)(c.peers[c.rank] + c.lay.claim_off);
}

static __device__ __forceinline__ unsigned epx_work_claim(unsigned *counter) {
  return threadIdx.x % 32 == 0 ? atomicAdd(counter, 1u) : 0u;
}

/* Every lane of the warp (warp-uniform results). */
static __device__ __forceinline__ EpxWork epx_work_begin(const EpxDevCtx &c, int chunk, int n, int gwarp,
                                                         int warps) {
  EpxWork w;
  w.n = n;
  w.step = warps;
  w.pending = 0;
  w.counter = c.dynamic ? epx_work_counters(c) + chunk : NULL;
  if (!w.counter) {
    w.cur = gwarp;
    return w;
  }
  w.cur = (int)__shfl_sync(0xffffffffu, epx_work_claim(w.counter), 0);
  if (w.cur < n) w.pending = epx_work_claim(w.counter);
  return w;
}

static __device__ __forceinline__ void epx_work_next(EpxWork &w) {
  if (!w.counter) {
    w.cur += w.step;
    return;
  }
  w.cur = (int)__shfl_sync(0xffffffffu, w.pending, 0);
  if (w.cur < w.n) w.pending = epx_work_claim(w.counter);
}

/* End of a normal-mode data kernel block (every thread): with tracing on,
 * the last send block to finish records SEND_SIGNALS and the last consume
 * block RECV_END (the critical path, not just blocks 0 and N). */
static __device__ void epx_trace_block_done(const EpxDevCtx &c, int op) {
  if (!c.trace) return;
  __syncthreads();
  if (threadIdx.x != 0) return;
  const int consumer = !epx_normal_role(c).send;
  const unsigned int n = consumer ? gridDim.x - c.send_blocks : c.send_blocks;
  {
    const int k = op == EPX_OP_COMBINE;
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const unsigned long long now = (unsigned long long)epx_globaltimer(), t0 = c.state->trace_t0;
    c.state->trace_block_sum[k][blockIdx.x] += now > t0 ? now - t0 : 0ull;
    c.state->trace_block_sm[k][blockIdx.x] = sm | (consumer ? 0u : 0x80000000u);
  }
  __threadfence();
  if (atomicAdd(&c.state->trace_done[consumer], 1u) != n - 1) return;
  c.state->trace_done[consumer] = 0;
  epx_trace(c, op, consumer ? EPX_TRACE_RECV_END : EPX_TRACE_SEND_SIGNALS);
}

/* ---- errors ---- */

static __device__ __forceinline__ int epx_code_is_fatal(int code) {
  return code == epxTimeout || code == epxAborted || code == epxPeerFailed;
}

/* Records the first error of the current op. Fatal codes also raise the sticky
 * flag that makes every later kernel of this communicator return at once.
 * The claim is a device-memory CAS (atomics on host-mapped memory need PCIe
 * atomics); the record itself is plain stores made visible to the host by the
 * system fence. */
static __device__ void epx_record_error(const EpxDevCtx &c, int code, int op, int phase, int peer,
                                        int field, long long expected, long long seen,
                                        unsigned long long seq, unsigned int why = 0) {
  if (epx_code_is_fatal(code)) atomicExch(&c.state->fatal, 1);
  if (atomicCAS(&c.state->err_claim, 0, 1) != 0) return;
  volatile EpxErrRecord *r = &c.host->rec;
  r->op = op;
  r->phase = phase;
  r->peer = peer;
  r->field = field;
  r->why = why;
  r->expected = expected;
  r->seen = seen;
  r->seq = seq;
  __threadfence_system();
  r->code = code; /* last: the host reads the fields only once code != 0 */
  __threadfence_system();
}

/* A wait on `peer` has outlasted the soft timeout: one record per call and
 * peer (the first waiter to see it; the others of the call stay quiet). */
static __device__ void epx_record_soft_wait(const EpxDevCtx &c, int op, int phase, int peer, long long waited_ns,
                                            long long expected, long long seen, unsigned long long seq) {
  if (peer < 0 || peer >= c.nranks || seq == 0) return;
  if (atomicMax(&c.state->soft_seq[peer], seq) >= seq) return;
  const unsigned long long n = atomicAdd(&c.state->soft_claim, 1ull);
  volatile EpxSoftRecord *r = &c.host->soft[n % EPX_SOFT_RING];
  r->op = op;
  r->phase = phase;
  r->peer = peer;
  r->waited_ns = waited_ns;
  r->expected = expected;
  r->seen = seen;
  r->seq = seq;
  __threadfence_system();
  r->number = n + 1; /* last: the host reads the fields only once the number is there */
}

/* Waits until *flag >= expected (an epoch). Wall clock (%globaltimer) against
 * the communicator's timeout (and, once, its soft timeout: a warning record);
 * polls the host-mapped abort flag, the sticky
 * fatal flag and the liveness word of `peer` (the rank that writes *flag).
 * Returns 1 when the value arrived, 0 after recording the failure (a peer
 * that will not arrive any more: epxPeerFailed, with its word in rec.why).
 * The acquire load pairs with the peer's st.release.sys of the same word, so
 * everything the peer wrote before that store is visible after a success. */
static __device__ int epx_wait_epoch(const EpxDevCtx &c, const unsigned long long *flag,
                                     unsigned long long expected, int op, int phase, int peer,
                                     unsigned long long seq) {
  const long long start = epx_globaltimer();
  long long next_host_check = start + EPX_CUDA_HOST_CHECK_NS;
  int warned = 0; /* the soft timeout was reported */
  for (unsigned int polls = 1;; ++polls) {
    unsigned long long v = epx_ld_relaxed_sys(flag);
    /* flags only grow: the acquire re-read sees v or a later value of the same
     * peer's release stores, and synchronises with it */
    if (v >= expected && epx_ld_acquire_sys(flag) >= expected) return 1;
    if (polls % EPX_CUDA_POLL_CHECK_EVERY != 0) continue;
    if (epx_ld_volatile_i32((volatile int *)&c.state->fatal)) return 0;
    const long long now = epx_globaltimer();
    /* Host memory (abort flag, liveness words) is read over PCIe: only every
     * EPX_CUDA_HOST_CHECK_NS of waiting, so that waits that end soon (the
     * common case) never read it and many waiting warps do not queue PCIe
     * reads in front of the system fences of the warps that send. */
    if (now >= next_host_check) {
      next_host_check = now + EPX_CUDA_HOST_CHECK_NS;
      if (epx_ld_volatile_i32(&c.host->abort)) {
        epx_record_error(c, epxAborted, op, phase, peer, EPX_FIELD_NONE, (long long)expected,
                         (long long)v, seq);
        return 0;
      }
      if (c.live && peer != c.rank) {
        unsigned int w = *(const volatile unsigned int *)(c.live + (size_t)peer * EPX_LIVE_SLOT_WORDS);
        if (w != 0) {
          /* It may have arrived just before it stopped: look once more. */
          v = epx_ld_acquire_sys(flag);
          if (v >= expected) return 1;
          epx_record_error(c, epxPeerFailed, op, phase, peer, EPX_FIELD_NONE, (long long)expected,
                           (long long)v, seq, w);
          return 0;
        }
      }
    }
    if (!warned && c.soft_timeout_ns > 0 && now - start > c.soft_timeout_ns) {
      warned = 1;
      epx_record_soft_wait(c, op, phase, peer, now - start, (long long)expected, (long long)v, seq);
    }
    if (now - start > c.timeout_ns) {
      epx_record_error(c, epxTimeout, op, phase, peer, EPX_FIELD_NONE, (long long)expected,
                       (long long)v, seq);
      return 0;
    }
  }
}

static __device__ __forceinline__ EpxHello *epx_hello_slot(const EpxDevCtx &c, char *region,
                                                           unsigned long long epoch, int src) {
  size_t slot = (size_t)(epoch % EPX_CUDA_HELLO_SLOTS) * (size_t)c.nranks + (size_t)src;
  return (EpxHello *)(region + c.lay.hello_off + slot * c.lay.hello_stride);
}


/* ---- chunk progress (normal-mode data kernels) ----
 *
 * A normal-mode dispatch or combine is one launch: S blocks send, the other
 * B - S consume (copy out, or reduce) while the send goes on (which blocks:
 * epx_normal_role; b below is a block's index among the senders). Senders walk
 * their rows in chunks of source tokens (lay.chunk_tokens in dispatch, the
 * combine's own chunk in combine), in order, each warp claiming items of the
 * current chunk (EpxWork). After its share of chunk c, send block b
 * release-stores progress[me][b] = epoch << 24 | (c + 1) into every peer's
 * region (dispatch: the whole block meets first, epx_post_progress; combine:
 * the block's last warp to finish c does it, epx_chunk_done), and after its last chunk
 * epoch << 24 | EPX_PROGRESS_ALL. A consumer that acquired, for every send
 * block b of src, progress[src][b] >= epoch << 24 | (c + 1) sees every row of
 * chunks 0..c that src wrote into its region. Values only grow (epochs grow),
 * so no word is ever reset; S is the same on every rank (checked at set-up).
 * One system fence per send block and chunk: chunks of hundreds of tokens
 * keep that cost small next to the rows (per-token signals cost more than the
 * overlap gained). Tried and dropped: a progress word per send warp, each
 * consume warp waiting on its own (no block-wide step). Each warp's fence
 * then stalls it chunk after chunk; EP4 dispatch went 586 -> 648 us, FP8
 * dispatch 309 -> 442 us. */
static __device__ __forceinline__ unsigned long long *epx_progress(const EpxDevCtx &c, char *region,
                                                                   int src, int block) {
  return (unsigned long long *)(region + c.lay.progress_off) +
         (size_t)src * EPX_CUDA_MAX_BLOCKS + (size_t)block;
}

static __device__ __forceinline__ unsigned long long epx_progress_value(unsigned long long epoch,
                                                                        unsigned long long chunks) {
  return epoch << 24 | chunks;
}

/* Rows sent to me by src after its chunks 0..c (written by every send block
 * of src before its progress store: all write the same value). */
static __device__ __forceinline__ int *epx_bound(const EpxDevCtx &c, char *region, int src, int chunk) {
  return (int *)(region + c.lay.bound_off) + (size_t)src * c.lay.max_chunks + (size_t)chunk;
}

/* Every thread of a send block, after its share of a chunk: this block's
 * writes (ordered before the stores by the barrier and each storing thread's
 * system fence) are released to every peer with `value`. */
static __device__ void epx_post_progress(const EpxDevCtx &c, unsigned long long value) {
  __syncthreads();
  if ((int)threadIdx.x < c.nranks && (int)threadIdx.x != c.rank) {
    __threadfence_system();
    epx_st_release_sys(epx_progress(c, c.peers[threadIdx.x], c.rank, epx_normal_role(c).index), value);
  }
}

/* ---- chunk release by the last warp (normal-mode send blocks) ----
 *
 * epx_post_progress makes the whole block meet at every chunk's end, and one
 * warp then waits on the system fence while the others idle. Here no warp
 * waits for the others: each warp counts itself done with chunk c in shared
 * memory, and the warp that arrives last fences and releases c to every peer,
 * then goes on with its next items (the claims hand its share to the others
 * meanwhile). The progress stores stay in chunk order (a value c + 1 promises
 * chunks 0..c), so the last warp of c waits until c - 1 is released (in
 * practice already done: that warp released it before it arrived at c), and a
 * warp may run at most EPX_RELEASE_SLOTS chunks ahead of the last released
 * one (the counters are reused modulo that). Both waits are on this block's
 * own warps, which always go on; they are bounded by the communicator's
 * timeout all the same. Measured (EP4 combine, 4 x H200): with 128-token
 * chunks the send blocks end at 488-499 us; at the default 256-token chunks
 * the op time did not move by itself (547.5 vs 548 us in another sitting), so
 * its worth is in allowing smaller chunks once the reduce keeps pace. */
#define EPX_RELEASE_SLOTS 8

typedef struct EpxChunkRelease {
  unsigned arrived[EPX_RELEASE_SLOTS]; /* warps done with chunk c, at c % EPX_RELEASE_SLOTS */
  int released;                        /* chunks 0 .. released - 1 are released to every peer */
} EpxChunkRelease;

/* Thread 0, before a __syncthreads. */
static __device__ __forceinline__ void epx_chunk_release_init(EpxChunkRelease &s) {
  for (int i = 0; i < EPX_RELEASE_SLOTS; ++i) s.arrived[i] = 0u;
  s.released = 0;
}

/* One lane: until chunks 0 .. n - 1 are released by this block. Returns 0
 * after a timeout (recorded), or at once once the communicator failed. */
static __device__ int epx_wait_released(const EpxDevCtx &c, EpxChunkRelease &s, int n, int op,
                                        unsigned long long seq) {
  if (n <= 0) return 1;
  const long long start = epx_globaltimer();
  for (;;) {
    const int have = atomicAdd(&s.released, 0); /* atomics throughout: racecheck sees no race */
    if (have >= n) break;
    __nanosleep(64);
    if (epx_ld_volatile_i32((volatile int *)&c.state->fatal)) return 0;
    if (epx_globaltimer() - start > c.timeout_ns) {
      epx_record_error(c, epxTimeout, op, EPX_PHASE_LOCAL_RELEASE, c.rank, EPX_FIELD_NONE, n, have, seq);
      return 0;
    }
  }
  __threadfence_block(); /* the releases (and counter resets) seen are ordered before what follows */
  return 1;
}

/* Every warp of a send block, after its items of chunk ch (bulk stores
 * drained): the warp that arrives last releases `value` into every peer's
 * progress word of this block. Returns 0 for the whole warp after a failed
 * wait (recorded: the sticky fatal flag ends the peers' waits). */
static __device__ int epx_chunk_done(const EpxDevCtx &c, EpxChunkRelease &s, int ch,
                                     unsigned long long value, int op, unsigned long long seq) {
  const int lane = threadIdx.x % 32, slot = ch % EPX_RELEASE_SLOTS;
  int ok = 1, last = 0;
  __syncwarp(); /* the lanes' stores of this chunk before lane 0's count */
  if (lane == 0) {
    ok = epx_wait_released(c, s, ch - EPX_RELEASE_SLOTS + 1, op, seq); /* slot reuse */
    __threadfence_block();
    last = atomicAdd(&s.arrived[slot], 1u) == blockDim.x / 32 - 1;
    if (last) atomicExch(&s.arrived[slot], 0u); /* no warp counts into it before chunk ch is released */
  }
  last = __shfl_sync(0xffffffffu, last, 0);
  if (!last) return __shfl_sync(0xffffffffu, ok, 0);
  __syncwarp();
  /* The slow part first, while the release of chunk ch - 1 may still be
   * pending in another warp: this fence covers chunk ch's rows. */
  if (lane == 0) __threadfence_system();
  if (lane == 0) ok = epx_wait_released(c, s, ch, op, seq) && ok; /* releases in chunk order */
  ok = __shfl_sync(0xffffffffu, ok, 0);
  /* A release store is cumulative: it also covers chunks 0 .. ch - 1, whose
   * release this warp has now seen. */
  for (int r = lane; r < c.nranks; r += 32)
    if (r != c.rank) epx_st_release_sys(epx_progress(c, c.peers[r], c.rank, epx_normal_role(c).index), value);
  __syncwarp();
  if (lane == 0) {
    __threadfence_block();
    atomicExch(&s.released, ch + 1);
  }
  return ok;
}

/* Every thread of a consume block: waits until every send block of every peer
 * src in src_mask (bit src) posted at least `value`. Returns 1 for the whole block when all did, 0 after
 * a failed wait (recorded; the sticky fatal flag ends the other waits). */
static __device__ int epx_wait_progress(const EpxDevCtx &c, unsigned long long src_mask,
                                        unsigned long long value, int op, unsigned long long seq) {
  const int S = c.send_blocks, n = c.nranks * S;
  int ok = 1;
  for (int i = threadIdx.x; ok && i < n; i += blockDim.x) {
    const int src = i / S;
    if (src == c.rank || !((src_mask >> src) & 1ull)) continue;
    ok = epx_wait_epoch(c, epx_progress(c, c.peers[c.rank], src, i % S), value, op,
                        EPX_PHASE_ARRIVAL, src, seq);
  }
  /* The barrier also orders every thread's reads after the acquires. (A
   * shared flag here raced with the next call's reset: racecheck.) */
  return __syncthreads_and(ok);
}

/* What a normal-mode data kernel reads first (after the PDL wait), the same
 * for every block: `fatal` (the communicator failed: return at once, wait on
 * nobody), `skip` (this op's count exchange failed or this rank's arguments
 * were invalid: take part, move nothing) and the op's epoch. */
typedef struct EpxOpStart {
  int fatal, skip;
  unsigned long long epoch;
} EpxOpStart;

static __device__ EpxOpStart epx_op_start(const EpxDevCtx &c, int invalid) {
  __shared__ EpxOpStart s_start;
  if (threadIdx.x == 0) {
    s_start.fatal = epx_ld_volatile_i32((volatile int *)&c.state->fatal);
    s_start.skip = invalid || c.state->call_status != 0;
    s_start.epoch = c.state->epoch;
  }
  __syncthreads();
  return s_start;
}

/* ---- 16-byte row copies ---- */

static __device__ __forceinline__ int4 epx_ld_nc_v4(const int4 *p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

/* ---- low-latency helpers ---- */

static __device__ __forceinline__ char *epx_ll_slot(const EpxDevCtx &c, char *region,
                                                   unsigned long long epoch) {
  return region + c.ll.slot_off + (size_t)(epoch & 1ull) * c.ll.slot_stride;
}
static __device__ __forceinline__ EpxLLHeader *epx_ll_hdr(const EpxDevCtx &c, char *slot, int src) {
  return (EpxLLHeader *)(slot + (size_t)src * c.ll.hdr_stride);
}
static __device__ __forceinline__ char *epx_ll_msg(const EpxDevCtx &c, char *slot, int src, int t) {
  return slot + c.ll.body_off + ((size_t)src * c.ll_max_tokens + (size_t)t) * c.ll.msg_stride;
}
static __device__ __forceinline__ char *epx_ll_inbox(const EpxDevCtx &c, char *slot, int t, int k) {
  return slot + c.ll.body_off + ((size_t)t * c.max_topk + (size_t)k) * c.ll.comb_row_stride;
}
static __device__ __forceinline__ unsigned long long *epx_ll_sig(const EpxDevCtx &c, char *region,
                                                                 int src) {
  return (unsigned long long *)(region + c.ll.sig_off) + src;
}
static __device__ __forceinline__ unsigned long long *epx_ll_ack(const EpxDevCtx &c, char *region,
                                                                 int dst) {
  return (unsigned long long *)(region + c.ll.ack_off) + dst;
}

/* Start of every LL kernel: the sticky fatal flag and the op number. */
static __device__ __forceinline__ int epx_ll_fatal(const EpxDevCtx &c) {
  return epx_ld_volatile_i32((volatile int *)&c.state->fatal);
}

/* Thread r < R: an early acquire of ack[r] (my region), issued at the start
 * of a send kernel so that its latency overlaps the block's preparation. */
static __device__ __forceinline__ unsigned long long epx_ll_peek_ack(const EpxDevCtx &c) {
  if ((int)threadIdx.x >= c.nranks) return 0;
  return epx_ld_acquire_sys(epx_ll_ack(c, c.ll_peers[c.rank], threadIdx.x));
}

/* Before writing slot epoch % 2 of any destination: thread r waits until r
 * acknowledged op epoch - 2 (the last op that used the slot). The acquire
 * pairs with r's release in epx_ll_post_acks, so r's reads of the slot are
 * ordered before our writes into it. Returns 1 for the whole block when all
 * destinations freed the slot. `peeked`: thread r's epx_ll_peek_ack; the
 * wait runs only when it was not enough yet (the acquire of the peek already
 * ordered r's reads otherwise). */
static __device__ int epx_ll_wait_slot_free(const EpxDevCtx &c, unsigned long long epoch, int op,
                                            unsigned long long seq, unsigned long long peeked) {
  int ok = 1;
  if (epoch > 2 && (int)threadIdx.x < c.nranks && peeked < epoch - 2) {
    const unsigned long long *ack = epx_ll_ack(c, c.ll_peers[c.rank], threadIdx.x);
    ok = epx_wait_epoch(c, ack, epoch - 2, op, EPX_PHASE_LL_SLOT, threadIdx.x, seq);
  }
  return __syncthreads_and(ok);
}

/* Which blocks do a role (send or receive) in an LL launch: a send or receive
 * kernel gives the whole grid to its role; the fused kernel gives the first
 * half of its grid to the send and the second half to the receive, side by
 * side, so the receive blocks take messages while the send blocks still send.
 * Role bodies use role.block / role.blocks, never blockIdx / gridDim. */
typedef struct EpxLLRole {
  int block, blocks;
} EpxLLRole;

static __device__ __forceinline__ EpxLLRole epx_ll_whole_grid(void) {
  EpxLLRole r = {(int)blockIdx.x, (int)gridDim.x};
  return r;
}

/* Exclusive prefix sums of value(0) .. value(n - 1) into out[0 .. n - 1],
 * and their total into out[n], by every thread of the block together (out in
 * shared memory; blockDim.x a multiple of 32). One load round trip per
 * blockDim.x values: a loop of one thread would wait for each load in turn.
 * Every thread must call it (it holds barriers). */
template <typename ValueFn>
static __device__ void epx_block_exclusive_scan(int n, ValueFn value, int *out) {
  __shared__ int s_warp_sum[32];
  __shared__ int s_carry;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x == 0) s_carry = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int j = base + threadIdx.x;
    const int v = j < n ? value(j) : 0;
    int x = v; /* inclusive sum over the warp */
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, d);
      if (lane >= d) x += y;
    }
    if (lane == 31) s_warp_sum[warp] = x;
    __syncthreads();
    if (warp == 0) {
      int w = lane < warps ? s_warp_sum[lane] : 0; /* inclusive over the warps */
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, w, d);
        if (lane >= d) w += y;
      }
      s_warp_sum[lane] = w;
    }
    __syncthreads();
    const int before = s_carry + (warp > 0 ? s_warp_sum[warp - 1] : 0) + x - v;
    if (j < n) out[j] = before;
    __syncthreads(); /* every thread has read s_carry and s_warp_sum */
    if (threadIdx.x == blockDim.x - 1) s_carry = before + v;
  }
  __syncthreads();
  if (threadIdx.x == 0) out[n] = s_carry;
  __syncthreads();
}

/* Last-block pattern shared by the LL kernels: each of the n blocks of a role
 * orders its global writes (peer and local) before its increment of *counter
 * by a system fence; the block that makes the count reach n has seen every
 * increment (one RMW chain) and returns 1 (to every thread of it) after
 * resetting the counter for the next kernel (stream order). */
static __device__ int epx_ll_last_block(unsigned int *counter, int n) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    unsigned int prev = atomicAdd(counter, 1u);
    s_last = prev == (unsigned int)n - 1;
    if (s_last) *counter = 0;
  }
  __syncthreads();
  return s_last;
}

/* The op number of an LL send or fused kernel: every block of the grid reads
 * e = ll_epoch + 1 first thing (epx_ll_read_epoch, thread 0), and at its end
 * counts itself (epx_ll_advance_epoch, thread 0; the fence orders the block's
 * read before its increment); the last block to count stores e back, for the
 * next LL kernel in stream order. Every block of the grid has read ll_epoch
 * by then, so the store cannot be seen early; counting at the end keeps the
 * atomic off the path to the first message. */
static __device__ __forceinline__ unsigned long long epx_ll_read_epoch(const EpxDevCtx &c) {
  return c.state->ll_epoch + 1;
}
static __device__ void epx_ll_advance_epoch(const EpxDevCtx &c, unsigned long long epoch) {
  if (threadIdx.x != 0) return;
  __threadfence();
  if (atomicAdd(&c.state->ll_send_done, 1u) != gridDim.x - 1) return;
  c.state->ll_send_done = 0;
  c.state->ll_epoch = epoch;
}

/* Start of a receive-role block of a fused kernel: the op number the send
 * blocks of the same grid read (ll_epoch + 1: no block of the grid advances
 * it before every block has read it), or 0 after a sticky fatal error. */
static __device__ unsigned long long epx_ll_begin_receive(const EpxDevCtx &c) {
  __shared__ unsigned long long s_epoch;
  if (threadIdx.x == 0) s_epoch = epx_ll_fatal(c) ? 0ull : epx_ll_read_epoch(c);
  __syncthreads();
  return s_epoch;
}

/* Body of a fused LL kernel: the first half of the grid runs Send, the second
 * half runs Recv at the same time (one block of each on an SM); every block
 * reads the op number first and counts itself at its end. */
template <typename SendParams, typename RecvParams,
          unsigned long long (*Send)(const SendParams &, EpxLLRole),
          void (*Recv)(const RecvParams &, unsigned long long, EpxLLRole)>
static __device__ void epx_ll_fused_roles(const EpxDevCtx &c, const SendParams &sp,
                                          const RecvParams &rp) {
  const int senders = (int)gridDim.x / 2;
  unsigned long long epoch;
  if ((int)blockIdx.x < senders) {
    const EpxLLRole role = {(int)blockIdx.x, senders};
    epoch = Send(sp, role);
  } else {
    const EpxLLRole role = {(int)blockIdx.x - senders, (int)gridDim.x - senders};
    epoch = epx_ll_begin_receive(c);
    if (epoch) Recv(rp, epoch, role);
  }
  if (epoch) epx_ll_advance_epoch(c, epoch);
}

/* After the headers of op e are written (by the whole block): thread r
 * release-stores sig[me] = e in destination r. The barrier and the release
 * order every thread's header writes before it. Pairs with the acquire in
 * epx_ll_wait_signals on r. */
static __device__ void epx_ll_post_headers(const EpxDevCtx &c, unsigned long long epoch) {
  __syncthreads();
  if ((int)threadIdx.x < c.nranks)
    epx_st_release_sys(epx_ll_sig(c, c.ll_peers[threadIdx.x], c.rank), epoch);
}

/* EPX_CUDA_TRACE: the last block of an LL send kernel to finish records
 * SEND_SIGNALS (every message and flag written). */
static __device__ void epx_ll_trace_send_done(const EpxDevCtx &c, int op, EpxLLRole role) {
  if (!c.trace) return;
  __syncthreads();
  if (threadIdx.x != 0) return;
  __threadfence();
  if (atomicAdd(&c.state->trace_done[0], 1u) != (unsigned int)role.blocks - 1) return;
  c.state->trace_done[0] = 0;
  epx_trace(c, op, EPX_TRACE_SEND_SIGNALS);
  const unsigned long long late = atomicExch(&c.state->trace_late_start, 0ull);
  const unsigned long long t0 = c.state->trace_t0;
  epx_trace_sample(c, op, 1 + EPX_TRACE_SEND_LATE_START, late);
  c.state->trace_sum[epx_trace_kind(c, op)][EPX_TRACE_SEND_LATE_START] += late > t0 ? late - t0 : 0ull;
}

/* EPX_CUDA_TRACE: every LL send block notes its start (one thread, first
 * thing); epx_ll_trace_send_done records the latest as SEND_LATE_START. */
static __device__ __forceinline__ void epx_ll_trace_send_begin(const EpxDevCtx &c) {
  if (!c.trace || threadIdx.x != 0) return;
  atomicMax(&c.state->trace_late_start, (unsigned long long)epx_globaltimer());
}

/* The flag words of a slot (see the protocol above). */
static __device__ __forceinline__ unsigned long long *epx_ll_flag(const EpxDevCtx &c, char *slot,
                                                                  size_t index) {
  return (unsigned long long *)(slot + c.ll.flags_off) + index;
}
static __device__ __forceinline__ unsigned long long epx_ll_flag_value(unsigned long long epoch,
                                                                       int present) {
  return 2ull * epoch + (present ? 1ull : 0ull);
}
static __device__ __forceinline__ size_t epx_ll_dispatch_flag_index(const EpxDevCtx &c, int src, int t) {
  return (size_t)src * (size_t)c.ll_max_tokens + (size_t)t;
}
static __device__ __forceinline__ size_t epx_ll_combine_flag_index(const EpxDevCtx &c, int t, int k,
                                                                   int piece) {
  return ((size_t)t * (size_t)c.max_topk + (size_t)k) * EPX_LL_COMBINE_PIECES + (size_t)piece;
}

/* Vectors (16 bytes) in one piece of a combine row cut into `pieces`: a
 * multiple of 32; pieces past the row's end are empty. */
static __device__ __forceinline__ int epx_ll_combine_piece_vectors(int nvec, int pieces) {
  return ((nvec + pieces - 1) / pieces + 31) / 32 * 32;
}

/* Waits (one thread) for the flag of op `epoch` written by `peer`; returns 1
 * when a message is there, 0 when the op sends none there, -1 after recording
 * a failed wait. The acquire in epx_wait_epoch pairs with the sender's
 * release-store of the flag; the caller's __syncwarp (or barrier) extends it
 * to the lanes that read the message. */
static __device__ int epx_ll_wait_flag(const EpxDevCtx &c, const unsigned long long *flag,
                                       unsigned long long epoch, int op, int peer,
                                       unsigned long long seq) {
  const unsigned long long want = epx_ll_flag_value(epoch, 0);
  if (!epx_wait_epoch(c, flag, want, op, EPX_PHASE_LL_MESSAGE, peer, seq)) return -1;
  /* stable: op epoch + 2 cannot write it before this receive acknowledges */
  return (int)(epx_ld_relaxed_sys(flag) & 1ull);
}

/* Start of an LL receive role: thread s acquires sig[s] >= epoch (pairs with
 * the release in epx_ll_post_headers on s); the barrier then orders every
 * thread's reads of the headers after it. */
static __device__ int epx_ll_wait_signals(const EpxDevCtx &c, unsigned long long epoch, int op,
                                          unsigned long long seq, EpxLLRole role) {
  __shared__ int s_ok;
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  if (role.block == 0 && threadIdx.x == 0) epx_trace(c, op, EPX_TRACE_RECV_START);
  if ((int)threadIdx.x < c.nranks) {
    const unsigned long long *sig = epx_ll_sig(c, c.ll_peers[c.rank], threadIdx.x);
    if (!epx_wait_epoch(c, sig, epoch, op, EPX_PHASE_LL_SIGNAL, threadIdx.x, seq)) s_ok = 0;
  }
  __syncthreads();
  if (role.block == 0 && threadIdx.x == 0 && s_ok) epx_trace(c, op, EPX_TRACE_RECV_SIGNALS);
  return s_ok;
}

/* End of an LL receive kernel: once every block has read its messages, the
 * last block's thread s release-stores ack[me] = epoch in source s. Pairs
 * with the acquire in epx_ll_wait_slot_free on s. */
static __device__ void epx_ll_post_acks(const EpxDevCtx &c, unsigned long long epoch, int op,
                                        EpxLLRole role) {
  if (!epx_ll_last_block(&c.state->ll_recv_done, role.blocks)) return;
  if (threadIdx.x == 32) epx_trace(c, op, EPX_TRACE_RECV_END);
  if ((int)threadIdx.x < c.nranks) {
    __threadfence_system();
    epx_st_release_sys(epx_ll_ack(c, c.ll_peers[threadIdx.x], c.rank), epoch);
  }
}

/* Priority of per-call errors when several sources report one (as the hello). */
static __device__ __forceinline__ int epx_ll_code_priority(int code) {
  if (code == epxInvalidArgument) return 3;
  if (code == epxRemoteError) return 2;
  if (code == epxMismatch) return 1;
  return 0;
}

static __device__ __forceinline__ void epx_ll_unpack_bf16x8(int4 v, float f[8]) {
  uint32_t w[4] = {(uint32_t)v.x, (uint32_t)v.y, (uint32_t)v.z, (uint32_t)v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = epx_bf16_to_f32((uint16_t)(w[i] & 0xffffu));
    f[2 * i + 1] = epx_bf16_to_f32((uint16_t)(w[i] >> 16));
  }
}

/* ---- programmatic dependent launch (PDL) ----
 *
 * The op kernels (hello, send, receive/reduce of both modes) are launched with
 * programmatic stream serialisation when EpxDevCtx.pdl is set
 * (EPX_CUDA_PDL=1, the default): a kernel's blocks may be scheduled as soon as
 * every block of the kernel before it in the stream has started (each calls
 * epx_allow_dependents first thing), which hides the launch gap between the
 * kernels of an op. Correctness does not change: every such kernel calls
 * epx_wait_prior_grid() before it touches global memory, and that waits for
 * the previous kernel to complete with its writes visible, as plain stream
 * order would. Without the launch attribute both are no-ops. */
static __device__ __forceinline__ void epx_wait_prior_grid(void) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
static __device__ __forceinline__ void epx_allow_dependents(void) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

/* Loads `kernel` into the current context now (cudaFuncGetAttributes needs it
 * loaded), instead of at its first launch: see epx_cuda_preload_kernels. */
template <typename... KArgs>
static cudaError_t epx_preload(void (*kernel)(KArgs...)) {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, kernel);
}

/* Launches kernel<<<blocks, threads, smem, stream>>>(args...), as a
 * programmatic dependent of the stream's previous kernel when `pdl`, and as a
 * cooperative launch (every block resident at once, or the launch fails)
 * when `cooperative`: the fused LL kernels need it, since their blocks wait
 * for messages that other ranks' blocks send. */
template <typename... KArgs, typename... Args>
static cudaError_t epx_launch_ex(void (*kernel)(KArgs...), int pdl, int cooperative, int blocks,
                                 int threads, size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)blocks);
  cfg.blockDim = dim3((unsigned)threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2] = {};
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cooperative) {
    attr[n].id = cudaLaunchAttributeCooperative;
    attr[n++].val.cooperative = 1;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename... KArgs, typename... Args>
static cudaError_t epx_launch(void (*kernel)(KArgs...), int pdl, int blocks, int threads, size_t smem,
                              cudaStream_t stream, Args... args) {
  return epx_launch_ex(kernel, pdl, 0, blocks, threads, smem, stream, args...);
}

#endif /* __CUDACC__ */

/* ---- kernel launches (one file per role) ---- */

/* The hello / count exchange of one op (single block). */
typedef struct EpxHelloParams {
  EpxDevCtx ctx;
  unsigned long long seq;
  int op, flags, hidden, topk, x_type, idx_type, scale_format, path;
  int counted;           /* 1: count tokens and fill the handle (notify, worst-case dispatch) */
  int write_host;        /* 1: publish N_recv and per-expert counts to the host words */
  const void *topk_idx;  /* NULL when absent */
  int topk_is_int64, num_tokens, expert_alignment;
  int *scratch_pos;           /* comm scratch [maxT, R]: pass-1 positions, -1 = not sent */
  uint8_t *is_token_in_rank; /* handle arrays (counted path), written only on success */
  int *send_row, *rank_prefix_matrix, *num_recv_per_expert;
} EpxHelloParams;

/* Dispatch, one launch: send blocks write every token into its final row on
 * each destination; copy-out blocks move the peers' rows from the region
 * into the caller's outputs chunk by chunk as they arrive. */
typedef struct EpxDispatchParams {
  EpxDevCtx ctx;
  unsigned long long seq;
  int invalid;
  const void *x;
  const void *x_scales;
  const void *topk_idx;
  const float *topk_weights;
  int topk_is_int64, num_tokens, num_topk;
  int payload_bytes, scale_bytes;
  const int *send_row; /* handle: [T, R] final row on r or -1 */
  /* Rows for this rank itself go straight into the caller's outputs (no
   * staging, no copy-out) when N_recv fits the capacity; the copy-out then
   * moves only the peers' rows. */
  long long capacity_rows;           /* rows the caller allocated: N_recv is checked against it */
  long long num_worst_tokens;
  int bulk;                          /* payload rows as bulk copies (bulk_copy.cuh) */
  const int *rank_prefix_matrix;     /* handle */
  const int *handle_per_expert;      /* handle */
  int *handle_recv_src_idx;          /* handle */
  void *recv_x, *recv_x_scales, *recv_topk_idx;
  float *recv_topk_weights;
  int *recv_src_idx, *recv_rank_prefix, *num_recv_tokens_per_expert, *num_recv_tokens;
} EpxDispatchParams;

/* Combine, one launch: send blocks push rows of remote sources into their
 * slots; reduce blocks sum each token's slots once its chunk has arrived. The
 * send pushes only rows of remote sources: the reduce reads this rank's own
 * rows straight from x (row send_row[t][me]), so they are never copied. */
typedef struct EpxCombineParams {
  EpxDevCtx ctx;
  unsigned long long seq;
  int invalid;
  const void *x;                 /* this rank's combine input (expert side) [N_recv, H] */
  const float *topk_weights;     /* this rank's input weights [N_recv, num_topk] or NULL */
  int hidden, num_topk, num_tokens, has_weights;
  const int *rank_prefix_matrix; /* handle */
  const int *recv_src_idx;       /* handle */
  const uint8_t *is_token_in_rank; /* handle */
  const int *send_row;           /* handle: [T, R]; column me = my token's row in x */
  const void *bias0, *bias1;
  void *combined_x;
  float *combined_topk_weights;
  int bulk;                      /* send rows as bulk copies (bulk_copy.cuh) */
  int chunk_tokens;              /* source tokens per chunk (its own, EPX_CUDA_COMBINE_CHUNK_TOKENS);
                                    chunks <= lay.claim_chunks */
} EpxCombineParams;

typedef struct EpxLayoutParams {
  EpxDevCtx ctx;
  const void *topk_idx;
  int topk_is_int64, num_tokens, num_topk;
  int *num_tokens_per_rank, *num_tokens_per_node, *num_tokens_per_expert;
  uint8_t *is_token_in_rank;
  /* An accumulator of bins ints (epx_cuda_layout_scratch_ints), zero between
   * calls: blocks add their histograms into it and the last block to finish
   * moves it into the outputs: no zeroing launches before the kernel. NULL:
   * the outputs are zeroed first and every block adds into them with global
   * atomics (more experts than shared memory holds). */
  int *scratch;
} EpxLayoutParams;

/* Ints of the layout scratch (the accumulator); 0 when the histograms do not
 * fit in shared memory (the kernel then counts in global memory). One source
 * of truth for the allocation and the launcher. */
size_t epx_cuda_layout_scratch_ints(int num_experts, int nranks, int ranks_per_node);

/* Preloading (one per launcher file): loads every kernel the file launches on
 * the current device. With CUDA lazy loading (CUDA_MODULE_LOADING=LAZY, the
 * default since CUDA 12.2) a kernel is otherwise loaded at its first launch,
 * and that load may wait until every kernel running in the context has
 * finished: the first dispatch's send kernel would wait, inside the host's
 * launch call, for its hello kernel, i.e. for the slowest peer (up to the
 * timeout, and an abort thread the application starts afterwards never runs).
 * cuda_init calls them all (epx_cuda_preload_kernels) before any kernel of the
 * communicator runs. */
cudaError_t epx_cuda_preload_hello(void);
cudaError_t epx_cuda_preload_dispatch(void);
cudaError_t epx_cuda_preload_combine(void);
cudaError_t epx_cuda_preload_layout(void);
cudaError_t epx_cuda_preload_ll_dispatch_send(void);
cudaError_t epx_cuda_preload_ll_dispatch_recv(void);
cudaError_t epx_cuda_preload_ll_combine_send(void);
cudaError_t epx_cuda_preload_ll_combine_recv(void);

/* Launchers: enqueue on `stream`, return the launch error (cudaSuccess if none). */
cudaError_t epx_cuda_launch_hello(const EpxHelloParams *p, cudaStream_t stream);

/* Dynamic shared memory of the hello kernel: per-warp rank counts, the R x R
 * count matrix, my per-expert counts and the received per-local-expert counts. */
#define EPX_CUDA_HELLO_WARPS (EPX_CUDA_HELLO_THREADS / 32)
static inline __host__ __device__ size_t epx_cuda_hello_smem_bytes(int nranks, int num_experts) {
  size_t ints = (size_t)EPX_CUDA_HELLO_WARPS * nranks + (size_t)nranks * nranks +
                (size_t)num_experts + (size_t)(num_experts / nranks);
  return ints * sizeof(int);
}
cudaError_t epx_cuda_launch_dispatch(const EpxDispatchParams *p, int blocks, cudaStream_t stream);
cudaError_t epx_cuda_launch_combine(const EpxCombineParams *p, int blocks, cudaStream_t stream);
cudaError_t epx_cuda_launch_layout(const EpxLayoutParams *p, cudaStream_t stream);

/* ---- low-latency launches (ll_*.cu) ---- */

typedef struct EpxLLDispatchSendParams {
  EpxDevCtx ctx;
  unsigned long long seq;
  int invalid;                      /* take part empty: header and signal only */
  const void *x;                    /* [T, H] BF16 */
  const void *topk_idx;
  int topk_is_int64, num_tokens, hidden, num_topk;
  int fp8, round_scale, ue8m0;
  unsigned long long *handle_epoch; /* where the op number goes for the receive (or NULL) */
} EpxLLDispatchSendParams;

typedef struct EpxLLDispatchRecvParams {
  EpxDevCtx ctx;
  unsigned long long seq;
  int invalid;
  const unsigned long long *epoch_src; /* the op number (handle word or state->ll_epoch) */
  int hidden, num_topk, fp8, ue8m0;
  void *recv_x, *recv_x_scales;
  int *recv_count, *recv_src_info;
  long long *recv_layout_range;
  int *stats;
  /* handle arrays */
  int *row_src_rank, *row_src_token;
  uint32_t *row_kmask;
  int *h_recv_count;
  long long *h_layout_range;
} EpxLLDispatchRecvParams;

typedef struct EpxLLCombineSendParams {
  EpxDevCtx ctx;
  unsigned long long seq;
  int invalid;
  const void *x; /* [E_local, R * llT, H] BF16 expert outputs */
  int hidden, num_topk;
  const int *row_src_rank, *row_src_token;
  const uint32_t *row_kmask;
  const int *h_recv_count;
  unsigned long long *handle_epoch;
} EpxLLCombineSendParams;

typedef struct EpxLLCombineRecvParams {
  EpxDevCtx ctx;
  unsigned long long seq;
  int invalid;
  const unsigned long long *epoch_src;
  const void *topk_idx;
  int topk_is_int64;
  const float *topk_weights;
  int num_tokens, hidden, num_topk;
  void *combined_x;
} EpxLLCombineRecvParams;

cudaError_t epx_cuda_launch_ll_dispatch_send(const EpxLLDispatchSendParams *p, int blocks,
                                             cudaStream_t stream);
cudaError_t epx_cuda_launch_ll_dispatch_recv(const EpxLLDispatchRecvParams *p, int blocks,
                                             cudaStream_t stream);
cudaError_t epx_cuda_launch_ll_combine_send(const EpxLLCombineSendParams *p, int blocks,
                                            cudaStream_t stream);
cudaError_t epx_cuda_launch_ll_combine_recv(const EpxLLCombineRecvParams *p, int blocks,
                                            cudaStream_t stream);
/* Send and receive in one launch (no receive hook): the first half of the
 * blocks sends, the second half receives. Launched cooperatively: a block
 * waiting for messages holds its SM, so every block must be resident (see
 * epx_cuda_ll_fused_blocks_per_sm). */
cudaError_t epx_cuda_launch_ll_dispatch_fused(const EpxLLDispatchSendParams *sp,
                                              const EpxLLDispatchRecvParams *rp, int blocks,
                                              cudaStream_t stream);
/* How many blocks of each fused kernel fit on one SM at once with `smem`
 * bytes of dynamic shared memory (the lower of the two); the fused grid is
 * that many per SM, at most 2. */
cudaError_t epx_cuda_ll_fused_blocks_per_sm(size_t dispatch_smem, size_t combine_smem, int *per_sm);
cudaError_t epx_cuda_ll_combine_fused_occupancy(size_t smem, int *per_sm);
cudaError_t epx_cuda_launch_ll_combine_fused(const EpxLLCombineSendParams *sp,
                                             const EpxLLCombineRecvParams *rp, int blocks,
                                             cudaStream_t stream);

#endif /* EPX_CUDA_COMMON_CUH */
