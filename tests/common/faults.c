/*
 * faults.c - the fault-injection world of the fault tests and its figures.
 * See faults.h.
 */
#include "common/faults.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/layout_math.h"

/* The board of this process and of the ranks it forks (epx_fault_board_map). */
static epx_fault_board *B;

/* ------------------------------------------------------------ the board */

epx_fault_board *epx_fault_board_map(void) {
  epx_fault_board *b = mmap(NULL, sizeof(epx_fault_board), PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (b == MAP_FAILED) {
    perror("mmap");
    return NULL;
  }
  memset(b, 0, sizeof *b);
  B = b;
  return b;
}

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

epx_fault_board *epx_fault_begin(epx_test_rng *rng, int *segs_before) {
  epx_fault_board *b = epx_fault_board_map();
  if (!b) return NULL;
  signal(SIGPIPE, SIG_IGN);
  *segs_before = count_epx_segments();
  uint64_t fseed = (uint64_t)time(NULL);
  const char *fs = getenv("EPX_FAULT_SEED");
  if (fs && *fs) fseed = strtoull(fs, NULL, 0);
  epx_test_rng_seed(rng, fseed);
  printf("fault seed %" PRIu64 " (EPX_FAULT_SEED reproduces the victims and delays)\n", fseed);
  return b;
}

int epx_fault_segments_left(int segs_before) {
  int segs_after = count_epx_segments();
  if (segs_before >= 0 && segs_after > segs_before) {
    printf("FAIL %d shared-memory segments left in /dev/shm\n", segs_after - segs_before);
    return 1;
  }
  return 0;
}

void epx_fault_note(int rank, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "  rank %d: %s\n", rank, buf);
  B->r[rank].bad = 1;
}

int epx_fault_expect_success(int rank, epxComm_t comm, epxResult_t res, const char *what) {
  if (!epx_test_expect_success(rank, comm, res, what)) return 0;
  B->r[rank].bad = 1;
  return 1;
}

int epx_fault_compare(int rank, const char *what, epx_test_elem e, const void *exp, const void *got,
                      int64_t rows, int64_t cols) {
  if (!epx_test_rank_compare(rank, what, e, exp, got, rows, cols)) return 0;
  B->r[rank].bad = 1;
  return 1;
}

void epx_fault_sleep(double s) {
  if (s <= 0) return;
  struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

int epx_fault_wait_flag(atomic_int *f, double limit_s) {
  double end = epx_test_now() + limit_s;
  while (!atomic_load(f)) {
    if (epx_test_now() > end) return 1;
    epx_fault_sleep(0.0005);
  }
  return 0;
}

int epx_fault_wait_ranks(atomic_int *(*flag)(int), int R, int except, double limit_s) {
  for (int r = 0; r < R; ++r)
    if (r != except && epx_fault_wait_flag(flag(r), limit_s)) return 1;
  return 0;
}

atomic_int *epx_fault_ready_of(int r) { return &B->r[r].ready; }
atomic_int *epx_fault_done_of(int r) { return &B->r[r].done; }

/* ------------------------------------------------------------ the ranks */

int epx_fault_run(int R, epx_test_rank_fn fn, void *arg, epx_fault_controller_fn ctl, void *ctx,
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
  pid_t pids[EPX_FAULT_MAX_RANKS];
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
  if (ctl) ctl(ctx, pids, status, R);
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
    if (left > 0) epx_fault_sleep(0.001);
  }
  epx_test_unique_id_release(helper);
  epx_test_unique_id_release(helper2);
  return hangs;
}

int epx_fault_exited_ok(int st) { return st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0; }

int epx_fault_killed_by(int st, int sig) {
  return st != -1 && WIFSIGNALED(st) && WTERMSIG(st) == sig;
}

int epx_fault_all_ok(const int *st, int R) {
  int ok = 1;
  for (int r = 0; r < R; ++r) ok &= epx_fault_exited_ok(st[r]) && !B->r[r].bad;
  return ok;
}

/* ------------------------------------------------------------ figures */

