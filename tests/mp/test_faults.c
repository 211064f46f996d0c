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
 * can kill, stop and resume them; they report through a shared page.
 *
 *   test_faults                 every section
 *   test_faults r1 r3 ...       the named sections
 * Environment: EPX_FAULT_RUNS (R1 runs per phase, default 20), EPX_SOAK_SEED
 * (first soak seed; default from the clock, printed), EPX_SOAK_SECONDS
 * (soak time budget, default 10).
 */
#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>

#include "common/harness.h"
#include "common/layout_math.h"
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

#define MAXR 8
#define MSG_BYTES 320

/* ------------------------------------------------------------ shared board */

typedef struct rank_slot {
  atomic_int ready;   /* set up and looping */
  atomic_int done;    /* finished its checks (error recorded) */
  int result;         /* first failing result of the loop; 0 if none */
  int bad;            /* own checks failed */
  int iters;
  double t_err;       /* CLOCK_MONOTONIC seconds of the error */
  double destroy_s;   /* duration of epxCommDestroy */
  double extra_s;     /* scenario specific figure */
  int warnings;       /* R3: soft-timeout warnings naming the slow rank */
  char msg[MSG_BYTES];
} rank_slot;

typedef struct board {
  atomic_int stop, release, resumed;
  double t_fault; /* when this process injected the fault */
  rank_slot r[MAXR];
} board;

static board *B;
/* Wait statuses of the ranks of the current run; a controller that reaps a
 * rank itself stores its status here. -1 while running. */
static int *g_status;

static void sleep_s(double s) {
  if (s <= 0) return;
  struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

/* Waits until *f is nonzero; 0 on success, 1 after limit_s. */
static int wait_flag(atomic_int *f, double limit_s) {
  double end = epx_test_now() + limit_s;
  while (!atomic_load(f)) {
    if (epx_test_now() > end) return 1;
    sleep_s(0.0005);
  }
  return 0;
}

static int wait_ranks(atomic_int *(*flag)(int), int R, int except, double limit_s) {
  for (int r = 0; r < R; ++r)
    if (r != except && wait_flag(flag(r), limit_s)) return 1;
  return 0;
}
static atomic_int *ready_of(int r) { return &B->r[r].ready; }
static atomic_int *done_of(int r) { return &B->r[r].done; }

static void note(int rank, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(int rank, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "  rank %d: %s\n", rank, buf);
  B->r[rank].bad = 1;
}

/* ------------------------------------------------------------ spawning */

typedef void (*controller_fn)(void *ctx, const pid_t *pids, int R);

/* Forks R ranks running fn, lets ctl (if any) inject faults, then reaps every
 * rank within limit_s (killing the rest). status[r] is each wait status.
 * Returns the number of ranks that had to be killed at the limit (hangs), or
 * -1 when the ranks could not be started. */
static int run_ranks(int R, epx_test_rank_fn fn, void *arg, controller_fn ctl, void *ctx,
                     double limit_s, int *status) {
  memset(B, 0, sizeof *B);
  epxUniqueId id;
  int helper = -1;
  if (epx_test_unique_id(&id, &helper) != 0) return -1;
  fflush(NULL);
  pid_t pids[MAXR];
  for (int r = 0; r < R; ++r) {
    pid_t pid = fork();
    if (pid < 0) {
      perror("fork");
      for (int q = 0; q < r; ++q) kill(pids[q], SIGKILL);
      for (int q = 0; q < r; ++q) waitpid(pids[q], NULL, 0);
      epx_test_unique_id_release(helper);
      return -1;
    }
    if (pid == 0) {
      int rc = fn(r, R, &id, arg);
      fflush(NULL);
      _exit(rc ? 1 : 0);
    }
    pids[r] = pid;
    status[r] = -1;
  }
  double start = epx_test_now();
  g_status = status;
  if (ctl) ctl(ctx, pids, R);
  int left = R, hangs = 0;
  while (left > 0) {
    left = 0;
    for (int r = 0; r < R; ++r) {
      if (status[r] != -1) continue;
      int st = 0;
      if (waitpid(pids[r], &st, WNOHANG) == pids[r])
        status[r] = st;
      else
        ++left;
    }
    if (left > 0 && epx_test_now() - start > limit_s) {
      for (int r = 0; r < R; ++r) {
        if (status[r] != -1) continue;
        fprintf(stderr, "  rank %d still running after %.1f s: killed (hang)\n", r,
                epx_test_now() - start);
        kill(pids[r], SIGKILL);
        kill(pids[r], SIGCONT);
        waitpid(pids[r], &status[r], 0);
        ++hangs;
      }
      left = 0;
    }
    if (left > 0) sleep_s(0.001);
  }
  epx_test_unique_id_release(helper);
  return hangs;
}

static int exited_ok(int st) { return st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0; }
static int killed_by(int st, int sig) { return st != -1 && WIFSIGNALED(st) && WTERMSIG(st) == sig; }

/* ------------------------------------------------------------ figures */

#define MAX_SAMPLES 4096
typedef struct samples {
  int n;
  double v[MAX_SAMPLES];
} samples;

static void add_sample(samples *s, double v) {
  if (s->n < MAX_SAMPLES) s->v[s->n++] = v;
}
static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}
static double median_of(samples *s) {
  if (s->n == 0) return 0;
  qsort(s->v, (size_t)s->n, sizeof(double), cmp_double);
  return s->v[s->n / 2];
}
static double max_of(const samples *s) {
  double m = 0;
  for (int i = 0; i < s->n; ++i)
    if (s->v[i] > m) m = s->v[i];
  return m;
}

/* ------------------------------------------------------------ per-rank state */

enum { OP_NOTIFY, OP_DISPATCH, OP_COMBINE, OP_LL_DISPATCH, OP_LL_COMBINE, OP_COUNT };
static const char *const op_names[OP_COUNT] = {"notify", "dispatch", "combine", "ll_dispatch",
                                               "ll_combine"};

/* Buffers of one rank for looping any op (contents are not checked). */
typedef struct loop_state {
  epx_test_world w;
  epxComm_t comm;
  epxHandle_t h;
  int rank, R, el, H, K, T, llT;
  int64_t n_recv, cap;
  void *recv_x, *recv_topk;
  float *recv_w;
  int *src, *prefix, *per_expert, num_recv;
  void *comb_x;
  void *out_x;
  void *ll_x, *ll_out;
  int *ll_count, *ll_src;
  int64_t *ll_range;
} loop_state;

static epxDispatchArgs_t loop_dispatch_args(const loop_state *s) {
  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = s->w.x[s->rank];
  a.x_type = epxBFloat16;
  a.topk_idx = s->w.topk[s->rank];
  a.topk_idx_type = epxInt64;
  a.topk_weights = s->w.weights[s->rank];
  a.num_tokens = s->T;
  a.hidden = s->H;
  a.num_topk = s->K;
  return a;
}

