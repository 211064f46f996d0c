/*
 * test_faults.c - fault injection, misuse and soak on the host backend
 * (reliability.md R1, R2, R3, R4, R6, R12; see docs/reliability.md).
 *
 *   R1   SIGKILL one rank at a random moment while every rank loops one of
 *        notify / dispatch / combine / ll_dispatch / ll_combine: every survivor
 *        returns epxPeerFailed or epxTimeout naming the killed rank within 2 s,
 *        its next call fails at once with the same (sticky) code, and
 *        epxCommDestroy returns within 1 s.
 *   R2   SIGSTOP one rank mid-dispatch (or combine / ll_dispatch) for longer
 *        than the hard timeout, then SIGCONT: survivors fail at the configured
 *        timeout (+1 s at most), their outputs are not touched after their
 *        error while the resumed rank runs on, and the resumed rank gets an
 *        error within 1 s and its next call fails cleanly.
 *   R3   one rank sleeps 80 % of the hard timeout before every call: every
 *        call exact, no error, and the other ranks log a soft-timeout warning
 *        (EPX_DEBUG=WARN) naming the slow rank.
 *   R4   epxCommAbort from another thread while a peer never arrives returns the
 *        blocked call within 1 s; epxCommDestroy after the peers died returns
 *        within 1 s; a process that exits with a call in flight exits.
 *   R6   use after destroy through the registry, a handle of a destroyed
 *        communicator, a low-latency handle in a normal combine, and a third
 *        outstanding low-latency send phase: invalid-usage errors, no hang, and
 *        the pending phases still complete exactly.
 *   R12  soak: random seeds (random shapes, heavy imbalance, ranks with 0
 *        tokens, all -1 routing, max tokens, duplicates), outputs poisoned
 *        before each call, every call exact against the reference, the whole
 *        sequence repeated and bit-identical.
 *
 * The ranks are forked here (not through epx_test_spawn) so that this process
 * can kill, stop and resume them; they report through a shared page. That
 * world, the figures and the exact sequence's parameters and references are
 * shared with tests/cuda/test_cuda_faults.c (tests/common/faults.h).
 *
 *   test_faults                 every section
 *   test_faults r1 r3 ...       the named sections
 * Environment: EPX_FAULT_RUNS (R1 runs per phase, default 20), EPX_SOAK_SEED
 * (first soak seed; default from the clock, printed), EPX_SOAK_SECONDS
 * (soak time budget, default 10).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/faults.h"
#include "common/harness.h"
#include "common/world.h"
#include "reference/reference.h"

#if defined(__SANITIZE_THREAD__)
/* ThreadSanitizer sleeps a second in exit() by default (atexit_sleep_ms), which
 * the R4 "process exits with a call in flight" figure would count. */
const char *__tsan_default_options(void);
__attribute__((visibility("default"))) const char *__tsan_default_options(void) {
  return "atexit_sleep_ms=0";
}
#endif

#define MAXR EPX_FAULT_MAX_RANKS

/* The board the ranks report through (tests/common/faults.h). */
static epx_fault_board *B;

/* ------------------------------------------------------------ per-rank state */

/* A rank loops one op (epx_fault_loop, tests/common/faults.h) on host buffers. */
static void zero_host(void *p, size_t bytes) { memset(p, 0, bytes); }

/* Initialises the communicator and the buffers, and runs the calls the op
 * needs before it (notify before dispatch, ...). 0 on success. */
static int loop_setup(epx_fault_loop *s, int rank, int R, const epxUniqueId *id, uint64_t seed,
                      int timeout_ms, int op) {
  epx_test_problem p;
  epx_fault_loop_init(s, &p, rank, R, seed);
  epxConfig_t cfg = epx_test_config(&p, s->llT);
  cfg.timeout_ms = timeout_ms;
  if (epx_test_comm_init(&s->comm, rank, R, id, &cfg)) return 1;
  if (epxHandleCreate(s->comm, &s->h) != epxSuccess) return 1;
  epx_test_world_init(&s->w, &p, 1, EPX_PAYLOAD_BF16, seed + 1);
  s->x = s->w.x[rank];
  s->topk = s->w.topk[rank];
  s->weights = s->w.weights[rank];
  epx_fault_loop_alloc(s, epx_test_xaligned, zero_host);
  return epx_fault_loop_prepare(s, op, epx_fault_loop_call);
}

/* ------------------------------------------------------------ R1 / R2 */

/* An output snapshot: the buffers the op writes. */
static unsigned char *snapshot(const epx_fault_loop *s) {
  size_t a, b, c;
  epx_fault_loop_out_bytes(s, &a, &b, &c);
  unsigned char *dst = epx_test_xmalloc(a + b + c);
  memcpy(dst, s->recv_x, a);
  memcpy(dst + a, s->out_x, b);
  memcpy(dst + a + b, s->ll_x, c);
  return dst;
}

static const epx_fault_backend backend = {
    .op = epx_fault_loop_call,
    .snapshot = snapshot,
    .names = epx_fault_names_rank,
    .loop_s = 30.0,
    .release_s = 20.0,
};