void epx_fault_sample(epx_fault_samples *s, double v) {
  if (s->n < EPX_FAULT_MAX_SAMPLES) s->v[s->n++] = v;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

double epx_fault_median(epx_fault_samples *s) {
  if (s->n == 0) return 0;
  qsort(s->v, (size_t)s->n, sizeof(double), cmp_double);
  return s->v[s->n / 2];
}

double epx_fault_max(const epx_fault_samples *s) {
  double m = 0;
  for (int i = 0; i < s->n; ++i)
    if (s->v[i] > m) m = s->v[i];
  return m;
}

/* ------------------------------------------------------------ call arguments */

/* T tokens of H columns with K ids of type it each. */
typedef struct call_shape {
  int T, H, K;
  epxDataType_t it;
} call_shape;

/* The token fields the argument structs of dispatch, LL dispatch and LL
 * combine share; every other field 0. */
#define TOKEN_ARGS(a, c, x_, topk_) \
  do {                              \
    memset(&(a), 0, sizeof(a));     \
    (a).x = (x_);                   \
    (a).topk_idx = (topk_);         \
    (a).topk_idx_type = (c).it;     \
    (a).num_tokens = (c).T;         \
    (a).hidden = (c).H;             \
    (a).num_topk = (c).K;           \
  } while (0)

/* BF16 x, no scales, no alignment. */
static epxDispatchArgs_t dispatch_args(call_shape c, const void *x, const void *topk,
                                       const float *weights) {
  epxDispatchArgs_t a;
  TOKEN_ARGS(a, c, x, topk);
  a.x_type = epxBFloat16;
  a.topk_weights = weights;
  return a;
}

static epxCombineArgs_t combine_args(call_shape c, const void *x, const float *weights,
                                     const void *bias) {
  epxCombineArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = x;
  a.topk_weights = weights;
  a.bias[0] = bias;
  a.hidden = c.H;
  a.num_topk = c.K;
  return a;
}

/* BF16 x. */
static epxLowLatencyDispatchArgs_t ll_dispatch_args(call_shape c, const void *x, const void *topk) {
  epxLowLatencyDispatchArgs_t a;
  TOKEN_ARGS(a, c, x, topk);
  return a;
}

static epxLowLatencyCombineArgs_t ll_combine_args(call_shape c, const void *x, const void *topk,
                                                  const float *weights) {
  epxLowLatencyCombineArgs_t a;
  TOKEN_ARGS(a, c, x, topk);
  a.topk_weights = weights;
  return a;
}

/* ------------------------------------------------------------ the loop (R1, R2, R4) */

const char *const epx_fault_op_names[EPX_FAULT_OPS] = {
    "notify", "dispatch", "combine", "ll_dispatch", "ll_combine", "worst_dispatch"};

void epx_fault_loop_init(epx_fault_loop *s, epx_test_problem *p, int rank, int R, uint64_t seed) {
  memset(s, 0, sizeof *s);
  s->rank = rank;
  s->R = R;
  s->el = 4;
  s->H = 512;
  s->K = 4;
  s->T = 256;
  s->llT = 256;
  s->cap = (int64_t)R * s->T;
  memset(p, 0, sizeof *p);
  p->nranks = R;
  p->num_experts = R * s->el;
  p->hidden = s->H;
  p->num_topk = s->K;
  p->routing = EPX_ROUTING_UNIFORM;
  p->seed = seed;
  for (int r = 0; r < R; ++r) p->tokens[r] = s->T;
}

void epx_fault_loop_alloc(epx_fault_loop *s, void *(*alloc)(size_t bytes),
                          void (*zero)(void *p, size_t bytes)) {
  size_t H = (size_t)s->H, K = (size_t)s->K, cap = (size_t)s->cap, el = (size_t)s->el;
  size_t ll_rows = el * (size_t)s->R * (size_t)s->llT;
  s->recv_x = alloc(cap * H * 2);
  s->recv_topk = alloc(cap * K * 8);
  s->recv_w = alloc(cap * K * 4);
  s->src = alloc(cap * 4);
  s->prefix = alloc((size_t)s->R * 4);
  s->per_expert = alloc(el * 4);
  s->num_recv = alloc(4);
  s->comb_x = alloc(cap * H * 2);
  zero(s->comb_x, cap * H * 2);
  s->out_x = alloc((size_t)s->T * H * 2);
  s->ll_x = alloc(ll_rows * H * 2);
  zero(s->ll_x, ll_rows * H * 2);
  s->ll_count = alloc(el * 4);
  s->ll_src = alloc(ll_rows * 4);
  s->ll_range = alloc(el * (size_t)s->R * 8);
}

void epx_fault_loop_free(epx_fault_loop *s, void (*release)(void *p)) {
  void *bufs[] = {s->recv_x,   s->recv_topk, s->recv_w, s->src,  s->prefix,   s->per_expert,
                  s->num_recv, s->comb_x,    s->out_x,  s->ll_x, s->ll_count, s->ll_src,
                  s->ll_range};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) release(bufs[i]);
  epx_test_world_free(&s->w);
}

