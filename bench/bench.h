/*
 * bench.h - epx-bench: the parts of the benchmark and how they meet.
 *
 *  epx_bench.c     command line, one forked job per mode, the table and the records
 *  bench_rank.c    what every rank runs: init, inputs, one checked iteration, warm-up,
 *                  timed iterations of each operation
 *  bench_check.c   comparison of one iteration's outputs with the CPU reference
 *  bench_shm.c     the channel between the ranks and the parent: a barrier, per-iteration
 *                  times, per-rank byte counts and verdicts, in shared memory made before fork
 *  bench_stats.c   percentiles, the slowest rank, bytes counted from the routing
 *  bench_json.c    result records (spec.md §9) and the merge into bench/results/<machine>.json
 *  bench_device.c  which device serves a backend; host views of device buffers
 *  bench_host.c    the host "device": host memory, wall-clock timing, a 64 MiB cache flush
 *  bench_cuda.c    the CUDA device: device buffers, one stream, CUDA events, a 256 MiB L2
 *                  flush, the start gate, and the NCCL all-to-all baseline (NCCL loaded
 *                  with dlopen); built when the Makefile finds nvcc, which defines
 *                  EPX_BENCH_HAVE_CUDA
 *  bench_gate.cu   the start gate's kernel (nvcc), for bench_cuda.c
 *
 * Timing on a device whose calls return before the work is done (CUDA): a series whose call
 * does not block the host is timed from a gated common start. Per iteration every rank
 * flushes the cache, enqueues the gate (a one-thread kernel that spins until a word of host
 * memory shared by all ranks reaches this iteration's number), the start event, the call and
 * the stop event; the ranks meet at a host barrier; rank 0 stores the number, releasing every
 * GPU at about the same moment; each rank then waits for its stop event. The events thus hold
 * GPU execution only: neither host launch skew between ranks nor host enqueue time. Each
 * gated series starts with one ungated call (lazy set-up, e.g. NCCL's connections, and the
 * "not supported" answer). The exact-size dispatch (notify waits on the host) and the e2e
 * series are timed by the wall clock: host call to stream completion, after a host barrier.
 * Without the gate (the host device, or a CUDA rank that cannot map the shared page) every
 * call is timed as host barrier, start, call, stop.
 *
 * The baseline has its own timed series per op (BENCH_NCCL_*), reported in the dispatch and
 * combine records as nccl_time_us_p50 (null when the device has no baseline or skips it).
 * An operation the backend answers with epxNotSupported on every rank gets a "not supported"
 * row and no record.
 *
 * Low latency also times each op's two phases apart (return_recv_hook = 1, then
 * epxLowLatencyRecv; BENCH_LL_*_SEND / _RECV): table rows "dispatch/send", "dispatch/recv",
 * "combine/send", "combine/recv", records with op "dispatch" or "combine" and an extra field
 * "phase": "send" | "recv" (the whole-op records have none). A phase has a time only: its
 * records' GB/s, e2e_us and nccl_time_us_p50 are null.
 */
#ifndef EPX_BENCH_H
#define EPX_BENCH_H

#include <stddef.h>
#include <stdint.h>

#include "common/harness.h"
#include "epx.h"

/* ------------------------------------------------------------ operations */

typedef enum benchMode { BENCH_NORMAL = 0, BENCH_LOW_LATENCY = 1, BENCH_NUM_MODES = 2 } benchMode;
typedef enum benchDtype { BENCH_BF16 = 0, BENCH_FP8 = 1, BENCH_NUM_DTYPES = 2 } benchDtype;

/* The timed series. A record (one line of the table) is one series: its time from the series
 * and its e2e_us from the series' wall-clock twin where one ran (bench_series_e2e), else the
 * same as its time. The normal dispatch record takes its time from BENCH_DISPATCH (the data
 * movement alone, with the routing cached in the handle) and its e2e_us from
 * BENCH_DISPATCH_E2E (layout + count exchange + dispatch). */