static int fault_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const epx_fault_case *fc = arg;
  epx_fault_loop s;
  if (loop_setup(&s, rank, R, id, fc->seed, fc->timeout_ms, fc->op)) return 1;
  epx_fault_loop_to_error(&s, fc, &backend);
  epx_fault_loop_destroy(&s);
  epx_fault_loop_free(&s, free);
  return B->r[rank].bad;
}

static void fault_controller(void *ctx, const pid_t *pids, int *status, int R) {
  const epx_fault_case *fc = ctx;
  if (epx_fault_wait_ranks(epx_fault_ready_of, R, -1, 30.0)) {
    fprintf(stderr, "  ranks not ready\n");
    atomic_store(&B->stop, 1);
    return;
  }
  epx_fault_inject(fc, pids, R, 10.0);
}

static epx_fault_r1_figures R1S;

static int section_r1(epx_test_rng *rng) {
  int runs = epx_fault_runs(20);
  int R = 3, fails = 0;
  for (int op = 0; op < EPX_FAULT_R1_OPS; ++op) {
    for (int i = 0; i < runs; ++i) {
      epx_fault_case fc = {op, (int)epx_test_rng_below(rng, (uint32_t)R), 0, 20000,
                           epx_test_rng_uniform(rng) * 0.02, epx_test_rng_next(rng)};
      int st[MAXR];
      int hangs = epx_fault_run(R, fault_rank, &fc, fault_controller, &fc, 40.0, st, 0);
      if (!epx_fault_r1_judge(&R1S, &fc, epx_fault_op_names[op], i, R, st, hangs, 0.0)) fails++;
    }
    printf("%s r1_kill_%s: %d runs, time to error median %.1f ms, worst %.1f ms\n",
           fails ? "FAIL" : "PASS", epx_fault_op_names[op], runs,
           epx_fault_median(&R1S.per_op[op]) * 1e3, epx_fault_max(&R1S.per_op[op]) * 1e3);
    fflush(stdout);
  }
  return fails != 0;
}

static epx_fault_r2_figures R2S;

static int section_r2(epx_test_rng *rng) {
  const int ops[] = {EPX_FAULT_DISPATCH, EPX_FAULT_DISPATCH, EPX_FAULT_COMBINE,
                     EPX_FAULT_LL_DISPATCH};
  int R = 3, fails = 0, timeout_ms = 1000;
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; ++i) {
    epx_fault_case fc = {ops[i], (int)epx_test_rng_below(rng, (uint32_t)R), 1, timeout_ms,
                         epx_test_rng_uniform(rng) * 0.02, epx_test_rng_next(rng)};
    int st[MAXR];
    int hangs = epx_fault_run(R, fault_rank, &fc, fault_controller, &fc, 40.0, st, 0);
    if (epx_fault_r2_judge(&R2S, &fc, epx_fault_op_names[fc.op], R, st, hangs, 1.0)) {
      printf("PASS r2_stop_%s: victim rank %d; survivors %s; resumed rank: %s\n",
             epx_fault_op_names[fc.op], fc.victim,
             epxGetErrorString((epxResult_t)B->r[(fc.victim + 1) % R].result),
             B->r[fc.victim].msg);
    } else {
      fails++;
    }
    fflush(stdout);
  }
  return fails != 0;
}

/* ------------------------------------------------------------ exact sequence (R3, R12) */

/* One pass of notify, dispatch, combine, worst-case dispatch, LL dispatch and
 * LL combine, each output poisoned first and compared in full with the
 * reference; *hash accumulates every output byte. */
