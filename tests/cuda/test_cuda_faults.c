/*
 * test_cuda_faults.c - fault injection and soak on the CUDA backend
 * (reliability.md R1, R2, R3, R4, R12; see docs/reliability.md). The host
 * backend's counterpart is tests/mp/test_faults.c.
 *
 *   r1   SIGKILL one of 3 ranks at a random moment while every rank loops one
 *        of notify / dispatch / combine / ll_dispatch / ll_combine (each
 *        stream-ordered call followed by a stream synchronisation): every
 *        survivor returns epxPeerFailed or epxTimeout naming the killed rank
 *        within 2 s (+0.5 s slack; the hard timeout is 20 s, so only the
 *        liveness words can make it), its next call fails at once with the
 *        same code, its CUDA context still works (cudaMemsetAsync + stream
 *        synchronisation), epxCommDestroy returns within 1 s, and the
 *        survivors then build a fresh communicator among themselves whose
 *        notify and dispatch are exact. No rank hangs.
 *   r2   SIGSTOP one rank mid-loop (dispatch twice, combine, ll_dispatch) for
 *        longer than a 2 s hard timeout, then SIGCONT: the survivors fail
 *        between timeout - 0.1 s and timeout + 1 s after the stop (timeout, or
 *        peer-failed naming the stopped rank through a survivor that timed out
 *        first); their outputs do not change while the resumed rank runs on
 *        (compared byte for byte, communicators kept alive); the resumed rank
 *        gets an error within 1.5 s of SIGCONT and its next call fails at once.
 *   r3   one rank sleeps 80 % of a 2.5 s hard timeout before each of 6 calls
 *        (notify, dispatch, combine, worst-case dispatch, LL dispatch, LL
 *        combine): every call succeeds and is exact. The CUDA backend has no
 *        soft-timeout warning, so none is asserted (the host test asserts it).
 *   r4   abort: rank 1 never calls; rank 0's worst-case dispatch (the first
 *        call of the communicator) is enqueued within 0.5 s (a stream-ordered
 *        call must not wait for a peer on the host), waits on the device, and
 *        another thread calls epxCommAbort: the blocked cudaStreamSynchronize
 *        returns within 1 s of it (not before: then rank 0 prints its own
 *        device error), the call after it fails with epxAborted at once, and
 *        rank 1's calls then fail within 1 s naming the abort. Destroy: ranks 1 and 2 are SIGKILLed and reaped, rank 0 starts
 *        a dispatch that waits on them and destroys at once: < 1 s. Exit: rank
 *        0 calls exit(0) while another thread is blocked in a notify: it must
 *        be reaped with status 0 within 1 s, and rank 1's calls fail within 2 s
 *        naming it.
 *   r12  soak: random seeds (random shapes, 90 % skew, ranks with 0 tokens,
 *        all -1 routing, max tokens, duplicate ids, BF16 / FP8 with f32 or
 *        UE8M0 scales, int32 / int64 ids, expert alignment, LL BF16 / FP8 /
 *        rounded / UE8M0), every output poisoned before each call and compared
 *        in full with the CPU reference, each seed's 6-call sequence run twice
 *        with bit-identical outputs.
 *   small_soak_two_ranks   one fixed r12 seed on 2 ranks: the case
 *        tools/gpu-check runs under compute-sanitizer (no fault injection).
 * At the end: no epx segment is left in /dev/shm, and one summary line.
 *
 * Ranks are forked processes; rank r uses device r % device_count, so 2-4
 * ranks run on 1 or 2 GPUs (sharing a GPU through CUDA IPC).
 *
 *   test_cuda_faults                 every section
 *   test_cuda_faults r1 r4 ...       the named sections / cases
 * Environment: EPX_FAULT_RUNS (R1 runs per phase, default 5), EPX_FAULT_RANKS
 * (ranks of R1 and R2, 2..4, default 3), EPX_FAULT_SEED (victims and delays;
 * default from the clock, printed), EPX_SOAK_SEED (first
 * soak seed; default from the clock, printed), EPX_SOAK_SECONDS (soak budget,
 * default 20), EPX_TEST_EXEC_RANKS=1 (ranks of the small case re-execute this
 * binary, for compute-sanitizer).
 */
#include <cuda_runtime_api.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/faults.h"
#include "common/harness.h"
#include "common/world.h"
#include "reference/reference.h"

#define MAXR EPX_FAULT_MAX_RANKS

/* Slack on the 2 s time-to-error criterion: a killed process's GPU context is
 * torn down by the driver while the survivors share the GPU. */
#define R1_SLACK_S 0.5

/* The board the ranks report through (tests/common/faults.h). */
static epx_fault_board *B;

/* 1 when the process has ended (it stays a zombie, not reaped, for
 * epx_fault_run). */
static int process_ended(pid_t pid) {
  siginfo_t info;
  memset(&info, 0, sizeof info);
  return waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid;
}

/* Waits until every rank is set up and looping; 1 after limit_s, or at once
 * when a rank ended before (its set-up failed: no use waiting). */
static int wait_all_ready(const pid_t *pids, int R, double limit_s) {
  double end = epx_test_now() + limit_s;
  for (;;) {
    int ready = 0;
    for (int r = 0; r < R; ++r) {
      if (atomic_load(epx_fault_ready_of(r))) {
        ++ready;
      } else if (process_ended(pids[r])) {
        fprintf(stderr, "  rank %d ended before it was ready\n", r);
        return 1;
      }
    }
    if (ready == R) return 0;
    if (epx_test_now() > end) {
      fprintf(stderr, "  ranks not ready after %.0f s\n", limit_s);
      return 1;
    }
    epx_fault_sleep(0.001);
  }
}

/* ------------------------------------------------------------ CUDA helpers */