epxResult_t epx_fault_loop_call(epx_fault_loop *s, int op) {
  epxStream_t stream = s->stream;
  call_shape c = {s->T, s->H, s->K, epxInt64};
  if (op == EPX_FAULT_NOTIFY) {
    epxDispatchArgs_t a = dispatch_args(c, s->x, s->topk, s->weights);
    int64_t n = 0;
    return epxDispatchNotify(s->comm, &a, s->h, &n, NULL, stream);
  }
  if (op == EPX_FAULT_DISPATCH || op == EPX_FAULT_WORST) {
    epxDispatchArgs_t a = dispatch_args(c, s->x, s->topk, s->weights);
    if (op == EPX_FAULT_WORST) a.num_worst_tokens = s->cap;
    epxDispatchOutputs_t o = {s->recv_x, NULL,          s->recv_topk, s->recv_w, s->src,
                              s->prefix, s->per_expert, s->num_recv,  s->cap};
    return epxDispatch(s->comm, &a, op == EPX_FAULT_WORST ? s->hw : s->h, &o, stream);
  }
  if (op == EPX_FAULT_COMBINE) {
    epxCombineArgs_t a = combine_args(c, s->comb_x, NULL, NULL);
    epxCombineOutputs_t o = {s->out_x, NULL};
    return epxCombine(s->comm, &a, s->h, &o, stream);
  }
  if (op == EPX_FAULT_LL_DISPATCH) {
    epxLowLatencyDispatchArgs_t a = ll_dispatch_args(c, s->x, s->topk);
    epxLowLatencyDispatchOutputs_t o = {s->ll_x, NULL, s->ll_count, s->ll_src, s->ll_range};
    return epxLowLatencyDispatch(s->comm, &a, s->h, &o, stream);
  }
  epxLowLatencyCombineArgs_t a = ll_combine_args(c, s->ll_x, s->topk, s->weights);
  return epxLowLatencyCombine(s->comm, &a, s->h, s->out_x, stream);
}

int epx_fault_loop_prepare(epx_fault_loop *s, int first, epxResult_t (*op)(epx_fault_loop *, int)) {
  epxResult_t res = epxSuccess;
  if (first == EPX_FAULT_DISPATCH || first == EPX_FAULT_COMBINE) res = op(s, EPX_FAULT_NOTIFY);
  if (res == epxSuccess && first == EPX_FAULT_COMBINE) res = op(s, EPX_FAULT_DISPATCH);
  if (res == epxSuccess && first == EPX_FAULT_LL_COMBINE) res = op(s, EPX_FAULT_LL_DISPATCH);
  if (res != epxSuccess) {
    fprintf(stderr, "  rank %d: set-up call failed: %s: %s\n", s->rank, epxGetErrorString(res),
            epxCommGetLastError(s->comm));
    return 1;
  }
  return 0;
}

void epx_fault_loop_out_bytes(const epx_fault_loop *s, size_t *recv_x, size_t *out_x,
                              size_t *ll_x) {
  *recv_x = (size_t)s->cap * (size_t)s->H * 2;
  *out_x = (size_t)s->T * (size_t)s->H * 2;
  *ll_x = (size_t)s->el * (size_t)s->R * (size_t)s->llT * (size_t)s->H * 2;
}

void epx_fault_loop_destroy(epx_fault_loop *s) {
  epx_fault_slot *me = &B->r[s->rank];
  double t0 = epx_test_now();
  epxHandleDestroy(s->h);
  if (s->hw) epxHandleDestroy(s->hw);
  if (epxCommDestroy(s->comm) != epxSuccess) epx_fault_note(s->rank, "epxCommDestroy failed");
  me->destroy_s = epx_test_now() - t0;
  if (me->destroy_s > 1.0) epx_fault_note(s->rank, "epxCommDestroy took %.3f s", me->destroy_s);
}

/* ------------------------------------------------------------ R1 / R2 / R4 */

int epx_fault_runs(int default_runs) {
  int runs = default_runs;
  const char *e = getenv("EPX_FAULT_RUNS");
  if (e && *e) runs = atoi(e);
  if (runs < 1) runs = 1;
  return runs;
}

int epx_fault_names_rank(const char *msg, int v) {
  char a[48], b[48], c[48];
  snprintf(a, sizeof a, "rank %d (pid", v);
  snprintf(b, sizeof b, "lost rank %d ", v);
  snprintf(c, sizeof c, "waiting for rank %d ", v);
  return strstr(msg, a) || strstr(msg, b) || strstr(msg, c);
}

/* Records the error a loop of fc->op ended with and checks it. */
static void loop_ended(int rank, const epx_fault_case *fc, const char *op_name, epxResult_t res,
                       epxComm_t comm, int (*names)(const char *msg, int v)) {
  epx_fault_slot *me = &B->r[rank];
  me->t_err = epx_test_now();
  me->result = (int)res;
  snprintf(me->msg, sizeof me->msg, "%s", epxCommGetLastError(comm));
  if (res == epxSuccess) {
    epx_fault_note(rank, "%s loop ended without an error (%d iterations)", op_name, me->iters);
  } else if (res != epxPeerFailed && res != epxTimeout) {
    epx_fault_note(rank, "%s returned %s, expected peer failed or timeout: %s", op_name,
                   epxGetErrorString(res), me->msg);
  } else if (rank != fc->victim && !names(me->msg, fc->victim)) {
    epx_fault_note(rank, "the message does not name rank %d: %s", fc->victim, me->msg);
  }
}