static int run_sequence(const epx_fault_seq *sp, int rank, epxComm_t comm, epx_test_world *w,
                        epx_test_world *wl, uint64_t *hash) {
  epx_fault_pass ps;
  epx_fault_pass_init(&ps, sp, rank, w, wl);
  int R = ps.R, el = ps.el, H = ps.H, K = ps.K, T = ps.T, fp8 = ps.fp8, f = 0;
  size_t ie = ps.ie, xrow = ps.xrow, srow = ps.srow, lxrow = ps.lxrow, lsrow = ps.lsrow;
  int64_t N = ps.N, worst = ps.worst, rows = ps.rows, lrows = ps.lrows;
  epxHandle_t h = NULL, hw = NULL, hl = NULL;

  /* output buffers */
  void *rx = epx_test_xaligned((size_t)rows * xrow);
  void *rs = srow ? epx_test_xaligned((size_t)rows * srow) : NULL;
  void *rt = epx_test_xaligned((size_t)rows * K * ie);
  float *rw = epx_test_xaligned((size_t)rows * K * 4);
  int *rsrc = epx_test_xaligned((size_t)rows * 4);
  int *rpre = epx_test_xaligned((size_t)R * 4), *rpe_cnt = epx_test_xaligned((size_t)el * 4);
  int *nrecv = epx_test_xaligned(4);
  uint16_t *ox = epx_test_xaligned((size_t)(T + 1) * H * 2);
  float *ow = epx_test_xaligned((size_t)(T + 1) * K * 4);
  void *lx = epx_test_xaligned((size_t)lrows * lxrow);
  void *ls = lsrow ? epx_test_xaligned((size_t)lrows * lsrow) : NULL;
  int *lcount = epx_test_xaligned((size_t)el * 4), *lsrc = epx_test_xaligned((size_t)lrows * 4);
  int64_t *lrange = epx_test_xaligned((size_t)el * R * 8);
  int *cnt = epx_test_xaligned((size_t)el * 4);

  f |= epx_fault_expect_success(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  f |= epx_fault_expect_success(rank, comm, epxHandleCreate(comm, &hw), "epxHandleCreate");
  f |= epx_fault_expect_success(rank, comm, epxHandleCreate(comm, &hl), "epxHandleCreate");
  if (f) goto out;

  epxDispatchArgs_t a = epx_fault_dispatch_args(sp, &ps, w->x[rank], w->scales[rank], w->topk[rank],
                                                w->weights[rank]);

  /* 1. notify */
  f |= epx_fault_seq_notify(sp, &ps, rank, comm, &a, h, cnt, NULL, hash);
  if (f) goto out;
  /* 2. dispatch with the notify's handle (cap = N + 1: the extra row stays poisoned) */
  for (int pass = 0; pass < 2 && !f; ++pass) {
    int64_t rr = pass == 0 ? ps.cap : worst;
    const epx_ref_dispatch_result *rf = pass == 0 ? &ps.ref[rank] : &ps.refw;
    epx_test_poison(rx, (size_t)rows * xrow);
    if (rs) epx_test_poison(rs, (size_t)rows * srow);
    epx_test_poison(rt, (size_t)rows * K * ie);
    epx_test_poison(rw, (size_t)rows * K * 4);
    epx_test_poison(rsrc, (size_t)rows * 4);
    epx_test_poison(rpre, (size_t)R * 4);
    epx_test_poison(rpe_cnt, (size_t)el * 4);
    epx_test_poison(nrecv, 4);
    epxDispatchArgs_t d = a;
    if (pass == 1) d.num_worst_tokens = worst;
    epxDispatchOutputs_t o = {rx, rs, rt, rw, rsrc, rpre, rpe_cnt, nrecv, rr};
    epx_fault_seq_before_call(sp, rank);
    f |= epx_fault_expect_success(rank, comm, epxDispatch(comm, &d, pass == 0 ? h : hw, &o, NULL),
                                  pass == 0 ? "epxDispatch" : "epxDispatch (worst case)");
    if (f) break;
    int64_t vr = pass == 0 ? N : worst; /* rows the reference describes */
    f |= epx_fault_compare(rank, "recv_x", fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16, rf->recv_x, rx, vr,
                           (int64_t)xrow / (fp8 ? 1 : 2));
    if (srow)
      f |= epx_fault_compare(rank, "recv_x_scales", EPX_ELEM_I32, rf->recv_x_scales, rs, N,
                             (int64_t)srow / 4);
    f |= epx_fault_compare(rank, "recv_topk_idx", sp->int32 ? EPX_ELEM_I32 : EPX_ELEM_I64,
                           rf->recv_topk_idx, rt, vr, K);
    f |= epx_fault_compare(rank, "recv_topk_weights", EPX_ELEM_F32, rf->recv_topk_weights, rw, vr,
                           K);
    f |= epx_fault_compare(rank, "recv_src_idx", EPX_ELEM_I32, rf->recv_src_idx, rsrc, vr, 1);
    f |= epx_fault_compare(rank, "recv_rank_prefix", EPX_ELEM_I32, rf->recv_rank_prefix, rpre, 1,
                           R);
    f |= epx_fault_compare(rank, "num_recv_tokens_per_expert", EPX_ELEM_I32,
                           rf->num_recv_tokens_per_expert, rpe_cnt, 1, el);
    int n32 = (int)N;
    f |= epx_fault_compare(rank, "num_recv_tokens", EPX_ELEM_I32, &n32, nrecv, 1, 1);
    if (pass == 0 && !epx_test_is_poisoned((uint8_t *)rx + (size_t)N * xrow, xrow)) {
      epx_fault_note(rank, "dispatch wrote recv_x past N_recv");
      f = 1;
    }
    if (pass == 1 &&
        !epx_test_is_poisoned((uint8_t *)rx + (size_t)N * xrow, (size_t)(worst - N) * xrow)) {
      epx_fault_note(rank, "worst-case dispatch wrote recv_x padding rows");
      f = 1;
    }
    *hash = epx_fault_fnv(*hash, rx, (size_t)rows * xrow);
    *hash = epx_fault_fnv(*hash, rt, (size_t)rows * K * ie);
    *hash = epx_fault_fnv(*hash, rw, (size_t)rows * K * 4);
    *hash = epx_fault_fnv(*hash, rsrc, (size_t)rows * 4);
    if (pass == 0) {
      /* 3. combine of the notify's routing */
      epx_test_poison(ox, (size_t)(T + 1) * H * 2);
      epx_test_poison(ow, (size_t)(T + 1) * K * 4);
      epxCombineArgs_t c = epx_fault_combine_args(&ps, ps.cx[rank], ps.cw[rank],
                                                  ps.with_bias ? ps.bias : NULL);
      epxCombineOutputs_t co = {ox, ow};
      epx_fault_seq_before_call(sp, rank);
      f |= epx_fault_expect_success(rank, comm, epxCombine(comm, &c, h, &co, NULL), "epxCombine");
      if (f) break;
      f |= epx_fault_compare(rank, "combined_x (+ 1 poisoned row)", EPX_ELEM_BF16, ps.exp_cx, ox, T,
                             H);
      f |= epx_fault_compare(rank, "combined_topk_weights", EPX_ELEM_F32, ps.exp_cw, ow, T, K);
      if (!epx_test_is_poisoned(ox + (size_t)T * H, (size_t)H * 2)) {
        epx_fault_note(rank, "combine wrote past row T");
        f = 1;
      }
      *hash = epx_fault_fnv(*hash, ox, (size_t)(T + 1) * H * 2);
      *hash = epx_fault_fnv(*hash, ow, (size_t)(T + 1) * K * 4);
    }
  }
  if (f) goto out;
  /* 4. LL dispatch and combine */
  {
    epx_test_poison(lx, (size_t)lrows * lxrow);
    if (ls) epx_test_poison(ls, (size_t)lrows * lsrow);
    epx_test_poison(lcount, (size_t)el * 4);
    epx_test_poison(lsrc, (size_t)lrows * 4);
    epx_test_poison(lrange, (size_t)el * R * 8);
    epxLowLatencyDispatchArgs_t la =
        epx_fault_ll_dispatch_args(sp, &ps, wl->x[rank], wl->topk[rank]);
    epxLowLatencyDispatchOutputs_t lo2 = {lx, ls, lcount, lsrc, lrange};
    epx_fault_seq_before_call(sp, rank);
    f |= epx_fault_expect_success(rank, comm, epxLowLatencyDispatch(comm, &la, hl, &lo2, NULL),
                                  "epxLowLatencyDispatch");
    if (f) goto out;
    f |= epx_fault_compare(rank, "ll recv_count", EPX_ELEM_I32, ps.lref.recv_count, lcount, 1, el);
    f |= epx_fault_compare(rank, "ll recv_layout_range", EPX_ELEM_I64, ps.lref.recv_layout_range,
                           lrange, el, R);
    /* full buffers: rows past each count are poisoned in both */
    f |= epx_fault_compare(rank, "ll recv_x (all rows)", sp->ll_fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16,
                           ps.lref.recv_x, lx, lrows, H);
    if (lsrow)
      f |= epx_fault_compare(rank, "ll recv_x_scales (all rows)", EPX_ELEM_I32,
                             ps.lref.recv_x_scales, ls, lrows, (int64_t)lsrow / 4);
    f |= epx_fault_compare(rank, "ll recv_src_info (all rows)", EPX_ELEM_I32, ps.lref.recv_src_info,
                           lsrc, lrows, 1);
    *hash = epx_fault_fnv(*hash, lx, (size_t)lrows * lxrow);
    if (ls) *hash = epx_fault_fnv(*hash, ls, (size_t)lrows * lsrow);
    *hash = epx_fault_fnv(*hash, lsrc, (size_t)lrows * 4);
    if (f) goto out;
    epx_test_poison(ox, (size_t)(T + 1) * H * 2);
    epxLowLatencyCombineArgs_t lc =
        epx_fault_ll_combine_args(&ps, ps.lout[rank], wl->topk[rank], wl->weights[rank]);
    epx_fault_seq_before_call(sp, rank);
    f |= epx_fault_expect_success(rank, comm, epxLowLatencyCombine(comm, &lc, hl, ox, NULL),
                                  "epxLowLatencyCombine");
    if (f) goto out;
    f |= epx_fault_compare(rank, "ll combined_x", EPX_ELEM_BF16, ps.exp_lx, ox, T, H);
    if (!epx_test_is_poisoned(ox + (size_t)T * H, (size_t)H * 2)) {
      epx_fault_note(rank, "ll combine wrote past row T");
      f = 1;
    }
    *hash = epx_fault_fnv(*hash, ox, (size_t)(T + 1) * H * 2);
  }
out:
  epxHandleDestroy(h);
  epxHandleDestroy(hw);
  epxHandleDestroy(hl);
  epx_fault_pass_free(&ps);
  void *bufs[] = {rx, rs, rt, rw, rsrc, rpre, rpe_cnt, nrecv, ox, ow, lx, ls, lcount, lsrc,
                  lrange, cnt};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) free(bufs[i]);
  return f;
}