#define CK(call)                                                                           \
  do {                                                                                     \
    cudaError_t ck_e_ = (call);                                                            \
    if (ck_e_ != cudaSuccess) {                                                            \
      fprintf(stderr, "  %s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(ck_e_)); \
      exit(3);                                                                             \
    }                                                                                      \
  } while (0)

static cudaStream_t g_stream;
static int g_device;

/* Device rank % device_count and a non-blocking stream, before any epx call. */
static void cuda_rank_setup(int rank) {
  int ndev = 0;
  CK(cudaGetDeviceCount(&ndev));
  g_device = rank % ndev;
  CK(cudaSetDevice(g_device));
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
}

static void *dalloc(size_t bytes) {
  void *p = NULL;
  CK(cudaMalloc(&p, bytes + 16));
  CK(cudaMemset(p, EPX_TEST_POISON_BYTE, bytes + 16));
  /* cudaMemset runs on the legacy stream, which does not order with the
   * non-blocking test stream: finish it before the buffer is used there. */
  CK(cudaDeviceSynchronize());
  return p;
}
static void *dup_dev(const void *h, size_t bytes) {
  void *d = dalloc(bytes);
  if (bytes) CK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
  return d;
}
static void dpoison(void *d, size_t bytes) {
  if (d && bytes) CK(cudaMemsetAsync(d, EPX_TEST_POISON_BYTE, bytes, g_stream));
}
static void *to_host(const void *d, size_t bytes) {
  void *h = epx_test_xmalloc(bytes + 16);
  CK(cudaStreamSynchronize(g_stream));
  if (bytes) CK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
  return h;
}
static void dfree(void *p) {
  if (p) cudaFree(p);
}
/* Zeroes device memory, finished before the test stream uses it. */
static void dzero(void *d, size_t bytes) {
  CK(cudaMemset(d, 0, bytes));
  CK(cudaDeviceSynchronize());
}

static epxConfig_t cuda_config(const epx_test_problem *p, int ll_tokens, int timeout_ms) {
  epxConfig_t cfg = epx_test_config(p, ll_tokens);
  cfg.backend = epxBackendCuda;
  cfg.cuda_device = g_device;
  if (timeout_ms > 0) cfg.timeout_ms = timeout_ms;
  return cfg;
}

/* The context still works: a memset and a synchronisation succeed. */
static void context_usable(int rank) {
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, 4096);
  if (e == cudaSuccess) e = cudaMemsetAsync(p, 0x5a, 4096, g_stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(g_stream);
  unsigned char b = 0;
  if (e == cudaSuccess) e = cudaMemcpy(&b, p, 1, cudaMemcpyDeviceToHost);
  if (p) cudaFree(p);
  if (e != cudaSuccess || b != 0x5a) {
    epx_fault_note(rank, "the CUDA context is not usable after the fault: %s (byte 0x%02x)",
                   cudaGetErrorString(e), b);
  }
}

/* ------------------------------------------------------------ looping one op */

/* Issues one op and, for a stream-ordered one, waits for its kernels: a
 * device error then surfaces at the next call. */
static epxResult_t loop_op(epx_fault_loop *s, int op) {
  epxResult_t res = epx_fault_loop_call(s, op);
  if (res == epxSuccess && op != EPX_FAULT_NOTIFY) {
    cudaError_t e = cudaStreamSynchronize(g_stream);
    if (e != cudaSuccess) {
      epx_fault_note(s->rank, "cudaStreamSynchronize after %s: %s", epx_fault_op_names[op],
                     cudaGetErrorString(e));
      return epxCudaError;
    }
  }
  return res;
}

/* Initialises the communicator and the buffers, and runs the calls the op
 * needs before it (notify before dispatch, ...). 0 on success. */
static int loop_setup(epx_fault_loop *s, int rank, int R, const epxUniqueId *id, uint64_t seed,
                      int timeout_ms, int op) {
  cuda_rank_setup(rank);
  epx_test_problem p;
  epx_fault_loop_init(s, &p, rank, R, seed);
  s->stream = g_stream;
  epxConfig_t cfg = cuda_config(&p, s->llT, timeout_ms);
  if (epx_test_comm_init(&s->comm, rank, R, id, &cfg)) return 1;
  if (epxHandleCreate(s->comm, &s->h) != epxSuccess) return 1;
  if (epxHandleCreate(s->comm, &s->hw) != epxSuccess) return 1;
  epx_test_world_init(&s->w, &p, 1, EPX_PAYLOAD_BF16, seed + 1);
  size_t H = (size_t)s->H, K = (size_t)s->K, T = (size_t)s->T;
  s->x = dup_dev(s->w.x[rank], T * H * 2);
  s->topk = dup_dev(s->w.topk[rank], T * K * 8);
  s->weights = dup_dev(s->w.weights[rank], T * K * 4);
  epx_fault_loop_alloc(s, dalloc, dzero);
  return epx_fault_loop_prepare(s, op, loop_op);
}

static void loop_free(epx_fault_loop *s) {
  dfree(s->x);
  dfree(s->topk);
  dfree(s->weights);
  epx_fault_loop_free(s, dfree);
  cudaStreamDestroy(g_stream);
}

/* 1 when the message names rank v as the cause (directly, as the rank a
 * failed peer lost, or as the rank waited for, "waiting for rank v:" too). */
static int names_rank(const char *msg, int v) {
  char d[48];
  snprintf(d, sizeof d, "waiting for rank %d:", v);
  return epx_fault_names_rank(msg, v) || strstr(msg, d);
}

/* Calls `op` until one fails (at most `tries` calls). A peer may have taken
 * part in the first call before it went away, so that one may succeed.
 * Returns the first failure (or epxSuccess); *seconds is the time it took. */
static epxResult_t call_until_error(epx_fault_loop *s, int op, int tries, double *seconds) {
  double t0 = epx_test_now();
  epxResult_t res = epxSuccess;
  for (int i = 0; i < tries && res == epxSuccess; ++i) res = loop_op(s, op);
  *seconds = epx_test_now() - t0;
  return res;
}

/* ------------------------------------------------------------ R1 / R2 */

/* An output snapshot: the buffers the ops write, copied to the host. */
static unsigned char *snapshot(const epx_fault_loop *s) {
  size_t a, b, c;
  epx_fault_loop_out_bytes(s, &a, &b, &c);
  unsigned char *dst = epx_test_xmalloc(a + b + c);
  unsigned char *x = to_host(s->recv_x, a), *o = to_host(s->out_x, b), *l = to_host(s->ll_x, c);
  memcpy(dst, x, a);
  memcpy(dst + a, o, b);
  memcpy(dst + a + b, l, c);
  free(x);
  free(o);
  free(l);
  return dst;
}

/* R1: the survivors (compacted ranks) build a fresh communicator with the
 * second id and check a notify and a dispatch against the reference. */
static int fresh_comm_exact(int rank, int R, int victim) {
  int me = rank < victim ? rank : rank - 1, n = R - 1;
  epx_test_problem p;
  memset(&p, 0, sizeof p);
  p.nranks = n;
  p.num_experts = 4 * n;
  p.hidden = 256;
  p.num_topk = 4;
  p.routing = EPX_ROUTING_UNIFORM;
  p.seed = 4242;
  for (int r = 0; r < n; ++r) p.tokens[r] = 64 - 5 * r;
  epxConfig_t cfg = cuda_config(&p, 0, 20000);
  cfg.bootstrap_timeout_ms = 15000;
  epxComm_t comm = NULL;
  if (epx_test_comm_init(&comm, me, n, &B->id2, &cfg)) {
    epx_fault_note(rank, "a fresh communicator among the survivors could not be made");
    return 0;
  }
  epx_test_world w;
  epx_test_world_init(&w, &p, 1, EPX_PAYLOAD_BF16, 77);
  epx_ref_dispatch_opts ro = {epxBFloat16, epxScalesNone, 0, 0};
  epx_ref_dispatch_result ref;
  epx_ref_dispatch(&w.ref, me, &ro, &ref);
  int T = p.tokens[me], H = p.hidden, K = p.num_topk, el = 4;
  void *x = dup_dev(w.x[me], (size_t)T * H * 2), *topk = dup_dev(w.topk[me], (size_t)T * K * 8);
  int64_t N = ref.num_recv;
  void *rx = dalloc((size_t)(N + 1) * H * 2);
  int *rsrc = dalloc((size_t)(N + 1) * 4);
  epxHandle_t h = NULL;
  int ok = epxHandleCreate(comm, &h) == epxSuccess;
  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = x;
  a.x_type = epxBFloat16;
  a.topk_idx = topk;
  a.topk_idx_type = epxInt64;
  a.num_tokens = T;
  a.hidden = H;
  a.num_topk = K;
  int64_t got = -1;
  int cnt[16];
  epxResult_t res = ok ? epxDispatchNotify(comm, &a, h, &got, cnt, g_stream) : epxInternalError;
  if (res != epxSuccess || got != N) {
    epx_fault_note(rank,
                   "fresh communicator: notify %s, N_recv %" PRId64 " (expected %" PRId64 "): %s",
                   epxGetErrorString(res), got, N, epxCommGetLastError(comm));
    ok = 0;
  }
  if (ok && epx_test_rank_compare(rank, "fresh notify per-expert counts", EPX_ELEM_I32,
                                  ref.num_recv_tokens_per_expert, cnt, 1, el))
    ok = 0;
  if (ok) {
    epxDispatchOutputs_t o;
    memset(&o, 0, sizeof o);
    o.recv_x = rx;
    o.recv_src_idx = rsrc;
    o.capacity_rows = N;
    res = epxDispatch(comm, &a, h, &o, g_stream);
    if (res != epxSuccess) {
      epx_fault_note(rank, "fresh communicator: dispatch %s: %s", epxGetErrorString(res),
                     epxCommGetLastError(comm));
      ok = 0;
    } else {
      uint16_t *gx = to_host(rx, (size_t)(N + 1) * H * 2);
      int *gs = to_host(rsrc, (size_t)N * 4);
      ok &= !epx_test_rank_compare(rank, "fresh recv_x", EPX_ELEM_BF16, ref.recv_x, gx, N, H);
      ok &= !epx_test_rank_compare(rank, "fresh recv_src_idx", EPX_ELEM_I32, ref.recv_src_idx, gs,
                                   N, 1);
      if (!epx_test_is_poisoned(gx + (size_t)N * H, (size_t)H * 2)) {
        epx_fault_note(rank, "fresh dispatch wrote past N_recv");
        ok = 0;
      }
      free(gx);
      free(gs);
    }
  }
  if (h) epxHandleDestroy(h);
  if (epxCommDestroy(comm) != epxSuccess) ok = 0;
  dfree(x);
  dfree(topk);
  dfree(rx);
  dfree(rsrc);
  epx_ref_dispatch_free(&ref);
  epx_test_world_free(&w);
  if (!ok) B->r[rank].bad = 1;
  return ok;
}

static const epx_fault_backend backend = {
    .op = loop_op,
    .snapshot = snapshot,
    .after_error = context_usable,
    .names = names_rank,
    .loop_s = 40.0,
    .release_s = 30.0,
};

static int fault_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const epx_fault_case *fc = arg;
  epx_fault_slot *me = &B->r[rank];
  epx_fault_loop s;
  if (loop_setup(&s, rank, R, id, fc->seed, fc->timeout_ms, fc->op)) return 1;
  epx_fault_loop_to_error(&s, fc, &backend);
  epx_fault_loop_destroy(&s);
  if (!fc->stop && rank != fc->victim && B->have_id2)
    me->fresh_ok = fresh_comm_exact(rank, R, fc->victim);
  loop_free(&s);
  return me->bad;
}

static void fault_controller(void *ctx, const pid_t *pids, int *status, int R) {
  const epx_fault_case *fc = ctx;
  if (wait_all_ready(pids, R, 60.0)) {
    atomic_store(&B->stop, 1);
    return;
  }
  epx_fault_inject(fc, pids, R, 15.0);
}

static epx_fault_r1_figures R1S;
static int fresh_ok, fresh_total; /* R1: survivors whose fresh communicator was exact */

static int fault_ranks(void) {
  int R = 3;
  const char *e = getenv("EPX_FAULT_RANKS");
  if (e && *e) R = atoi(e);
  if (R < 2) R = 2;
  if (R > 4) R = 4;
  return R;
}

static int section_r1(epx_test_rng *rng) {
  int runs = epx_fault_runs(5);
  int R = fault_ranks(), fails = 0;
  for (int op = 0; op < EPX_FAULT_R1_OPS; ++op) {
    int op_fails = 0;
    double t_op = epx_test_now();
    for (int i = 0; i < runs; ++i) {
      epx_fault_case fc = {op, (int)epx_test_rng_below(rng, (uint32_t)R), 0, 20000,
                           epx_test_rng_uniform(rng) * 0.05, epx_test_rng_next(rng)};
      int st[MAXR];
      int hangs = epx_fault_run(R, fault_rank, &fc, fault_controller, &fc, 60.0, st, 1);
      for (int r = 0; r < R; ++r) {
        if (r == fc.victim) continue;
        fresh_total++;
        fresh_ok += B->r[r].fresh_ok;
      }
      if (!epx_fault_r1_judge(&R1S, &fc, epx_fault_op_names[op], i, R, st, hangs, R1_SLACK_S))
        op_fails++;
    }
    printf("%s r1_kill_%s: %d runs of %d ranks, time to error median %.1f ms, worst %.1f ms "
           "(%.1f s)\n",
           op_fails ? "FAIL" : "PASS", epx_fault_op_names[op], runs, R,
           epx_fault_median(&R1S.per_op[op]) * 1e3, epx_fault_max(&R1S.per_op[op]) * 1e3,
           epx_test_now() - t_op);
    fflush(stdout);
    fails += op_fails;
  }
  return fails != 0;
}

static epx_fault_r2_figures R2S;

static int section_r2(epx_test_rng *rng) {
  const int ops[] = {EPX_FAULT_DISPATCH, EPX_FAULT_DISPATCH, EPX_FAULT_COMBINE,
                     EPX_FAULT_LL_DISPATCH};
  int R = fault_ranks(), fails = 0, timeout_ms = 2000;
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; ++i) {
    epx_fault_case fc = {ops[i], (int)epx_test_rng_below(rng, (uint32_t)R), 1, timeout_ms,
                         epx_test_rng_uniform(rng) * 0.05, epx_test_rng_next(rng)};
    int st[MAXR];
    int hangs = epx_fault_run(R, fault_rank, &fc, fault_controller, &fc, 60.0, st, 0);
    if (epx_fault_r2_judge(&R2S, &fc, epx_fault_op_names[fc.op], R, st, hangs, 1.5))
      printf("PASS r2_stop_%s: victim rank %d; survivor: %s; resumed rank: %s\n",
             epx_fault_op_names[fc.op], fc.victim, B->r[(fc.victim + 1) % R].msg,
             B->r[fc.victim].msg);
    else
      fails++;
    fflush(stdout);
  }
  return fails != 0;
}

/* ------------------------------------------------------------ exact sequence (R3, R12) */

/* Copies a device output back, compares it and hashes every byte. */
static int dcmp(int rank, const char *what, epx_test_elem e, const void *exp, const void *dev,
                int64_t rows, int64_t cols, size_t all_bytes, uint64_t *hash) {
  unsigned char *got = to_host(dev, all_bytes);
  int bad = epx_fault_compare(rank, what, e, exp, got, rows, cols);
  *hash = epx_fault_fnv(*hash, got, all_bytes);
  free(got);
  return bad;
}

static int dpoisoned(int rank, const char *what, const void *dev, size_t off, size_t bytes) {
  if (!bytes) return 0;
  unsigned char *got = to_host((const unsigned char *)dev + off, bytes);
  int ok = epx_test_is_poisoned(got, bytes);
  free(got);
  if (!ok) epx_fault_note(rank, "%s", what);
  return !ok;
}

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

  /* device inputs */
  void *dx = dup_dev(w->x[rank], (size_t)T * xrow);
  void *ds = srow ? dup_dev(w->scales[rank], (size_t)T * srow) : NULL;
  void *dt = dup_dev(w->topk[rank], (size_t)T * K * ie);
  float *dw = dup_dev(w->weights[rank], (size_t)T * K * 4);
  void *dcx = dup_dev(ps.cx[rank], (size_t)N * H * 2);
  float *dcw = dup_dev(ps.cw[rank], (size_t)N * K * 4);
  void *dbias = dup_dev(ps.bias, (size_t)T * H * 2);
  void *dlx_in = dup_dev(wl->x[rank], (size_t)T * H * 2);
  void *dlt = dup_dev(wl->topk[rank], (size_t)T * K * ie);
  float *dlw = dup_dev(wl->weights[rank], (size_t)T * K * 4);
  void *dlout = dup_dev(ps.lout[rank], (size_t)lrows * H * 2);
  /* device outputs */
  void *rx = dalloc((size_t)rows * xrow);
  void *rs = srow ? dalloc((size_t)rows * srow) : NULL;
  void *rt = dalloc((size_t)rows * K * ie);
  float *rw = dalloc((size_t)rows * K * 4);
  int *rsrc = dalloc((size_t)rows * 4);
  int *rpre = dalloc((size_t)R * 4), *rpe_cnt = dalloc((size_t)el * 4);
  int *nrecv = dalloc(4);
  uint16_t *ox = dalloc((size_t)(T + 1) * H * 2);
  float *ow = dalloc((size_t)(T + 1) * K * 4);
  void *lx = dalloc((size_t)lrows * lxrow);
  void *ls = lsrow ? dalloc((size_t)lrows * lsrow) : NULL;
  int *lcount = dalloc((size_t)el * 4), *lsrc = dalloc((size_t)lrows * 4);
  int64_t *lrange = dalloc((size_t)el * R * 8);
  int *cnt = epx_test_xaligned((size_t)el * 4);

  f |= epx_fault_expect_success(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  f |= epx_fault_expect_success(rank, comm, epxHandleCreate(comm, &hw), "epxHandleCreate");
  f |= epx_fault_expect_success(rank, comm, epxHandleCreate(comm, &hl), "epxHandleCreate");
  if (f) goto out;

  epxDispatchArgs_t a = epx_fault_dispatch_args(sp, &ps, dx, ds, dt, dw);

  /* 1. notify */
  f |= epx_fault_seq_notify(sp, &ps, rank, comm, &a, h, cnt, g_stream, hash);
  if (f) goto out;
  /* 2. dispatch with the notify's handle (cap = N + 1: the extra row stays
   *    poisoned), then the worst-case dispatch on its own handle */
  for (int pass = 0; pass < 2 && !f; ++pass) {
    int64_t rr = pass == 0 ? ps.cap : worst;
    const epx_ref_dispatch_result *rf = pass == 0 ? &ps.ref[rank] : &ps.refw;
    dpoison(rx, (size_t)rows * xrow);
    dpoison(rs, (size_t)rows * srow);
    dpoison(rt, (size_t)rows * K * ie);
    dpoison(rw, (size_t)rows * K * 4);
    dpoison(rsrc, (size_t)rows * 4);
    dpoison(rpre, (size_t)R * 4);
    dpoison(rpe_cnt, (size_t)el * 4);
    dpoison(nrecv, 4);
    epxDispatchArgs_t d = a;
    if (pass == 1) d.num_worst_tokens = worst;
    epxDispatchOutputs_t o = {rx, rs, rt, rw, rsrc, rpre, rpe_cnt, nrecv, rr};
    epx_fault_seq_before_call(sp, rank);
    f |= epx_fault_expect_success(rank, comm,
                                  epxDispatch(comm, &d, pass == 0 ? h : hw, &o, g_stream),
                                  pass == 0 ? "epxDispatch" : "epxDispatch (worst case)");
    if (f) break;
    int64_t vr = pass == 0 ? N : worst; /* rows the reference describes */
    f |= dcmp(rank, "recv_x", fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16, rf->recv_x, rx, vr,
              (int64_t)xrow / (fp8 ? 1 : 2), (size_t)rows * xrow, hash);
    if (srow)
      f |= dcmp(rank, "recv_x_scales", EPX_ELEM_I32, rf->recv_x_scales, rs, N, (int64_t)srow / 4,
                (size_t)rows * srow, hash);
    f |= dcmp(rank, "recv_topk_idx", sp->int32 ? EPX_ELEM_I32 : EPX_ELEM_I64, rf->recv_topk_idx,
              rt, vr, K, (size_t)rows * K * ie, hash);
    f |= dcmp(rank, "recv_topk_weights", EPX_ELEM_F32, rf->recv_topk_weights, rw, vr, K,
              (size_t)rows * K * 4, hash);
    f |= dcmp(rank, "recv_src_idx", EPX_ELEM_I32, rf->recv_src_idx, rsrc, vr, 1, (size_t)rows * 4,
              hash);
    f |= dcmp(rank, "recv_rank_prefix", EPX_ELEM_I32, rf->recv_rank_prefix, rpre, 1, R,
              (size_t)R * 4, hash);
    f |= dcmp(rank, "num_recv_tokens_per_expert", EPX_ELEM_I32, rf->num_recv_tokens_per_expert,
              rpe_cnt, 1, el, (size_t)el * 4, hash);
    int n32 = (int)N;
    f |= dcmp(rank, "num_recv_tokens", EPX_ELEM_I32, &n32, nrecv, 1, 1, 4, hash);
    if (pass == 0)
      f |= dpoisoned(rank, "dispatch wrote recv_x past N_recv", rx, (size_t)N * xrow, xrow);
    else
      f |= dpoisoned(rank, "worst-case dispatch wrote recv_x padding rows", rx, (size_t)N * xrow,
                     (size_t)(worst - N) * xrow);
    if (pass == 0 && !f) {
      /* 3. combine of the notify's routing */
      dpoison(ox, (size_t)(T + 1) * H * 2);
      dpoison(ow, (size_t)(T + 1) * K * 4);
      epxCombineArgs_t c = epx_fault_combine_args(&ps, dcx, dcw, ps.with_bias ? dbias : NULL);
      epxCombineOutputs_t co = {ox, ow};
      epx_fault_seq_before_call(sp, rank);
      f |= epx_fault_expect_success(rank, comm, epxCombine(comm, &c, h, &co, g_stream),
                                    "epxCombine");
      if (f) break;
      f |= dcmp(rank, "combined_x", EPX_ELEM_BF16, ps.exp_cx, ox, T, H, (size_t)(T + 1) * H * 2,
                hash);
      f |= dcmp(rank, "combined_topk_weights", EPX_ELEM_F32, ps.exp_cw, ow, T, K,
                (size_t)(T + 1) * K * 4, hash);
      f |= dpoisoned(rank, "combine wrote past row T", ox, (size_t)T * H * 2, (size_t)H * 2);
    }
  }
  if (f) goto out;
  /* 4. LL dispatch and combine */
  {
    dpoison(lx, (size_t)lrows * lxrow);
    dpoison(ls, (size_t)lrows * lsrow);
    dpoison(lcount, (size_t)el * 4);
    dpoison(lsrc, (size_t)lrows * 4);
    dpoison(lrange, (size_t)el * R * 8);
    epxLowLatencyDispatchArgs_t la = epx_fault_ll_dispatch_args(sp, &ps, dlx_in, dlt);
    epxLowLatencyDispatchOutputs_t lo2 = {lx, ls, lcount, lsrc, lrange};
    epx_fault_seq_before_call(sp, rank);
    f |= epx_fault_expect_success(rank, comm, epxLowLatencyDispatch(comm, &la, hl, &lo2, g_stream),
                                  "epxLowLatencyDispatch");
    if (f) goto out;
    f |= dcmp(rank, "ll recv_count", EPX_ELEM_I32, ps.lref.recv_count, lcount, 1, el,
              (size_t)el * 4, hash);
    f |= dcmp(rank, "ll recv_layout_range", EPX_ELEM_I64, ps.lref.recv_layout_range, lrange, el, R,
              (size_t)el * R * 8, hash);
    /* full buffers: rows past each count are poisoned in both */
    f |= dcmp(rank, "ll recv_x (all rows)", sp->ll_fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16,
              ps.lref.recv_x, lx, lrows, H, (size_t)lrows * lxrow, hash);
    if (lsrow)
      f |= dcmp(rank, "ll recv_x_scales (all rows)", EPX_ELEM_I32, ps.lref.recv_x_scales, ls,
                lrows, (int64_t)lsrow / 4, (size_t)lrows * lsrow, hash);
    f |= dcmp(rank, "ll recv_src_info (all rows)", EPX_ELEM_I32, ps.lref.recv_src_info, lsrc,
              lrows, 1, (size_t)lrows * 4, hash);
    if (f) goto out;
    dpoison(ox, (size_t)(T + 1) * H * 2);
    epxLowLatencyCombineArgs_t lc = epx_fault_ll_combine_args(&ps, dlout, dlt, dlw);
    epx_fault_seq_before_call(sp, rank);
    f |= epx_fault_expect_success(rank, comm, epxLowLatencyCombine(comm, &lc, hl, ox, g_stream),
                                  "epxLowLatencyCombine");
    if (f) goto out;
    f |= dcmp(rank, "ll combined_x", EPX_ELEM_BF16, ps.exp_lx, ox, T, H, (size_t)(T + 1) * H * 2,
              hash);
    f |= dpoisoned(rank, "ll combine wrote past row T", ox, (size_t)T * H * 2, (size_t)H * 2);
  }
out:
  CK(cudaStreamSynchronize(g_stream));
  epxHandleDestroy(h);
  epxHandleDestroy(hw);
  epxHandleDestroy(hl);
  epx_fault_pass_free(&ps);
  free(cnt);
  void *dev[] = {dx, ds,   dt,   dw,   dcx,     dcw,   dbias,  dlx_in, dlt, dlw,    dlout, rx,
                 rs, rt,   rw,   rsrc, rpre,    rpe_cnt, nrecv, ox,     ow,  lx,     ls,    lcount,
                 lsrc, lrange};
  for (size_t i = 0; i < sizeof dev / sizeof dev[0]; ++i) dfree(dev[i]);
  return f;
}

static int seq_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const epx_fault_seq *sp = arg;
  epx_fault_slot *me = &B->r[rank];
  char cap_path[64] = "";
  /* R3: capture this rank's stderr, WARN logging on, before the library reads
   * its parameters. */
  int saved_err = sp->slow_rank >= 0 ? epx_fault_capture_begin(cap_path, sizeof cap_path) : -1;
  cuda_rank_setup(rank);
  epx_test_problem p;
  epx_fault_seq_problem(sp, &p);
  epxConfig_t cfg = cuda_config(&p, sp->llT, sp->timeout_ms);
  cfg.max_tokens_per_rank = sp->maxT;
  if (sp->soft_timeout_ms > 0) cfg.soft_timeout_ms = sp->soft_timeout_ms;
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, R, id, &cfg)) return 1;
  int f = epx_fault_seq_repeat(sp, rank, comm, run_sequence); /* destroys comm: warnings logged */
  cudaStreamDestroy(g_stream);
  epx_fault_r3_end(sp, rank, cap_path, saved_err);
  return f || me->bad;
}

