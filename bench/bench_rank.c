/*
 * bench_rank.c - what every rank of a benchmark job runs.
 *
 * One job per mode, one communicator per job, so that each mode's buffers are those it
 * needs (buffer_bytes is that mode's) and the machine holds one mode's memory at a time.
 * For each dtype pass:
 *   1. one checked iteration: outputs poisoned, every operation run once and compared with
 *      the CPU reference (checks that need every rank's expected outputs run one rank at a
 *      time, so that only one rank at a time holds them);
 *   2. per operation, --warmup untimed and --iters timed iterations; before each, the caches
 *      are flushed and the ranks start together: on a device with the start gate (bench.h)
 *      the GPUs are released at once after every rank has enqueued the call, so the time is
 *      GPU execution alone; else the ranks meet at a host barrier and call.
 * The combines move BF16 whatever the dispatch dtype, so they run in the BF16 pass, on the
 * BF16 dispatch's outputs (identity experts). The layout does not depend on the dtype: it
 * runs in the first pass only and is recorded under that pass's dtype.
 *
 * The end-to-end series (layout + notify, which blocks the host, + dispatch) is timed by the
 * wall clock; the others by the device's timer (CUDA events on the GPU, from the gate). On a
 * device with a wall clock of its own (CUDA), each gated operation series but the cached
 * dispatch (whose record's e2e_us is the exact-size dispatch's) also gets a wall-clock twin
 * (host call to stream completion, after a host barrier, no gate): the records' e2e_us.
 *
 * Baseline: where the device has one (NCCL on the GPU), every rank joins it after init and,
 * after each dispatch and combine series, times an all-to-all that moves the same rows: to
 * each peer the rows routed there (self included), FP8 rows with their scales; the combine's
 * goes the other way, BF16.
 *
 * Low-latency phases (bench.h): after each op's series, its send phase and its receive phase
 * are timed apart, like the op (from the gate where there is one): the send series times the
 * call with return_recv_hook = 1 and then, untimed, receives (epxLowLatencyRecv) and drains the
 * stream; the receive series sends untimed, drains the stream, meets the other ranks (so every
 * rank's data has arrived) and times epxLowLatencyRecv alone. The checked iteration runs each
 * op once more through the hooks and checks those outputs too: the phases' verdict.
 *
 * An operation the backend answers with epxNotSupported is not timed: its series (and those
 * that depend on it) get the verdict "not supported", the same on every rank or the job fails.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "bench_check.h"
#include "common/layout_math.h"

/* Barrier wait before a rank gives up on a missing peer (s); larger than any one call. */
#define BARRIER_TIMEOUT_S 600.0
/* Returned by a step whose operation the backend does not support (0 = ran, 1 = failed). */
#define RC_UNSUPPORTED 2
/* Byte the baseline's buffers are filled with (any nonzero pattern). */
#define BASELINE_FILL_BYTE 0x3c

typedef struct rankState {
  const benchJob *job;
  const benchOptions *opt;
  const benchDevice *dev;
  benchShm *shm;
  int rank, nranks, tokens, E_local;
  epx_test_problem p;
  epxComm_t comm;
  epxHandle_t handle;
  benchRouting routing;

  /* inputs (device buffers) */
  void *topk, *weights, *x_bf16, *x_fp8, *scales;
  /* normal mode outputs */
  int *per_rank, *per_node, *per_expert;
  uint8_t *in_rank;
  int64_t num_recv;
  void *recv_x, *recv_scales, *recv_topk, *recv_weights;
  int *recv_src, *recv_prefix, *recv_per_expert, *recv_num;
  void *combined_x, *combined_weights;
  /* low-latency outputs */
  void *ll_recv_x, *ll_scales, *ll_src_info, *ll_range, *ll_count;

  /* the call being timed */
  benchDtype dtype;
  int unsupported[BENCH_NUM_SERIES]; /* of the current dtype pass */
  int layout_timed;

  /* the start gate (bench.h) */
  int gated;         /* every rank attached it: operation series start from it */
  uint32_t gate_gen; /* generation of the last gate enqueued (the same on every rank) */

  /* the baseline (when joined) */
  int baseline;
  void *b_send, *b_recv;
  int64_t b_send_rows[EPX_TEST_MAX_RANKS], b_recv_rows[EPX_TEST_MAX_RANKS];
} rankState;

/* ----------------------------------------------------------- plumbing */

static int epx_failed(rankState *st, const char *what, epxResult_t res) {
  if (res == epxSuccess) return 0;
  fprintf(stderr, "epx-bench rank %d: %s: %s: %s\n", st->rank, what, epxGetErrorString(res),
          epxCommGetLastError(st->comm));
  bench_shm_fail(st->shm);
  return 1;
}

static void *dev_alloc(rankState *st, size_t bytes) {
  void *p = st->dev->alloc(bytes);
  if (!p) bench_shm_fail(st->shm);
  return p;
}

static void dev_free(rankState *st, void **p) {
  if (*p) st->dev->free(*p);
  *p = NULL;
}

static int dev_poison(rankState *st, void *p, size_t bytes) {
  return p ? st->dev->fill(p, EPX_TEST_POISON_BYTE, bytes) : 0;
}

/* Generates a host array with `fill` and uploads it to a new device buffer. */
static void *upload_new(rankState *st, size_t bytes, void (*fill)(rankState *, void *)) {
  void *host = epx_test_xmalloc(bytes + 1);
  fill(st, host);
  void *d = dev_alloc(st, bytes + 1);
  if (d && st->dev->upload(d, host, bytes)) {
    st->dev->free(d);
    d = NULL;
    bench_shm_fail(st->shm);
  }
  free(host);
  return d;
}

static void fill_topk(rankState *st, void *h) { epx_test_fill_topk(&st->p, st->rank, h, 1); }
static void fill_weights(rankState *st, void *h) { epx_test_fill_weights(&st->p, st->rank, h); }
static void fill_x_bf16(rankState *st, void *h) { epx_test_fill_x_bf16(&st->p, st->rank, h); }
static void fill_x_fp8(rankState *st, void *h) { epx_test_fill_x_fp8(&st->p, st->rank, h); }
static void fill_scales(rankState *st, void *h) { epx_test_fill_scales_f32(&st->p, st->rank, h); }

static void set_verdict(rankState *st, benchSeries s, benchVerdict v) {
  bench_shm_set_verdict(st->shm, st->dtype, s, st->rank, v);
}

/* Result of one call of an operation: 0 ran, RC_UNSUPPORTED the backend cannot serve it
 * (noted for series s of this pass), 1 failed. */
static int op_result(rankState *st, benchSeries s, const char *what, epxResult_t res) {
  if (res != epxNotSupported) return epx_failed(st, what, res);
  if (st->rank == 0)
    fprintf(stderr, "epx-bench: %s %s: not supported by the %s backend: %s\n",
            bench_dtype_name(st->dtype), what, st->dev->name, epxCommGetLastError(st->comm));
  st->unsupported[s] = 1;
  return RC_UNSUPPORTED;
}

/* Every rank contributes `mine`; all[r] is rank r's. Two barriers, so the slots are free for
 * the next round when it returns. 0 on success. */
static int agree_all(rankState *st, int mine, int *all) {
  int *flags = bench_shm_flags(st->shm);
  flags[st->rank] = mine;
  if (bench_barrier(st->shm, BARRIER_TIMEOUT_S)) return 1;
  for (int r = 0; r < st->nranks; ++r) all[r] = flags[r];
  return bench_barrier(st->shm, BARRIER_TIMEOUT_S);
}

/* End of a dtype pass that met an unsupported operation: marks `series` (n of them) not
 * supported and checks that every rank met the same. 0 when they agree. */