static epxResult_t loop_op(loop_state *s, int op) {
  if (op == OP_NOTIFY) {
    epxDispatchArgs_t a = loop_dispatch_args(s);
    int64_t n = 0;
    return epxDispatchNotify(s->comm, &a, s->h, &n, NULL, NULL);
  }
  if (op == OP_DISPATCH) {
    epxDispatchArgs_t a = loop_dispatch_args(s);
    epxDispatchOutputs_t o = {s->recv_x, NULL, s->recv_topk, s->recv_w, s->src,
                              s->prefix, s->per_expert, &s->num_recv, s->cap};
    return epxDispatch(s->comm, &a, s->h, &o, NULL);
  }
  if (op == OP_COMBINE) {
    epxCombineArgs_t a;
    memset(&a, 0, sizeof a);
    a.x = s->comb_x;
    a.hidden = s->H;
    a.num_topk = s->K;
    epxCombineOutputs_t o = {s->out_x, NULL};
    return epxCombine(s->comm, &a, s->h, &o, NULL);
  }
  if (op == OP_LL_DISPATCH) {
    epxLowLatencyDispatchArgs_t a;
    memset(&a, 0, sizeof a);
    a.x = s->w.x[s->rank];
    a.topk_idx = s->w.topk[s->rank];
    a.topk_idx_type = epxInt64;
    a.num_tokens = s->T;
    a.hidden = s->H;
    a.num_topk = s->K;
    epxLowLatencyDispatchOutputs_t o = {s->ll_x, NULL, s->ll_count, s->ll_src, s->ll_range};
    return epxLowLatencyDispatch(s->comm, &a, s->h, &o, NULL);
  }
  epxLowLatencyCombineArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = s->ll_x;
  a.topk_idx = s->w.topk[s->rank];
  a.topk_idx_type = epxInt64;
  a.topk_weights = s->w.weights[s->rank];
  a.num_tokens = s->T;
  a.hidden = s->H;
  a.num_topk = s->K;
  return epxLowLatencyCombine(s->comm, &a, s->h, s->out_x, NULL);
}

#define LOOP_E_PER_RANK 4
#define LOOP_H 512
#define LOOP_K 4
#define LOOP_T 256

/* Initialises the communicator and the buffers, and runs the calls the op
 * needs before it (notify before dispatch, ...). 0 on success. */
static int loop_setup(loop_state *s, int rank, int R, const epxUniqueId *id, uint64_t seed,
                      int timeout_ms, int op) {
  memset(s, 0, sizeof *s);
  s->rank = rank;
  s->R = R;
  s->el = LOOP_E_PER_RANK;
  s->H = LOOP_H;
  s->K = LOOP_K;
  s->T = LOOP_T;
  s->llT = LOOP_T;
  epx_test_problem p;
  memset(&p, 0, sizeof p);
  p.nranks = R;
  p.num_experts = R * s->el;
  p.hidden = s->H;
  p.num_topk = s->K;
  p.routing = EPX_ROUTING_UNIFORM;
  p.seed = seed;
  for (int r = 0; r < R; ++r) p.tokens[r] = s->T;
  epxConfig_t cfg = epx_test_config(&p, s->llT);
  cfg.timeout_ms = timeout_ms;
  if (epx_test_comm_init(&s->comm, rank, R, id, &cfg)) return 1;
  if (epxHandleCreate(s->comm, &s->h) != epxSuccess) return 1;
  epx_test_world_init(&s->w, &p, 1, EPX_PAYLOAD_BF16, seed + 1);
  s->cap = (int64_t)R * s->T;
  size_t H = (size_t)s->H, K = (size_t)s->K, cap = (size_t)s->cap;
  s->recv_x = epx_test_xaligned(cap * H * 2);
  s->recv_topk = epx_test_xaligned(cap * K * 8);
  s->recv_w = epx_test_xaligned(cap * K * 4);
  s->src = epx_test_xaligned(cap * 4);
  s->prefix = epx_test_xaligned((size_t)R * 4);
  s->per_expert = epx_test_xaligned((size_t)s->el * 4);
  s->comb_x = epx_test_xaligned(cap * H * 2);
  memset(s->comb_x, 0, cap * H * 2);
  s->out_x = epx_test_xaligned((size_t)s->T * H * 2);
  size_t ll_rows = (size_t)s->el * (size_t)R * (size_t)s->llT;
  s->ll_x = epx_test_xaligned(ll_rows * H * 2);
  memset(s->ll_x, 0, ll_rows * H * 2);
  s->ll_count = epx_test_xaligned((size_t)s->el * 4);
  s->ll_src = epx_test_xaligned(ll_rows * 4);
  s->ll_range = epx_test_xaligned((size_t)s->el * (size_t)R * 8);
  epxResult_t res = epxSuccess;
  if (op == OP_DISPATCH || op == OP_COMBINE) res = loop_op(s, OP_NOTIFY);
  if (res == epxSuccess && op == OP_COMBINE) res = loop_op(s, OP_DISPATCH);
  if (res == epxSuccess && op == OP_LL_COMBINE) res = loop_op(s, OP_LL_DISPATCH);
  if (res != epxSuccess) {
    fprintf(stderr, "  rank %d: set-up call failed: %s: %s\n", rank, epxGetErrorString(res),
            epxCommGetLastError(s->comm));
    return 1;
  }
  return 0;
}

static void loop_free(loop_state *s) {
  free(s->recv_x);
  free(s->recv_topk);
  free(s->recv_w);
  free(s->src);
  free(s->prefix);
  free(s->per_expert);
  free(s->comb_x);
  free(s->out_x);
  free(s->ll_x);
  free(s->ll_count);
  free(s->ll_src);
  free(s->ll_range);
  epx_test_world_free(&s->w);
}

/* 1 when the message names rank v as the cause. */
static int names_rank(const char *msg, int v) {
  char a[48], b[48], c[48];
  snprintf(a, sizeof a, "rank %d (pid", v);
  snprintf(b, sizeof b, "lost rank %d ", v);
  snprintf(c, sizeof c, "waiting for rank %d ", v);
  return strstr(msg, a) || strstr(msg, b) || strstr(msg, c);
}

/* ------------------------------------------------------------ R1 / R2 */

typedef struct fault_case {
  int op;
  int victim;
  int stop; /* 0: SIGKILL; 1: SIGSTOP for longer than the hard timeout, then SIGCONT */
  int timeout_ms;
  double delay_s;
  uint64_t seed;
} fault_case;

/* What an output snapshot covers: the buffers the op writes. */
static size_t snapshot_bytes(const loop_state *s) {
  return (size_t)s->cap * (size_t)s->H * 2 + (size_t)s->T * (size_t)s->H * 2 +
         (size_t)s->el * (size_t)s->R * (size_t)s->llT * (size_t)s->H * 2;
}
static void snapshot(const loop_state *s, unsigned char *dst) {
  size_t a = (size_t)s->cap * (size_t)s->H * 2, b = (size_t)s->T * (size_t)s->H * 2;
  memcpy(dst, s->recv_x, a);
  memcpy(dst + a, s->out_x, b);
  memcpy(dst + a + b, s->ll_x, snapshot_bytes(s) - a - b);
}