static int section_r3(void) {
  epx_fault_seq sp;
  epx_fault_seq_r3(&sp, 2500);
  sp.soft_timeout_ms = 300;
  int st[MAXR];
  double t0 = epx_test_now();
  int hangs = epx_fault_run(sp.R, seq_rank, &sp, NULL, NULL, 120.0, st, 0);
  int ok = hangs == 0 && epx_fault_all_ok(st, sp.R);
  printf("%s r3_slow_rank: rank %d sleeps %.0f ms (80 %% of the %d ms timeout) before each of 6 "
         "calls; exact, no error; soft-timeout (%d ms) warnings naming it: %d and %d; its wait "
         "statistics: %.0f and %.0f slow waits, longest %.0f and %.0f ms (%.1f s)\n",
         ok ? "PASS" : "FAIL", sp.slow_rank, sp.slow_sleep_s * 1e3, sp.timeout_ms, sp.soft_timeout_ms,
         B->r[0].warnings, B->r[1].warnings, B->r[0].extra_s, B->r[1].extra_s, B->r[0].extra2_s * 1e3,
         B->r[1].extra2_s * 1e3, epx_test_now() - t0);
  fflush(stdout);
  return !ok;
}

/* ------------------------------------------------------------ R12 soak */

/* EPX_TEST_TIMEOUT_MS (20 s; gpu-check raises it under the sanitizers) */
#define SOAK_TIMEOUT_MS 0
#define SOAK_LIMIT_S 180.0