static int mark_unsupported(rankState *st, const benchSeries *series, int n) {
  int mine = 0, all[EPX_TEST_MAX_RANKS];
  for (int i = 0; i < n; ++i) {
    set_verdict(st, series[i], BENCH_NOT_SUPPORTED);
    mine |= 1 << series[i];
  }
  if (agree_all(st, mine, all)) return 1;
  for (int r = 0; r < st->nranks; ++r) {
    if (all[r] != mine) {
      fprintf(stderr,
              "epx-bench rank %d: ranks disagree on which operations are supported (mask %#x "
              "here, %#x on rank %d)\n",
              st->rank, (unsigned)mine, (unsigned)all[r], r);
      bench_shm_fail(st->shm);
      return 1;
    }
  }
  return 0;
}

/* Records the verdict of a check result (<0: the reference failed, a rank error). */
static int record_check(rankState *st, benchSeries s, int64_t bad, const char *what) {
  if (bad < 0) {
    fprintf(stderr, "epx-bench rank %d: the reference for %s could not run (out of memory?)\n",
            st->rank, what);
    bench_shm_fail(st->shm);
    return 1;
  }
  if (bad > 0)
    fprintf(stderr,
            "epx-bench rank %d: %s %s: %lld elements differ from the reference (seed %llu)\n",
            st->rank, bench_dtype_name(st->dtype), what, (long long)bad,
            (unsigned long long)st->p.seed);
  set_verdict(st, s, bad == 0 ? BENCH_CORRECT : BENCH_WRONG);
  return 0;
}

/* Runs `fn` on one rank at a time, in rank order. */
static int one_at_a_time(rankState *st, int (*fn)(rankState *, void *), void *ctx) {
  int rc = 0;
  for (int r = 0; r < st->nranks; ++r) {
    if (bench_barrier(st->shm, BARRIER_TIMEOUT_S)) return 1;
    if (r == st->rank) rc = fn(st, ctx);
  }
  if (bench_barrier(st->shm, BARRIER_TIMEOUT_S)) return 1;
  return rc;
}

/* --------------------------------------------------------- operations */

typedef epxResult_t (*benchOpFn)(rankState *st);

static epxDispatchArgs_t dispatch_args(rankState *st, int cached) {
  epxDispatchArgs_t a;
  memset(&a, 0, sizeof(a));
  int fp8 = st->dtype == BENCH_FP8;
  a.x = fp8 ? st->x_fp8 : st->x_bf16;
  a.x_type = fp8 ? epxFloat8E4M3 : epxBFloat16;
  a.x_scales = fp8 ? st->scales : NULL;
  a.scale_format = fp8 ? epxScalesFloat32 : epxScalesNone;
  /* A cached re-dispatch (the backward pass's) moves payloads only: no routing in or out. */
  a.topk_idx = cached ? NULL : st->topk;
  a.topk_idx_type = epxInt64;
  a.topk_weights = cached ? NULL : st->weights;
  a.num_tokens = st->tokens;
  a.hidden = st->opt->hidden;
  a.num_topk = st->opt->topk;
  return a;
}

static epxDispatchOutputs_t dispatch_outputs(rankState *st, int cached) {
  epxDispatchOutputs_t o;
  memset(&o, 0, sizeof(o));
  int fp8 = st->dtype == BENCH_FP8;
  o.recv_x = st->recv_x;
  o.recv_x_scales = fp8 ? st->recv_scales : NULL;
  o.recv_topk_idx = cached ? NULL : st->recv_topk;
  o.recv_topk_weights = cached ? NULL : st->recv_weights;
  o.recv_src_idx = st->recv_src;
  o.recv_rank_prefix = st->recv_prefix;
  o.num_recv_tokens_per_expert = st->recv_per_expert;
  o.num_recv_tokens = st->recv_num;
  o.capacity_rows = st->num_recv;
  return o;
}

static epxResult_t op_layout(rankState *st) {
  epxLayout_t l = {st->per_rank, st->per_node, st->per_expert, st->in_rank};
  return epxGetDispatchLayout(st->comm, st->topk, epxInt64, st->tokens, st->opt->topk, &l,
                              st->dev->stream());
}

/* Layout + count exchange + dispatch: what a forward pass pays for one dispatch. */
static epxResult_t op_dispatch_e2e(rankState *st) {
  epxResult_t res = op_layout(st);
  if (res != epxSuccess) return res;
  epxDispatchArgs_t a = dispatch_args(st, 0);
  int64_t n = 0;
  res = epxDispatchNotify(st->comm, &a, st->handle, &n, NULL, st->dev->stream());
  if (res != epxSuccess) return res;
  if (n > st->num_recv) { /* the routing is fixed: N_recv cannot grow between iterations */
    fprintf(stderr, "epx-bench rank %d: N_recv went from %lld to %lld with the same routing\n",
            st->rank, (long long)st->num_recv, (long long)n);
    return epxInternalError;
  }
  epxDispatchOutputs_t o = dispatch_outputs(st, 0);
  return epxDispatch(st->comm, &a, st->handle, &o, st->dev->stream());
}

static epxResult_t op_dispatch_cached(rankState *st) {
  epxDispatchArgs_t a = dispatch_args(st, 1);
  epxDispatchOutputs_t o = dispatch_outputs(st, 1);
  return epxDispatch(st->comm, &a, st->handle, &o, st->dev->stream());
}

static epxResult_t op_combine(rankState *st) {
  epxCombineArgs_t a;
  memset(&a, 0, sizeof(a));
  a.x = st->recv_x; /* the BF16 dispatch's output: identity experts */
  a.topk_weights = st->recv_weights;
  a.hidden = st->opt->hidden;
  a.num_topk = st->opt->topk;
  epxCombineOutputs_t o = {st->combined_x, st->combined_weights};
  return epxCombine(st->comm, &a, st->handle, &o, st->dev->stream());
}

/* The low-latency ops; with `hook` only the send phase (return_recv_hook = 1), which
 * epxLowLatencyRecv (op_ll_recv) completes. */
static epxResult_t ll_dispatch_call(rankState *st, int hook) {
  epxLowLatencyDispatchArgs_t a;
  memset(&a, 0, sizeof(a));
  a.x = st->x_bf16;
  a.topk_idx = st->topk;
  a.topk_idx_type = epxInt64;
  a.num_tokens = st->tokens;
  a.hidden = st->opt->hidden;
  a.num_topk = st->opt->topk;
  a.use_fp8 = st->dtype == BENCH_FP8;
  a.return_recv_hook = hook;
  epxLowLatencyDispatchOutputs_t o = {st->ll_recv_x, a.use_fp8 ? st->ll_scales : NULL, st->ll_count,
                                      st->ll_src_info, st->ll_range};
  return epxLowLatencyDispatch(st->comm, &a, st->handle, &o, st->dev->stream());
}

static epxResult_t ll_combine_call(rankState *st, int hook) {
  epxLowLatencyCombineArgs_t a;
  memset(&a, 0, sizeof(a));
  a.x = st->ll_recv_x; /* the BF16 dispatch's output: identity experts */
  a.topk_idx = st->topk;
  a.topk_idx_type = epxInt64;
  a.topk_weights = st->weights;
  a.num_tokens = st->tokens;
  a.hidden = st->opt->hidden;
  a.num_topk = st->opt->topk;
  a.return_recv_hook = hook;
  return epxLowLatencyCombine(st->comm, &a, st->handle, st->combined_x, st->dev->stream());
}

static epxResult_t op_ll_dispatch(rankState *st) { return ll_dispatch_call(st, 0); }
static epxResult_t op_ll_combine(rankState *st) { return ll_combine_call(st, 0); }
static epxResult_t op_ll_dispatch_send(rankState *st) { return ll_dispatch_call(st, 1); }
static epxResult_t op_ll_combine_send(rankState *st) { return ll_combine_call(st, 1); }
static epxResult_t op_ll_recv(rankState *st) {
  return epxLowLatencyRecv(st->comm, st->handle, st->dev->stream());
}