static int fault_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const fault_case *fc = arg;
  rank_slot *me = &B->r[rank];
  loop_state s;
  if (loop_setup(&s, rank, R, id, fc->seed, fc->timeout_ms, fc->op)) return 1;
  atomic_store(&me->ready, 1);
  epxResult_t res = epxSuccess;
  double limit = epx_test_now() + 30.0;
  while (!atomic_load(&B->stop) && epx_test_now() < limit) {
    res = loop_op(&s, fc->op);
    me->iters++;
    if (res != epxSuccess) break;
  }
  me->t_err = epx_test_now();
  me->result = (int)res;
  snprintf(me->msg, sizeof me->msg, "%s", epxCommGetLastError(s.comm));
  int victim = rank == fc->victim;
  if (res == epxSuccess) {
    note(rank, "%s loop ended without an error (%d iterations)", op_names[fc->op], me->iters);
  } else if (res != epxPeerFailed && res != epxTimeout) {
    note(rank, "%s returned %s, expected peer failed or timeout: %s", op_names[fc->op],
         epxGetErrorString(res), me->msg);
  } else if (!victim && !names_rank(me->msg, fc->victim)) {
    note(rank, "the message does not name rank %d: %s", fc->victim, me->msg);
  }
  /* The next call fails at once with the sticky code. */
  double t0 = epx_test_now();
  epxResult_t again = loop_op(&s, fc->op);
  double again_s = epx_test_now() - t0;
  if (res != epxSuccess && (again != res || again_s > 0.1))
    note(rank, "the call after the error returned %s in %.3f s, expected %s at once",
         epxGetErrorString(again), again_s, epxGetErrorString(res));
  unsigned char *snap = NULL;
  if (fc->stop && !victim) {
    snap = epx_test_xmalloc(snapshot_bytes(&s));
    snapshot(&s, snap);
  }
  atomic_store(&me->done, 1);
  if (fc->stop && !victim) {
    /* Keep the communicator (and its segment) while the stopped rank resumes. */
    if (wait_flag(&B->release, 20.0)) note(rank, "never released");
    unsigned char *now = epx_test_xmalloc(snapshot_bytes(&s));
    snapshot(&s, now);
    if (memcmp(now, snap, snapshot_bytes(&s)) != 0)
      note(rank, "outputs changed after this rank's error, while the resumed rank ran");
    free(now);
    free(snap);
  }
  t0 = epx_test_now();
  epxHandleDestroy(s.h);
  if (epxCommDestroy(s.comm) != epxSuccess) note(rank, "epxCommDestroy failed");
  me->destroy_s = epx_test_now() - t0;
  if (me->destroy_s > 1.0) note(rank, "epxCommDestroy took %.3f s", me->destroy_s);
  loop_free(&s);
  return me->bad;
}

static void fault_controller(void *ctx, const pid_t *pids, int R) {
  const fault_case *fc = ctx;
  pid_t v = pids[fc->victim];
  if (wait_ranks(ready_of, R, -1, 30.0)) {
    fprintf(stderr, "  ranks not ready\n");
    atomic_store(&B->stop, 1);
    return;
  }
  sleep_s(fc->delay_s);
  B->t_fault = epx_test_now();
  if (!fc->stop) {
    kill(v, SIGKILL);
    wait_ranks(done_of, R, fc->victim, 10.0);
    atomic_store(&B->stop, 1);
    return;
  }
  kill(v, SIGSTOP);
  /* Stopped for longer than the hard timeout: until every survivor failed. */
  wait_ranks(done_of, R, fc->victim, fc->timeout_ms / 1000.0 + 10.0);
  sleep_s(0.2);
  B->r[fc->victim].extra_s = epx_test_now(); /* resume time */
  atomic_store(&B->resumed, 1);
  kill(v, SIGCONT);
  wait_flag(done_of(fc->victim), 10.0);
  atomic_store(&B->release, 1);
  atomic_store(&B->stop, 1);
}

typedef struct r1_stats {
  int injected, survived, hangs;
  samples tte;          /* seconds, every survivor of every run */
  samples per_op[OP_COUNT];
  samples destroy;
} r1_stats;

static r1_stats R1S;

static int section_r1(epx_test_rng *rng) {
  int runs = 20;
  const char *e = getenv("EPX_FAULT_RUNS");
  if (e && *e) runs = atoi(e);
  if (runs < 1) runs = 1;
  int R = 3, fails = 0;
  for (int op = 0; op < OP_COUNT; ++op) {
    for (int i = 0; i < runs; ++i) {
      fault_case fc = {op, (int)epx_test_rng_below(rng, (uint32_t)R), 0, 20000,
                       epx_test_rng_uniform(rng) * 0.02, epx_test_rng_next(rng)};
      int st[MAXR];
      int hangs = run_ranks(R, fault_rank, &fc, fault_controller, &fc, 40.0, st);
      R1S.injected++;
      int ok = hangs == 0 && killed_by(st[fc.victim], SIGKILL);
      if (hangs > 0) R1S.hangs += hangs;
      double worst = 0;
      for (int r = 0; r < R; ++r) {
        if (r == fc.victim) continue;
        ok &= exited_ok(st[r]) && !B->r[r].bad;
        double tte = B->r[r].t_err - B->t_fault;
        if (B->r[r].result != epxSuccess) {
          add_sample(&R1S.tte, tte);
          add_sample(&R1S.per_op[op], tte);
          add_sample(&R1S.destroy, B->r[r].destroy_s);
          if (tte > worst) worst = tte;
        }
        if (tte > 2.0) {
          fprintf(stderr, "  rank %d: error %.3f s after the kill (limit 2 s)\n", r, tte);
          ok = 0;
        }
      }
      if (ok) {
        R1S.survived++;
      } else {
        fails++;
        printf("FAIL r1 %s run %d: victim rank %d, delay %.4f s, seed %" PRIu64 "\n",
               op_names[op], i, fc.victim, fc.delay_s, fc.seed);
        for (int r = 0; r < R; ++r)
          fprintf(stderr, "  rank %d: status 0x%x, %s, %d iterations: %s\n", r, st[r],
                  epxGetErrorString((epxResult_t)B->r[r].result), B->r[r].iters, B->r[r].msg);
      }
    }
    printf("%s r1_kill_%s: %d runs, time to error median %.1f ms, worst %.1f ms\n",
           fails ? "FAIL" : "PASS", op_names[op], runs, median_of(&R1S.per_op[op]) * 1e3,
           max_of(&R1S.per_op[op]) * 1e3);
    fflush(stdout);
  }
  return fails != 0;
}

typedef struct r2_stats {
  int injected, survived;
  samples over; /* survivor error time minus (stop time + timeout), seconds */
  samples resumed_err; /* resumed rank: error time minus resume time */
} r2_stats;
static r2_stats R2S;

static int section_r2(epx_test_rng *rng) {
  const int ops[] = {OP_DISPATCH, OP_DISPATCH, OP_COMBINE, OP_LL_DISPATCH};
  int R = 3, fails = 0, timeout_ms = 1000;
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; ++i) {
    fault_case fc = {ops[i], (int)epx_test_rng_below(rng, (uint32_t)R), 1, timeout_ms,
                     epx_test_rng_uniform(rng) * 0.02, epx_test_rng_next(rng)};
    int st[MAXR];
    int hangs = run_ranks(R, fault_rank, &fc, fault_controller, &fc, 40.0, st);
    R2S.injected++;
    int ok = hangs == 0;
    for (int r = 0; r < R; ++r) {
      ok &= exited_ok(st[r]) && !B->r[r].bad;
      if (r == fc.victim) {
        double after = B->r[r].t_err - B->r[r].extra_s;
        add_sample(&R2S.resumed_err, after);
        if (after > 1.0 || B->r[r].result == epxSuccess) {
          fprintf(stderr, "  resumed rank %d: %s %.3f s after SIGCONT\n", r,
                  epxGetErrorString((epxResult_t)B->r[r].result), after);
          ok = 0;
        }
        continue;
      }
      double over = B->r[r].t_err - B->t_fault - timeout_ms / 1000.0;
      add_sample(&R2S.over, over);
      /* A survivor may have begun waiting just before the stop. */
      if (over < -0.1 || over > 1.0) {
        fprintf(stderr, "  rank %d: failed %.3f s after the stop; timeout is %.3f s\n", r,
                B->r[r].t_err - B->t_fault, timeout_ms / 1000.0);
        ok = 0;
      }
    }
    if (ok) {
      R2S.survived++;
      printf("PASS r2_stop_%s: victim rank %d; survivors %s; resumed rank: %s\n",
             op_names[fc.op], fc.victim,
             epxGetErrorString((epxResult_t)B->r[(fc.victim + 1) % R].result),
             B->r[fc.victim].msg);
    } else {
      fails++;
      printf("FAIL r2_stop_%s: victim rank %d, seed %" PRIu64 "\n", op_names[fc.op], fc.victim,
             fc.seed);
      for (int r = 0; r < R; ++r)
        fprintf(stderr, "  rank %d: status 0x%x, %s: %s\n", r, st[r],
                epxGetErrorString((epxResult_t)B->r[r].result), B->r[r].msg);
    }
    fflush(stdout);
  }
  return fails != 0;
}