static int seq_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const epx_fault_seq *sp = arg;
  epx_fault_slot *me = &B->r[rank];
  char cap_path[64] = "";
  /* R3: capture this rank's stderr, WARN logging on, before the library reads
   * its parameters. */
  int saved_err = sp->slow_rank >= 0 ? epx_fault_capture_begin(cap_path, sizeof cap_path) : -1;
  epx_test_problem p;
  epx_fault_seq_problem(sp, &p);
  epxConfig_t cfg = epx_test_config(&p, sp->llT);
  cfg.max_tokens_per_rank = sp->maxT;
  cfg.timeout_ms = sp->timeout_ms;
  cfg.soft_timeout_ms = sp->soft_timeout_ms;
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, R, id, &cfg)) return 1;
  int f = epx_fault_seq_repeat(sp, rank, comm, run_sequence);
  epx_fault_r3_end(sp, rank, cap_path, saved_err);
  return f || me->bad;
}

static int section_r3(void) {
  epx_fault_seq sp;
  epx_fault_seq_r3(&sp, 1500);
  sp.soft_timeout_ms = 300;
  int st[MAXR];
  double t0 = epx_test_now();
  int hangs = epx_fault_run(sp.R, seq_rank, &sp, NULL, NULL, 60.0, st, 0);
  int ok = hangs == 0 && epx_fault_all_ok(st, sp.R);
  printf("%s r3_slow_rank: rank %d sleeps %.0f ms (80 %% of the %d ms timeout) before each of 6 "
         "calls; exact, no error; soft-timeout warnings naming it: %d and %d; its wait statistics: "
         "%.0f and %.0f slow waits, longest %.0f and %.0f ms (%.1f s)\n",
         ok ? "PASS" : "FAIL", sp.slow_rank, sp.slow_sleep_s * 1e3, sp.timeout_ms, B->r[0].warnings,
         B->r[1].warnings, B->r[0].extra_s, B->r[1].extra_s, B->r[0].extra2_s * 1e3,
         B->r[1].extra2_s * 1e3, epx_test_now() - t0);
  fflush(stdout);
  return !ok;
}

