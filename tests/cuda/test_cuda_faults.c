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
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/harness.h"
#include "common/layout_math.h"
#include "common/world.h"
#include "reference/reference.h"

#define MAXR 8
#define MSG_BYTES 400

/* Slack on the 2 s time-to-error criterion: a killed process's GPU context is
 * torn down by the driver while the survivors share the GPU. */
#define R1_LIMIT_S 2.5

/* ------------------------------------------------------------ shared board */

typedef struct rank_slot {
  atomic_int ready;   /* set up and looping */
  atomic_int done;    /* finished its checks (error recorded) */
  int result;         /* first failing result of the loop; 0 if none */
  int bad;            /* own checks failed */
  int iters;
  int fresh_ok;       /* R1: the survivors' fresh communicator was exact */
  double t_err;       /* CLOCK_MONOTONIC seconds of the error */
  double destroy_s;   /* duration of epxCommDestroy */
  double extra_s;     /* scenario specific figures */
  double extra2_s;
  char msg[MSG_BYTES];
} rank_slot;

typedef struct board {
  atomic_int stop, release;
  double t_fault; /* when this process injected the fault */
  int have_id2;   /* R1: id2 is a fresh unique id for the survivors */
  epxUniqueId id2;
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

/* 1 when the process has ended (it stays a zombie, not reaped, for run_ranks). */
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
      if (atomic_load(ready_of(r))) {
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
    sleep_s(0.001);
  }
}