static epx_fault_soak_figures SOAK;

static int section_r12(void) {
  return epx_fault_soak(20.0, SOAK_TIMEOUT_MS, seq_rank, SOAK_LIMIT_S, &SOAK);
}

/* The small case (compute-sanitizer): one fixed soak seed on 2 ranks. */
typedef struct small_case {
  const char *name;
  int R;
  uint64_t seed;
} small_case;

static const small_case small_cases[] = {
    {.name = "small_soak_two_ranks", .R = 2, .seed = 1201},
};

/* The fixed parameters of a small case: a random draw, then 2 ranks, FP8 with
 * UE8M0 scales, skewed routing, a rank with 0 tokens. */
static void small_params(const small_case *c, epx_fault_seq *sp) {
  epx_fault_seq_random(sp, c->seed, SOAK_TIMEOUT_MS);
  sp->R = c->R;
  sp->el = 3;
  sp->H = 256;
  sp->K = 4;
  sp->maxT = 48;
  sp->llT = 48;
  sp->tokens[0] = 48;
  sp->tokens[1] = 0;
  sp->routing = EPX_ROUTING_SKEWED;
  sp->payload = EPX_PAYLOAD_FP8_UE8M0;
  sp->int32 = 1;
  sp->align = 4;
  sp->ll_fp8 = 1;
  sp->ll_round = 1;
  sp->ll_ue8m0 = 0;
  sp->repeats = 2;
}