/* The call after the error must fail at once with the same code. */
static void expect_sticky(int rank, epxResult_t res, epxResult_t again, double again_s) {
  if (res != epxSuccess && (again != res || again_s > 0.1))
    epx_fault_note(rank, "the call after the error returned %s in %.3f s, expected %s at once",
                   epxGetErrorString(again), again_s, epxGetErrorString(res));
}

void epx_fault_loop_to_error(epx_fault_loop *s, const epx_fault_case *fc,
                             const epx_fault_backend *be) {
  int rank = s->rank, victim = rank == fc->victim;
  epx_fault_slot *me = &B->r[rank];
  atomic_store(&me->ready, 1);
  epxResult_t res = epxSuccess;
  double limit = epx_test_now() + be->loop_s;
  while (!atomic_load(&B->stop) && epx_test_now() < limit) {
    res = be->op(s, fc->op);
    me->iters++;
    if (res != epxSuccess) break;
  }
  loop_ended(rank, fc, epx_fault_op_names[fc->op], res, s->comm, be->names);
  /* The next call fails at once with the sticky code. */
  double t0 = epx_test_now();
  epxResult_t again = epx_fault_loop_call(s, fc->op);
  expect_sticky(rank, res, again, epx_test_now() - t0);
  if (be->after_error) be->after_error(rank);
  unsigned char *snap = NULL;
  if (fc->stop && !victim) snap = be->snapshot(s);
  atomic_store(&me->done, 1);
  if (fc->stop && !victim) {
    /* Keep the communicator (and its memory) while the stopped rank resumes. */
    if (epx_fault_wait_flag(&B->release, be->release_s)) epx_fault_note(rank, "never released");
    unsigned char *now = be->snapshot(s);
    size_t a, b, c;
    epx_fault_loop_out_bytes(s, &a, &b, &c);
    if (memcmp(now, snap, a + b + c) != 0)
      epx_fault_note(rank, "outputs changed after this rank's error, while the resumed rank ran");
    free(now);
    free(snap);
  }
}

void epx_fault_inject(const epx_fault_case *fc, const pid_t *pids, int R, double grace_s) {
  pid_t v = pids[fc->victim];
  epx_fault_sleep(fc->delay_s);
  B->t_fault = epx_test_now();
  if (!fc->stop) {
    kill(v, SIGKILL);
    epx_fault_wait_ranks(epx_fault_done_of, R, fc->victim, grace_s);
    atomic_store(&B->stop, 1);
    return;
  }
  kill(v, SIGSTOP);
  /* Stopped for longer than the hard timeout: until every survivor failed. */
  epx_fault_wait_ranks(epx_fault_done_of, R, fc->victim, fc->timeout_ms / 1000.0 + grace_s);
  epx_fault_sleep(0.2);
  B->r[fc->victim].extra_s = epx_test_now(); /* resume time */
  kill(v, SIGCONT);
  epx_fault_wait_flag(epx_fault_done_of(fc->victim), grace_s);
  atomic_store(&B->release, 1);
  atomic_store(&B->stop, 1);
}

int epx_fault_r1_judge(epx_fault_r1_figures *fig, const epx_fault_case *fc, const char *op_name,
                       int run, int R, const int *st, int hangs, double slack_s) {
  fig->injected++;
  int ok = hangs == 0 && epx_fault_killed_by(st[fc->victim], SIGKILL);
  if (hangs > 0) fig->hangs += hangs;
  for (int r = 0; r < R; ++r) {
    if (r == fc->victim) continue;
    ok &= epx_fault_exited_ok(st[r]) && !B->r[r].bad;
    double tte = B->r[r].t_err - B->t_fault;
    if (B->r[r].result != epxSuccess) {
      epx_fault_sample(&fig->tte, tte);
      epx_fault_sample(&fig->per_op[fc->op], tte);
      epx_fault_sample(&fig->destroy, B->r[r].destroy_s);
    }
    if (tte > 2.0 + slack_s) {
      if (slack_s > 0)
        fprintf(stderr, "  rank %d: error %.3f s after the kill (limit 2 s + %.1f s slack)\n", r,
                tte, slack_s);
      else
        fprintf(stderr, "  rank %d: error %.3f s after the kill (limit 2 s)\n", r, tte);
      ok = 0;
    }
  }
  if (ok) {
    fig->survived++;
    return 1;
  }
  printf("FAIL r1 %s run %d: victim rank %d, delay %.4f s, seed %" PRIu64 "\n", op_name, run,
         fc->victim, fc->delay_s, fc->seed);
  for (int r = 0; r < R; ++r)
    fprintf(stderr, "  rank %d: status 0x%x, %s, %d iterations: %s\n", r, st[r],
            epxGetErrorString((epxResult_t)B->r[r].result), B->r[r].iters, B->r[r].msg);
  return 0;
}