/* How an iteration is timed. */
typedef enum timeHow {
  TIME_PLAIN = 0, /* host barrier, timer_start, call, timer_stop_us */
  TIME_WALL = 1,  /* the same by the wall clock (wall_start, wall_stop_us) */
  TIME_GATED = 2  /* the start gate: GPU execution from a common start */
} timeHow;

/* One call of the timed region: 0, RC_UNSUPPORTED (noted, nothing failed), or 1 after
 * printing why and marking the job failed. */
typedef int (*benchCallFn)(rankState *st, void *ctx);

/* Flushes the caches, then times one call as `how` says into *us. Returns what the call
 * returned, or 1 when the timing failed (said why, marked the job failed). */
static int timed_call(rankState *st, timeHow how, benchCallFn call, void *ctx, double *us) {
  const benchDevice *dev = st->dev;
  dev->flush_cache();
  if (how != TIME_GATED) {
    if (bench_barrier(st->shm, BARRIER_TIMEOUT_S)) return 1;
    if (how == TIME_WALL)
      dev->wall_start();
    else
      dev->timer_start();
    int rc = call(st, ctx);
    *us = how == TIME_WALL ? dev->wall_stop_us() : dev->timer_stop_us();
    if (rc) return rc;
    if (*us < 0.0) { /* the timer failed (it said why) */
      bench_shm_fail(st->shm);
      return 1;
    }
    return 0;
  }
  /* Gate, start, call, stop all enqueued; the ranks meet; rank 0 opens every gate at once;
   * then the stop event is waited for. A rank that fails opens the gate itself, so no GPU
   * waits out the gate's limit behind it. */
  uint32_t gen = ++st->gate_gen;
  if (dev->gate_enqueue(gen)) {
    bench_shm_fail(st->shm);
    return 1;
  }
  dev->timer_start();
  int rc = call(st, ctx);
  dev->gate_timer_stop();
  int failed = rc != 0 || bench_barrier(st->shm, BARRIER_TIMEOUT_S);
  if (failed || st->rank == 0) bench_shm_gate_open(st->shm, gen);
  *us = dev->gate_timer_read_us(gen);
  if (failed || *us < 0.0) {
    bench_shm_fail(st->shm); /* an unsupported answer here too: the ranks are past agreeing */
    return 1;
  }
  return 0;
}

/* An epx operation as a timed call: its first call may answer "not supported". */
typedef struct opCall {
  benchOpFn fn;
  benchSeries series; /* the operation's own series (not a wall-clock twin) */
  int first;
} opCall;

static int op_call(rankState *st, void *ctx) {
  const opCall *c = ctx;
  const char *what = bench_series_op(c->series);
  epxResult_t res = c->fn(st);
  if (c->first && res == epxNotSupported) return op_result(st, c->series, what, res);
  return epx_failed(st, what, res);
}

/* How series s is timed on this rank. */
static timeHow series_how(const rankState *st, benchSeries s) {
  const benchDevice *dev = st->dev;
  int wall = s == BENCH_DISPATCH_E2E || bench_series_base(s) != s;
  if (wall && dev->wall_start && dev->wall_stop_us) return TIME_WALL;
  if (!wall && st->gated) return TIME_GATED;
  return TIME_PLAIN;
}

/* Warm-up, then timed iterations of `call`, into the times of series s. A gated series starts
 * with one ungated call, so that lazy set-up (CUDA's lazy module loading, which may wait for
 * the device; NCCL's connections) and the "not supported" answer come outside the gate: a
 * call that waited for the GPU inside would wait for the gate, until its time limit. */
static int time_calls_between(rankState *st, benchSeries s, benchCallFn before, benchCallFn call,
                              benchCallFn after, void *ctx, int *first) {
  const benchOptions *o = st->opt;
  double *times = bench_shm_times(st->shm, st->dtype, s, st->rank);
  timeHow how = series_how(st, s);
  for (int i = how == TIME_GATED ? -1 : 0; i < o->warmup + o->iters; ++i) {
    double us = 0.0;
    int rc = before ? before(st, ctx) : 0;
    if (!rc) rc = timed_call(st, i < 0 ? TIME_PLAIN : how, call, ctx, &us);
    if (!rc && after) rc = after(st, ctx);
    *first = 0;
    if (rc) return rc;
    if (i >= o->warmup) times[i - o->warmup] = us;
  }
  return 0;
}

/* The same with nothing untimed around the call. */
static int time_calls(rankState *st, benchSeries s, benchCallFn call, void *ctx, int *first) {
  return time_calls_between(st, s, NULL, call, NULL, ctx, first);
}

/* Warm-up, then timed iterations of one operation (series_how says how). RC_UNSUPPORTED when
 * its first call answers epxNotSupported (only without --check: with it, the checked
 * iteration has called every operation already). */
static int time_series(rankState *st, benchSeries s, benchOpFn fn) {
  const benchOptions *o = st->opt;
  opCall c = {fn, bench_series_base(s), 1};
  int rc = time_calls(st, s, op_call, &c, &c.first);
  if (rc) return rc;
  *bench_shm_bytes(st->shm, st->dtype, s, st->rank) =
      bench_series_bytes(st->dtype, s, o->hidden, &st->routing);
  /* A wall-clock twin is not checked on its own: "unchecked" says it ran. */
  if (!o->check || bench_series_base(s) != s) set_verdict(st, s, BENCH_UNCHECKED);
  return 0;
}

/* The wall-clock twin of series s, where this device has a wall clock of its own (CUDA: the
 * records' e2e_us); nothing on a device whose timer is the wall clock already. */
static int time_e2e_twin(rankState *st, benchSeries s, benchOpFn fn) {
  benchSeries twin = bench_series_e2e(s);
  if (twin == BENCH_NUM_SERIES || !st->dev->wall_start || !st->dev->wall_stop_us) return 0;
  return time_series(st, twin, fn);
}

/* The two phases of a low-latency op as timed calls (bench.h). */
typedef struct phaseCall {
  benchOpFn send_only;     /* the op with return_recv_hook = 1 */
  benchSeries send_series; /* where its "not supported" answer is noted */
  int first;
} phaseCall;

static const char *phase_what(const phaseCall *c) {
  return c->send_series == BENCH_LL_COMBINE_SEND ? "epxLowLatencyCombine (send only)"
                                                 : "epxLowLatencyDispatch (send only)";
}

/* Waits for this rank's stream (nothing on a device whose calls return when done). */
static int drain(rankState *st) {
  if (!st->dev->sync || st->dev->sync() == 0) return 0;
  bench_shm_fail(st->shm);
  return 1;
}

static int phase_send(rankState *st, void *ctx) {
  phaseCall *c = ctx;
  epxResult_t res = c->send_only(st);
  if (c->first && res == epxNotSupported) return op_result(st, c->send_series, phase_what(c), res);
  return epx_failed(st, phase_what(c), res);
}

static int phase_recv(rankState *st, void *ctx) {
  return epx_failed(st, "epxLowLatencyRecv", op_ll_recv(st));
}

/* After a timed send: the receive, untimed, drained, so the op is complete (its slot free,
 * the handle filled) and nothing of it runs into the next iteration's start. */
static int phase_recv_untimed(rankState *st, void *ctx) {
  int rc = phase_recv(st, ctx);
  return rc ? rc : drain(st);
}

/* Before a timed receive: the send, untimed; then this rank's stream drained and the ranks
 * met, so that every rank's send has completed (its data arrived) before any receive starts.
 * (The gate's release, and the plain timer's barrier, come after this barrier too.) */
static int phase_send_untimed(rankState *st, void *ctx) {
  int rc = phase_send(st, ctx);
  if (!rc) rc = drain(st);
  if (!rc && bench_barrier(st->shm, BARRIER_TIMEOUT_S)) rc = 1;
  return rc;
}