typedef enum benchSeries {
  BENCH_LAYOUT = 0,       /* epxGetDispatchLayout */
  BENCH_DISPATCH_E2E = 1, /* epxGetDispatchLayout + epxDispatchNotify + epxDispatch */
  BENCH_DISPATCH = 2,     /* epxDispatch with a filled handle (cached re-dispatch) */
  BENCH_COMBINE = 3,      /* epxCombine */
  BENCH_LL_DISPATCH = 4,  /* epxLowLatencyDispatch */
  BENCH_LL_COMBINE = 5,   /* epxLowLatencyCombine */
  BENCH_NCCL_DISPATCH = 6, /* baseline: the dispatch's rows moved by an NCCL all-to-all */
  BENCH_NCCL_COMBINE = 7,  /* baseline: the combine's rows (back to their sources) likewise */
  /* Wall-clock twins (host call to stream completion) of series timed from the gate, for the
   * records' e2e_us; run only on a device with a wall clock of its own (wall_start). */
  BENCH_COMBINE_E2E = 8,     /* epxCombine */
  BENCH_LL_DISPATCH_E2E = 9, /* epxLowLatencyDispatch */
  BENCH_LL_COMBINE_E2E = 10, /* epxLowLatencyCombine */
  BENCH_LAYOUT_E2E = 11,     /* epxGetDispatchLayout */
  /* The two phases of a low-latency op, each timed alone (from the gate where there is one):
   * send = the call with return_recv_hook = 1, then, untimed, epxLowLatencyRecv; recv = the
   * send-only call untimed, every rank's stream drained and the ranks met, then
   * epxLowLatencyRecv alone (receiving data that has all arrived). Records with "phase". */
  BENCH_LL_DISPATCH_SEND = 12, /* epxLowLatencyDispatch, return_recv_hook = 1 */
  BENCH_LL_DISPATCH_RECV = 13, /* epxLowLatencyRecv of that dispatch */
  BENCH_LL_COMBINE_SEND = 14,  /* epxLowLatencyCombine, return_recv_hook = 1 */
  BENCH_LL_COMBINE_RECV = 15,  /* epxLowLatencyRecv of that combine */
  BENCH_NUM_SERIES = 16
} benchSeries;

const char *bench_mode_name(benchMode m);   /* "normal", "low_latency" */
const char *bench_dtype_name(benchDtype d); /* "bf16", "fp8" */
const char *bench_series_op(benchSeries s); /* "layout", "dispatch", "combine" */
/* The phase of a phase series ("send", "recv"); NULL for a whole operation. */
const char *bench_series_phase(benchSeries s);
/* The wall-clock e2e twin of a series (BENCH_NUM_SERIES: none), and the series a twin
 * belongs to (itself for any other). */
benchSeries bench_series_e2e(benchSeries s);
benchSeries bench_series_base(benchSeries s);

/* --------------------------------------------------------------- options */

typedef struct benchOptions {
  int nranks;
  int ranks_per_node; /* 0 = all ranks */
  epxBackend_t backend;
  int modes[BENCH_NUM_MODES];   /* 1 = run this mode */
  int dtypes[BENCH_NUM_DTYPES]; /* 1 = run this dtype */
  int tokens;                   /* 0 = the mode's standard T */
  int hidden, topk, experts;
  int iters, warmup;
  int sms;
  int check;
  uint64_t seed;
  int timeout_s;         /* wall-clock limit of one mode's job */
  const char *json_path; /* NULL = no records written */
  const char *machine;
  int machine_given;  /* --machine or $EPX_MACHINE: else the device may name the machine */
  int print_backend;  /* --print-backend: say what would run, run nothing */
  char command[2048]; /* argv joined, for the records */
} benchOptions;

/* Standard shapes (spec.md §8). */
#define BENCH_STD_NORMAL_TOKENS 4096
#define BENCH_STD_LL_TOKENS 128
#define BENCH_STD_HIDDEN 7168
#define BENCH_STD_TOPK 8
#define BENCH_STD_EXPERTS 256
/* Recorded runs take the median of at least this many timed iterations (spec.md §8). */
#define BENCH_MIN_RECORDED_ITERS 50