int epx_fault_r2_judge(epx_fault_r2_figures *fig, const epx_fault_case *fc, const char *op_name,
                       int R, const int *st, int hangs, double resumed_limit_s) {
  fig->injected++;
  int ok = hangs == 0;
  for (int r = 0; r < R; ++r) {
    ok &= epx_fault_exited_ok(st[r]) && !B->r[r].bad;
    if (r == fc->victim) {
      double after = B->r[r].t_err - B->r[r].extra_s;
      epx_fault_sample(&fig->resumed_err, after);
      if (after > resumed_limit_s || B->r[r].result == epxSuccess) {
        fprintf(stderr, "  resumed rank %d: %s %.3f s after SIGCONT\n", r,
                epxGetErrorString((epxResult_t)B->r[r].result), after);
        ok = 0;
      }
      continue;
    }
    double over = B->r[r].t_err - B->t_fault - fc->timeout_ms / 1000.0;
    epx_fault_sample(&fig->over, over);
    /* A survivor may have begun waiting just before the stop. */
    if (over < -0.1 || over > 1.0) {
      fprintf(stderr, "  rank %d: failed %.3f s after the stop; the timeout is %.3f s\n", r,
              B->r[r].t_err - B->t_fault, fc->timeout_ms / 1000.0);
      ok = 0;
    }
  }
  if (ok) {
    fig->survived++;
    return 1;
  }
  printf("FAIL r2_stop_%s: victim rank %d, seed %" PRIu64 "\n", op_name, fc->victim, fc->seed);
  for (int r = 0; r < R; ++r)
    fprintf(stderr, "  rank %d: status 0x%x, %s: %s\n", r, st[r],
            epxGetErrorString((epxResult_t)B->r[r].result), B->r[r].msg);
  return 0;
}

void epx_fault_kill_peers(const pid_t *pids, int *status, int R) {
  for (int r = 1; r < R; ++r) kill(pids[r], SIGKILL);
  for (int r = 1; r < R; ++r) waitpid(pids[r], &status[r], 0); /* reaped: certainly gone */
  atomic_store(&B->release, 1);
}

static void *notify_thread(void *loop) {
  epx_fault_loop_call(loop, EPX_FAULT_NOTIFY); /* never returns before the process exits */
  return NULL;
}

void epx_fault_exit_with_notify_in_flight(epx_fault_loop *s) {
  pthread_t th;
  pthread_create(&th, NULL, notify_thread, s);
  epx_fault_sleep(0.2);
  B->t_fault = epx_test_now();
  exit(0); /* with the notify in flight on the other thread */
}

double epx_fault_reap_exit(const pid_t *pids, int *status, double limit_s) {
  int st = 0;
  double end = epx_test_now() + limit_s;
  while (waitpid(pids[0], &st, WNOHANG) != pids[0] && epx_test_now() < end) epx_fault_sleep(0.001);
  double exit_s = epx_test_now() - B->t_fault;
  status[0] = st;
  if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
    fprintf(stderr, "  rank 0 ended with wait status 0x%x after exit(0)\n", st);
    exit_s = 1e9;
  }
  atomic_store(&B->release, 1);
  return exit_s;
}

/* ------------------------------------------------------------ exact sequence (R3, R12) */

void epx_fault_seq_r3(epx_fault_seq *sp, int timeout_ms) {
  memset(sp, 0, sizeof *sp);
  sp->R = 3;
  sp->el = 4;
  sp->H = 256;
  sp->K = 4;
  sp->maxT = 96;
  sp->llT = 96;
  for (int r = 0; r < sp->R; ++r) sp->tokens[r] = 96 - 17 * r;
  sp->routing = EPX_ROUTING_UNIFORM;
  sp->payload = EPX_PAYLOAD_BF16;
  sp->seed = 303;
  sp->slow_rank = 2;
  sp->timeout_ms = timeout_ms;
  sp->slow_sleep_s = 0.8 * sp->timeout_ms / 1000.0;
  sp->repeats = 1;
}

void epx_fault_seq_random(epx_fault_seq *sp, uint64_t seed, int timeout_ms) {
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
  sp->timeout_ms = timeout_ms;
  sp->repeats = 2;
}

void epx_fault_seq_problem(const epx_fault_seq *sp, epx_test_problem *p) {
  memset(p, 0, sizeof *p);
  p->nranks = sp->R;
  p->num_experts = sp->R * sp->el;
  p->hidden = sp->H;
  p->num_topk = sp->K;
  p->routing = sp->routing;
  p->seed = sp->seed;
  for (int r = 0; r < sp->R; ++r) p->tokens[r] = sp->tokens[r];
}

void epx_fault_seq_before_call(const epx_fault_seq *sp, int rank) {
  if (rank == sp->slow_rank) epx_fault_sleep(sp->slow_sleep_s);
}

uint64_t epx_fault_fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