/* ------------------------------------------------------------ R4 */

typedef struct r4_ctx {
  int mode; /* 0 abort from a thread, 1 destroy after the peers died, 2 exit with work in flight */
} r4_ctx;

static double r4_abort_s = -1, r4_abort_call_s = -1, r4_peer_after_abort_s = -1;
static double r4_destroy_s = -1, r4_exit_s = -1, r4_peer_after_exit_s = -1;

/* A stream-ordered call has to return without waiting for a peer. */
#define R4_ENQUEUE_LIMIT_S 0.5

/* The abort thread's state: it calls epxCommAbort 0.2 s after it starts
 * (WAITING -> CALLING), unless the main thread holds it back (WAITING -> HELD)
 * because the kernels already finished without the abort: the main thread
 * then reads this rank's own device error first, which the abort would hide
 * (after it, every call fails with epxAborted before reading the record). */
enum { ABORT_WAITING, ABORT_HELD, ABORT_CALLING };

typedef struct abort_thread_arg {
  epxComm_t comm;
  double t_call, call_s;
  epxResult_t res;
  atomic_int state;
} abort_thread_arg;

static void *abort_thread(void *p) {
  abort_thread_arg *a = p;
  epx_fault_sleep(0.2);
  for (;;) {
    int expected = ABORT_WAITING;
    if (atomic_compare_exchange_strong(&a->state, &expected, ABORT_CALLING)) break;
    epx_fault_sleep(0.0005); /* held by the main thread */
  }
  a->t_call = epx_test_now();
  a->res = epxCommAbort(a->comm);
  a->call_s = epx_test_now() - a->t_call;
  return NULL;
}