/* T of a mode under these options. */
int bench_mode_tokens(const benchOptions *o, benchMode m);

/* ---------------------------------------------------------------- device */

/* Where the benchmark keeps the buffers it hands to epx, and how it times a call. The host
 * device uses host memory and the wall clock; a CUDA device uses device memory, one stream
 * and CUDA events. Every function returns 0 on success, nonzero after printing why. */
typedef struct benchDevice {
  const char *name;
  epxBackend_t backend;
  int host_addressable; /* buffers are host memory: bench_fetch needs no copy */
  /* Ranks this device can run by default (GPUs visible; the host: 0 = no preference). Called
   * in the parent: it must not initialise anything a forked rank cannot inherit (CUDA). */
  int (*default_ranks)(void);
  /* In the parent: the machine kind for the records when neither --machine nor $EPX_MACHINE
   * names it (e.g. "nvidia-h200-x2"), or NULL. NULL entry: host-<nproc>cpu. */
  const char *(*default_machine)(void);
  /* Per rank, after fork and before epxCommInitRank: pick the GPU, make the stream, ... */
  int (*rank_setup)(int rank, int nranks);
  void (*rank_teardown)(void);
  void *(*alloc)(size_t bytes); /* NULL after printing why */
  void (*free)(void *p);
  int (*upload)(void *dst, const void *src, size_t bytes);
  int (*download)(void *dst, const void *src, size_t bytes);
  int (*fill)(void *dst, int byte, size_t bytes);
  epxStream_t (*stream)(void);
  /* Evicts the benchmark's data from the caches between timed iterations. */
  void (*flush_cache)(void);
  /* Brackets one timed region; stop waits for the work and returns microseconds. */
  void (*timer_start)(void);
  double (*timer_stop_us)(void);
  /* The same by the wall clock, for regions with host synchronisation inside (end to end):
   * stop waits for the stream first. NULL: timer_start / timer_stop_us. */
  void (*wall_start)(void);
  double (*wall_stop_us)(void);
  /* Waits for the work enqueued on the stream; 0, or nonzero after printing why. NULL: the
   * device's calls return when done (the host). */
  int (*sync)(void);

  /* The start gate (see the top of this file), all NULL on a device without one (the host:
   * its calls return when done, so its timer is the wall clock already).
   * gate_attach: per rank after rank_setup; maps `page` (`bytes`, page-aligned host memory
   * shared by every rank) for the device; `go` and `timed_out` lie in it. NULL when attached,
   * else why not (the caller prints it). */
  const char *(*gate_attach)(void *page, size_t bytes, volatile uint32_t *go,
                             volatile uint32_t *timed_out);
  void (*gate_detach)(void); /* waits for the stream, unmaps */
  /* Enqueues the gate: the stream waits until *go reaches gen (wrapping compare), or until
   * the gate's wall-clock limit passes, when it stores gen into *timed_out and lets the
   * stream go on. 0, or nonzero after printing why. */
  int (*gate_enqueue)(uint32_t gen);
  /* After timer_start and the call: records the stop event, without waiting. */
  void (*gate_timer_stop)(void);
  /* Waits for the stop event; microseconds from start to stop, or -1 after printing why (a
   * failed wait, or the gate of gen timed out). */
  double (*gate_timer_read_us)(uint32_t gen);

  /* The baseline (NCCL all-to-all of the same rows), all NULL when the device has none. */
  /* In the parent: NULL when a run of nranks ranks can have the baseline, else why not. */
  const char *(*baseline_unavailable)(int nranks);
  /* Rank 0: makes the rendezvous id (BENCH_BASELINE_ID_BYTES) handed to every rank. */
  int (*baseline_make_id)(void *id);
  /* Every rank (collective): joins the baseline communicator. */
  int (*baseline_join)(int rank, int nranks, const void *id);
  /* Enqueues, on the stream, one all-to-all: to rank r the send_bytes[r] bytes at
   * send + send_off[r], from rank r recv_bytes[r] bytes into recv + recv_off[r]. */
  int (*baseline_alltoall)(const void *send, const size_t *send_off, const size_t *send_bytes,
                           void *recv, const size_t *recv_off, const size_t *recv_bytes);
  void (*baseline_leave)(void);
} benchDevice;