void epx_fault_pass_init(epx_fault_pass *ps, const epx_fault_seq *sp, int rank,
                         const epx_test_world *w, const epx_test_world *wl) {
  memset(ps, 0, sizeof *ps);
  int R = sp->R, el = sp->el, H = sp->H, K = sp->K, T = sp->tokens[rank];
  ps->R = R;
  ps->el = el;
  ps->H = H;
  ps->K = K;
  ps->T = T;
  ps->fp8 = sp->payload != EPX_PAYLOAD_BF16;
  ps->it = sp->int32 ? epxInt32 : epxInt64;
  ps->ie = sp->int32 ? 4 : 8;
  ps->xrow = ps->fp8 ? (size_t)H : (size_t)H * 2;
  ps->srow = ps->fp8 ? epx_scale_row_bytes(H, (int)sp->payload) : 0;
  /* references, all computed before the first call */
  epx_ref_dispatch_opts ro = {ps->fp8 ? epxFloat8E4M3 : epxBFloat16,
                              (epxScaleFormat_t)(ps->fp8 ? (int)sp->payload : 0), sp->align, 0};
  for (int r = 0; r < R; ++r) epx_ref_dispatch(&w->ref, r, &ro, &ps->ref[r]);
  ps->worst = (int64_t)R * sp->maxT;
  epx_ref_dispatch_opts row_ = ro;
  row_.num_worst_tokens = ps->worst;
  epx_ref_dispatch(&w->ref, rank, &row_, &ps->refw);
  ps->N = ps->ref[rank].num_recv;
  ps->cap = ps->N + 1;
  ps->rows = ps->worst > ps->cap ? ps->worst : ps->cap;
  /* combine inputs of every rank */
  for (int r = 0; r < R; ++r) {
    int64_t n = ps->ref[r].num_recv;
    ps->cx[r] = epx_test_xaligned((size_t)(n + 1) * H * 2);
    ps->cw[r] = epx_test_xaligned((size_t)(n + 1) * K * 4);
    epx_test_fill_bf16_wide(sp->seed * 5 + 3, r, n, H, ps->cx[r]);
    epx_test_fill_f32_tagged(sp->seed * 5 + 4, r, n, K, ps->cw[r]);
  }
  ps->bias = epx_test_xaligned((size_t)(T + 1) * H * 2);
  epx_test_fill_bf16_tagged(sp->seed * 5 + 5, 100 + rank, T, H, ps->bias);
  ps->exp_cx = epx_test_xaligned((size_t)(T + 1) * H * 2);
  ps->exp_cw = epx_test_xaligned((size_t)(T + 1) * K * 4);
  ps->with_bias = (int)(sp->seed & 1);
  epx_ref_combine_inputs ci = {(const uint16_t *const *)ps->cx,
                               (const float *const *)ps->cw,
                               {ps->with_bias ? ps->bias : NULL, NULL}};
  epx_ref_combine(&w->ref, rank, &ci, ps->exp_cx, ps->exp_cw);
  /* low latency */
  epx_ref_ll_opts lo = {sp->llT, sp->ll_fp8, sp->ll_round, sp->ll_ue8m0};
  epx_ref_ll_dispatch(&wl->ref, rank, &lo, &ps->lref);
  ps->rpe = (int64_t)R * sp->llT;
  ps->lrows = (int64_t)el * ps->rpe;
  ps->lxrow = sp->ll_fp8 ? (size_t)H : (size_t)H * 2;
  ps->lsrow = sp->ll_fp8 ? epx_scale_row_bytes(H, sp->ll_ue8m0 ? 2 : 1) : 0;
  for (int r = 0; r < R; ++r) {
    ps->lout[r] = epx_test_xaligned((size_t)ps->lrows * H * 2);
    epx_test_poison(ps->lout[r], (size_t)ps->lrows * H * 2);
    for (int e = 0; e < el; ++e) {
      /* rows of global expert r*el+e: tokens listing it, once per token */
      int64_t n = 0;
      for (int s = 0; s < R; ++s)
        for (int t = 0; t < sp->tokens[s]; ++t)
          n += epx_ref_token_has_expert(&wl->ref, s, t, (int64_t)r * el + e);
      epx_test_fill_bf16_wide(sp->seed * 5 + 6, r * 4096 + e, n, H,
                              ps->lout[r] + (size_t)e * ps->rpe * H);
    }
  }
  ps->exp_lx = epx_test_xaligned((size_t)(T + 1) * H * 2);
  epx_ref_ll_combine(&wl->ref, rank, sp->llT, (const uint16_t *const *)ps->lout, wl->weights[rank],
                     ps->exp_lx);
}

void epx_fault_pass_free(epx_fault_pass *ps) {
  for (int r = 0; r < ps->R; ++r) {
    epx_ref_dispatch_free(&ps->ref[r]);
    free(ps->cx[r]);
    free(ps->cw[r]);
    free(ps->lout[r]);
  }
  epx_ref_dispatch_free(&ps->refw);
  epx_ref_ll_free(&ps->lref);
  free(ps->bias);
  free(ps->exp_cx);
  free(ps->exp_cw);
  free(ps->exp_lx);
}

static call_shape pass_shape(const epx_fault_pass *ps) {
  call_shape c = {ps->T, ps->H, ps->K, ps->it};
  return c;
}