/* ------------------------------------------------------------ R12 soak */

static epx_fault_soak_figures SOAK;

static int section_r12(void) { return epx_fault_soak(10.0, 20000, seq_rank, 120.0, &SOAK); }

/* ------------------------------------------------------------ R4 */

typedef struct r4_ctx {
  int mode; /* 0 abort from a thread, 1 destroy after the peers died, 2 exit with work in flight */
} r4_ctx;

static double r4_abort_s = -1, r4_abort_call_s = -1, r4_destroy_s = -1, r4_exit_s = -1;

typedef struct abort_thread_arg {
  epxComm_t comm;
  double t_call, call_s;
  epxResult_t res;
} abort_thread_arg;

static void *abort_thread(void *p) {
  abort_thread_arg *a = p;
  epx_fault_sleep(0.2);
  a->t_call = epx_test_now();
  a->res = epxCommAbort(a->comm);
  a->call_s = epx_test_now() - a->t_call;
  return NULL;
}

static int r4_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const r4_ctx *c = arg;
  epx_fault_slot *me = &B->r[rank];
  epx_fault_loop s;
  if (loop_setup(&s, rank, R, id, 44 + (uint64_t)c->mode, 20000, EPX_FAULT_NOTIFY)) return 1;
  atomic_store(&me->ready, 1);
  if (c->mode == 0) {
    if (rank == 0) {
      abort_thread_arg a = {s.comm, 0, 0, epxSuccess};
      pthread_t th;
      pthread_create(&th, NULL, abort_thread, &a);
      epxResult_t res =
          epx_fault_loop_call(&s, EPX_FAULT_NOTIFY); /* rank 1 never makes this call */
      double t_ret = epx_test_now();
      pthread_join(th, NULL);
      me->extra_s = t_ret - a.t_call;
      me->t_err = a.call_s;
      if (res != epxAborted)
        epx_fault_note(rank, "the blocked notify returned %s, expected aborted",
                       epxGetErrorString(res));
      if (a.res != epxSuccess)
        epx_fault_note(rank, "epxCommAbort returned %s", epxGetErrorString(a.res));
      if (me->extra_s > 1.0 || me->extra_s < 0)
        epx_fault_note(rank, "the blocked call returned %.3f s after epxCommAbort", me->extra_s);
      epxResult_t async = epxSuccess;
      epxCommGetAsyncError(s.comm, &async);
      if (async != epxAborted)
        epx_fault_note(rank, "async error %s, expected aborted", epxGetErrorString(async));
      atomic_store(&B->release, 1);
    } else {
      epx_fault_wait_flag(&B->release, 20.0);
      double t0 = epx_test_now();
      epxResult_t res = epx_fault_loop_call(&s, EPX_FAULT_NOTIFY);
      double d = epx_test_now() - t0;
      if (res != epxPeerFailed || !strstr(epxCommGetLastError(s.comm), "aborted") || d > 1.0)
        epx_fault_note(rank, "after the peer aborted: %s in %.3f s: %s", epxGetErrorString(res), d,
                       epxCommGetLastError(s.comm));
    }
  } else if (c->mode == 1) {
    if (rank == 0) {
      epx_fault_wait_flag(&B->release, 20.0); /* the controller killed every peer */
      double t0 = epx_test_now();
      epxHandleDestroy(s.h);
      epxResult_t res = epxCommDestroy(s.comm);
      me->extra_s = epx_test_now() - t0;
      if (res != epxSuccess || me->extra_s > 1.0)
        epx_fault_note(rank, "epxCommDestroy after the peers died: %s in %.3f s",
                       epxGetErrorString(res), me->extra_s);
      epx_fault_loop_free(&s, free);
      return me->bad;
    }
    for (;;) pause(); /* killed by the controller */
  } else {
    if (rank == 0) epx_fault_exit_with_notify_in_flight(&s);
    epx_fault_wait_flag(&B->release, 20.0); /* rank 0 has been reaped */
    double t0 = epx_test_now();
    epxResult_t res = epx_fault_loop_call(&s, EPX_FAULT_NOTIFY);
    double d = epx_test_now() - t0;
    if ((res != epxPeerFailed && res != epxTimeout) || d > 2.0)
      epx_fault_note(rank, "after the peer exited: %s in %.3f s: %s", epxGetErrorString(res), d,
                     epxCommGetLastError(s.comm));
  }
  epxHandleDestroy(s.h);
  epxCommDestroy(s.comm);
  epx_fault_loop_free(&s, free);
  return me->bad;
}