/* Bytes of the baseline's rendezvous id (NCCL's ncclUniqueId). */
#define BENCH_BASELINE_ID_BYTES 128

extern const benchDevice bench_host_device;
/* The device serving `backend` in this build, or NULL. */
const benchDevice *bench_device_for(epxBackend_t backend);

/* A host view of `bytes` of device buffer `p`: `p` itself on a host-addressable device,
 * else a copy in *scratch (malloc'd, freed by the caller). NULL after printing why. */
const void *bench_fetch(const benchDevice *dev, const void *p, size_t bytes, void **scratch);

/* ----------------------------------------------------------- the channel */

/* Per-rank figures a rank reports to the parent for one (dtype, series). */
typedef struct benchRankBytes {
  double logical;  /* DeepEP's count (spec.md §8) */
  double physical; /* payload bytes this rank sends to other ranks (self excluded) */
} benchRankBytes;

typedef enum benchVerdict {
  BENCH_NOT_RUN = 0,
  BENCH_UNCHECKED = 1, /* ran; --no-check */
  BENCH_CORRECT = 2,
  BENCH_WRONG = 3,
  BENCH_NOT_SUPPORTED = 4 /* the backend answered epxNotSupported */
} benchVerdict;

typedef struct benchShm benchShm;

/* Shared memory for nranks ranks and `iters` timed iterations, made by the parent before it
 * forks the ranks (MAP_SHARED | MAP_ANONYMOUS). NULL after printing why. */
benchShm *bench_shm_create(int nranks, int iters);
void bench_shm_destroy(benchShm *s);
/* Clears every figure and the failure flag, for the next job. */
void bench_shm_reset(benchShm *s);

/* Waits until every rank has arrived. Returns 0, or nonzero when a rank has reported failure
 * or `timeout_s` passes (a lost rank must not hang the others). */
int bench_barrier(benchShm *s, double timeout_s);
/* Marks the job failed, so waiting ranks leave their barriers. */
void bench_shm_fail(benchShm *s);
int bench_shm_failed(const benchShm *s);

double *bench_shm_times(benchShm *s, benchDtype d, benchSeries op, int rank); /* [iters] */
const double *bench_shm_times_c(const benchShm *s, benchDtype d, benchSeries op, int rank);
benchRankBytes *bench_shm_bytes(benchShm *s, benchDtype d, benchSeries op, int rank);
const benchRankBytes *bench_shm_bytes_c(const benchShm *s, benchDtype d, benchSeries op, int rank);
void bench_shm_set_verdict(benchShm *s, benchDtype d, benchSeries op, int rank, benchVerdict v);
benchVerdict bench_shm_verdict(const benchShm *s, benchDtype d, benchSeries op, int rank);
/* buffer_bytes reported by rank 0 for a mode (epxGetSizeHints). */
void bench_shm_set_buffer_bytes(benchShm *s, size_t bytes);
size_t bench_shm_buffer_bytes(const benchShm *s);
/* SMs of the mode's kernels reported by rank 0 (-1: unknown, a null in the records). */
void bench_shm_set_sms(benchShm *s, int sms);
int bench_shm_sms(const benchShm *s);
int bench_shm_iters(const benchShm *s);
/* One int per rank, for the ranks to agree on something (e.g. that the baseline joined). */
int *bench_shm_flags(benchShm *s);
/* BENCH_BASELINE_ID_BYTES bytes: the baseline's rendezvous id, from rank 0 to the others. */
void *bench_shm_baseline_id(benchShm *s);
/* The start gate's page: page-aligned, a page long, for the device to map (gate_attach).
 * It holds `go`, the last generation released (0 after a reset), and per rank the
 * generation whose gate timed out (0: none). */