/* This rank's own error, as far as the library tells it: epxGetDispatchLayout
 * is local (never waits on a peer) and, like every op, first reports an error
 * that an earlier stream-ordered call left on the device ("an earlier call:
 * ..."). Without one it runs its own kernel (outputs into buffers the caller
 * does not check any more). Changes the async error to the reported one. */
static void own_device_error(epx_fault_loop *s, char *out, size_t len) {
  epxLayout_t l = {s->prefix, NULL, s->src, (uint8_t *)s->recv_topk};
  epxResult_t r = epxGetDispatchLayout(s->comm, s->topk, epxInt64, s->T, s->K, &l, g_stream);
  if (r == epxSuccess) cudaStreamSynchronize(g_stream);
  epxResult_t async = epxSuccess;
  epxCommGetAsyncError(s->comm, &async);
  snprintf(out, len, "a local call then returned %s (async error %s): %s", epxGetErrorString(r),
           epxGetErrorString(async),
           r == epxSuccess ? "no error was recorded on the device" : epxCommGetLastError(s->comm));
}

static int r4_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const r4_ctx *c = arg;
  epx_fault_slot *me = &B->r[rank];
  epx_fault_loop s;
  if (loop_setup(&s, rank, R, id, 44 + (uint64_t)c->mode, 20000, EPX_FAULT_NOTIFY)) return 1;
  atomic_store(&me->ready, 1);
  if (c->mode == 0) {
    if (rank == 0) {
      /* A worst-case dispatch (no host sync inside) whose kernels wait for
       * rank 1; this thread waits for them in cudaStreamSynchronize. It is
       * the communicator's first call, so its kernels run for the first time
       * in this process: the enqueue must not wait for the hello kernel
       * either (CUDA loads a kernel at its first launch unless the library
       * loaded it before; that load may wait for every running kernel). */
      abort_thread_arg a;
      memset(&a, 0, sizeof a);
      a.comm = s.comm;
      atomic_init(&a.state, ABORT_WAITING);
      double t_enq = epx_test_now();
      epxResult_t res = epx_fault_loop_call(&s, EPX_FAULT_WORST);
      double enqueue_s = epx_test_now() - t_enq;
      me->extra2_s = enqueue_s;
      if (res != epxSuccess)
        epx_fault_note(rank, "enqueueing the dispatch: %s", epxGetErrorString(res));
      if (enqueue_s > R4_ENQUEUE_LIMIT_S)
        epx_fault_note(
            rank,
            "enqueueing the worst-case dispatch took %.3f s: a stream-ordered call waited on "
            "the host (a kernel loaded at its first launch while the hello kernel waits for "
            "rank 1?)",
            enqueue_s);
      pthread_t th;
      pthread_create(&th, NULL, abort_thread, &a);
      cudaError_t e = cudaStreamSynchronize(g_stream);
      double t_ret = epx_test_now();
      int expected = ABORT_WAITING;
      const int before_abort = atomic_compare_exchange_strong(&a.state, &expected, ABORT_HELD);
      if (before_abort) {
        /* The kernels ended without the abort: say why, before the abort
         * makes every call fail with epxAborted. */
        char own[512];
        own_device_error(&s, own, sizeof own);
        epx_fault_note(
            rank,
            "the waiting kernels finished before epxCommAbort was called (the enqueue took "
            "%.3f s); this rank's own error: %s",
            enqueue_s, own);
        atomic_store(&a.state, ABORT_WAITING);
      }
      pthread_join(th, NULL);
      me->extra_s = t_ret - a.t_call;
      me->t_err = a.call_s;
      if (e != cudaSuccess)
        epx_fault_note(rank, "cudaStreamSynchronize: %s", cudaGetErrorString(e));
      if (a.res != epxSuccess)
        epx_fault_note(rank, "epxCommAbort returned %s", epxGetErrorString(a.res));
      if (me->extra_s > 1.0 || me->extra_s < 0)
        epx_fault_note(rank, "the waiting kernel finished %.3f s after epxCommAbort", me->extra_s);
      /* After own_device_error the communicator holds that error, not the abort. */
      if (!before_abort) {
        epxResult_t async = epxSuccess;
        epxCommGetAsyncError(s.comm, &async);
        if (async != epxAborted)
          epx_fault_note(rank, "async error %s, expected aborted", epxGetErrorString(async));
        double t0 = epx_test_now();
        res = epx_fault_loop_call(&s, EPX_FAULT_WORST);
        double d = epx_test_now() - t0;
        if (res != epxAborted || d > 0.1)
          epx_fault_note(rank,
                         "the call after the abort returned %s in %.3f s, expected aborted at once",
                         epxGetErrorString(res), d);
      }
      context_usable(rank);
      atomic_store(&B->release, 1);
    } else {
      epx_fault_wait_flag(&B->release, 30.0);
      double d = 0;
      /* rank 0 posted its hello before it aborted, so the first call may get
       * past it; by the second at the latest, the abort must be named */
      epxResult_t res = call_until_error(&s, EPX_FAULT_WORST, 3, &d);
      me->extra_s = d;
      const char *msg = epxCommGetLastError(s.comm);
      if (res != epxPeerFailed || !strstr(msg, "aborted") || d > 1.0)
        epx_fault_note(rank, "after the peer aborted: %s in %.3f s: %s", epxGetErrorString(res), d,
                       msg);
      else
        fprintf(stderr, "  rank %d: %.1f ms after release: %s\n", rank, d * 1e3, msg);
    }
  } else if (c->mode == 1) {
    if (rank == 0) {
      epx_fault_wait_flag(&B->release, 30.0); /* the controller killed every peer */
      /* a dispatch whose kernels wait on the dead peers, then destroy at once */
      epxResult_t res = epx_fault_loop_call(&s, EPX_FAULT_WORST);
      if (res != epxSuccess)
        epx_fault_note(rank, "enqueueing the dispatch: %s", epxGetErrorString(res));
      double t0 = epx_test_now();
      epxHandleDestroy(s.h);
      epxHandleDestroy(s.hw);
      res = epxCommDestroy(s.comm);
      me->extra_s = epx_test_now() - t0;
      if (res != epxSuccess || me->extra_s > 1.0)
        epx_fault_note(rank,
                       "epxCommDestroy after the peers died (a dispatch in flight): %s in %.3f s",
                       epxGetErrorString(res), me->extra_s);
      context_usable(rank);
      loop_free(&s);
      return me->bad;
    }
    for (;;) pause(); /* killed by the controller */
  } else {
    if (rank == 0) epx_fault_exit_with_notify_in_flight(&s);
    epx_fault_wait_flag(&B->release, 30.0); /* rank 0 has been reaped */
    double d = 0;
    epxResult_t res = call_until_error(&s, EPX_FAULT_NOTIFY, 3, &d);
    me->extra_s = d;
    const char *msg = epxCommGetLastError(s.comm);
    if ((res != epxPeerFailed && res != epxTimeout) || !names_rank(msg, 0) || d > 2.0)
      epx_fault_note(rank, "after the peer exited: %s in %.3f s: %s", epxGetErrorString(res), d,
                     msg);
    else
      fprintf(stderr, "  rank %d: %.1f ms after release: %s\n", rank, d * 1e3, msg);
  }
  epxHandleDestroy(s.h);
  epxHandleDestroy(s.hw);
  epxCommDestroy(s.comm);
  loop_free(&s);
  return me->bad;
}