static void r4_controller(void *ctx, const pid_t *pids, int *status, int R) {
  const r4_ctx *c = ctx;
  if (epx_fault_wait_ranks(epx_fault_ready_of, R, -1, 30.0)) return;
  if (c->mode == 1)
    epx_fault_kill_peers(pids, status, R);
  else if (c->mode == 2)
    r4_exit_s = epx_fault_reap_exit(pids, status, 10.0);
}

static int section_r4(void) {
  int fails = 0;
  int st[MAXR];
  r4_ctx c0 = {0};
  int hangs = epx_fault_run(2, r4_rank, &c0, r4_controller, &c0, 30.0, st, 0);
  int ok = hangs == 0 && epx_fault_exited_ok(st[0]) && epx_fault_exited_ok(st[1]) && !B->r[0].bad &&
           !B->r[1].bad;
  r4_abort_s = B->r[0].extra_s;
  r4_abort_call_s = B->r[0].t_err;
  printf("%s r4_abort_from_thread: blocked call returned %.1f ms after epxCommAbort (which took "
         "%.3f ms); the peer then fails at once naming the abort\n",
         ok ? "PASS" : "FAIL", r4_abort_s * 1e3, r4_abort_call_s * 1e3);
  fails += !ok;

  r4_ctx c1 = {1};
  hangs = epx_fault_run(3, r4_rank, &c1, r4_controller, &c1, 30.0, st, 0);
  ok = hangs == 0 && epx_fault_exited_ok(st[0]) && !B->r[0].bad;
  r4_destroy_s = B->r[0].extra_s;
  printf("%s r4_destroy_after_peers_died: epxCommDestroy took %.3f ms\n", ok ? "PASS" : "FAIL",
         r4_destroy_s * 1e3);
  fails += !ok;

  r4_ctx c2 = {2};
  hangs = epx_fault_run(2, r4_rank, &c2, r4_controller, &c2, 30.0, st, 0);
  ok = hangs == 0 && epx_fault_exited_ok(st[1]) && !B->r[1].bad && r4_exit_s < 1.0;
  printf("%s r4_exit_with_call_in_flight: the process was gone %.1f ms after exit(0); its peer "
         "then failed naming it\n",
         ok ? "PASS" : "FAIL", r4_exit_s * 1e3);
  fails += !ok;
  fflush(stdout);
  return fails != 0;
}

/* ------------------------------------------------------------ R6 */

static int self_allgather(void *user, const void *send, void *recv, size_t bytes) {
  (void)user;
  memcpy(recv, send, bytes);
  return 0;
}

static int expect_code(int rank, epxResult_t got, epxResult_t want, const char *what,
                       const char *msg, const char *needle) {
  if (got == want && (!needle || strstr(msg, needle))) return 0;
  epx_fault_note(rank, "%s: %s (%s), expected %s%s%s", what, epxGetErrorString(got), msg,
                 epxGetErrorString(want), needle ? " naming " : "", needle ? needle : "");
  return 1;
}