/* ------------------------------------------------------------ exact sequence (R3, R12) */

typedef struct seq_params {
  int R, el, H, K, maxT, llT;
  int tokens[MAXR];
  epx_test_routing routing;
  epx_test_payload payload;
  int int32, align;
  int ll_fp8, ll_round, ll_ue8m0;
  uint64_t seed;
  int slow_rank;      /* R3: sleeps before every call; -1 = none */
  double slow_sleep_s;
  int timeout_ms, soft_timeout_ms;
  int repeats;
} seq_params;

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

static int cmpx(int rank, const char *what, epx_test_elem e, const void *exp, const void *got,
                int64_t rows, int64_t cols) {
  char name[160];
  snprintf(name, sizeof name, "rank %d %s", rank, what);
  if (epx_test_compare(name, e, exp, got, rows, cols) == 0) return 0;
  B->r[rank].bad = 1;
  return 1;
}

static int ok_call(int rank, epxComm_t comm, epxResult_t res, const char *what) {
  if (res == epxSuccess) return 0;
  note(rank, "%s returned %s: %s", what, epxGetErrorString(res), epxCommGetLastError(comm));
  return 1;
}

static void before_call(const seq_params *sp, int rank) {
  if (rank == sp->slow_rank) sleep_s(sp->slow_sleep_s);
}

/* One pass of notify, dispatch, combine, worst-case dispatch, LL dispatch and
 * LL combine, each output poisoned first and compared in full with the
 * reference; *hash accumulates every output byte. */