/* Warm-up and timed iterations of the send phase of an op, then of its receive phase, timed
 * like the whole op (from the gate where there is one). A send-only call the backend answers
 * with epxNotSupported is noted (st->unsupported[send_series]) and leaves both phases out:
 * 0 then, as after a phase met unsupported in the checked iteration. */
static int time_phases(rankState *st, benchSeries send_series, benchSeries recv_series,
                       benchOpFn send_only) {
  const benchOptions *o = st->opt;
  if (st->unsupported[send_series]) return 0;
  phaseCall c = {send_only, send_series, 1};
  int rc = time_calls_between(st, send_series, NULL, phase_send, phase_recv_untimed, &c, &c.first);
  if (rc == RC_UNSUPPORTED) return 0;
  if (!rc)
    rc = time_calls_between(st, recv_series, phase_send_untimed, phase_recv, NULL, &c, &c.first);
  if (rc) return 1; /* a send-only call answered unsupported after it had served: a failure */
  /* The checked iteration gave both phases the verdict of the hooked op; without it (no
   * --check, or it stopped before the hooks), "unchecked" says they ran. */
  benchSeries both[2] = {send_series, recv_series};
  for (int i = 0; i < 2; ++i)
    if (!o->check || bench_shm_verdict(st->shm, st->dtype, both[i], st->rank) == BENCH_NOT_RUN)
      set_verdict(st, both[i], BENCH_UNCHECKED);
  return 0;
}

/* Attaches the start gate where the device has one; every rank must have it, or none uses
 * it (the lowest rank that could not says why, once). */
static int gate_setup(rankState *st) {
  const benchDevice *dev = st->dev;
  int all[EPX_TEST_MAX_RANKS];
  if (!dev->gate_attach || !dev->gate_enqueue || !dev->gate_timer_stop ||
      !dev->gate_timer_read_us)
    return 0;
  size_t bytes = 0;
  void *page = bench_shm_gate_page(st->shm, &bytes);
  const char *why = dev->gate_attach(page, bytes, bench_shm_gate_go(st->shm),
                                     bench_shm_gate_timed_out(st->shm, st->rank));
  if (agree_all(st, why == NULL, all)) {
    if (!why && dev->gate_detach) dev->gate_detach();
    return 1;
  }
  int first_bad = -1;
  for (int r = 0; r < st->nranks && first_bad < 0; ++r)
    if (!all[r]) first_bad = r;
  if (first_bad < 0) {
    st->gated = 1;
    return 0;
  }
  if (!why && dev->gate_detach) dev->gate_detach();
  if (st->rank == first_bad)
    fprintf(stderr,
            "epx-bench: rank %d: no start gate (%s): device times include host launch skew "
            "between ranks\n",
            st->rank, why);
  return 0;
}

/* ------------------------------------------------------------ baseline */

/* Joins the device's baseline, if it has one for this run; a baseline that cannot start is
 * skipped (with the reason), never fatal. Every rank takes the same path. */
static int baseline_setup(rankState *st) {
  const benchDevice *dev = st->dev;
  int all[EPX_TEST_MAX_RANKS];
  if (!dev->baseline_join || !dev->baseline_make_id || !dev->baseline_alltoall) return 0;
  /* The answer is the parent's (printed in the header), inherited: the same on every rank. */
  if (dev->baseline_unavailable && dev->baseline_unavailable(st->nranks)) return 0;
  void *id = bench_shm_baseline_id(st->shm);
  int ok = st->rank == 0 ? dev->baseline_make_id(id) == 0 : 1;
  if (agree_all(st, ok, all)) return 1;
  if (!all[0]) {
    if (st->rank == 0) fprintf(stderr, "epx-bench: baseline skipped: no rendezvous id\n");
    return 0;
  }
  ok = dev->baseline_join(st->rank, st->nranks, id) == 0;
  if (agree_all(st, ok, all)) return 1;
  for (int r = 0; r < st->nranks; ++r) {
    if (!all[r]) {
      if (st->rank == 0)
        fprintf(stderr, "epx-bench: baseline skipped: rank %d could not join it\n", r);
      if (ok && dev->baseline_leave) dev->baseline_leave();
      return 0;
    }
  }
  bench_count_pairs(&st->p, st->rank, st->b_send_rows, st->b_recv_rows);
  int64_t send = 0, recv = 0;
  for (int r = 0; r < st->nranks; ++r) {
    send += st->b_send_rows[r];
    recv += st->b_recv_rows[r];
  }
  /* Dispatch sends `send` rows and receives `recv`; combine the reverse; BF16 rows are the
   * largest. */
  size_t rows = (size_t)(send > recv ? send : recv), row = 2 * (size_t)st->opt->hidden;
  st->b_send = dev_alloc(st, rows * row + 16);
  st->b_recv = dev_alloc(st, rows * row + 16);
  if (!st->b_send || !st->b_recv || dev->fill(st->b_send, BASELINE_FILL_BYTE, rows * row) ||
      dev->fill(st->b_recv, BASELINE_FILL_BYTE, rows * row))
    return 1;
  st->baseline = 1;
  return 0;
}

static void baseline_teardown(rankState *st) {
  dev_free(st, &st->b_send);
  dev_free(st, &st->b_recv);
  if (st->baseline && st->dev->baseline_leave) st->dev->baseline_leave();
  st->baseline = 0;
}

/* One all-to-all of the baseline as a timed call. */
typedef struct baselineCall {
  size_t soff[EPX_TEST_MAX_RANKS], sbytes[EPX_TEST_MAX_RANKS];
  size_t roff[EPX_TEST_MAX_RANKS], rbytes[EPX_TEST_MAX_RANKS];
} baselineCall;

static int baseline_call(rankState *st, void *ctx) {
  const baselineCall *c = ctx;
  if (st->dev->baseline_alltoall(st->b_send, c->soff, c->sbytes, st->b_recv, c->roff,
                                 c->rbytes) == 0)
    return 0;
  fprintf(stderr, "epx-bench rank %d: the baseline all-to-all failed\n", st->rank);
  bench_shm_fail(st->shm);
  return 1;
}

/* Times the all-to-all of series s (BENCH_NCCL_DISPATCH or _COMBINE) with rows of row_bytes,
 * the same way as the operations (from the gate where there is one). */
static int time_baseline(rankState *st, benchSeries s, size_t row_bytes) {
  if (!st->baseline) return 0;
  int R = st->nranks, back = s == BENCH_NCCL_COMBINE;
  baselineCall c;
  size_t so = 0, ro = 0;
  for (int r = 0; r < R; ++r) {
    c.sbytes[r] = (size_t)(back ? st->b_recv_rows[r] : st->b_send_rows[r]) * row_bytes;
    c.rbytes[r] = (size_t)(back ? st->b_send_rows[r] : st->b_recv_rows[r]) * row_bytes;
    c.soff[r] = so;
    c.roff[r] = ro;
    so += c.sbytes[r];
    ro += c.rbytes[r];
  }
  int first = 1;
  if (time_calls(st, s, baseline_call, &c, &first)) return 1;
  set_verdict(st, s, BENCH_UNCHECKED); /* ran; a baseline is timed, not checked */
  return 0;
}

/* Bytes of one dispatched row as the baseline moves it: FP8 payload and float32 scales. */
static size_t baseline_row_bytes(const rankState *st) {
  size_t H = (size_t)st->opt->hidden;
  return st->dtype == BENCH_FP8 ? H + (size_t)epx_scale_cols_f32(st->opt->hidden) * 4 : 2 * H;
}

/* ------------------------------------------------------- normal mode */

static int num_nodes(const rankState *st) { return st->nranks / epx_test_ranks_per_node(&st->p); }

static size_t layout_bytes_in_rank(const rankState *st) {
  return (size_t)st->tokens * (size_t)st->nranks + 1;
}