static int r6_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  (void)arg;
  int el = 3, H = 128, K = 3, T = 40;
  epx_test_problem p;
  memset(&p, 0, sizeof p);
  p.nranks = R;
  p.num_experts = R * el;
  p.hidden = H;
  p.num_topk = K;
  p.routing = EPX_ROUTING_RANDOM_DUP;
  p.seed = 66;
  for (int r = 0; r < R; ++r) p.tokens[r] = T - 7 * r;
  epxConfig_t cfg = epx_test_config(&p, T);
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, R, id, &cfg)) return 1;
  epx_test_world w;
  epx_test_world_init(&w, &p, 1, EPX_PAYLOAD_BF16, 67);
  epx_ref_ll_opts lo = {T, 0, 0, 0};
  epx_ref_ll_result ref;
  epx_ref_ll_dispatch(&w.ref, rank, &lo, &ref);
  int64_t lrows = (int64_t)el * R * T;
  int f = 0;
  epxHandle_t h[3] = {NULL, NULL, NULL};
  void *x[3];
  int *cnt[3], *src[3];
  int64_t *rng[3];
  for (int i = 0; i < 3; ++i) {
    f |= epx_fault_expect_success(rank, comm, epxHandleCreate(comm, &h[i]), "epxHandleCreate");
    x[i] = epx_test_xaligned((size_t)lrows * H * 2);
    cnt[i] = epx_test_xaligned((size_t)el * 4);
    src[i] = epx_test_xaligned((size_t)lrows * 4);
    rng[i] = epx_test_xaligned((size_t)el * R * 8);
    epx_test_poison(x[i], (size_t)lrows * H * 2);
    epx_test_poison(cnt[i], (size_t)el * 4);
    epx_test_poison(src[i], (size_t)lrows * 4);
    epx_test_poison(rng[i], (size_t)el * R * 8);
  }
  epxLowLatencyDispatchArgs_t la;
  memset(&la, 0, sizeof la);
  la.x = w.x[rank];
  la.topk_idx = w.topk[rank];
  la.topk_idx_type = epxInt64;
  la.num_tokens = p.tokens[rank];
  la.hidden = H;
  la.num_topk = K;
  la.return_recv_hook = 1;
  /* Two send-only phases may be outstanding; a third is refused on every rank. */
  for (int i = 0; i < 3 && !f; ++i) {
    epxLowLatencyDispatchOutputs_t o = {x[i], NULL, cnt[i], src[i], rng[i]};
    epxResult_t res = epxLowLatencyDispatch(comm, &la, h[i], &o, NULL);
    if (i < 2)
      f |= epx_fault_expect_success(rank, comm, res, "epxLowLatencyDispatch (send only)");
    else
      f |= expect_code(rank, res, epxInvalidUsage, "third outstanding send-only dispatch",
                       epxCommGetLastError(comm), "two send-only");
  }
  if (!f && !epx_test_is_poisoned(x[2], (size_t)lrows * H * 2)) {
    epx_fault_note(rank, "the refused dispatch wrote recv_x");
    f = 1;
  }
  /* The pending phases still complete, exactly; then the third goes through. */
  for (int i = 0; i < 2 && !f; ++i) {
    f |= epx_fault_expect_success(rank, comm, epxLowLatencyRecv(comm, h[i], NULL),
                                  "epxLowLatencyRecv");
    if (f) break;
    f |= epx_fault_compare(rank, "recv_count", EPX_ELEM_I32, ref.recv_count, cnt[i], 1, el);
    f |= epx_fault_compare(rank, "recv_x", EPX_ELEM_BF16, ref.recv_x, x[i], lrows, H);
    f |=
        epx_fault_compare(rank, "recv_src_info", EPX_ELEM_I32, ref.recv_src_info, src[i], lrows, 1);
  }
  if (!f) {
    la.return_recv_hook = 0;
    epxLowLatencyDispatchOutputs_t o = {x[2], NULL, cnt[2], src[2], rng[2]};
    f |= epx_fault_expect_success(rank, comm, epxLowLatencyDispatch(comm, &la, h[2], &o, NULL),
                                  "epxLowLatencyDispatch after the receives");
    if (!f)
      f |= epx_fault_compare(rank, "recv_x (retried)", EPX_ELEM_BF16, ref.recv_x, x[2], lrows, H);
  }
  /* A low-latency handle in a normal combine: invalid usage on every rank, no hang. */
  if (!f) {
    uint16_t *out = epx_test_xaligned((size_t)(T + 1) * H * 2);
    epx_test_poison(out, (size_t)(T + 1) * H * 2);
    epxCombineArgs_t c;
    memset(&c, 0, sizeof c);
    c.x = x[0];
    c.hidden = H;
    c.num_topk = K;
    epxCombineOutputs_t co = {out, NULL};
    f |= expect_code(rank, epxCombine(comm, &c, h[0], &co, NULL), epxInvalidUsage,
                     "normal combine with a low-latency handle", epxCommGetLastError(comm),
                     "handle");
    if (!f && !epx_test_is_poisoned(out, (size_t)(T + 1) * H * 2)) {
      epx_fault_note(rank, "the refused combine wrote its output");
      f = 1;
    }
    free(out);
  }
  /* Use after destroy: the registry recognises the dead pointers. */
  if (!f) {
    epxComm_t dead = comm;
    f |= epx_fault_expect_success(rank, comm, epxCommDestroy(comm), "epxCommDestroy");
    comm = NULL;
    epxDispatchArgs_t a;
    memset(&a, 0, sizeof a);
    int64_t n = 0;
    f |= expect_code(rank, epxDispatchNotify(dead, &a, h[0], &n, NULL, NULL), epxInvalidUsage,
                     "epxDispatchNotify after destroy", epxCommGetLastError(NULL), "not a live");
    f |= expect_code(rank, epxLowLatencyRecv(dead, h[0], NULL), epxInvalidUsage,
                     "epxLowLatencyRecv after destroy", epxCommGetLastError(NULL), "not a live");
    f |= expect_code(rank, epxCommDestroy(dead), epxInvalidUsage, "second epxCommDestroy",
                     epxCommGetLastError(NULL), "not a live");
    f |= expect_code(rank, epxCommAbort(dead), epxInvalidArgument, "epxCommAbort after destroy",
                     epxCommGetLastError(NULL), "not a live");
    epxResult_t async;
    f |= expect_code(rank, epxCommGetAsyncError(dead, &async), epxInvalidArgument,
                     "epxCommGetAsyncError after destroy", epxCommGetLastError(NULL), "not a live");
    epxCommInfo_t info;
    f |= expect_code(rank, epxCommGetInfo(dead, &info), epxInvalidUsage,
                     "epxCommGetInfo after destroy", epxCommGetLastError(NULL), "not a live");
    /* A handle that outlived its communicator, passed to a new one. */
    epxComm_t other = NULL;
    epxConfig_t oc = epx_test_config(&p, T);
    oc.ranks_per_node = 0;
    oc.num_experts = el;
    f |= epx_fault_expect_success(
        rank, NULL, epxCommInitRankWithAllGather(&other, 1, 0, self_allgather, NULL, &oc),
        "epxCommInitRankWithAllGather");
    if (!f) {
      la.return_recv_hook = 0;
      la.topk_idx = NULL;
      la.num_tokens = 0;
      epxLowLatencyDispatchOutputs_t o = {x[1], NULL, cnt[1], src[1], rng[1]};
      f |= expect_code(rank, epxLowLatencyDispatch(other, &la, h[1], &o, NULL), epxInvalidUsage,
                       "a handle of a destroyed communicator on a new one",
                       epxCommGetLastError(other), "another communicator");
      epxResult_t a2 = epxSuccess;
      epxCommGetAsyncError(other, &a2);
      if (a2 != epxSuccess)
        epx_fault_note(rank, "the new communicator has sticky error %s", epxGetErrorString(a2));
      epxCommDestroy(other);
    }
    for (int i = 0; i < 3; ++i) {
      f |= epx_fault_expect_success(rank, NULL, epxHandleDestroy(h[i]),
                                    "epxHandleDestroy after epxCommDestroy");
      f |= expect_code(rank, epxHandleDestroy(h[i]), epxInvalidUsage, "second epxHandleDestroy",
                       epxCommGetLastError(NULL), "not a live");
      epxHandleInfo_t hi;
      f |= expect_code(rank, epxHandleGetInfo(h[i], &hi), epxInvalidUsage,
                       "epxHandleGetInfo after destroy", epxCommGetLastError(NULL), "not a live");
      f |= expect_code(rank, epxHandleReset(h[i]), epxInvalidUsage, "epxHandleReset after destroy",
                       epxCommGetLastError(NULL), "not a live");
      h[i] = NULL;
    }
  }
  for (int i = 0; i < 3; ++i) {
    if (h[i]) epxHandleDestroy(h[i]);
    free(x[i]);
    free(cnt[i]);
    free(src[i]);
    free(rng[i]);
  }
  if (comm) epxCommDestroy(comm);
  epx_ref_ll_free(&ref);
  epx_test_world_free(&w);
  return f || B->r[rank].bad;
}