static int run_sequence(const seq_params *sp, int rank, epxComm_t comm, epx_test_world *w,
                        epx_test_world *wl, uint64_t *hash) {
  int R = sp->R, el = sp->el, H = sp->H, K = sp->K, T = sp->tokens[rank];
  int f = 0, fp8 = sp->payload != EPX_PAYLOAD_BF16;
  epxDataType_t it = sp->int32 ? epxInt32 : epxInt64;
  size_t ie = sp->int32 ? 4 : 8;
  size_t xrow = fp8 ? (size_t)H : (size_t)H * 2;
  size_t srow = fp8 ? epx_scale_row_bytes(H, (int)sp->payload) : 0;
  epxHandle_t h = NULL, hw = NULL, hl = NULL;
  /* references, all computed before the first call */
  epx_ref_dispatch_result ref[MAXR], refw;
  memset(ref, 0, sizeof ref);
  memset(&refw, 0, sizeof refw);
  epx_ref_dispatch_opts ro = {fp8 ? epxFloat8E4M3 : epxBFloat16,
                              (epxScaleFormat_t)(fp8 ? (int)sp->payload : 0), sp->align, 0};
  for (int r = 0; r < R; ++r) epx_ref_dispatch(&w->ref, r, &ro, &ref[r]);
  int64_t worst = (int64_t)R * sp->maxT;
  epx_ref_dispatch_opts row_ = ro;
  row_.num_worst_tokens = worst;
  epx_ref_dispatch(&w->ref, rank, &row_, &refw);
  int64_t N = ref[rank].num_recv, cap = N + 1;
  /* combine inputs of every rank */
  uint16_t *cx[MAXR];
  float *cw[MAXR];
  for (int r = 0; r < R; ++r) {
    int64_t n = ref[r].num_recv;
    cx[r] = epx_test_xaligned((size_t)(n + 1) * H * 2);
    cw[r] = epx_test_xaligned((size_t)(n + 1) * K * 4);
    epx_test_fill_bf16_wide(sp->seed * 5 + 3, r, n, H, cx[r]);
    epx_test_fill_f32_tagged(sp->seed * 5 + 4, r, n, K, cw[r]);
  }
  uint16_t *bias = epx_test_xaligned((size_t)(T + 1) * H * 2);
  epx_test_fill_bf16_tagged(sp->seed * 5 + 5, 100 + rank, T, H, bias);
  uint16_t *exp_cx = epx_test_xaligned((size_t)(T + 1) * H * 2);
  float *exp_cw = epx_test_xaligned((size_t)(T + 1) * K * 4);
  epx_ref_combine_inputs ci = {(const uint16_t *const *)cx, (const float *const *)cw,
                               {(sp->seed & 1) ? bias : NULL, NULL}};
  epx_ref_combine(&w->ref, rank, &ci, exp_cx, exp_cw);
  /* low latency */
  epx_ref_ll_opts lo = {sp->llT, sp->ll_fp8, sp->ll_round, sp->ll_ue8m0};
  epx_ref_ll_result lref;
  epx_ref_ll_dispatch(&wl->ref, rank, &lo, &lref);
  int64_t rpe = (int64_t)R * sp->llT, lrows = (int64_t)el * rpe;
  size_t lxrow = sp->ll_fp8 ? (size_t)H : (size_t)H * 2;
  size_t lsrow = sp->ll_fp8 ? epx_scale_row_bytes(H, sp->ll_ue8m0 ? 2 : 1) : 0;
  uint16_t *lout[MAXR];
  for (int r = 0; r < R; ++r) {
    lout[r] = epx_test_xaligned((size_t)lrows * H * 2);
    epx_test_poison(lout[r], (size_t)lrows * H * 2);
    for (int e = 0; e < el; ++e) {
      /* rows of global expert r*el+e: tokens listing it, once per token */
      int64_t n = 0;
      for (int s = 0; s < R; ++s)
        for (int t = 0; t < sp->tokens[s]; ++t)
          n += epx_ref_token_has_expert(&wl->ref, s, t, (int64_t)r * el + e);
      epx_test_fill_bf16_wide(sp->seed * 5 + 6, r * 4096 + e, n, H, lout[r] + (size_t)e * rpe * H);
    }
  }
  uint16_t *exp_lx = epx_test_xaligned((size_t)(T + 1) * H * 2);
  epx_ref_ll_combine(&wl->ref, rank, sp->llT, (const uint16_t *const *)lout, wl->weights[rank],
                     exp_lx);

  /* output buffers */
  int64_t rows = worst > cap ? worst : cap;
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

  f |= ok_call(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  f |= ok_call(rank, comm, epxHandleCreate(comm, &hw), "epxHandleCreate");
  f |= ok_call(rank, comm, epxHandleCreate(comm, &hl), "epxHandleCreate");
  if (f) goto out;

  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = w->x[rank];
  a.x_type = fp8 ? epxFloat8E4M3 : epxBFloat16;
  a.x_scales = w->scales[rank];
  a.scale_format = (epxScaleFormat_t)(fp8 ? (int)sp->payload : 0);
  a.topk_idx = w->topk[rank];
  a.topk_idx_type = it;
  a.topk_weights = w->weights[rank];
  a.num_tokens = T;
  a.hidden = H;
  a.num_topk = K;
  a.expert_alignment = sp->align;

  /* 1. notify */
  {
    int64_t n = -7;
    epx_test_poison(cnt, (size_t)el * 4);
    before_call(sp, rank);
    f |= ok_call(rank, comm, epxDispatchNotify(comm, &a, h, &n, cnt, NULL), "epxDispatchNotify");
    if (f) goto out;
    if (n != N) {
      note(rank, "notify: N_recv %" PRId64 ", expected %" PRId64, n, N);
      f = 1;
      goto out;
    }
    f |= cmpx(rank, "notify per-expert counts", EPX_ELEM_I32, ref[rank].num_recv_tokens_per_expert,
              cnt, 1, el);
    *hash = fnv(*hash, cnt, (size_t)el * 4);
  }
  /* 2. dispatch with the notify's handle (cap = N + 1: the extra row stays poisoned) */
  for (int pass = 0; pass < 2 && !f; ++pass) {
    int64_t rr = pass == 0 ? cap : worst;
    const epx_ref_dispatch_result *rf = pass == 0 ? &ref[rank] : &refw;
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
    before_call(sp, rank);
    f |= ok_call(rank, comm, epxDispatch(comm, &d, pass == 0 ? h : hw, &o, NULL),
                 pass == 0 ? "epxDispatch" : "epxDispatch (worst case)");
    if (f) break;
    int64_t vr = pass == 0 ? N : worst; /* rows the reference describes */
    f |= cmpx(rank, "recv_x", fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16, rf->recv_x, rx, vr, (int64_t)xrow / (fp8 ? 1 : 2));
    if (srow) f |= cmpx(rank, "recv_x_scales", EPX_ELEM_I32, rf->recv_x_scales, rs, N, (int64_t)srow / 4);
    f |= cmpx(rank, "recv_topk_idx", sp->int32 ? EPX_ELEM_I32 : EPX_ELEM_I64, rf->recv_topk_idx, rt, vr, K);
    f |= cmpx(rank, "recv_topk_weights", EPX_ELEM_F32, rf->recv_topk_weights, rw, vr, K);
    f |= cmpx(rank, "recv_src_idx", EPX_ELEM_I32, rf->recv_src_idx, rsrc, vr, 1);
    f |= cmpx(rank, "recv_rank_prefix", EPX_ELEM_I32, rf->recv_rank_prefix, rpre, 1, R);
    f |= cmpx(rank, "num_recv_tokens_per_expert", EPX_ELEM_I32, rf->num_recv_tokens_per_expert, rpe_cnt, 1, el);
    int n32 = (int)N;
    f |= cmpx(rank, "num_recv_tokens", EPX_ELEM_I32, &n32, nrecv, 1, 1);
    if (pass == 0 && !epx_test_is_poisoned((uint8_t *)rx + (size_t)N * xrow, xrow)) {
      note(rank, "dispatch wrote recv_x past N_recv");
      f = 1;
    }
    if (pass == 1 && !epx_test_is_poisoned((uint8_t *)rx + (size_t)N * xrow, (size_t)(worst - N) * xrow)) {
      note(rank, "worst-case dispatch wrote recv_x padding rows");
      f = 1;
    }
    *hash = fnv(*hash, rx, (size_t)rows * xrow);
    *hash = fnv(*hash, rt, (size_t)rows * K * ie);
    *hash = fnv(*hash, rw, (size_t)rows * K * 4);
    *hash = fnv(*hash, rsrc, (size_t)rows * 4);
    if (pass == 0) {
      /* 3. combine of the notify's routing */
      epx_test_poison(ox, (size_t)(T + 1) * H * 2);
      epx_test_poison(ow, (size_t)(T + 1) * K * 4);
      epxCombineArgs_t c;
      memset(&c, 0, sizeof c);
      c.x = cx[rank];
      c.topk_weights = cw[rank];
      c.bias[0] = ci.bias[0];
      c.hidden = H;
      c.num_topk = K;
      epxCombineOutputs_t co = {ox, ow};
      before_call(sp, rank);
      f |= ok_call(rank, comm, epxCombine(comm, &c, h, &co, NULL), "epxCombine");
      if (f) break;
      f |= cmpx(rank, "combined_x (+ 1 poisoned row)", EPX_ELEM_BF16, exp_cx, ox, T, H);
      f |= cmpx(rank, "combined_topk_weights", EPX_ELEM_F32, exp_cw, ow, T, K);
      if (!epx_test_is_poisoned(ox + (size_t)T * H, (size_t)H * 2)) {
        note(rank, "combine wrote past row T");
        f = 1;
      }
      *hash = fnv(*hash, ox, (size_t)(T + 1) * H * 2);
      *hash = fnv(*hash, ow, (size_t)(T + 1) * K * 4);
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
    epxLowLatencyDispatchArgs_t la;
    memset(&la, 0, sizeof la);
    la.x = wl->x[rank];
    la.topk_idx = wl->topk[rank];
    la.topk_idx_type = it;
    la.num_tokens = T;
    la.hidden = H;
    la.num_topk = K;
    la.use_fp8 = sp->ll_fp8;
    la.round_scale = sp->ll_round;
    la.use_ue8m0 = sp->ll_ue8m0;
    epxLowLatencyDispatchOutputs_t lo2 = {lx, ls, lcount, lsrc, lrange};
    before_call(sp, rank);
    f |= ok_call(rank, comm, epxLowLatencyDispatch(comm, &la, hl, &lo2, NULL), "epxLowLatencyDispatch");
    if (f) goto out;
    f |= cmpx(rank, "ll recv_count", EPX_ELEM_I32, lref.recv_count, lcount, 1, el);
    f |= cmpx(rank, "ll recv_layout_range", EPX_ELEM_I64, lref.recv_layout_range, lrange, el, R);
    /* full buffers: rows past each count are poisoned in both */
    f |= cmpx(rank, "ll recv_x (all rows)", sp->ll_fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16, lref.recv_x,
              lx, lrows, sp->ll_fp8 ? H : H);
    if (lsrow) f |= cmpx(rank, "ll recv_x_scales (all rows)", EPX_ELEM_I32, lref.recv_x_scales, ls, lrows, (int64_t)lsrow / 4);
    f |= cmpx(rank, "ll recv_src_info (all rows)", EPX_ELEM_I32, lref.recv_src_info, lsrc, lrows, 1);
    *hash = fnv(*hash, lx, (size_t)lrows * lxrow);
    if (ls) *hash = fnv(*hash, ls, (size_t)lrows * lsrow);
    *hash = fnv(*hash, lsrc, (size_t)lrows * 4);
    if (f) goto out;
    epx_test_poison(ox, (size_t)(T + 1) * H * 2);
    epxLowLatencyCombineArgs_t lc;
    memset(&lc, 0, sizeof lc);
    lc.x = lout[rank];
    lc.topk_idx = wl->topk[rank];
    lc.topk_idx_type = it;
    lc.topk_weights = wl->weights[rank];
    lc.num_tokens = T;
    lc.hidden = H;
    lc.num_topk = K;
    before_call(sp, rank);
    f |= ok_call(rank, comm, epxLowLatencyCombine(comm, &lc, hl, ox, NULL), "epxLowLatencyCombine");
    if (f) goto out;
    f |= cmpx(rank, "ll combined_x", EPX_ELEM_BF16, exp_lx, ox, T, H);
    if (!epx_test_is_poisoned(ox + (size_t)T * H, (size_t)H * 2)) {
      note(rank, "ll combine wrote past row T");
      f = 1;
    }
    *hash = fnv(*hash, ox, (size_t)(T + 1) * H * 2);
  }
out:
  epxHandleDestroy(h);
  epxHandleDestroy(hw);
  epxHandleDestroy(hl);
  for (int r = 0; r < R; ++r) {
    epx_ref_dispatch_free(&ref[r]);
    free(cx[r]);
    free(cw[r]);
    free(lout[r]);
  }
  epx_ref_dispatch_free(&refw);
  epx_ref_ll_free(&lref);
  free(bias);
  free(exp_cx);
  free(exp_cw);
  free(exp_lx);
  free(rx);
  free(rs);
  free(rt);
  free(rw);
  free(rsrc);
  free(rpre);
  free(rpe_cnt);
  free(nrecv);
  free(ox);
  free(ow);
  free(lx);
  free(ls);
  free(lcount);
  free(lsrc);
  free(lrange);
  free(cnt);
  return f;
}

static void make_problem(const seq_params *sp, epx_test_problem *p) {
  memset(p, 0, sizeof *p);
  p->nranks = sp->R;
  p->num_experts = sp->R * sp->el;
  p->hidden = sp->H;
  p->num_topk = sp->K;
  p->routing = sp->routing;
  p->seed = sp->seed;
  for (int r = 0; r < sp->R; ++r) p->tokens[r] = sp->tokens[r];
}

/* Counts the soft-timeout warnings in a captured stderr file that name `slow`. */
static int count_warnings(const char *path, int slow, int *others) {
  FILE *fp = fopen(path, "r");
  if (!fp) return 0;
  char line[2048], want[48];
  snprintf(want, sizeof want, "for rank %d ", slow);
  int n = 0;
  *others = 0;
  while (fgets(line, sizeof line, fp)) {
    if (!strstr(line, " epx WARN ") || !strstr(line, "waiting")) continue;
    if (strstr(line, want)) {
      if (n == 0) fprintf(stderr, "  (captured) %s", line);
      ++n;
    } else {
      ++*others;
    }
  }
  fclose(fp);
  return n;
}

static int seq_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const seq_params *sp = arg;
  rank_slot *me = &B->r[rank];
  char cap_path[64] = "";
  int saved_err = -1;
  if (sp->slow_rank >= 0) {
    /* R3: capture this rank's stderr and turn on WARN logging before the
     * library reads its parameters. */
    setenv("EPX_DEBUG", "WARN", 1);
    snprintf(cap_path, sizeof cap_path, "/tmp/epx-faults-%d-XXXXXX", (int)getpid());
    int fd = mkstemp(cap_path);
    if (fd >= 0) {
      fflush(stderr);
      saved_err = dup(2);
      dup2(fd, 2);
      close(fd);
    }
  }
  epx_test_problem p;
  make_problem(sp, &p);
  epxConfig_t cfg = epx_test_config(&p, sp->llT);
  cfg.max_tokens_per_rank = sp->maxT;
  cfg.timeout_ms = sp->timeout_ms;
  cfg.soft_timeout_ms = sp->soft_timeout_ms;
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, R, id, &cfg)) return 1;
  epx_test_world w, wl;
  epx_test_world_init(&w, &p, !sp->int32, sp->payload, sp->seed * 3 + 1);
  int two = sp->payload != EPX_PAYLOAD_BF16;
  if (two) epx_test_world_init(&wl, &p, !sp->int32, EPX_PAYLOAD_BF16, sp->seed * 3 + 2);
  atomic_store(&me->ready, 1);
  int f = 0;
  uint64_t first = 0;
  for (int rep = 0; rep < sp->repeats && !f; ++rep) {
    uint64_t hsh = 0xcbf29ce484222325ull;
    f |= run_sequence(sp, rank, comm, &w, two ? &wl : &w, &hsh);
    if (!f && rep == 0) first = hsh;
    if (!f && rep > 0 && hsh != first) {
      note(rank, "repeat %d differs from the first run (output hash %016" PRIx64 " vs %016" PRIx64 ")",
           rep, hsh, first);
      f = 1;
    }
    me->iters++;
  }
  epxResult_t async = epxSuccess;
  epxCommGetAsyncError(comm, &async);
  if (async != epxSuccess) note(rank, "sticky error %s", epxGetErrorString(async));
  if (epxCommDestroy(comm) != epxSuccess) note(rank, "epxCommDestroy failed");
  epx_test_world_free(&w);
  if (two) epx_test_world_free(&wl);
  if (saved_err >= 0) {
    fflush(stderr);
    dup2(saved_err, 2);
    close(saved_err);
    if (rank != sp->slow_rank) {
      int others = 0;
      me->warnings = count_warnings(cap_path, sp->slow_rank, &others);
      /* one wait per call on the slow rank: notify, dispatch, combine, worst
       * dispatch, LL dispatch, LL combine */
      if (me->warnings < 6) note(rank, "%d soft-timeout warnings name rank %d, expected >= 6",
                                 me->warnings, sp->slow_rank);
    }
    FILE *fp = fopen(cap_path, "r");
    if (fp) { /* replay what the rank printed, warnings aside */
      char line[2048];
      while (fgets(line, sizeof line, fp))
        if (!strstr(line, " epx WARN ")) fputs(line, stderr);
      fclose(fp);
    }
    unlink(cap_path);
  }
  return f || me->bad;
}