epxDispatchArgs_t epx_fault_dispatch_args(const epx_fault_seq *sp, const epx_fault_pass *ps,
                                          const void *x, const void *scales, const void *topk,
                                          const float *weights) {
  epxDispatchArgs_t a = dispatch_args(pass_shape(ps), x, topk, weights);
  a.x_type = ps->fp8 ? epxFloat8E4M3 : epxBFloat16;
  a.x_scales = scales;
  a.scale_format = (epxScaleFormat_t)(ps->fp8 ? (int)sp->payload : 0);
  a.expert_alignment = sp->align;
  return a;
}

epxCombineArgs_t epx_fault_combine_args(const epx_fault_pass *ps, const void *x,
                                        const float *weights, const void *bias) {
  return combine_args(pass_shape(ps), x, weights, bias);
}

epxLowLatencyDispatchArgs_t epx_fault_ll_dispatch_args(const epx_fault_seq *sp,
                                                       const epx_fault_pass *ps, const void *x,
                                                       const void *topk) {
  epxLowLatencyDispatchArgs_t la = ll_dispatch_args(pass_shape(ps), x, topk);
  la.use_fp8 = sp->ll_fp8;
  la.round_scale = sp->ll_round;
  la.use_ue8m0 = sp->ll_ue8m0;
  return la;
}

epxLowLatencyCombineArgs_t epx_fault_ll_combine_args(const epx_fault_pass *ps, const void *x,
                                                     const void *topk, const float *weights) {
  return ll_combine_args(pass_shape(ps), x, topk, weights);
}

int epx_fault_seq_notify(const epx_fault_seq *sp, const epx_fault_pass *ps, int rank,
                         epxComm_t comm, const epxDispatchArgs_t *a, epxHandle_t h, int *cnt,
                         epxStream_t stream, uint64_t *hash) {
  int64_t n = -7;
  epx_test_poison(cnt, (size_t)ps->el * 4);
  epx_fault_seq_before_call(sp, rank);
  if (epx_fault_expect_success(rank, comm, epxDispatchNotify(comm, a, h, &n, cnt, stream),
                               "epxDispatchNotify"))
    return 1;
  if (n != ps->N) {
    epx_fault_note(rank, "notify: N_recv %" PRId64 ", expected %" PRId64, n, ps->N);
    return 1;
  }
  int f = epx_fault_compare(rank, "notify per-expert counts", EPX_ELEM_I32,
                            ps->ref[rank].num_recv_tokens_per_expert, cnt, 1, ps->el);
  *hash = epx_fault_fnv(*hash, cnt, (size_t)ps->el * 4);
  return f;
}

/* R3: the wait statistics of a rank that waited for the slow one name it in
 * each of the 6 calls, at least the soft timeout long (into extra_s / extra2_s). */
static int r3_check_wait_stats(const epx_fault_seq *sp, int rank, epxComm_t comm) {
  epx_fault_slot *me = &B->r[rank];
  epxPeerWaitStats_t st;
  if (epxCommGetPeerWaitStats(comm, sp->slow_rank, &st) != epxSuccess) {
    epx_fault_note(rank, "epxCommGetPeerWaitStats: %s", epxCommGetLastError(comm));
    return 1;
  }
  me->extra_s = (double)st.slow_waits;
  me->extra2_s = (double)st.longest_wait_ns / 1e9;
  const int64_t soft_ns = (int64_t)sp->soft_timeout_ms * 1000000;
  if (st.slow_waits < 6 || st.longest_wait_ns < soft_ns || st.last_slow_seq == 0) {
    epx_fault_note(rank,
                   "wait statistics of rank %d: %llu slow waits (want >= 6), longest %.0f ms (want "
                   ">= %d), last call %llu",
                   sp->slow_rank, (unsigned long long)st.slow_waits, (double)st.longest_wait_ns / 1e6,
                   sp->soft_timeout_ms, (unsigned long long)st.last_slow_seq);
    return 1;
  }
  return 0;
}