static int normal_alloc(rankState *st) {
  const benchOptions *o = st->opt;
  size_t T = (size_t)st->tokens, H = (size_t)o->hidden, K = (size_t)o->topk;
  int nodes = num_nodes(st);
  st->topk = upload_new(st, T * K * sizeof(int64_t), fill_topk);
  st->weights = upload_new(st, T * K * sizeof(float), fill_weights);
  if (o->dtypes[BENCH_BF16]) st->x_bf16 = upload_new(st, T * H * 2, fill_x_bf16);
  if (o->dtypes[BENCH_FP8]) {
    st->x_fp8 = upload_new(st, T * H, fill_x_fp8);
    st->scales = upload_new(st, T * (size_t)epx_scale_cols_f32(o->hidden) * 4, fill_scales);
  }
  st->per_rank = dev_alloc(st, sizeof(int) * (size_t)st->nranks);
  st->per_node = dev_alloc(st, sizeof(int) * (size_t)nodes);
  st->per_expert = dev_alloc(st, sizeof(int) * (size_t)o->experts);
  st->in_rank = dev_alloc(st, layout_bytes_in_rank(st));
  if (bench_shm_failed(st->shm)) return 1;

  /* N_recv is fixed by the routing: one notify sizes every output. */
  st->dtype = o->dtypes[BENCH_BF16] ? BENCH_BF16 : BENCH_FP8;
  epxDispatchArgs_t a = dispatch_args(st, 0);
  int nrc = op_result(
      st, BENCH_DISPATCH_E2E, "epxDispatchNotify",
      epxDispatchNotify(st->comm, &a, st->handle, &st->num_recv, NULL, st->dev->stream()));
  if (nrc == RC_UNSUPPORTED) return RC_UNSUPPORTED;
  if (nrc)
    return 1;
  size_t rows = (size_t)st->num_recv + 1;
  st->recv_x = dev_alloc(st, rows * H * 2); /* BF16 size; the FP8 pass reuses it */
  st->recv_scales = dev_alloc(st, rows * (size_t)epx_scale_cols_f32(o->hidden) * 4 + 4);
  st->recv_topk = dev_alloc(st, rows * K * sizeof(int64_t));
  st->recv_weights = dev_alloc(st, rows * K * sizeof(float));
  st->recv_src = dev_alloc(st, rows * sizeof(int));
  st->recv_prefix = dev_alloc(st, sizeof(int) * (size_t)st->nranks);
  st->recv_per_expert = dev_alloc(st, sizeof(int) * (size_t)st->E_local);
  st->recv_num = dev_alloc(st, sizeof(int));
  st->combined_x = dev_alloc(st, T * H * 2 + 2);
  st->combined_weights = dev_alloc(st, T * K * sizeof(float) + 4);
  return bench_shm_failed(st->shm) ? 1 : 0;
}

static int poison_dispatch_outputs(rankState *st) {
  const benchOptions *o = st->opt;
  size_t rows = (size_t)st->num_recv, H = (size_t)o->hidden, K = (size_t)o->topk;
  int rc = dev_poison(st, st->recv_x, rows * H * 2);
  rc |= dev_poison(st, st->recv_scales, rows * (size_t)epx_scale_cols_f32(o->hidden) * 4);
  rc |= dev_poison(st, st->recv_topk, rows * K * sizeof(int64_t));
  rc |= dev_poison(st, st->recv_weights, rows * K * sizeof(float));
  rc |= dev_poison(st, st->recv_src, rows * sizeof(int));
  rc |= dev_poison(st, st->recv_prefix, sizeof(int) * (size_t)st->nranks);
  rc |= dev_poison(st, st->recv_per_expert, sizeof(int) * (size_t)st->E_local);
  rc |= dev_poison(st, st->recv_num, sizeof(int));
  return rc;
}

/* Host views of the dispatch outputs (copies on a GPU; freed by release_views). */
typedef struct views {
  void *scratch[16];
  int n;
  int failed;
} views;

static const void *view(rankState *st, views *v, const void *p, size_t bytes) {
  if (!p) return NULL;
  void *scratch = NULL;
  if (v->n == (int)(sizeof(v->scratch) / sizeof(v->scratch[0]))) {
    fprintf(stderr, "epx-bench rank %d: too many host views at once\n", st->rank);
    v->failed = 1;
    return NULL;
  }
  const void *h = bench_fetch(st->dev, p, bytes, &scratch);
  if (!h) v->failed = 1;
  if (scratch) v->scratch[v->n++] = scratch;
  return h;
}

static void release_views(views *v) {
  for (int i = 0; i < v->n; ++i) free(v->scratch[i]);
  v->n = 0;
}

static epxDispatchOutputs_t dispatch_views(rankState *st, views *v, int cached) {
  const benchOptions *o = st->opt;
  size_t rows = (size_t)st->num_recv, H = (size_t)o->hidden, K = (size_t)o->topk;
  int fp8 = st->dtype == BENCH_FP8;
  epxDispatchOutputs_t d = dispatch_outputs(st, cached);
  epxDispatchOutputs_t h;
  memset(&h, 0, sizeof(h));
  h.recv_x = (void *)view(st, v, d.recv_x, rows * H * (fp8 ? 1 : 2));
  h.recv_x_scales =
      (void *)view(st, v, d.recv_x_scales, rows * (size_t)epx_scale_cols_f32(o->hidden) * 4);
  h.recv_topk_idx = (void *)view(st, v, d.recv_topk_idx, rows * K * sizeof(int64_t));
  h.recv_topk_weights = (float *)view(st, v, d.recv_topk_weights, rows * K * sizeof(float));
  h.recv_src_idx = (int *)view(st, v, d.recv_src_idx, rows * sizeof(int));
  h.recv_rank_prefix = (int *)view(st, v, d.recv_rank_prefix, sizeof(int) * (size_t)st->nranks);
  h.num_recv_tokens_per_expert =
      (int *)view(st, v, d.num_recv_tokens_per_expert, sizeof(int) * (size_t)st->E_local);
  h.num_recv_tokens = (int *)view(st, v, d.num_recv_tokens, sizeof(int));
  return h;
}

typedef struct normalCheck {
  benchWorld *world;
  int64_t notified; /* N_recv from the checked notify */
  int layout, combine;
} normalCheck;

static int check_normal_one_rank(rankState *st, void *arg) {
  normalCheck *c = arg;
  const benchOptions *o = st->opt;
  views v = {{0}, 0, 0};
  int nodes = num_nodes(st);
  int rc = 0;
  if (c->layout) {
    const int *pr = view(st, &v, st->per_rank, sizeof(int) * (size_t)st->nranks);
    const int *pn = view(st, &v, st->per_node, sizeof(int) * (size_t)nodes);
    const int *pe = view(st, &v, st->per_expert, sizeof(int) * (size_t)o->experts);
    const uint8_t *ir = view(st, &v, st->in_rank, layout_bytes_in_rank(st));
    if (!v.failed)
      rc |= record_check(st, BENCH_LAYOUT, bench_check_layout(c->world, st->rank, pr, pn, pe, ir),
                         "layout");
  }
  epxDispatchOutputs_t h = dispatch_views(st, &v, 0);
  if (!v.failed)
    rc |= record_check(st, BENCH_DISPATCH_E2E,
                       bench_check_dispatch(c->world, st->rank, st->dtype, c->notified, &h),
                       "dispatch (layout + notify + dispatch)");
  if (c->combine && !v.failed) {
    const void *cx = view(st, &v, st->combined_x, (size_t)st->tokens * (size_t)o->hidden * 2);
    const void *cw = view(st, &v, st->combined_weights, (size_t)st->tokens * (size_t)o->topk * 4);
    if (!v.failed)
      rc |= record_check(st, BENCH_COMBINE, bench_check_combine(c->world, st->rank, cx, cw),
                         "combine");
  }
  release_views(&v);
  if (v.failed) bench_shm_fail(st->shm);
  return rc || v.failed;
}