static int section_r3(void) {
  seq_params sp;
  memset(&sp, 0, sizeof sp);
  sp.R = 3;
  sp.el = 4;
  sp.H = 256;
  sp.K = 4;
  sp.maxT = 96;
  sp.llT = 96;
  for (int r = 0; r < sp.R; ++r) sp.tokens[r] = 96 - 17 * r;
  sp.routing = EPX_ROUTING_UNIFORM;
  sp.payload = EPX_PAYLOAD_BF16;
  sp.seed = 303;
  sp.slow_rank = 2;
  sp.timeout_ms = 1500;
  sp.soft_timeout_ms = 300;
  sp.slow_sleep_s = 0.8 * sp.timeout_ms / 1000.0;
  sp.repeats = 1;
  int st[MAXR];
  double t0 = epx_test_now();
  int hangs = run_ranks(sp.R, seq_rank, &sp, NULL, NULL, 60.0, st);
  int ok = hangs == 0;
  for (int r = 0; r < sp.R; ++r) ok &= exited_ok(st[r]) && !B->r[r].bad;
  printf("%s r3_slow_rank: rank %d sleeps %.0f ms (80 %% of the %d ms timeout) before each of 6 "
         "calls; exact, no error; soft-timeout warnings naming it: %d and %d (%.1f s)\n",
         ok ? "PASS" : "FAIL", sp.slow_rank, sp.slow_sleep_s * 1e3, sp.timeout_ms, B->r[0].warnings,
         B->r[1].warnings, epx_test_now() - t0);
  fflush(stdout);
  return !ok;
}

/* ------------------------------------------------------------ R12 soak */

static void random_params(seq_params *sp, uint64_t seed) {
  epx_test_rng g;
  epx_test_rng_seed(&g, seed);
  memset(sp, 0, sizeof *sp);
  sp->R = 2 + (int)epx_test_rng_below(&g, 3);
  sp->el = 1 + (int)epx_test_rng_below(&g, 4);
  static const int hs[] = {128, 256, 384};
  sp->H = hs[epx_test_rng_below(&g, 3)];
  sp->K = 1 + (int)epx_test_rng_below(&g, 8);
  static const int mts[] = {16, 64, 200};
  sp->maxT = mts[epx_test_rng_below(&g, 3)];
  sp->llT = sp->maxT;
  int any_max = 0;
  for (int r = 0; r < sp->R; ++r) {
    double u = epx_test_rng_uniform(&g);
    sp->tokens[r] = u < 0.2 ? 0 : u < 0.5 ? sp->maxT : 1 + (int)epx_test_rng_below(&g, (uint32_t)sp->maxT);
    any_max |= sp->tokens[r] == sp->maxT;
  }
  if (!any_max) sp->tokens[epx_test_rng_below(&g, (uint32_t)sp->R)] = sp->maxT;
  double u = epx_test_rng_uniform(&g);
  sp->routing = u < 0.3 ? EPX_ROUTING_UNIFORM
                : u < 0.65 ? EPX_ROUTING_SKEWED
                : u < 0.8 ? EPX_ROUTING_ALL_MINUS1
                          : EPX_ROUTING_RANDOM_DUP;
  sp->payload = (epx_test_payload)epx_test_rng_below(&g, 3);
  sp->int32 = (int)epx_test_rng_below(&g, 2);
  static const int al[] = {0, 1, 4};
  sp->align = al[epx_test_rng_below(&g, 3)];
  sp->ll_fp8 = (int)epx_test_rng_below(&g, 2);
  sp->ll_round = sp->ll_fp8 && epx_test_rng_below(&g, 2);
  sp->ll_ue8m0 = sp->ll_round && epx_test_rng_below(&g, 2);
  sp->seed = seed;
  sp->slow_rank = -1;
  sp->timeout_ms = 20000;
  sp->repeats = 2;
}