static void note(int rank, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(int rank, const char *fmt, ...) {
  char buf[1024];
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
 * rank within limit_s (killing the rest). status[r] is each wait status. With
 * want_id2 the board carries a second unique id (the survivors' fresh
 * communicator). Returns the number of ranks killed at the limit (hangs), or
 * -1 when the ranks could not be started. */
static int run_ranks(int R, epx_test_rank_fn fn, void *arg, controller_fn ctl, void *ctx,
                     double limit_s, int *status, int want_id2) {
  memset(B, 0, sizeof *B);
  epxUniqueId id;
  int helper = -1, helper2 = -1;
  if (epx_test_unique_id(&id, &helper) != 0) return -1;
  if (want_id2) {
    if (epx_test_unique_id(&B->id2, &helper2) != 0) {
      epx_test_unique_id_release(helper);
      return -1;
    }
    B->have_id2 = 1;
  }
  fflush(NULL);
  pid_t pids[MAXR];
  for (int r = 0; r < R; ++r) {
    pid_t pid = fork();
    if (pid < 0) {
      perror("fork");
      for (int q = 0; q < r; ++q) kill(pids[q], SIGKILL);
      for (int q = 0; q < r; ++q) waitpid(pids[q], NULL, 0);
      epx_test_unique_id_release(helper);
      epx_test_unique_id_release(helper2);
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
  epx_test_unique_id_release(helper2);
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

static epxConfig_t cuda_config(const epx_test_problem *p, int ll_tokens, int timeout_ms) {
  epxConfig_t cfg = epx_test_config(p, ll_tokens);
  cfg.backend = epxBackendCuda;
  cfg.cuda_device = g_device;
  if (timeout_ms > 0) cfg.timeout_ms = timeout_ms;
  return cfg;
}

/* The context still works: a memset and a synchronisation succeed. */
static int context_usable(int rank) {
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, 4096);
  if (e == cudaSuccess) e = cudaMemsetAsync(p, 0x5a, 4096, g_stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(g_stream);
  unsigned char b = 0;
  if (e == cudaSuccess) e = cudaMemcpy(&b, p, 1, cudaMemcpyDeviceToHost);
  if (p) cudaFree(p);
  if (e != cudaSuccess || b != 0x5a) {
    note(rank, "the CUDA context is not usable after the fault: %s (byte 0x%02x)",
         cudaGetErrorString(e), b);
    return 0;
  }
  return 1;
}

/* ------------------------------------------------------------ looping one op */

enum { OP_NOTIFY, OP_DISPATCH, OP_COMBINE, OP_LL_DISPATCH, OP_LL_COMBINE, OP_WORST, OP_COUNT };
static const char *const op_names[OP_COUNT] = {"notify",      "dispatch",   "combine",
                                               "ll_dispatch", "ll_combine", "worst_dispatch"};
#define R1_OPS 5 /* the first five: every phase R1 kills in */

/* Device buffers of one rank for looping any op (contents are not checked). */
typedef struct loop_state {
  epx_test_world w;
  epxComm_t comm;
  epxHandle_t h, hw; /* hw: the worst-case dispatch's own handle */
  int rank, R, el, H, K, T, llT;
  int64_t cap;
  void *x, *topk;
  float *weights;
  void *recv_x, *recv_topk;
  float *recv_w;
  int *src, *prefix, *per_expert, *num_recv;
  void *comb_x, *out_x;
  void *ll_x;
  int *ll_count, *ll_src;
  int64_t *ll_range;
} loop_state;

#define LOOP_E_PER_RANK 4
#define LOOP_H 512
#define LOOP_K 4
#define LOOP_T 256

static epxDispatchArgs_t loop_dispatch_args(const loop_state *s) {
  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = s->x;
  a.x_type = epxBFloat16;
  a.topk_idx = s->topk;
  a.topk_idx_type = epxInt64;
  a.topk_weights = s->weights;
  a.num_tokens = s->T;
  a.hidden = s->H;
  a.num_topk = s->K;
  return a;
}

/* Issues one op (no synchronisation). */
static epxResult_t loop_call(loop_state *s, int op) {
  if (op == OP_NOTIFY) {
    epxDispatchArgs_t a = loop_dispatch_args(s);
    int64_t n = 0;
    return epxDispatchNotify(s->comm, &a, s->h, &n, NULL, g_stream);
  }
  if (op == OP_DISPATCH || op == OP_WORST) {
    epxDispatchArgs_t a = loop_dispatch_args(s);
    if (op == OP_WORST) a.num_worst_tokens = s->cap;
    epxDispatchOutputs_t o = {s->recv_x, NULL, s->recv_topk, s->recv_w, s->src,
                              s->prefix, s->per_expert, s->num_recv, s->cap};
    return epxDispatch(s->comm, &a, op == OP_WORST ? s->hw : s->h, &o, g_stream);
  }
  if (op == OP_COMBINE) {
    epxCombineArgs_t a;
    memset(&a, 0, sizeof a);
    a.x = s->comb_x;
    a.hidden = s->H;
    a.num_topk = s->K;
    epxCombineOutputs_t o = {s->out_x, NULL};
    return epxCombine(s->comm, &a, s->h, &o, g_stream);
  }
  if (op == OP_LL_DISPATCH) {
    epxLowLatencyDispatchArgs_t a;
    memset(&a, 0, sizeof a);
    a.x = s->x;
    a.topk_idx = s->topk;
    a.topk_idx_type = epxInt64;
    a.num_tokens = s->T;
    a.hidden = s->H;
    a.num_topk = s->K;
    epxLowLatencyDispatchOutputs_t o = {s->ll_x, NULL, s->ll_count, s->ll_src, s->ll_range};
    return epxLowLatencyDispatch(s->comm, &a, s->h, &o, g_stream);
  }
  epxLowLatencyCombineArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = s->ll_x;
  a.topk_idx = s->topk;
  a.topk_idx_type = epxInt64;
  a.topk_weights = s->weights;
  a.num_tokens = s->T;
  a.hidden = s->H;
  a.num_topk = s->K;
  return epxLowLatencyCombine(s->comm, &a, s->h, s->out_x, g_stream);
}

/* Issues one op and, for a stream-ordered one, waits for its kernels: a
 * device error then surfaces at the next call. */
static epxResult_t loop_op(loop_state *s, int op) {
  epxResult_t res = loop_call(s, op);
  if (res == epxSuccess && op != OP_NOTIFY) {
    cudaError_t e = cudaStreamSynchronize(g_stream);
    if (e != cudaSuccess) {
      note(s->rank, "cudaStreamSynchronize after %s: %s", op_names[op], cudaGetErrorString(e));
      return epxCudaError;
    }
  }
  return res;
}

/* Initialises the communicator and the buffers, and runs the calls the op
 * needs before it (notify before dispatch, ...). 0 on success. */
static int loop_setup(loop_state *s, int rank, int R, const epxUniqueId *id, uint64_t seed,
                      int timeout_ms, int op) {
  memset(s, 0, sizeof *s);
  cuda_rank_setup(rank);
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
  epxConfig_t cfg = cuda_config(&p, s->llT, timeout_ms);
  if (epx_test_comm_init(&s->comm, rank, R, id, &cfg)) return 1;
  if (epxHandleCreate(s->comm, &s->h) != epxSuccess) return 1;
  if (epxHandleCreate(s->comm, &s->hw) != epxSuccess) return 1;
  epx_test_world_init(&s->w, &p, 1, EPX_PAYLOAD_BF16, seed + 1);
  s->cap = (int64_t)R * s->T;
  size_t H = (size_t)s->H, K = (size_t)s->K, cap = (size_t)s->cap, T = (size_t)s->T;
  s->x = dup_dev(s->w.x[rank], T * H * 2);
  s->topk = dup_dev(s->w.topk[rank], T * K * 8);
  s->weights = dup_dev(s->w.weights[rank], T * K * 4);
  s->recv_x = dalloc(cap * H * 2);
  s->recv_topk = dalloc(cap * K * 8);
  s->recv_w = dalloc(cap * K * 4);
  s->src = dalloc(cap * 4);
  s->prefix = dalloc((size_t)R * 4);
  s->per_expert = dalloc((size_t)s->el * 4);
  s->num_recv = dalloc(4);
  s->comb_x = dalloc(cap * H * 2);
  CK(cudaMemset(s->comb_x, 0, cap * H * 2));
  s->out_x = dalloc(T * H * 2);
  size_t ll_rows = (size_t)s->el * (size_t)R * (size_t)s->llT;
  s->ll_x = dalloc(ll_rows * H * 2);
  CK(cudaMemset(s->ll_x, 0, ll_rows * H * 2));
  CK(cudaDeviceSynchronize());
  s->ll_count = dalloc((size_t)s->el * 4);
  s->ll_src = dalloc(ll_rows * 4);
  s->ll_range = dalloc((size_t)s->el * (size_t)R * 8);
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
  void *bufs[] = {s->x,       s->topk,       s->weights,  s->recv_x, s->recv_topk,
                  s->recv_w,  s->src,        s->prefix,   s->per_expert, s->num_recv,
                  s->comb_x,  s->out_x,      s->ll_x,     s->ll_count, s->ll_src,
                  s->ll_range};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) dfree(bufs[i]);
  epx_test_world_free(&s->w);
  cudaStreamDestroy(g_stream);
}

/* 1 when the message names rank v as the cause (directly, as the rank a
 * failed peer lost, or as the rank waited for). */
static int names_rank(const char *msg, int v) {
  char a[48], b[48], c[48], d[48];
  snprintf(a, sizeof a, "rank %d (pid", v);
  snprintf(b, sizeof b, "lost rank %d ", v);
  snprintf(c, sizeof c, "waiting for rank %d:", v);
  snprintf(d, sizeof d, "waiting for rank %d ", v);
  return strstr(msg, a) || strstr(msg, b) || strstr(msg, c) || strstr(msg, d);
}

/* Calls `op` until one fails (at most `tries` calls). A peer may have taken
 * part in the first call before it went away, so that one may succeed.
 * Returns the first failure (or epxSuccess); *seconds is the time it took. */
static epxResult_t call_until_error(loop_state *s, int op, int tries, double *seconds) {
  double t0 = epx_test_now();
  epxResult_t res = epxSuccess;
  for (int i = 0; i < tries && res == epxSuccess; ++i) res = loop_op(s, op);
  *seconds = epx_test_now() - t0;
  return res;
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

/* What an output snapshot covers: the buffers the ops write. */
static size_t snapshot_bytes(const loop_state *s) {
  return (size_t)s->cap * (size_t)s->H * 2 + (size_t)s->T * (size_t)s->H * 2 +
         (size_t)s->el * (size_t)s->R * (size_t)s->llT * (size_t)s->H * 2;
}
static unsigned char *snapshot(const loop_state *s) {
  size_t a = (size_t)s->cap * (size_t)s->H * 2, b = (size_t)s->T * (size_t)s->H * 2;
  size_t c = snapshot_bytes(s) - a - b;
  unsigned char *dst = epx_test_xmalloc(snapshot_bytes(s));
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
    note(rank, "a fresh communicator among the survivors could not be made");
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
    note(rank, "fresh communicator: notify %s, N_recv %" PRId64 " (expected %" PRId64 "): %s",
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
      note(rank, "fresh communicator: dispatch %s: %s", epxGetErrorString(res),
           epxCommGetLastError(comm));
      ok = 0;
    } else {
      uint16_t *gx = to_host(rx, (size_t)(N + 1) * H * 2);
      int *gs = to_host(rsrc, (size_t)N * 4);
      ok &= !epx_test_rank_compare(rank, "fresh recv_x", EPX_ELEM_BF16, ref.recv_x, gx, N, H);
      ok &= !epx_test_rank_compare(rank, "fresh recv_src_idx", EPX_ELEM_I32, ref.recv_src_idx, gs,
                                   N, 1);
      if (!epx_test_is_poisoned(gx + (size_t)N * H, (size_t)H * 2)) {
        note(rank, "fresh dispatch wrote past N_recv");
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

static int fault_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const fault_case *fc = arg;
  rank_slot *me = &B->r[rank];
  loop_state s;
  if (loop_setup(&s, rank, R, id, fc->seed, fc->timeout_ms, fc->op)) return 1;
  atomic_store(&me->ready, 1);
  epxResult_t res = epxSuccess;
  double limit = epx_test_now() + 40.0;
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
  epxResult_t again = loop_call(&s, fc->op);
  double again_s = epx_test_now() - t0;
  if (res != epxSuccess && (again != res || again_s > 0.1))
    note(rank, "the call after the error returned %s in %.3f s, expected %s at once",
         epxGetErrorString(again), again_s, epxGetErrorString(res));
  context_usable(rank);
  unsigned char *snap = NULL;
  if (fc->stop && !victim) snap = snapshot(&s);
  atomic_store(&me->done, 1);
  if (fc->stop && !victim) {
    /* Keep the communicator (and its regions) while the stopped rank resumes. */
    if (wait_flag(&B->release, 30.0)) note(rank, "never released");
    unsigned char *now = snapshot(&s);
    if (memcmp(now, snap, snapshot_bytes(&s)) != 0)
      note(rank, "outputs changed after this rank's error, while the resumed rank ran");
    free(now);
    free(snap);
  }
  t0 = epx_test_now();
  epxHandleDestroy(s.h);
  epxHandleDestroy(s.hw);
  if (epxCommDestroy(s.comm) != epxSuccess) note(rank, "epxCommDestroy failed");
  me->destroy_s = epx_test_now() - t0;
  if (me->destroy_s > 1.0) note(rank, "epxCommDestroy took %.3f s", me->destroy_s);
  if (!fc->stop && !victim && B->have_id2) me->fresh_ok = fresh_comm_exact(rank, R, fc->victim);
  loop_free(&s);
  return me->bad;
}

static void fault_controller(void *ctx, const pid_t *pids, int R) {
  const fault_case *fc = ctx;
  pid_t v = pids[fc->victim];
  if (wait_all_ready(pids, R, 60.0)) {
    atomic_store(&B->stop, 1);
    return;
  }
  sleep_s(fc->delay_s);
  B->t_fault = epx_test_now();
  if (!fc->stop) {
    kill(v, SIGKILL);
    wait_ranks(done_of, R, fc->victim, 15.0);
    atomic_store(&B->stop, 1);
    return;
  }
  kill(v, SIGSTOP);
  /* Stopped for longer than the hard timeout: until every survivor failed. */
  wait_ranks(done_of, R, fc->victim, fc->timeout_ms / 1000.0 + 15.0);
  sleep_s(0.2);
  B->r[fc->victim].extra_s = epx_test_now(); /* resume time */
  kill(v, SIGCONT);
  wait_flag(done_of(fc->victim), 15.0);
  atomic_store(&B->release, 1);
  atomic_store(&B->stop, 1);
}

typedef struct r1_stats {
  int injected, survived, hangs, fresh_ok, fresh_total;
  samples tte; /* seconds, every survivor of every run */
  samples per_op[R1_OPS];
  samples destroy;
} r1_stats;
static r1_stats R1S;

static int fault_ranks(void) {
  int R = 3;
  const char *e = getenv("EPX_FAULT_RANKS");
  if (e && *e) R = atoi(e);
  if (R < 2) R = 2;
  if (R > 4) R = 4;
  return R;
}

static int section_r1(epx_test_rng *rng) {
  int runs = 5;
  const char *e = getenv("EPX_FAULT_RUNS");
  if (e && *e) runs = atoi(e);
  if (runs < 1) runs = 1;
  int R = fault_ranks(), fails = 0;
  for (int op = 0; op < R1_OPS; ++op) {
    int op_fails = 0;
    double t_op = epx_test_now();
    for (int i = 0; i < runs; ++i) {
      fault_case fc = {op, (int)epx_test_rng_below(rng, (uint32_t)R), 0, 20000,
                       epx_test_rng_uniform(rng) * 0.05, epx_test_rng_next(rng)};
      int st[MAXR];
      int hangs = run_ranks(R, fault_rank, &fc, fault_controller, &fc, 60.0, st, 1);
      R1S.injected++;
      int ok = hangs == 0 && killed_by(st[fc.victim], SIGKILL);
      if (hangs > 0) R1S.hangs += hangs;
      for (int r = 0; r < R; ++r) {
        if (r == fc.victim) continue;
        ok &= exited_ok(st[r]) && !B->r[r].bad;
        R1S.fresh_total++;
        R1S.fresh_ok += B->r[r].fresh_ok;
        double tte = B->r[r].t_err - B->t_fault;
        if (B->r[r].result != epxSuccess) {
          add_sample(&R1S.tte, tte);
          add_sample(&R1S.per_op[op], tte);
          add_sample(&R1S.destroy, B->r[r].destroy_s);
        }
        if (tte > R1_LIMIT_S) {
          fprintf(stderr, "  rank %d: error %.3f s after the kill (limit 2 s + %.1f s slack)\n", r,
                  tte, R1_LIMIT_S - 2.0);
          ok = 0;
        }
      }
      if (ok) {
        R1S.survived++;
      } else {
        op_fails++;
        printf("FAIL r1 %s run %d: victim rank %d, delay %.4f s, seed %" PRIu64 "\n",
               op_names[op], i, fc.victim, fc.delay_s, fc.seed);
        for (int r = 0; r < R; ++r)
          fprintf(stderr, "  rank %d: status 0x%x, %s, %d iterations: %s\n", r, st[r],
                  epxGetErrorString((epxResult_t)B->r[r].result), B->r[r].iters, B->r[r].msg);
      }
    }
    printf("%s r1_kill_%s: %d runs of %d ranks, time to error median %.1f ms, worst %.1f ms "
           "(%.1f s)\n",
           op_fails ? "FAIL" : "PASS", op_names[op], runs, R, median_of(&R1S.per_op[op]) * 1e3,
           max_of(&R1S.per_op[op]) * 1e3, epx_test_now() - t_op);
    fflush(stdout);
    fails += op_fails;
  }
  return fails != 0;
}

typedef struct r2_stats {
  int injected, survived;
  samples over;        /* survivor error time minus (stop time + timeout), seconds */
  samples resumed_err; /* resumed rank: error time minus resume time */
} r2_stats;
static r2_stats R2S;

static int section_r2(epx_test_rng *rng) {
  const int ops[] = {OP_DISPATCH, OP_DISPATCH, OP_COMBINE, OP_LL_DISPATCH};
  int R = fault_ranks(), fails = 0, timeout_ms = 2000;
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; ++i) {
    fault_case fc = {ops[i], (int)epx_test_rng_below(rng, (uint32_t)R), 1, timeout_ms,
                     epx_test_rng_uniform(rng) * 0.05, epx_test_rng_next(rng)};
    int st[MAXR];
    int hangs = run_ranks(R, fault_rank, &fc, fault_controller, &fc, 60.0, st, 0);
    R2S.injected++;
    int ok = hangs == 0;
    for (int r = 0; r < R; ++r) {
      ok &= exited_ok(st[r]) && !B->r[r].bad;
      if (r == fc.victim) {
        double after = B->r[r].t_err - B->r[r].extra_s;
        add_sample(&R2S.resumed_err, after);
        if (after > 1.5 || B->r[r].result == epxSuccess) {
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
        fprintf(stderr, "  rank %d: failed %.3f s after the stop; the timeout is %.3f s\n", r,
                B->r[r].t_err - B->t_fault, timeout_ms / 1000.0);
        ok = 0;
      }
    }
    if (ok) {
      R2S.survived++;
      printf("PASS r2_stop_%s: victim rank %d; survivor: %s; resumed rank: %s\n", op_names[fc.op],
             fc.victim, B->r[(fc.victim + 1) % R].msg, B->r[fc.victim].msg);
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
  const char *name;
  int R, el, H, K, maxT, llT;
  int tokens[MAXR];
  epx_test_routing routing;
  epx_test_payload payload;
  int int32, align;
  int ll_fp8, ll_round, ll_ue8m0;
  uint64_t seed;
  int slow_rank; /* R3: sleeps before every call; -1 = none */
  double slow_sleep_s;
  int timeout_ms;
  int repeats;
} seq_params;

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

/* Copies a device output back, compares it and hashes every byte. */
static int dcmp(int rank, const char *what, epx_test_elem e, const void *exp, const void *dev,
                int64_t rows, int64_t cols, size_t all_bytes, uint64_t *hash) {
  unsigned char *got = to_host(dev, all_bytes);
  int bad = epx_test_rank_compare(rank, what, e, exp, got, rows, cols);
  *hash = fnv(*hash, got, all_bytes);
  free(got);
  if (bad) B->r[rank].bad = 1;
  return bad;
}

static int dpoisoned(int rank, const char *what, const void *dev, size_t off, size_t bytes) {
  if (!bytes) return 0;
  unsigned char *got = to_host((const unsigned char *)dev + off, bytes);
  int ok = epx_test_is_poisoned(got, bytes);
  free(got);
  if (!ok) note(rank, "%s", what);
  return !ok;
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
  int with_bias = (int)(sp->seed & 1);
  epx_ref_combine_inputs ci = {(const uint16_t *const *)cx, (const float *const *)cw,
                               {with_bias ? bias : NULL, NULL}};
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

  /* device inputs */
  void *dx = dup_dev(w->x[rank], (size_t)T * xrow);
  void *ds = srow ? dup_dev(w->scales[rank], (size_t)T * srow) : NULL;
  void *dt = dup_dev(w->topk[rank], (size_t)T * K * ie);
  float *dw = dup_dev(w->weights[rank], (size_t)T * K * 4);
  void *dcx = dup_dev(cx[rank], (size_t)N * H * 2);
  float *dcw = dup_dev(cw[rank], (size_t)N * K * 4);
  void *dbias = dup_dev(bias, (size_t)T * H * 2);
  void *dlx_in = dup_dev(wl->x[rank], (size_t)T * H * 2);
  void *dlt = dup_dev(wl->topk[rank], (size_t)T * K * ie);
  float *dlw = dup_dev(wl->weights[rank], (size_t)T * K * 4);
  void *dlout = dup_dev(lout[rank], (size_t)lrows * H * 2);
  /* device outputs */
  int64_t rows = worst > cap ? worst : cap;
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

  f |= ok_call(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  f |= ok_call(rank, comm, epxHandleCreate(comm, &hw), "epxHandleCreate");
  f |= ok_call(rank, comm, epxHandleCreate(comm, &hl), "epxHandleCreate");
  if (f) goto out;

  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = dx;
  a.x_type = fp8 ? epxFloat8E4M3 : epxBFloat16;
  a.x_scales = ds;
  a.scale_format = (epxScaleFormat_t)(fp8 ? (int)sp->payload : 0);
  a.topk_idx = dt;
  a.topk_idx_type = it;
  a.topk_weights = dw;
  a.num_tokens = T;
  a.hidden = H;
  a.num_topk = K;
  a.expert_alignment = sp->align;

  /* 1. notify */
  {
    int64_t n = -7;
    epx_test_poison(cnt, (size_t)el * 4);
    before_call(sp, rank);
    f |= ok_call(rank, comm, epxDispatchNotify(comm, &a, h, &n, cnt, g_stream), "epxDispatchNotify");
    if (f) goto out;
    if (n != N) {
      note(rank, "notify: N_recv %" PRId64 ", expected %" PRId64, n, N);
      f = 1;
      goto out;
    }
    if (epx_test_rank_compare(rank, "notify per-expert counts", EPX_ELEM_I32,
                              ref[rank].num_recv_tokens_per_expert, cnt, 1, el)) {
      B->r[rank].bad = 1;
      f = 1;
    }
    *hash = fnv(*hash, cnt, (size_t)el * 4);
  }
  /* 2. dispatch with the notify's handle (cap = N + 1: the extra row stays
   *    poisoned), then the worst-case dispatch on its own handle */
  for (int pass = 0; pass < 2 && !f; ++pass) {
    int64_t rr = pass == 0 ? cap : worst;
    const epx_ref_dispatch_result *rf = pass == 0 ? &ref[rank] : &refw;
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
    before_call(sp, rank);
    f |= ok_call(rank, comm, epxDispatch(comm, &d, pass == 0 ? h : hw, &o, g_stream),
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
      epxCombineArgs_t c;
      memset(&c, 0, sizeof c);
      c.x = dcx;
      c.topk_weights = dcw;
      c.bias[0] = with_bias ? dbias : NULL;
      c.hidden = H;
      c.num_topk = K;
      epxCombineOutputs_t co = {ox, ow};
      before_call(sp, rank);
      f |= ok_call(rank, comm, epxCombine(comm, &c, h, &co, g_stream), "epxCombine");
      if (f) break;
      f |= dcmp(rank, "combined_x", EPX_ELEM_BF16, exp_cx, ox, T, H, (size_t)(T + 1) * H * 2,
                hash);
      f |= dcmp(rank, "combined_topk_weights", EPX_ELEM_F32, exp_cw, ow, T, K,
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
    epxLowLatencyDispatchArgs_t la;
    memset(&la, 0, sizeof la);
    la.x = dlx_in;
    la.topk_idx = dlt;
    la.topk_idx_type = it;
    la.num_tokens = T;
    la.hidden = H;
    la.num_topk = K;
    la.use_fp8 = sp->ll_fp8;
    la.round_scale = sp->ll_round;
    la.use_ue8m0 = sp->ll_ue8m0;
    epxLowLatencyDispatchOutputs_t lo2 = {lx, ls, lcount, lsrc, lrange};
    before_call(sp, rank);
    f |= ok_call(rank, comm, epxLowLatencyDispatch(comm, &la, hl, &lo2, g_stream),
                 "epxLowLatencyDispatch");
    if (f) goto out;
    f |= dcmp(rank, "ll recv_count", EPX_ELEM_I32, lref.recv_count, lcount, 1, el, (size_t)el * 4,
              hash);
    f |= dcmp(rank, "ll recv_layout_range", EPX_ELEM_I64, lref.recv_layout_range, lrange, el, R,
              (size_t)el * R * 8, hash);
    /* full buffers: rows past each count are poisoned in both */
    f |= dcmp(rank, "ll recv_x (all rows)", sp->ll_fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16, lref.recv_x,
              lx, lrows, H, (size_t)lrows * lxrow, hash);
    if (lsrow)
      f |= dcmp(rank, "ll recv_x_scales (all rows)", EPX_ELEM_I32, lref.recv_x_scales, ls, lrows,
                (int64_t)lsrow / 4, (size_t)lrows * lsrow, hash);
    f |= dcmp(rank, "ll recv_src_info (all rows)", EPX_ELEM_I32, lref.recv_src_info, lsrc, lrows,
              1, (size_t)lrows * 4, hash);
    if (f) goto out;
    dpoison(ox, (size_t)(T + 1) * H * 2);
    epxLowLatencyCombineArgs_t lc;
    memset(&lc, 0, sizeof lc);
    lc.x = dlout;
    lc.topk_idx = dlt;
    lc.topk_idx_type = it;
    lc.topk_weights = dlw;
    lc.num_tokens = T;
    lc.hidden = H;
    lc.num_topk = K;
    before_call(sp, rank);
    f |= ok_call(rank, comm, epxLowLatencyCombine(comm, &lc, hl, ox, g_stream),
                 "epxLowLatencyCombine");
    if (f) goto out;
    f |= dcmp(rank, "ll combined_x", EPX_ELEM_BF16, exp_lx, ox, T, H, (size_t)(T + 1) * H * 2,
              hash);
    f |= dpoisoned(rank, "ll combine wrote past row T", ox, (size_t)T * H * 2, (size_t)H * 2);
  }
out:
  CK(cudaStreamSynchronize(g_stream));
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
  free(cnt);
  void *dev[] = {dx, ds,   dt,   dw,   dcx,     dcw,   dbias,  dlx_in, dlt, dlw,    dlout, rx,
                 rs, rt,   rw,   rsrc, rpre,    rpe_cnt, nrecv, ox,     ow,  lx,     ls,    lcount,
                 lsrc, lrange};
  for (size_t i = 0; i < sizeof dev / sizeof dev[0]; ++i) dfree(dev[i]);
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

static int seq_rank(int rank, int R, const epxUniqueId *id, void *arg) {
  const seq_params *sp = arg;
  rank_slot *me = &B->r[rank];
  cuda_rank_setup(rank);
  epx_test_problem p;
  make_problem(sp, &p);
  epxConfig_t cfg = cuda_config(&p, sp->llT, sp->timeout_ms);
  cfg.max_tokens_per_rank = sp->maxT;
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
      note(rank, "repeat %d differs from the first run (output hash %016" PRIx64 " vs %016" PRIx64
                 ")",
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
  cudaStreamDestroy(g_stream);
  return f || me->bad;
}

static int section_r3(void) {
  seq_params sp;
  memset(&sp, 0, sizeof sp);
  sp.name = "r3_slow_rank";
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
  sp.timeout_ms = 2500;
  sp.slow_sleep_s = 0.8 * sp.timeout_ms / 1000.0;
  sp.repeats = 1;
  int st[MAXR];
  double t0 = epx_test_now();
  int hangs = run_ranks(sp.R, seq_rank, &sp, NULL, NULL, 120.0, st, 0);
  int ok = hangs == 0;
  for (int r = 0; r < sp.R; ++r) ok &= exited_ok(st[r]) && !B->r[r].bad;
  printf("%s r3_slow_rank: rank %d sleeps %.0f ms (80 %% of the %d ms timeout) before each of 6 "
         "calls; exact, no error (the CUDA backend logs no soft-timeout warning: not asserted) "
         "(%.1f s)\n",
         ok ? "PASS" : "FAIL", sp.slow_rank, sp.slow_sleep_s * 1e3, sp.timeout_ms,
         epx_test_now() - t0);
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
    sp->tokens[r] = u < 0.2   ? 0
                    : u < 0.5 ? sp->maxT
                              : 1 + (int)epx_test_rng_below(&g, (uint32_t)sp->maxT);
    any_max |= sp->tokens[r] == sp->maxT;
  }
  if (!any_max) sp->tokens[epx_test_rng_below(&g, (uint32_t)sp->R)] = sp->maxT;
  double u = epx_test_rng_uniform(&g);
  sp->routing = u < 0.3    ? EPX_ROUTING_UNIFORM
                : u < 0.65 ? EPX_ROUTING_SKEWED
                : u < 0.8  ? EPX_ROUTING_ALL_MINUS1
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
  sp->timeout_ms = 0; /* EPX_TEST_TIMEOUT_MS (20 s; gpu-check raises it under the sanitizers) */
  sp->repeats = 2;
}

static int soak_seeds, soak_calls;
static const char *const routing_names[] = {"uniform", "skewed-90%", "all-minus-1", "random-dup"};
static const char *const payload_names[] = {"bf16", "fp8+f32", "fp8+ue8m0"};

static int run_soak_seed(const seq_params *sp, const char *label) {
  int st[MAXR];
  double t1 = epx_test_now();
  int hangs = run_ranks(sp->R, seq_rank, (void *)sp, NULL, NULL, 180.0, st, 0);
  int ok = hangs == 0;
  for (int r = 0; r < sp->R; ++r) ok &= exited_ok(st[r]) && !B->r[r].bad;
  char tok[64] = "";
  for (int r = 0; r < sp->R; ++r)
    snprintf(tok + strlen(tok), sizeof tok - strlen(tok), "%s%d", r ? "," : "", sp->tokens[r]);
  printf("%s %s: R=%d E=%d H=%d K=%d T=[%s] %s %s ids=%s align=%d ll=%s x%d (%.2f s)\n",
         ok ? "PASS" : "FAIL", label, sp->R, sp->R * sp->el, sp->H, sp->K, tok,
         routing_names[sp->routing], payload_names[sp->payload], sp->int32 ? "int32" : "int64",
         sp->align,
         sp->ll_fp8 ? (sp->ll_ue8m0 ? "fp8+ue8m0" : sp->ll_round ? "fp8+round" : "fp8") : "bf16",
         sp->repeats, epx_test_now() - t1);
  fflush(stdout);
  soak_seeds++;
  soak_calls += sp->R * sp->repeats * 6;
  return ok;
}

static int section_r12(void) {
  uint64_t base;
  const char *e = getenv("EPX_SOAK_SEED");
  if (e && *e)
    base = strtoull(e, NULL, 0);
  else
    base = (uint64_t)time(NULL) % 1000000;
  double budget = 20.0;
  const char *b = getenv("EPX_SOAK_SECONDS");
  if (b && *b) budget = atof(b);
  printf("r12 soak: first seed %" PRIu64 " (EPX_SOAK_SEED=%" PRIu64 " reproduces), budget %.0f s\n",
         base, base, budget);
  double t0 = epx_test_now();
  int fails = 0, seeds = 0;
  for (uint64_t s = base; fails == 0; ++s) {
    if (seeds >= 4 && epx_test_now() - t0 > budget) break;
    if (seeds >= 400) break;
    seq_params sp;
    random_params(&sp, s);
    char label[48];
    snprintf(label, sizeof label, "r12_seed_%" PRIu64, s);
    if (!run_soak_seed(&sp, label)) fails++;
    ++seeds;
  }
  return fails != 0;
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
static void small_params(const small_case *c, seq_params *sp) {
  random_params(sp, c->seed);
  sp->name = c->name;
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
  sleep_s(0.2);
  for (;;) {
    int expected = ABORT_WAITING;
    if (atomic_compare_exchange_strong(&a->state, &expected, ABORT_CALLING)) break;
    sleep_s(0.0005); /* held by the main thread */
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
static void own_device_error(loop_state *s, char *out, size_t len) {
  epxLayout_t l = {s->prefix, NULL, s->src, (uint8_t *)s->recv_topk};
  epxResult_t r = epxGetDispatchLayout(s->comm, s->topk, epxInt64, s->T, s->K, &l, g_stream);
  if (r == epxSuccess) cudaStreamSynchronize(g_stream);
  epxResult_t async = epxSuccess;
  epxCommGetAsyncError(s->comm, &async);
  snprintf(out, len, "a local call then returned %s (async error %s): %s", epxGetErrorString(r),
           epxGetErrorString(async),
           r == epxSuccess ? "no error was recorded on the device" : epxCommGetLastError(s->comm));
}

static void *notify_thread(void *p) {
  loop_state *s = p;
  loop_call(s, OP_NOTIFY); /* never returns before the process exits */
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
      epxResult_t res = loop_call(&s, OP_WORST);
      double enqueue_s = epx_test_now() - t_enq;
      me->extra2_s = enqueue_s;
      if (res != epxSuccess) note(rank, "enqueueing the dispatch: %s", epxGetErrorString(res));
      if (enqueue_s > R4_ENQUEUE_LIMIT_S)
        note(rank,
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
        note(rank,
             "the waiting kernels finished before epxCommAbort was called (the enqueue took "
             "%.3f s); this rank's own error: %s",
             enqueue_s, own);
        atomic_store(&a.state, ABORT_WAITING);
      }
      pthread_join(th, NULL);
      me->extra_s = t_ret - a.t_call;
      me->t_err = a.call_s;
      if (e != cudaSuccess) note(rank, "cudaStreamSynchronize: %s", cudaGetErrorString(e));
      if (a.res != epxSuccess) note(rank, "epxCommAbort returned %s", epxGetErrorString(a.res));
      if (me->extra_s > 1.0 || me->extra_s < 0)
        note(rank, "the waiting kernel finished %.3f s after epxCommAbort", me->extra_s);
      /* After own_device_error the communicator holds that error, not the abort. */
      if (!before_abort) {
        epxResult_t async = epxSuccess;
        epxCommGetAsyncError(s.comm, &async);
        if (async != epxAborted)
          note(rank, "async error %s, expected aborted", epxGetErrorString(async));
        double t0 = epx_test_now();
        res = loop_call(&s, OP_WORST);
        double d = epx_test_now() - t0;
        if (res != epxAborted || d > 0.1)
          note(rank, "the call after the abort returned %s in %.3f s, expected aborted at once",
               epxGetErrorString(res), d);
      }
      context_usable(rank);
      atomic_store(&B->release, 1);
    } else {
      wait_flag(&B->release, 30.0);
      double d = 0;
      /* rank 0 posted its hello before it aborted, so the first call may get
       * past it; by the second at the latest, the abort must be named */
      epxResult_t res = call_until_error(&s, OP_WORST, 3, &d);
      me->extra_s = d;
      const char *msg = epxCommGetLastError(s.comm);
      if (res != epxPeerFailed || !strstr(msg, "aborted") || d > 1.0)
        note(rank, "after the peer aborted: %s in %.3f s: %s", epxGetErrorString(res), d, msg);
      else
        fprintf(stderr, "  rank %d: %.1f ms after release: %s\n", rank, d * 1e3, msg);
    }
  } else if (c->mode == 1) {
    if (rank == 0) {
      wait_flag(&B->release, 30.0); /* the controller killed every peer */
      /* a dispatch whose kernels wait on the dead peers, then destroy at once */
      epxResult_t res = loop_call(&s, OP_WORST);
      if (res != epxSuccess) note(rank, "enqueueing the dispatch: %s", epxGetErrorString(res));
      double t0 = epx_test_now();
      epxHandleDestroy(s.h);
      epxHandleDestroy(s.hw);
      res = epxCommDestroy(s.comm);
      me->extra_s = epx_test_now() - t0;
      if (res != epxSuccess || me->extra_s > 1.0)
        note(rank, "epxCommDestroy after the peers died (a dispatch in flight): %s in %.3f s",
             epxGetErrorString(res), me->extra_s);
      context_usable(rank);
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
    wait_flag(&B->release, 30.0); /* rank 0 has been reaped */
    double d = 0;
    epxResult_t res = call_until_error(&s, OP_NOTIFY, 3, &d);
    me->extra_s = d;
    const char *msg = epxCommGetLastError(s.comm);
    if ((res != epxPeerFailed && res != epxTimeout) || !names_rank(msg, 0) || d > 2.0)
      note(rank, "after the peer exited: %s in %.3f s: %s", epxGetErrorString(res), d, msg);
    else
      fprintf(stderr, "  rank %d: %.1f ms after release: %s\n", rank, d * 1e3, msg);
  }
  epxHandleDestroy(s.h);
  epxHandleDestroy(s.hw);
  epxCommDestroy(s.comm);
  loop_free(&s);
  return me->bad;
}

static void r4_controller(void *ctx, const pid_t *pids, int R) {
  const r4_ctx *c = ctx;
  if (wait_all_ready(pids, R, 60.0)) {
    /* a rank waiting for the release would wait in vain */
    for (int r = 0; r < R; ++r) kill(pids[r], SIGKILL);
    return;
  }
  if (c->mode == 1) {
    for (int r = 1; r < R; ++r) kill(pids[r], SIGKILL);
    for (int r = 1; r < R; ++r) waitpid(pids[r], &g_status[r], 0); /* reaped: certainly gone */
    atomic_store(&B->release, 1);
  } else if (c->mode == 2) {
    int st = 0;
    double end = epx_test_now() + 15.0;
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
  int hangs = run_ranks(2, r4_rank, &c0, r4_controller, &c0, 60.0, st, 0);
  int ok = hangs == 0 && exited_ok(st[0]) && exited_ok(st[1]) && !B->r[0].bad && !B->r[1].bad;
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
  hangs = run_ranks(3, r4_rank, &c1, r4_controller, &c1, 60.0, st, 0);
  ok = hangs == 0 && exited_ok(st[0]) && !B->r[0].bad;
  r4_destroy_s = B->r[0].extra_s;
  printf("%s r4_destroy_after_peers_died: with a dispatch waiting on the dead peers, "
         "epxHandleDestroy + epxCommDestroy took %.1f ms; the context still works\n",
         ok ? "PASS" : "FAIL", r4_destroy_s * 1e3);
  fails += !ok;

  r4_ctx c2 = {2};
  hangs = run_ranks(2, r4_rank, &c2, r4_controller, &c2, 60.0, st, 0);
  ok = hangs == 0 && exited_ok(st[1]) && !B->r[1].bad && r4_exit_s < 1.0;
  r4_peer_after_exit_s = B->r[1].extra_s;
  printf("%s r4_exit_with_call_in_flight: the process was gone %.1f ms after exit(0); its peer "
         "then failed naming it %.1f ms after it called\n",
         ok ? "PASS" : "FAIL", r4_exit_s * 1e3, r4_peer_after_exit_s * 1e3);
  fails += !ok;
  fflush(stdout);
  return fails != 0;
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

static board *board_map(void) {
  board *b = mmap(NULL, sizeof(board), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (b == MAP_FAILED) {
    perror("mmap");
    return NULL;
  }
  memset(b, 0, sizeof *b);
  return b;
}

/* A rank of a small case re-executed by epx_test_exec_rank (compute-sanitizer). */
static int small_rank(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const small_case *c = arg;
  seq_params sp;
  small_params(c, &sp);
  return seq_rank(rank, nranks, id, &sp);
}

static int rank_exec_main(int argc, char **argv) {
  epxUniqueId id;
  const char *name;
  int rank, nranks;
  if (epx_test_parse_rank_exec(argc, argv, &name, &rank, &nranks, &id) != 0) return 2;
  B = board_map(); /* this process's own board: a small case has no controller */
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
  seq_params sp;
  small_params(c, &sp);
  return run_soak_seed(&sp, c->name);
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--rank-exec") == 0) return rank_exec_main(argc, argv);
  B = board_map();
  if (!B) return 1;
  signal(SIGPIPE, SIG_IGN);
  int segs_before = count_epx_segments();
  epx_test_rng rng;
  uint64_t fseed = (uint64_t)time(NULL);
  const char *fs = getenv("EPX_FAULT_SEED");
  if (fs && *fs) fseed = strtoull(fs, NULL, 0);
  epx_test_rng_seed(&rng, fseed);
  printf("fault seed %" PRIu64 " (EPX_FAULT_SEED reproduces the victims and delays)\n", fseed);
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
  int segs_after = count_epx_segments();
  if (segs_before >= 0 && segs_after > segs_before) {
    printf("FAIL %d shared-memory segments left in /dev/shm\n", segs_after - segs_before);
    fails++;
  }
  double r1_med = median_of(&R1S.tte), r1_max = max_of(&R1S.tte);
  double r2_med = median_of(&R2S.over), r2_max = max_of(&R2S.over);
  printf("test_cuda_faults summary: R1 kills=%d survived=%d hangs=%d time_to_error_ms median=%.1f "
         "worst=%.1f destroy_ms worst=%.1f fresh_comms=%d/%d | R2 stops=%d survived=%d "
         "error_after_timeout_ms median=%.0f worst=%.0f resumed_rank_error_ms worst=%.0f | R4 "
         "abort_ms=%.1f peer_after_abort_ms=%.1f destroy_ms=%.1f exit_ms=%.1f "
         "peer_after_exit_ms=%.1f | R12 seeds=%d calls=%d | %.1f s, %s\n",
         R1S.injected, R1S.survived, R1S.hangs, r1_med * 1e3, r1_max * 1e3,
         max_of(&R1S.destroy) * 1e3, R1S.fresh_ok, R1S.fresh_total, R2S.injected, R2S.survived,
         r2_med * 1e3, r2_max * 1e3, max_of(&R2S.resumed_err) * 1e3, r4_abort_s * 1e3,
         r4_peer_after_abort_s * 1e3, r4_destroy_s * 1e3, r4_exit_s * 1e3,
         r4_peer_after_exit_s * 1e3, soak_seeds, soak_calls, epx_test_now() - t0,
         fails ? "FAILED" : "passed");
  return fails ? 1 : 0;
}