static int check_cached_one_rank(rankState *st, void *arg) {
  normalCheck *c = arg;
  views v = {{0}, 0, 0};
  epxDispatchOutputs_t h = dispatch_views(st, &v, 1);
  int rc = v.failed;
  if (!v.failed)
    rc = record_check(st, BENCH_DISPATCH,
                      bench_check_dispatch(c->world, st->rank, st->dtype, st->num_recv, &h),
                      "cached dispatch");
  release_views(&v);
  if (v.failed) bench_shm_fail(st->shm);
  return rc;
}

/* One checked iteration of every normal-mode operation of this dtype pass. */
static int normal_checked_iteration(rankState *st, int first_pass) {
  const benchOptions *o = st->opt;
  int combine = st->dtype == BENCH_BF16;
  size_t T = (size_t)st->tokens;
  int nodes = num_nodes(st);
  if (dev_poison(st, st->per_rank, sizeof(int) * (size_t)st->nranks) ||
      dev_poison(st, st->per_node, sizeof(int) * (size_t)nodes) ||
      dev_poison(st, st->per_expert, sizeof(int) * (size_t)o->experts) ||
      dev_poison(st, st->in_rank, layout_bytes_in_rank(st)) || poison_dispatch_outputs(st) ||
      dev_poison(st, st->combined_x, T * (size_t)o->hidden * 2) ||
      dev_poison(st, st->combined_weights, T * (size_t)o->topk * 4))
    return 1;

  normalCheck c = {NULL, 0, first_pass, combine};
  epxDispatchArgs_t a = dispatch_args(st, 0);
  epxDispatchOutputs_t out = dispatch_outputs(st, 0);
  int orc = op_result(st, BENCH_LAYOUT, "epxGetDispatchLayout", op_layout(st));
  if (!orc)
    orc = op_result(
        st, BENCH_DISPATCH_E2E, "epxDispatchNotify",
        epxDispatchNotify(st->comm, &a, st->handle, &c.notified, NULL, st->dev->stream()));
  if (orc) return orc;
  if (c.notified > st->num_recv) {
    fprintf(stderr, "epx-bench rank %d: N_recv changed from %lld to %lld between two notifies\n",
            st->rank, (long long)st->num_recv, (long long)c.notified);
    bench_shm_fail(st->shm);
    return 1;
  }
  orc = op_result(st, BENCH_DISPATCH_E2E, "epxDispatch",
                  epxDispatch(st->comm, &a, st->handle, &out, st->dev->stream()));
  if (orc) return orc;
  /* A combine the backend cannot serve leaves the dispatch to check and time. */
  if (combine) orc = op_result(st, BENCH_COMBINE, "epxCombine", op_combine(st));
  if (orc == 1) return 1;
  if (orc == RC_UNSUPPORTED) c.combine = 0;

  benchWorld world;
  bench_world_build(&world, &st->p, st->dtype);
  c.world = &world;
  int rc = one_at_a_time(st, check_normal_one_rank, &c);
  /* The cached re-dispatch writes the same outputs: check it on its own. */
  if (!rc) rc = poison_dispatch_outputs(st);
  if (!rc) rc = op_result(st, BENCH_DISPATCH, "epxDispatch (cached)", op_dispatch_cached(st));
  if (!rc) rc = one_at_a_time(st, check_cached_one_rank, &c);
  bench_world_free(&world);
  return rc;
}

/* The timed series of one normal-mode pass; RC_UNSUPPORTED stops it. */
static int normal_pass(rankState *st, int first) {
  const benchOptions *o = st->opt;
  int rc = o->check ? normal_checked_iteration(st, first) : 0;
  if (!rc && first) rc = time_series(st, BENCH_LAYOUT, op_layout);
  if (!rc && first) rc = time_e2e_twin(st, BENCH_LAYOUT, op_layout);
  if (!rc && first) st->layout_timed = 1;
  if (!rc) rc = time_series(st, BENCH_DISPATCH_E2E, op_dispatch_e2e);
  if (!rc) rc = time_series(st, BENCH_DISPATCH, op_dispatch_cached);
  if (!rc) rc = time_baseline(st, BENCH_NCCL_DISPATCH, baseline_row_bytes(st));
  /* Combine after the BF16 dispatch: its handle and recv_x are the BF16 ones. */
  int combine = st->dtype == BENCH_BF16 && !st->unsupported[BENCH_COMBINE];
  if (!rc && combine) rc = time_series(st, BENCH_COMBINE, op_combine);
  if (!rc && combine) rc = time_e2e_twin(st, BENCH_COMBINE, op_combine);
  if (!rc && combine) rc = time_baseline(st, BENCH_NCCL_COMBINE, 2 * (size_t)o->hidden);
  return rc;
}

/* The rows of a normal-mode pass that met an unsupported operation. Every record of the pass
 * needs the dispatch (the combine moves its rows back), except the layout. */
static int normal_unsupported(rankState *st, int first) {
  benchSeries list[4];
  int n = 0;
  if (!st->unsupported[BENCH_LAYOUT] && !st->unsupported[BENCH_DISPATCH_E2E] &&
      !st->unsupported[BENCH_DISPATCH]) { /* the combine alone; the rest ran */
    list[n++] = BENCH_COMBINE;
    return mark_unsupported(st, list, n);
  }
  if (first && st->unsupported[BENCH_LAYOUT]) {
    list[n++] = BENCH_LAYOUT;
  } else if (first && !st->layout_timed) {
    /* The layout works on its own: time it. Its check needs the dispatch's outputs, so it
     * stays unchecked unless the checked iteration got that far. */
    int rc = time_series(st, BENCH_LAYOUT, op_layout);
    if (rc == RC_UNSUPPORTED) {
      list[n++] = BENCH_LAYOUT;
    } else if (rc) {
      return 1;
    } else {
      st->layout_timed = 1;
      if (bench_shm_verdict(st->shm, st->dtype, BENCH_LAYOUT, st->rank) == BENCH_NOT_RUN)
        set_verdict(st, BENCH_LAYOUT, BENCH_UNCHECKED);
    }
  }
  list[n++] = BENCH_DISPATCH;
  list[n++] = BENCH_DISPATCH_E2E;
  if (st->dtype == BENCH_BF16) list[n++] = BENCH_COMBINE;
  return mark_unsupported(st, list, n);
}

static int run_normal(rankState *st) {
  const benchOptions *o = st->opt;
  int rc = normal_alloc(st);
  if (rc == RC_UNSUPPORTED) { /* the count exchange itself: nothing of this mode runs */
    for (int d = 0, first = 1; d < BENCH_NUM_DTYPES; ++d) {
      if (!o->dtypes[d]) continue;
      st->dtype = (benchDtype)d;
      if (normal_unsupported(st, first)) return 1;
      first = 0;
    }
    return 0;
  }
  if (rc) return 1;
  int first = 1;
  for (int d = 0; d < BENCH_NUM_DTYPES; ++d) {
    if (!o->dtypes[d]) continue;
    st->dtype = (benchDtype)d;
    memset(st->unsupported, 0, sizeof(st->unsupported));
    rc = normal_pass(st, first);
    if (rc == RC_UNSUPPORTED || (rc == 0 && st->unsupported[BENCH_COMBINE])) {
      if (normal_unsupported(st, first)) return 1;
    } else if (rc) {
      return 1;
    }
    first = 0;
  }
  return 0;
}

/* -------------------------------------------------- low-latency mode */

static size_t ll_rows(const rankState *st) {
  return (size_t)st->E_local * (size_t)epx_ll_rows_per_expert(st->nranks, st->tokens);
}