static int soak_seeds, soak_calls;

static int section_r12(void) {
  uint64_t base;
  const char *e = getenv("EPX_SOAK_SEED");
  if (e && *e)
    base = strtoull(e, NULL, 0);
  else
    base = (uint64_t)time(NULL) % 1000000;
  double budget = 10.0;
  const char *b = getenv("EPX_SOAK_SECONDS");
  if (b && *b) budget = atof(b);
  static const char *const routings[] = {"uniform", "skewed-90%", "all-minus-1", "random-dup"};
  static const char *const payloads[] = {"bf16", "fp8+f32", "fp8+ue8m0"};
  printf("r12 soak: first seed %" PRIu64 " (EPX_SOAK_SEED=%" PRIu64 " reproduces), budget %.0f s\n",
         base, base, budget);
  double t0 = epx_test_now();
  int fails = 0;
  for (uint64_t s = base; fails == 0; ++s) {
    if (soak_seeds >= 4 && epx_test_now() - t0 > budget) break;
    if (soak_seeds >= 400) break;
    seq_params sp;
    random_params(&sp, s);
    int st[MAXR];
    double t1 = epx_test_now();
    int hangs = run_ranks(sp.R, seq_rank, &sp, NULL, NULL, 120.0, st);
    int ok = hangs == 0;
    for (int r = 0; r < sp.R; ++r) ok &= exited_ok(st[r]) && !B->r[r].bad;
    char tok[64] = "";
    for (int r = 0; r < sp.R; ++r)
      snprintf(tok + strlen(tok), sizeof tok - strlen(tok), "%s%d", r ? "," : "", sp.tokens[r]);
    printf("%s r12_seed_%" PRIu64 ": R=%d E=%d H=%d K=%d T=[%s] %s %s ids=%s align=%d ll=%s x2 (%.2f s)\n",
           ok ? "PASS" : "FAIL", s, sp.R, sp.R * sp.el, sp.H, sp.K, tok, routings[sp.routing],
           payloads[sp.payload], sp.int32 ? "int32" : "int64", sp.align,
           sp.ll_fp8 ? (sp.ll_ue8m0 ? "fp8+ue8m0" : sp.ll_round ? "fp8+round" : "fp8") : "bf16",
           epx_test_now() - t1);
    fflush(stdout);
    soak_seeds++;
    soak_calls += sp.R * sp.repeats * 6;
    if (!ok) fails++;
  }
  return fails != 0;
}

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
  sleep_s(0.2);
  a->t_call = epx_test_now();
  a->res = epxCommAbort(a->comm);
  a->call_s = epx_test_now() - a->t_call;
  return NULL;
}

static void *notify_thread(void *p) {
  loop_state *s = p;
  loop_op(s, OP_NOTIFY); /* never returns before the process exits */
  return NULL;
}

static int r4_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const r4_ctx *c = arg;
  rank_slot *me = &B->r[rank];
  loop_state s;
  if (loop_setup(&s, rank, R, id, 44 + (uint64_t)c->mode, 20000, OP_NOTIFY)) return 1;
  atomic_store(&me->ready, 1);
  if (c->mode == 0) {
    if (rank == 0) {
      abort_thread_arg a = {s.comm, 0, 0, epxSuccess};
      pthread_t th;
      pthread_create(&th, NULL, abort_thread, &a);
      epxResult_t res = loop_op(&s, OP_NOTIFY); /* rank 1 never makes this call */
      double t_ret = epx_test_now();
      pthread_join(th, NULL);
      me->extra_s = t_ret - a.t_call;
      me->t_err = a.call_s;
      if (res != epxAborted) note(rank, "the blocked notify returned %s, expected aborted", epxGetErrorString(res));
      if (a.res != epxSuccess) note(rank, "epxCommAbort returned %s", epxGetErrorString(a.res));
      if (me->extra_s > 1.0 || me->extra_s < 0)
        note(rank, "the blocked call returned %.3f s after epxCommAbort", me->extra_s);
      epxResult_t async = epxSuccess;
      epxCommGetAsyncError(s.comm, &async);
      if (async != epxAborted) note(rank, "async error %s, expected aborted", epxGetErrorString(async));
      atomic_store(&B->release, 1);
    } else {
      wait_flag(&B->release, 20.0);
      double t0 = epx_test_now();
      epxResult_t res = loop_op(&s, OP_NOTIFY);
      double d = epx_test_now() - t0;
      if (res != epxPeerFailed || !strstr(epxCommGetLastError(s.comm), "aborted") || d > 1.0)
        note(rank, "after the peer aborted: %s in %.3f s: %s", epxGetErrorString(res), d,
             epxCommGetLastError(s.comm));
    }
  } else if (c->mode == 1) {
    if (rank == 0) {
      wait_flag(&B->release, 20.0); /* the controller killed every peer */
      double t0 = epx_test_now();
      epxHandleDestroy(s.h);
      epxResult_t res = epxCommDestroy(s.comm);
      me->extra_s = epx_test_now() - t0;
      if (res != epxSuccess || me->extra_s > 1.0)
        note(rank, "epxCommDestroy after the peers died: %s in %.3f s", epxGetErrorString(res),
             me->extra_s);
      loop_free(&s);
      return me->bad;
    }
    for (;;) pause(); /* killed by the controller */
  } else {
    if (rank == 0) {
      pthread_t th;
      pthread_create(&th, NULL, notify_thread, &s);
      sleep_s(0.2);
      B->t_fault = epx_test_now();
      exit(0); /* with the notify in flight on the other thread */
    }
    wait_flag(&B->release, 20.0); /* rank 0 has been reaped */
    double t0 = epx_test_now();
    epxResult_t res = loop_op(&s, OP_NOTIFY);
    double d = epx_test_now() - t0;
    if ((res != epxPeerFailed && res != epxTimeout) || d > 2.0)
      note(rank, "after the peer exited: %s in %.3f s: %s", epxGetErrorString(res), d,
           epxCommGetLastError(s.comm));
  }
  epxHandleDestroy(s.h);
  epxCommDestroy(s.comm);
  loop_free(&s);
  return me->bad;
}

static void r4_controller(void *ctx, const pid_t *pids, int R) {
  const r4_ctx *c = ctx;
  if (wait_ranks(ready_of, R, -1, 30.0)) return;
  if (c->mode == 1) {
    for (int r = 1; r < R; ++r) kill(pids[r], SIGKILL);
    for (int r = 1; r < R; ++r) waitpid(pids[r], &g_status[r], 0); /* reaped: certainly gone */
    atomic_store(&B->release, 1);
  } else if (c->mode == 2) {
    int st = 0;
    double end = epx_test_now() + 10.0;
    while (waitpid(pids[0], &st, WNOHANG) != pids[0] && epx_test_now() < end) sleep_s(0.001);
    r4_exit_s = epx_test_now() - B->t_fault;
    g_status[0] = st;
    if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
      fprintf(stderr, "  rank 0 ended with wait status 0x%x after exit(0)\n", st);
      r4_exit_s = 1e9;
    }
    atomic_store(&B->release, 1);
  }
}