static int section_r6(void) {
  int st[MAXR];
  int hangs = epx_fault_run(2, r6_rank, NULL, NULL, NULL, 60.0, st, 0);
  int ok = hangs == 0 && epx_fault_exited_ok(st[0]) && epx_fault_exited_ok(st[1]);
  printf("%s r6_misuse: third outstanding LL send phase refused on every rank (the two pending "
         "complete exactly), LL handle in a normal combine, use after destroy of communicator "
         "and handles, a stale handle on a new communicator\n",
         ok ? "PASS" : "FAIL");
  fflush(stdout);
  return !ok;
}

/* ------------------------------------------------------------ main */

int main(int argc, char **argv) {
  epx_test_rng rng;
  int segs_before = 0;
  B = epx_fault_begin(&rng, &segs_before);
  if (!B) return 1;
  double t0 = epx_test_now();
  int fails = 0;
  if (epx_test_case_wanted(argc, argv, "r1")) fails += section_r1(&rng);
  if (epx_test_case_wanted(argc, argv, "r2")) fails += section_r2(&rng);
  if (epx_test_case_wanted(argc, argv, "r3")) fails += section_r3();
  if (epx_test_case_wanted(argc, argv, "r4")) fails += section_r4();
  if (epx_test_case_wanted(argc, argv, "r6")) fails += section_r6();
  if (epx_test_case_wanted(argc, argv, "r12")) fails += section_r12();
  fails += epx_fault_segments_left(segs_before);
  /* The figures, in one line for the CI log. */
  double r1_med = epx_fault_median(&R1S.tte), r1_max = epx_fault_max(&R1S.tte);
  double r2_med = epx_fault_median(&R2S.over), r2_max = epx_fault_max(&R2S.over);
  printf("test_faults summary: R1 kills=%d survived=%d hangs=%d time_to_error_ms median=%.1f "
         "worst=%.1f destroy_ms worst=%.1f | R2 stops=%d survived=%d error_after_timeout_ms "
         "median=%.0f worst=%.0f resumed_rank_error_ms worst=%.0f | R4 abort_ms=%.1f "
         "destroy_ms=%.1f exit_ms=%.1f | R12 seeds=%d calls=%d | %.1f s, %s\n",
         R1S.injected, R1S.survived, R1S.hangs, r1_med * 1e3, r1_max * 1e3,
         epx_fault_max(&R1S.destroy) * 1e3, R2S.injected, R2S.survived, r2_med * 1e3,
         r2_max * 1e3, epx_fault_max(&R2S.resumed_err) * 1e3, r4_abort_s * 1e3,
         r4_destroy_s * 1e3, r4_exit_s * 1e3, SOAK.seeds, SOAK.calls, epx_test_now() - t0,
         fails ? "FAILED" : "passed");
  return fails ? 1 : 0;
}