static void r4_controller(void *ctx, const pid_t *pids, int *status, int R) {
  const r4_ctx *c = ctx;
  if (wait_all_ready(pids, R, 60.0)) {
    /* a rank waiting for the release would wait in vain */
    for (int r = 0; r < R; ++r) kill(pids[r], SIGKILL);
    return;
  }
  if (c->mode == 1)
    epx_fault_kill_peers(pids, status, R);
  else if (c->mode == 2)
    r4_exit_s = epx_fault_reap_exit(pids, status, 15.0);
}

static int section_r4(void) {
  int fails = 0;
  int st[MAXR];
  r4_ctx c0 = {0};
  int hangs = epx_fault_run(2, r4_rank, &c0, r4_controller, &c0, 60.0, st, 0);
  int ok = hangs == 0 && epx_fault_exited_ok(st[0]) && epx_fault_exited_ok(st[1]) && !B->r[0].bad &&
           !B->r[1].bad;
  r4_abort_s = B->r[0].extra_s;
  r4_abort_call_s = B->r[0].t_err;
  r4_peer_after_abort_s = B->r[1].extra_s;
  printf("%s r4_abort_from_thread: the dispatch was enqueued in %.1f ms; the waiting kernel "
         "finished (cudaStreamSynchronize returned) %.1f ms after epxCommAbort (which took %.3f "
         "ms); the next call failed at once; the peer failed naming the abort %.1f ms after it "
         "called\n",
         ok ? "PASS" : "FAIL", B->r[0].extra2_s * 1e3, r4_abort_s * 1e3, r4_abort_call_s * 1e3,
         r4_peer_after_abort_s * 1e3);
  fails += !ok;

  r4_ctx c1 = {1};
  hangs = epx_fault_run(3, r4_rank, &c1, r4_controller, &c1, 60.0, st, 0);
  ok = hangs == 0 && epx_fault_exited_ok(st[0]) && !B->r[0].bad;
  r4_destroy_s = B->r[0].extra_s;
  printf("%s r4_destroy_after_peers_died: with a dispatch waiting on the dead peers, "
         "epxHandleDestroy + epxCommDestroy took %.1f ms; the context still works\n",
         ok ? "PASS" : "FAIL", r4_destroy_s * 1e3);
  fails += !ok;

  r4_ctx c2 = {2};
  hangs = epx_fault_run(2, r4_rank, &c2, r4_controller, &c2, 60.0, st, 0);
  ok = hangs == 0 && epx_fault_exited_ok(st[1]) && !B->r[1].bad && r4_exit_s < 1.0;
  r4_peer_after_exit_s = B->r[1].extra_s;
  printf("%s r4_exit_with_call_in_flight: the process was gone %.1f ms after exit(0); its peer "
         "then failed naming it %.1f ms after it called\n",
         ok ? "PASS" : "FAIL", r4_exit_s * 1e3, r4_peer_after_exit_s * 1e3);
  fails += !ok;
  fflush(stdout);
  return fails != 0;
}