int epx_fault_seq_repeat(const epx_fault_seq *sp, int rank, epxComm_t comm,
                         epx_fault_pass_fn pass) {
  epx_fault_slot *me = &B->r[rank];
  epx_test_problem p;
  epx_fault_seq_problem(sp, &p);
  epx_test_world w, wl;
  epx_test_world_init(&w, &p, !sp->int32, sp->payload, sp->seed * 3 + 1);
  int two = sp->payload != EPX_PAYLOAD_BF16;
  if (two) epx_test_world_init(&wl, &p, !sp->int32, EPX_PAYLOAD_BF16, sp->seed * 3 + 2);
  atomic_store(&me->ready, 1);
  int f = 0;
  uint64_t first = 0;
  for (int rep = 0; rep < sp->repeats && !f; ++rep) {
    uint64_t hsh = EPX_FAULT_FNV_BASIS;
    f |= pass(sp, rank, comm, &w, two ? &wl : &w, &hsh);
    if (!f && rep == 0) first = hsh;
    if (!f && rep > 0 && hsh != first) {
      epx_fault_note(rank,
                     "repeat %d differs from the first run (output hash %016" PRIx64
                     " vs %016" PRIx64 ")",
                     rep, hsh, first);
      f = 1;
    }
    me->iters++;
  }
  epxResult_t async = epxSuccess;
  epxCommGetAsyncError(comm, &async);
  if (async != epxSuccess) epx_fault_note(rank, "sticky error %s", epxGetErrorString(async));
  if (sp->slow_rank >= 0 && rank != sp->slow_rank) f |= r3_check_wait_stats(sp, rank, comm);
  if (epxCommDestroy(comm) != epxSuccess) epx_fault_note(rank, "epxCommDestroy failed");
  epx_test_world_free(&w);
  if (two) epx_test_world_free(&wl);
  return f;
}

static const char *const routing_names[] = {"uniform", "skewed-90%", "all-minus-1", "random-dup"};
static const char *const payload_names[] = {"bf16", "fp8+f32", "fp8+ue8m0"};

int epx_fault_soak_seed(const epx_fault_seq *sp, const char *label, epx_test_rank_fn seq_rank,
                        double limit_s, epx_fault_soak_figures *fig) {
  int st[EPX_FAULT_MAX_RANKS];
  double t1 = epx_test_now();
  int hangs = epx_fault_run(sp->R, seq_rank, (void *)sp, NULL, NULL, limit_s, st, 0);
  int ok = hangs == 0 && epx_fault_all_ok(st, sp->R);
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
  fig->seeds++;
  fig->calls += sp->R * sp->repeats * 6;
  return ok;
}

int epx_fault_soak(double default_budget_s, int timeout_ms, epx_test_rank_fn seq_rank,
                   double limit_s, epx_fault_soak_figures *fig) {
  uint64_t base;
  const char *e = getenv("EPX_SOAK_SEED");
  if (e && *e)
    base = strtoull(e, NULL, 0);
  else
    base = (uint64_t)time(NULL) % 1000000;
  double budget = default_budget_s;
  const char *b = getenv("EPX_SOAK_SECONDS");
  if (b && *b) budget = atof(b);
  printf("r12 soak: first seed %" PRIu64 " (EPX_SOAK_SEED=%" PRIu64 " reproduces), budget %.0f s\n",
         base, base, budget);
  double t0 = epx_test_now();
  int fails = 0, seeds = 0;
  for (uint64_t s = base; fails == 0; ++s) {
    if (seeds >= 4 && epx_test_now() - t0 > budget) break;
    if (seeds >= 400) break;
    epx_fault_seq sp;
    epx_fault_seq_random(&sp, s, timeout_ms);
    char label[48];
    snprintf(label, sizeof label, "r12_seed_%" PRIu64, s);
    if (!epx_fault_soak_seed(&sp, label, seq_rank, limit_s, fig)) fails++;
    ++seeds;
  }
  return fails != 0;
}

/* ------------------------------------------------------------ R3 warnings */

int epx_fault_capture_begin(char *path, size_t n) {
  setenv("EPX_DEBUG", "WARN", 1);
  snprintf(path, n, "/tmp/epx-faults-%d-XXXXXX", (int)getpid());
  int fd = mkstemp(path);
  if (fd < 0) {
    path[0] = 0;
    return -1;
  }
  fflush(stderr);
  int saved = dup(2);
  dup2(fd, 2);
  close(fd);
  return saved;
}

/* Restores stderr, counts the captured soft-timeout warnings that name rank
 * `slow` (" epx WARN ", "waiting", "for rank <slow> "; the first is echoed),
 * replays every other line, removes the file. */
static int capture_end(const char *path, int saved, int slow) {
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  FILE *fp = fopen(path, "r");
  if (!fp) return 0;
  char line[2048], want[48];
  snprintf(want, sizeof want, "for rank %d ", slow);
  int count = 0;
  while (fgets(line, sizeof line, fp)) {
    if (strstr(line, " epx WARN ") && strstr(line, "waiting") && strstr(line, want)) {
      if (count++ == 0) fprintf(stderr, "  (captured) %s", line);
    } else if (!strstr(line, " epx WARN ")) {
      fputs(line, stderr); /* what the rank printed, warnings aside */
    }
  }
  fclose(fp);
  unlink(path);
  return count;
}

void epx_fault_r3_end(const epx_fault_seq *sp, int rank, const char *path, int saved) {
  if (saved < 0) return;
  epx_fault_slot *me = &B->r[rank];
  me->warnings = capture_end(path, saved, sp->slow_rank);
  if (rank != sp->slow_rank && me->warnings < 6)
    epx_fault_note(rank, "%d soft-timeout warnings name rank %d, expected >= 6", me->warnings,
                   sp->slow_rank);
}