void *bench_shm_gate_page(benchShm *s, size_t *bytes);
volatile uint32_t *bench_shm_gate_go(benchShm *s);
volatile uint32_t *bench_shm_gate_timed_out(benchShm *s, int rank);
/* Releases every gate waiting for generation <= gen (a release store). */
void bench_shm_gate_open(benchShm *s, uint32_t gen);

/* ------------------------------------------------------------- one rank */

typedef struct benchJob {
  const benchOptions *opt;
  const benchDevice *dev;
  benchMode mode;
  benchShm *shm;
} benchJob;

/* The epx_test_rank_fn of one mode's job: arg is a benchJob. */
int bench_rank_main(int rank, int nranks, const epxUniqueId *id, void *arg);

/* ------------------------------------------------------------ statistics */

/* Nearest-rank percentile (0 < q <= 1) of n values; sorts `v` in place. */
double bench_percentile(double *v, int n, double q);

/* Routing counts of one rank, from every rank's topk (all regenerated from the seed). */
typedef struct benchRouting {
  int64_t tokens;      /* T of this rank */
  int64_t selections;  /* valid (token, slot) pairs of this rank's topk */
  int64_t recv_rows;   /* N_recv: tokens of all ranks with an expert here */
  int64_t recv_remote; /* of those, tokens from other ranks */
  int64_t send_remote; /* (token, rank) pairs, rank != me, with an expert of the token */
} benchRouting;

/* Counts routing of rank `rank` of problem `p`. */
void bench_count_routing(const epx_test_problem *p, int rank, benchRouting *out);
/* Per peer, the rows of a dispatch: send_rows[r] = tokens of `rank` with an expert on r,
 * recv_rows[s] = tokens of s with an expert on `rank` (self included in both). */
void bench_count_pairs(const epx_test_problem *p, int rank, int64_t *send_rows,
                       int64_t *recv_rows);

/* Logical and physical bytes of (dtype, series) for one rank (spec.md §8). */
benchRankBytes bench_series_bytes(benchDtype d, benchSeries s, int hidden, const benchRouting *r);

/* One line of the table and one JSON record. */
typedef struct benchRecord {
  benchMode mode;
  benchSeries series; /* BENCH_DISPATCH for the dispatch record; a phase series for a phase */
  benchDtype dtype;
  int ranks, ranks_per_node, tokens, hidden, topk, experts;
  int sms; /* < 0: null (unknown) */
  double time_us_p50, time_us_p99;
  double logical_gbps, physical_gbps; /* < 0: none (layout, phases) */
  double e2e_us;                      /* < 0: none (phases) */
  double nccl_time_us_p50; /* < 0: null */
  size_t buffer_bytes;
  benchVerdict verdict;
} benchRecord;

/* Summarises one (dtype, series) of a finished job into *rec; 0 when the series ran. */
int bench_summarise(const benchShm *s, const benchOptions *o, benchMode mode, benchDtype d,
                    benchSeries series, benchRecord *rec);

/* ------------------------------------------------------------------ JSON */

typedef struct benchRunInfo {
  char date[32];   /* ISO 8601 UTC */
  char commit[64]; /* git rev-parse --short HEAD, or "unknown" */
  const char *machine;
  const char *command;
} benchRunInfo;

void bench_run_info(benchRunInfo *info, const benchOptions *o);
/* One record as a single-line JSON object (no newline); returns its length or -1. */
int bench_record_json(const benchRecord *rec, const benchRunInfo *info, char *buf, size_t cap);
/* Merges records into the JSON array at `path`: a record replaces the one of the same
 * configuration (mode, op, phase, dtype, ranks, ranks_per_node, tokens, hidden, topk, experts,
 * sms; a whole-op record has no "phase", and matches only records without one), others are
 * kept as they are, new ones appended. Atomic (temp file + rename). 0 on success. */
int bench_json_merge(const char *path, const benchRecord *recs, int n, const benchRunInfo *info);

#endif /* EPX_BENCH_H */