/* ------------------------------------------------------------ main */

/* A rank of a small case re-executed by epx_test_exec_rank (compute-sanitizer). */
static int small_rank(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const small_case *c = arg;
  epx_fault_seq sp;
  small_params(c, &sp);
  return seq_rank(rank, nranks, id, &sp);
}

static int rank_exec_main(int argc, char **argv) {
  epxUniqueId id;
  const char *name;
  int rank, nranks;
  if (epx_test_parse_rank_exec(argc, argv, &name, &rank, &nranks, &id) != 0) return 2;
  B = epx_fault_board_map(); /* this process's own board: a small case has no controller */
  if (!B) return 2;
  for (size_t i = 0; i < sizeof small_cases / sizeof small_cases[0]; ++i)
    if (strcmp(small_cases[i].name, name) == 0)
      return small_rank(rank, nranks, &id, (void *)&small_cases[i]);
  return 2;
}

static int run_small(const small_case *c) {
  const char *ex = getenv("EPX_TEST_EXEC_RANKS");
  if (ex && strcmp(ex, "1") == 0) {
    double t0 = epx_test_now();
    int rc = epx_test_spawn(c->R, epx_test_exec_rank, (void *)c->name, 600);
    printf("%s %s (exec mode, %.2f s)\n", rc ? "FAIL" : "PASS", c->name, epx_test_now() - t0);
    fflush(stdout);
    return rc == 0;
  }
  epx_fault_seq sp;
  small_params(c, &sp);
  return epx_fault_soak_seed(&sp, c->name, seq_rank, SOAK_LIMIT_S, &SOAK);
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--rank-exec") == 0) return rank_exec_main(argc, argv);
  epx_test_rng rng;
  int segs_before = 0;
  B = epx_fault_begin(&rng, &segs_before);
  if (!B) return 1;
  double t0 = epx_test_now();
  int fails = 0, ran = 0;
  for (size_t i = 0; i < sizeof small_cases / sizeof small_cases[0]; ++i)
    if (epx_test_case_wanted(argc, argv, small_cases[i].name)) {
      fails += !run_small(&small_cases[i]);
      ++ran;
    }
  if (epx_test_case_wanted(argc, argv, "r1")) fails += section_r1(&rng), ++ran;
  if (epx_test_case_wanted(argc, argv, "r2")) fails += section_r2(&rng), ++ran;
  if (epx_test_case_wanted(argc, argv, "r3")) fails += section_r3(), ++ran;
  if (epx_test_case_wanted(argc, argv, "r4")) fails += section_r4(), ++ran;
  if (epx_test_case_wanted(argc, argv, "r12")) fails += section_r12(), ++ran;
  if (ran == 0) {
    fprintf(stderr, "no case matched (cases: r1 r2 r3 r4 r12 small_soak_two_ranks)\n");
    return 1;
  }
  fails += epx_fault_segments_left(segs_before);
  double r1_med = epx_fault_median(&R1S.tte), r1_max = epx_fault_max(&R1S.tte);
  double r2_med = epx_fault_median(&R2S.over), r2_max = epx_fault_max(&R2S.over);
  printf("test_cuda_faults summary: R1 kills=%d survived=%d hangs=%d time_to_error_ms median=%.1f "
         "worst=%.1f destroy_ms worst=%.1f fresh_comms=%d/%d | R2 stops=%d survived=%d "
         "error_after_timeout_ms median=%.0f worst=%.0f resumed_rank_error_ms worst=%.0f | R4 "
         "abort_ms=%.1f peer_after_abort_ms=%.1f destroy_ms=%.1f exit_ms=%.1f "
         "peer_after_exit_ms=%.1f | R12 seeds=%d calls=%d | %.1f s, %s\n",
         R1S.injected, R1S.survived, R1S.hangs, r1_med * 1e3, r1_max * 1e3,
         epx_fault_max(&R1S.destroy) * 1e3, fresh_ok, fresh_total, R2S.injected, R2S.survived,
         r2_med * 1e3, r2_max * 1e3, epx_fault_max(&R2S.resumed_err) * 1e3, r4_abort_s * 1e3,
         r4_peer_after_abort_s * 1e3, r4_destroy_s * 1e3, r4_exit_s * 1e3,
         r4_peer_after_exit_s * 1e3, SOAK.seeds, SOAK.calls, epx_test_now() - t0,
         fails ? "FAILED" : "passed");
  return fails ? 1 : 0;
}