static int ll_alloc(rankState *st) {
  const benchOptions *o = st->opt;
  size_t T = (size_t)st->tokens, H = (size_t)o->hidden, K = (size_t)o->topk, rows = ll_rows(st);
  st->topk = upload_new(st, T * K * sizeof(int64_t), fill_topk);
  st->weights = upload_new(st, T * K * sizeof(float), fill_weights);
  st->x_bf16 = upload_new(st, T * H * 2, fill_x_bf16); /* low latency sends BF16, casts inside */
  st->ll_recv_x = dev_alloc(st, rows * H * 2);         /* BF16 size; the FP8 pass reuses it */
  st->ll_scales = dev_alloc(st, rows * (size_t)epx_scale_cols_f32(o->hidden) * 4 + 4);
  st->ll_src_info = dev_alloc(st, rows * sizeof(int));
  st->ll_range = dev_alloc(st, (size_t)st->E_local * (size_t)st->nranks * sizeof(int64_t));
  st->ll_count = dev_alloc(st, (size_t)st->E_local * sizeof(int));
  st->combined_x = dev_alloc(st, T * H * 2 + 2);
  return bench_shm_failed(st->shm) ? 1 : 0;
}

/* What a checked low-latency iteration compares, and the series its verdicts go to. */
typedef struct llCheck {
  benchWorld *world;
  benchSeries dispatch;
  benchSeries combine; /* BENCH_NUM_SERIES: the combine did not run */
} llCheck;

static int check_ll_one_rank(rankState *st, void *arg) {
  const llCheck *c = arg;
  benchWorld *world = c->world;
  const benchOptions *o = st->opt;
  size_t rows = ll_rows(st), H = (size_t)o->hidden;
  int fp8 = st->dtype == BENCH_FP8;
  views v = {{0}, 0, 0};
  epxLowLatencyDispatchOutputs_t h;
  h.recv_x = (void *)view(st, &v, st->ll_recv_x, rows * H * (fp8 ? 1 : 2));
  h.recv_x_scales =
      fp8 ? (void *)view(st, &v, st->ll_scales, rows * (size_t)epx_scale_cols_f32(o->hidden) * 4)
          : NULL;
  h.recv_count = (int *)view(st, &v, st->ll_count, (size_t)st->E_local * sizeof(int));
  h.recv_src_info = (int *)view(st, &v, st->ll_src_info, rows * sizeof(int));
  h.recv_layout_range = (int64_t *)view(st, &v, st->ll_range,
                                        (size_t)st->E_local * (size_t)st->nranks * sizeof(int64_t));
  int rc = v.failed;
  if (!rc)
    rc = record_check(st, c->dispatch,
                      bench_check_ll_dispatch(world, st->rank, st->tokens, fp8, &h),
                      c->dispatch == BENCH_LL_DISPATCH ? "ll_dispatch" : "ll_dispatch (hooked)");
  if (!rc && !fp8 && c->combine != BENCH_NUM_SERIES) {
    const void *cx = view(st, &v, st->combined_x, (size_t)st->tokens * H * 2);
    rc = v.failed;
    if (!rc)
      rc = record_check(st, c->combine, bench_check_ll_combine(world, st->rank, st->tokens, cx),
                        c->combine == BENCH_LL_COMBINE ? "ll_combine" : "ll_combine (hooked)");
  }
  release_views(&v);
  if (v.failed) bench_shm_fail(st->shm);
  return rc;
}

static int ll_poison(rankState *st) {
  const benchOptions *o = st->opt;
  size_t rows = ll_rows(st), H = (size_t)o->hidden;
  return dev_poison(st, st->ll_recv_x, rows * H * 2) ||
         dev_poison(st, st->ll_scales, rows * (size_t)epx_scale_cols_f32(o->hidden) * 4) ||
         dev_poison(st, st->ll_src_info, rows * sizeof(int)) ||
         dev_poison(st, st->ll_range, (size_t)st->E_local * (size_t)st->nranks * sizeof(int64_t)) ||
         dev_poison(st, st->ll_count, (size_t)st->E_local * sizeof(int)) ||
         dev_poison(st, st->combined_x, (size_t)st->tokens * H * 2);
}

/* The checked iteration once more through the hooks: each op as its send-only call, then
 * epxLowLatencyRecv. The verdict of the outputs goes to both phase series of the op. A
 * send-only call the backend cannot serve is noted (st->unsupported) and its phases left
 * out; those of the combine go with the dispatch's. */
static int ll_checked_hooks(rankState *st, benchWorld *world) {
  int combine = st->dtype == BENCH_BF16 && !st->unsupported[BENCH_LL_COMBINE];
  if (ll_poison(st)) return 1;
  int orc = op_result(st, BENCH_LL_DISPATCH_SEND, "epxLowLatencyDispatch (send only)",
                      op_ll_dispatch_send(st));
  if (orc == RC_UNSUPPORTED) return 0;
  if (orc || epx_failed(st, "epxLowLatencyRecv (dispatch)", op_ll_recv(st))) return 1;
  if (combine) {
    orc = op_result(st, BENCH_LL_COMBINE_SEND, "epxLowLatencyCombine (send only)",
                    op_ll_combine_send(st));
    if (orc == 1) return 1;
    if (orc == RC_UNSUPPORTED)
      combine = 0;
    else if (epx_failed(st, "epxLowLatencyRecv (combine)", op_ll_recv(st)))
      return 1;
  }
  llCheck c = {world, BENCH_LL_DISPATCH_SEND, combine ? BENCH_LL_COMBINE_SEND : BENCH_NUM_SERIES};
  int rc = one_at_a_time(st, check_ll_one_rank, &c);
  if (rc) return rc;
  bench_shm_set_verdict(st->shm, st->dtype, BENCH_LL_DISPATCH_RECV, st->rank,
                        bench_shm_verdict(st->shm, st->dtype, BENCH_LL_DISPATCH_SEND, st->rank));
  if (combine)
    bench_shm_set_verdict(st->shm, st->dtype, BENCH_LL_COMBINE_RECV, st->rank,
                          bench_shm_verdict(st->shm, st->dtype, BENCH_LL_COMBINE_SEND, st->rank));
  return 0;
}

static int ll_checked_iteration(rankState *st) {
  int combine = st->dtype == BENCH_BF16;
  if (ll_poison(st)) return 1;
  int orc = op_result(st, BENCH_LL_DISPATCH, "epxLowLatencyDispatch", op_ll_dispatch(st));
  if (orc) return orc;
  /* A combine the backend cannot serve leaves the dispatch to check and time. */
  if (combine) orc = op_result(st, BENCH_LL_COMBINE, "epxLowLatencyCombine", op_ll_combine(st));
  if (orc == 1) return 1;
  benchWorld world;
  bench_world_build(&world, &st->p, BENCH_BF16);
  llCheck c = {&world, BENCH_LL_DISPATCH,
               combine && orc == 0 ? BENCH_LL_COMBINE : BENCH_NUM_SERIES};
  int rc = one_at_a_time(st, check_ll_one_rank, &c);
  if (!rc) rc = ll_checked_hooks(st, &world);
  bench_world_free(&world);
  return rc;
}

/* The series of a low-latency pass the backend cannot serve: an op it does not serve, with
 * its phases; the combine's rows need the dispatch's, and its phases the dispatch's phases. */
static int ll_unsupported(rankState *st) {
  int bf16 = st->dtype == BENCH_BF16;
  int dispatch = st->unsupported[BENCH_LL_DISPATCH];
  int dispatch_phases = dispatch || st->unsupported[BENCH_LL_DISPATCH_SEND];
  int combine = bf16 && (dispatch || st->unsupported[BENCH_LL_COMBINE]);
  int combine_phases =
      bf16 && (combine || dispatch_phases || st->unsupported[BENCH_LL_COMBINE_SEND]);
  benchSeries list[6];
  int n = 0;
  if (dispatch) list[n++] = BENCH_LL_DISPATCH;
  if (dispatch_phases) {
    list[n++] = BENCH_LL_DISPATCH_SEND;
    list[n++] = BENCH_LL_DISPATCH_RECV;
  }
  if (combine) list[n++] = BENCH_LL_COMBINE;
  if (combine_phases) {
    list[n++] = BENCH_LL_COMBINE_SEND;
    list[n++] = BENCH_LL_COMBINE_RECV;
  }
  return mark_unsupported(st, list, n);
}