static int section_r4(void) {
  int fails = 0;
  int st[MAXR];
  r4_ctx c0 = {0};
  int hangs = run_ranks(2, r4_rank, &c0, r4_controller, &c0, 30.0, st);
  int ok = hangs == 0 && exited_ok(st[0]) && exited_ok(st[1]) && !B->r[0].bad && !B->r[1].bad;
  r4_abort_s = B->r[0].extra_s;
  r4_abort_call_s = B->r[0].t_err;
  printf("%s r4_abort_from_thread: blocked call returned %.1f ms after epxCommAbort (which took "
         "%.3f ms); the peer then fails at once naming the abort\n",
         ok ? "PASS" : "FAIL", r4_abort_s * 1e3, r4_abort_call_s * 1e3);
  fails += !ok;

  r4_ctx c1 = {1};
  hangs = run_ranks(3, r4_rank, &c1, r4_controller, &c1, 30.0, st);
  ok = hangs == 0 && exited_ok(st[0]) && !B->r[0].bad;
  r4_destroy_s = B->r[0].extra_s;
  printf("%s r4_destroy_after_peers_died: epxCommDestroy took %.3f ms\n", ok ? "PASS" : "FAIL",
         r4_destroy_s * 1e3);
  fails += !ok;

  r4_ctx c2 = {2};
  hangs = run_ranks(2, r4_rank, &c2, r4_controller, &c2, 30.0, st);
  ok = hangs == 0 && exited_ok(st[1]) && !B->r[1].bad && r4_exit_s < 1.0;
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
  note(rank, "%s: %s (%s), expected %s%s%s", what, epxGetErrorString(got), msg,
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
    f |= ok_call(rank, comm, epxHandleCreate(comm, &h[i]), "epxHandleCreate");
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
      f |= ok_call(rank, comm, res, "epxLowLatencyDispatch (send only)");
    else
      f |= expect_code(rank, res, epxInvalidUsage, "third outstanding send-only dispatch",
                       epxCommGetLastError(comm), "two send-only");
  }
  if (!f && !epx_test_is_poisoned(x[2], (size_t)lrows * H * 2)) {
    note(rank, "the refused dispatch wrote recv_x");
    f = 1;
  }
  /* The pending phases still complete, exactly; then the third goes through. */
  for (int i = 0; i < 2 && !f; ++i) {
    f |= ok_call(rank, comm, epxLowLatencyRecv(comm, h[i], NULL), "epxLowLatencyRecv");
    if (f) break;
    f |= cmpx(rank, "recv_count", EPX_ELEM_I32, ref.recv_count, cnt[i], 1, el);
    f |= cmpx(rank, "recv_x", EPX_ELEM_BF16, ref.recv_x, x[i], lrows, H);
    f |= cmpx(rank, "recv_src_info", EPX_ELEM_I32, ref.recv_src_info, src[i], lrows, 1);
  }
  if (!f) {
    la.return_recv_hook = 0;
    epxLowLatencyDispatchOutputs_t o = {x[2], NULL, cnt[2], src[2], rng[2]};
    f |= ok_call(rank, comm, epxLowLatencyDispatch(comm, &la, h[2], &o, NULL),
                 "epxLowLatencyDispatch after the receives");
    if (!f) f |= cmpx(rank, "recv_x (retried)", EPX_ELEM_BF16, ref.recv_x, x[2], lrows, H);
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
                     "normal combine with a low-latency handle", epxCommGetLastError(comm), "handle");
    if (!f && !epx_test_is_poisoned(out, (size_t)(T + 1) * H * 2)) {
      note(rank, "the refused combine wrote its output");
      f = 1;
    }
    free(out);
  }
  /* Use after destroy: the registry recognises the dead pointers. */
  if (!f) {
    epxComm_t dead = comm;
    f |= ok_call(rank, comm, epxCommDestroy(comm), "epxCommDestroy");
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
    f |= ok_call(rank, NULL, epxCommInitRankWithAllGather(&other, 1, 0, self_allgather, NULL, &oc),
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
      if (a2 != epxSuccess) note(rank, "the new communicator has sticky error %s", epxGetErrorString(a2));
      epxCommDestroy(other);
    }
    for (int i = 0; i < 3; ++i) {
      f |= ok_call(rank, NULL, epxHandleDestroy(h[i]), "epxHandleDestroy after epxCommDestroy");
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
  int hangs = run_ranks(2, r6_rank, NULL, NULL, NULL, 60.0, st);
  int ok = hangs == 0 && exited_ok(st[0]) && exited_ok(st[1]);
  printf("%s r6_misuse: third outstanding LL send phase refused on every rank (the two pending "
         "complete exactly), LL handle in a normal combine, use after destroy of communicator "
         "and handles, a stale handle on a new communicator\n",
         ok ? "PASS" : "FAIL");
  fflush(stdout);
  return !ok;
}

/* ------------------------------------------------------------ main */

static int count_epx_segments(void) {
  DIR *d = opendir("/dev/shm");
  if (!d) return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)))
    if (!strncmp(e->d_name, "epx-", 4)) ++n;
  closedir(d);
  return n;
}

static int wanted(int argc, char **argv, const char *name) {
  if (argc < 2) return 1;
  for (int i = 1; i < argc; ++i)
    if (!strcmp(argv[i], name)) return 1;
  return 0;
}

int main(int argc, char **argv) {
  B = mmap(NULL, sizeof(board), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (B == MAP_FAILED) {
    perror("mmap");
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  int segs_before = count_epx_segments();
  epx_test_rng rng;
  uint64_t fseed = (uint64_t)time(NULL);
  const char *fs = getenv("EPX_FAULT_SEED");
  if (fs && *fs) fseed = strtoull(fs, NULL, 0);
  epx_test_rng_seed(&rng, fseed);
  printf("fault seed %" PRIu64 " (EPX_FAULT_SEED reproduces the victims and delays)\n", fseed);
  double t0 = epx_test_now();
  int fails = 0;
  if (wanted(argc, argv, "r1")) fails += section_r1(&rng);
  if (wanted(argc, argv, "r2")) fails += section_r2(&rng);
  if (wanted(argc, argv, "r3")) fails += section_r3();
  if (wanted(argc, argv, "r4")) fails += section_r4();
  if (wanted(argc, argv, "r6")) fails += section_r6();
  if (wanted(argc, argv, "r12")) fails += section_r12();
  int segs_after = count_epx_segments();
  if (segs_before >= 0 && segs_after > segs_before) {
    printf("FAIL %d shared-memory segments left in /dev/shm\n", segs_after - segs_before);
    fails++;
  }
  /* The figures, in one line for the CI log. */
  double r1_med = median_of(&R1S.tte), r1_max = max_of(&R1S.tte);
  double r2_med = median_of(&R2S.over), r2_max = max_of(&R2S.over);
  printf("test_faults summary: R1 kills=%d survived=%d hangs=%d time_to_error_ms median=%.1f "
         "worst=%.1f destroy_ms worst=%.1f | R2 stops=%d survived=%d error_after_timeout_ms "
         "median=%.0f worst=%.0f resumed_rank_error_ms worst=%.0f | R4 abort_ms=%.1f "
         "destroy_ms=%.1f exit_ms=%.1f | R12 seeds=%d calls=%d | %.1f s, %s\n",
         R1S.injected, R1S.survived, R1S.hangs, r1_med * 1e3, r1_max * 1e3,
         max_of(&R1S.destroy) * 1e3, R2S.injected, R2S.survived, r2_med * 1e3, r2_max * 1e3,
         max_of(&R2S.resumed_err) * 1e3, r4_abort_s * 1e3, r4_destroy_s * 1e3, r4_exit_s * 1e3,
         soak_seeds, soak_calls, epx_test_now() - t0, fails ? "FAILED" : "passed");
  return fails ? 1 : 0;
}