static int run_low_latency(rankState *st) {
  const benchOptions *o = st->opt;
  if (ll_alloc(st)) return 1;
  for (int d = 0; d < BENCH_NUM_DTYPES; ++d) {
    if (!o->dtypes[d]) continue;
    st->dtype = (benchDtype)d;
    memset(st->unsupported, 0, sizeof(st->unsupported));
    int bf16 = st->dtype == BENCH_BF16;
    int rc = o->check ? ll_checked_iteration(st) : 0;
    if (!rc) rc = time_series(st, BENCH_LL_DISPATCH, op_ll_dispatch);
    if (!rc) rc = time_e2e_twin(st, BENCH_LL_DISPATCH, op_ll_dispatch);
    if (!rc) rc = time_baseline(st, BENCH_NCCL_DISPATCH, baseline_row_bytes(st));
    if (!rc) rc = time_phases(st, BENCH_LL_DISPATCH_SEND, BENCH_LL_DISPATCH_RECV,
                              op_ll_dispatch_send);
    /* Combine after the BF16 dispatch: the handle and recv_x are the BF16 ones (the hooked
     * dispatch's, received: the same outputs). */
    if (!rc && bf16 && !st->unsupported[BENCH_LL_COMBINE])
      rc = time_series(st, BENCH_LL_COMBINE, op_ll_combine);
    if (!rc && bf16 && !st->unsupported[BENCH_LL_COMBINE])
      rc = time_e2e_twin(st, BENCH_LL_COMBINE, op_ll_combine);
    if (!rc && bf16 && !st->unsupported[BENCH_LL_COMBINE])
      rc = time_baseline(st, BENCH_NCCL_COMBINE, 2 * (size_t)o->hidden);
    if (!rc && bf16 && !st->unsupported[BENCH_LL_COMBINE] &&
        !st->unsupported[BENCH_LL_DISPATCH_SEND])
      rc = time_phases(st, BENCH_LL_COMBINE_SEND, BENCH_LL_COMBINE_RECV, op_ll_combine_send);
    if (rc == 1) return 1;
    if (rc == RC_UNSUPPORTED || st->unsupported[BENCH_LL_COMBINE] ||
        st->unsupported[BENCH_LL_DISPATCH_SEND] || st->unsupported[BENCH_LL_COMBINE_SEND]) {
      if (ll_unsupported(st)) return 1;
    }
  }
  return 0;
}

/* ------------------------------------------------------------- a rank */

static void rank_free(rankState *st) {
  void **bufs[] = {&st->topk,
                   &st->weights,
                   &st->x_bf16,
                   &st->x_fp8,
                   &st->scales,
                   (void **)&st->per_rank,
                   (void **)&st->per_node,
                   (void **)&st->per_expert,
                   (void **)&st->in_rank,
                   &st->recv_x,
                   &st->recv_scales,
                   &st->recv_topk,
                   &st->recv_weights,
                   (void **)&st->recv_src,
                   (void **)&st->recv_prefix,
                   (void **)&st->recv_per_expert,
                   (void **)&st->recv_num,
                   &st->combined_x,
                   &st->combined_weights,
                   &st->ll_recv_x,
                   &st->ll_scales,
                   &st->ll_src_info,
                   &st->ll_range,
                   &st->ll_count};
  for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); ++i) dev_free(st, bufs[i]);
  epxHandleDestroy(st->handle);
  st->handle = NULL;
  epxCommDestroy(st->comm);
  st->comm = NULL;
}

int bench_rank_main(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const benchJob *job = arg;
  const benchOptions *o = job->opt;
  rankState st;
  memset(&st, 0, sizeof(st));
  st.job = job;
  st.opt = o;
  st.dev = job->dev;
  st.shm = job->shm;
  st.rank = rank;
  st.nranks = nranks;
  st.tokens = bench_mode_tokens(o, job->mode);
  st.E_local = o->experts / nranks;

  st.p.nranks = nranks;
  st.p.ranks_per_node = o->ranks_per_node;
  st.p.num_experts = o->experts;
  st.p.hidden = o->hidden;
  st.p.num_topk = o->topk;
  for (int r = 0; r < nranks; ++r) st.p.tokens[r] = st.tokens;
  st.p.routing = EPX_ROUTING_UNIFORM;
  st.p.seed = o->seed;

  if (st.dev->rank_setup(rank, nranks)) {
    bench_shm_fail(st.shm);
    return 1;
  }
  epxConfig_t cfg = EPX_CONFIG_INITIALIZER;
  cfg.backend = st.dev->backend;
  cfg.ranks_per_node = o->ranks_per_node;
  cfg.num_experts = o->experts;
  cfg.hidden = o->hidden;
  cfg.max_topk = o->topk;
  cfg.max_tokens_per_rank = st.tokens;
  cfg.ll_max_tokens_per_rank = job->mode == BENCH_LOW_LATENCY ? st.tokens : 0;
  cfg.num_sms = o->sms;

  int rc = 1;
  epxSizeHints_t hints;
  memset(&hints, 0, sizeof(hints));
  hints.size = sizeof(hints);
  if (epx_failed(&st, "epxGetSizeHints", epxGetSizeHints(&cfg, nranks, &hints))) goto done;
  epxResult_t ires = epxCommInitRank(&st.comm, nranks, *id, rank, &cfg);
  if (ires == epxNotSupported && job->mode == BENCH_LOW_LATENCY) {
    /* A backend that cannot set low latency up at all: every row of the mode says so. */
    if (rank == 0)
      fprintf(stderr, "epx-bench: low latency: not supported by the %s backend: %s\n",
              st.dev->name, epxCommGetLastError(NULL));
    rc = 0;
    for (int d = 0; d < BENCH_NUM_DTYPES && !rc; ++d) {
      if (!o->dtypes[d]) continue;
      st.dtype = (benchDtype)d;
      benchSeries list[6] = {BENCH_LL_DISPATCH,     BENCH_LL_DISPATCH_SEND,
                             BENCH_LL_DISPATCH_RECV, BENCH_LL_COMBINE,
                             BENCH_LL_COMBINE_SEND,  BENCH_LL_COMBINE_RECV};
      rc = mark_unsupported(&st, list, st.dtype == BENCH_BF16 ? 6 : 3);
    }
    goto done;
  }
  if (epx_failed(&st, "epxCommInitRank", ires) ||
      epx_failed(&st, "epxHandleCreate", epxHandleCreate(st.comm, &st.handle)))
    goto done;
  if (rank == 0) {
    bench_shm_set_buffer_bytes(
        st.shm, job->mode == BENCH_LOW_LATENCY ? hints.ll_buffer_bytes : hints.comm_buffer_bytes);
    /* The SMs the library says its kernels of this mode occupy (0 on the host backend);
     * if it cannot say, -1 stays: a null in the records. */
    epxCommInfo_t info;
    if (epxCommGetInfo(st.comm, &info) == epxSuccess)
      bench_shm_set_sms(st.shm, job->mode == BENCH_LOW_LATENCY ? info.ll_sms : info.normal_sms);
  }
  bench_count_routing(&st.p, rank, &st.routing);
  if (baseline_setup(&st)) goto done;
  if (gate_setup(&st)) goto done;
  rc = job->mode == BENCH_LOW_LATENCY ? run_low_latency(&st) : run_normal(&st);
done:
  if (rc) bench_shm_fail(st.shm);
  if (st.gated && st.dev->gate_detach) st.dev->gate_detach();
  baseline_teardown(&st);
  rank_free(&st);
  st.dev->rank_teardown();
  return rc;
}
