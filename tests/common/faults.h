/*
 * faults.h - the fault-injection world of the fault tests and its figures:
 * what tests/mp/test_faults.c (host backend) and tests/cuda/test_cuda_faults.c
 * (CUDA backend) share; each keeps its backend's buffers and calls.
 *
 *  - The board: a page of shared memory with one slot per rank (flags, the
 *    error a rank saw, its timings) and the flags the controlling process
 *    raises. Ranks are forked by epx_fault_run (not by epx_test_spawn) so
 *    that this process can kill, stop and resume them; they report here.
 *  - R1 / R2 / R4: a rank looping one op (its buffers are the backend's),
 *    the end of that loop, the injection (SIGKILL, or SIGSTOP past the hard
 *    timeout then SIGCONT), the judgement of a run, and R4's kill / exit.
 *  - Figures: samples with their median and worst.
 *  - The exact sequence of R3 and R12 (notify, dispatch, combine, worst-case
 *    dispatch, LL dispatch, LL combine): its parameters, the soak's random
 *    draw, and one rank's pass: shapes, the reference's outputs and the
 *    combine inputs, on the host.
 */
#ifndef EPX_TESTS_FAULTS_H
#define EPX_TESTS_FAULTS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/harness.h"
#include "common/world.h"
#include "epx.h"
#include "reference/reference.h"

#define EPX_FAULT_MAX_RANKS 8
#define EPX_FAULT_MSG_BYTES 400

/* ------------------------------------------------------------ the board */

typedef struct epx_fault_slot {
  atomic_int ready; /* set up and looping */
  atomic_int done;  /* finished its checks (error recorded) */
  int result;       /* first failing result of the loop; 0 if none */
  int bad;          /* own checks failed */
  int iters;
  int fresh_ok;     /* CUDA R1: the survivors' fresh communicator was exact */
  int warnings;     /* R3: soft-timeout warnings naming the slow rank */
  double t_err;     /* CLOCK_MONOTONIC seconds of the error */
  double destroy_s; /* duration of epxCommDestroy */
  double extra_s;   /* scenario specific figures */
  double extra2_s;
  char msg[EPX_FAULT_MSG_BYTES];
} epx_fault_slot;

typedef struct epx_fault_board {
  atomic_int stop, release;
  double t_fault; /* when this process injected the fault */
  int have_id2;   /* id2 is a fresh unique id (for the survivors' new communicator) */
  epxUniqueId id2;
  epx_fault_slot r[EPX_FAULT_MAX_RANKS];
} epx_fault_board;

/* Maps a zeroed board shared with the processes forked after it, and makes it
 * the board of every function below. NULL (after perror) on failure. */
epx_fault_board *epx_fault_board_map(void);

/* The start of a fault test's main: maps the board, ignores SIGPIPE, counts
 * the epx segments in /dev/shm into *segs_before, seeds *rng from
 * EPX_FAULT_SEED (else the clock) and prints the seed. NULL when the board
 * cannot be mapped. */
epx_fault_board *epx_fault_begin(epx_test_rng *rng, int *segs_before);
/* Its end: 1, after a FAIL line, when more epx segments are in /dev/shm than
 * segs_before (a negative count, /dev/shm unreadable, checks nothing). */
int epx_fault_segments_left(int segs_before);

/* Prints "  rank <rank>: <message>" to stderr and marks the rank's slot bad. */
void epx_fault_note(int rank, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* 0 on epxSuccess; otherwise prints the call, the result and the library's
 * message (epx_test_expect_success), marks the rank bad and returns 1. */
int epx_fault_expect_success(int rank, epxComm_t comm, epxResult_t res, const char *what);
/* epx_test_rank_compare that marks the rank bad on a difference; 1 then. */
int epx_fault_compare(int rank, const char *what, epx_test_elem e, const void *exp, const void *got,
                      int64_t rows, int64_t cols);

void epx_fault_sleep(double s);
/* Waits until *f is nonzero; 0 on success, 1 after limit_s. */
int epx_fault_wait_flag(atomic_int *f, double limit_s);
/* Waits for flag(r) of every rank r but `except` (-1: none), each within
 * limit_s; 1 as soon as one is late. */
int epx_fault_wait_ranks(atomic_int *(*flag)(int), int R, int except, double limit_s);
atomic_int *epx_fault_ready_of(int r);
atomic_int *epx_fault_done_of(int r);

/* ------------------------------------------------------------ the ranks */

/* Injects faults into the running ranks; status[r] is -1 while rank r runs,
 * and a controller that reaps a rank itself stores its wait status there. */
typedef void (*epx_fault_controller_fn)(void *ctx, const pid_t *pids, int *status, int R);

/* Clears the board, makes a unique id (and with want_id2 a second one in the
 * board's id2), forks R ranks running exit(fn(...) ? 1 : 0), lets ctl (if any)
 * inject faults, then reaps every rank within limit_s of the fork, killing
 * the rest (SIGKILL, then SIGCONT for a stopped one). status[r] is each wait
 * status. Returns the number of ranks killed at the limit (hangs), or -1 when
 * the ranks could not be started. */
int epx_fault_run(int R, epx_test_rank_fn fn, void *arg, epx_fault_controller_fn ctl, void *ctx,
                  double limit_s, int *status, int want_id2);

int epx_fault_exited_ok(int st);
int epx_fault_killed_by(int st, int sig);
/* 1 when every rank exited with status 0 and its slot is not marked bad. */
int epx_fault_all_ok(const int *st, int R);

/* ------------------------------------------------------------ figures */

#define EPX_FAULT_MAX_SAMPLES 4096

typedef struct epx_fault_samples {
  int n;
  double v[EPX_FAULT_MAX_SAMPLES];
} epx_fault_samples;

void epx_fault_sample(epx_fault_samples *s, double v);
double epx_fault_median(epx_fault_samples *s);    /* sorts; 0 without samples */
double epx_fault_max(const epx_fault_samples *s); /* 0 without samples */

/* ------------------------------------------------------------ R1 / R2 / R4 */

/* The ops a rank loops on. R1 kills in the first five. */
enum {
  EPX_FAULT_NOTIFY,
  EPX_FAULT_DISPATCH,
  EPX_FAULT_COMBINE,
  EPX_FAULT_LL_DISPATCH,
  EPX_FAULT_LL_COMBINE,
  EPX_FAULT_WORST, /* worst-case dispatch, on its own handle */
  EPX_FAULT_OPS
};
#define EPX_FAULT_R1_OPS 5
extern const char *const epx_fault_op_names[EPX_FAULT_OPS];

/* One rank's state for calling any op over and over; outputs are not
 * checked. Its buffers are host memory on the host backend and device memory
 * on the CUDA one. */
typedef struct epx_fault_loop {
  epx_test_world w; /* every rank's inputs, on the host */
  epxComm_t comm;
  epxHandle_t h, hw;  /* hw: the worst-case dispatch's own handle (NULL: none) */
  epxStream_t stream; /* where the ops are issued (NULL on the host backend) */
  int rank, R, el, H, K, T, llT;
  int64_t cap;    /* R * T */
  void *x, *topk; /* this rank's inputs where the backend reads them */
  float *weights;
  void *recv_x, *recv_topk;
  float *recv_w;
  int *src, *prefix, *per_expert, *num_recv;
  void *comb_x, *out_x, *ll_x;
  int *ll_count, *ll_src;
  int64_t *ll_range;
} epx_fault_loop;

/* Clears s and sets its shape: 4 experts per rank, H 512, top-4, 256 tokens
 * on every rank (LL max tokens too); *p is that problem on R ranks, uniform
 * routing from seed. */
void epx_fault_loop_init(epx_fault_loop *s, epx_test_problem *p, int rank, int R, uint64_t seed);
/* Allocates the output buffers with alloc and zeroes the ops' inputs among
 * them (comb_x, ll_x) with zero. */
void epx_fault_loop_alloc(epx_fault_loop *s, void *(*alloc)(size_t bytes),
                          void (*zero)(void *p, size_t bytes));
/* Frees the output buffers with release, then the world. */
void epx_fault_loop_free(epx_fault_loop *s, void (*release)(void *p));
/* Issues one op on s->stream (no synchronisation). */
epxResult_t epx_fault_loop_call(epx_fault_loop *s, int op);
/* Runs, through op, the ops that `first` needs before it (notify before
 * dispatch and combine, dispatch before combine, LL dispatch before LL
 * combine). 0 on success; prints the failure. */
int epx_fault_loop_prepare(epx_fault_loop *s, int first, epxResult_t (*op)(epx_fault_loop *, int));
/* Bytes of the outputs the ops write (BF16): recv_x [cap, H], out_x [T, H],
 * ll_x [el * R * llT, H]. */
void epx_fault_loop_out_bytes(const epx_fault_loop *s, size_t *recv_x, size_t *out_x, size_t *ll_x);
/* Destroys the loop's handles and communicator, timed into the rank's
 * destroy_s; noted when it fails or takes more than 1 s. */
void epx_fault_loop_destroy(epx_fault_loop *s);

typedef struct epx_fault_case {
  int op;
  int victim;
  int stop; /* 0: SIGKILL; 1: SIGSTOP for longer than the hard timeout, then SIGCONT */
  int timeout_ms;
  double delay_s;
  uint64_t seed;
} epx_fault_case;

typedef struct epx_fault_r1_figures {
  int injected, survived, hangs;
  epx_fault_samples tte; /* seconds, every survivor of every run */
  epx_fault_samples per_op[EPX_FAULT_R1_OPS];
  epx_fault_samples destroy;
} epx_fault_r1_figures;

typedef struct epx_fault_r2_figures {
  int injected, survived;
  epx_fault_samples over;        /* survivor error time minus (stop time + timeout), seconds */
  epx_fault_samples resumed_err; /* resumed rank: error time minus resume time */
} epx_fault_r2_figures;

/* R1 runs per phase: EPX_FAULT_RUNS, else default_runs; at least 1. */
int epx_fault_runs(int default_runs);

/* 1 when the message names rank v as the cause: "rank v (pid", "lost rank v "
 * or "waiting for rank v ". */
int epx_fault_names_rank(const char *msg, int v);

/* What the R1 / R2 rank needs of its backend. */
typedef struct epx_fault_backend {
  epxResult_t (*op)(epx_fault_loop *s, int op); /* one op, completed */
  unsigned char *(*snapshot)(const epx_fault_loop *s); /* the outputs, copied to the host */
  void (*after_error)(int rank);        /* NULL, or a check once the error was seen */
  int (*names)(const char *msg, int v); /* the message names rank v as the cause */
  double loop_s;    /* the most a rank loops */
  double release_s; /* the most a survivor of a stop waits for release */
} epx_fault_backend;

/* The R1 / R2 rank between its set-up and its destroy: raises ready; loops
 * fc->op until it fails, stop is raised or loop_s passed; records the error
 * (time, result, message) in its slot and checks it: peer failed or timeout,
 * naming the victim on a survivor; the next call must fail at once with the
 * same code; after_error; raises done. A survivor of a stop snapshots its
 * outputs first, then keeps its communicator until release and checks that
 * they did not change meanwhile. */
void epx_fault_loop_to_error(epx_fault_loop *s, const epx_fault_case *fc,
                             const epx_fault_backend *be);

/* The controller's part once every rank loops: after fc->delay_s, SIGKILLs
 * the victim, waits (grace_s) for the survivors to finish, and raises stop;
 * or SIGSTOPs it until every survivor has failed (the timeout + grace_s at
 * most), resumes it (the resume time in its slot's extra_s), waits for it
 * (grace_s) and raises release and stop. The fault time goes to t_fault. */
void epx_fault_inject(const epx_fault_case *fc, const pid_t *pids, int R, double grace_s);

/* Judges an R1 run (run `run` of op op_name; st and hangs from epx_fault_run)
 * into fig: the victim killed by SIGKILL, every survivor exited clean and
 * failed within 2 s + slack_s of the kill. Prints the FAIL line and every
 * rank's state on failure. Returns 1 when the run passed. */
int epx_fault_r1_judge(epx_fault_r1_figures *fig, const epx_fault_case *fc, const char *op_name,
                       int run, int R, const int *st, int hangs, double slack_s);
/* Judges an R2 run into fig: every rank exited clean; the survivors failed
 * between the timeout - 0.1 s and the timeout + 1 s after the stop, the
 * resumed rank within resumed_limit_s of SIGCONT. Prints the FAIL line and
 * every rank's state on failure. Returns 1 when the run passed. */
int epx_fault_r2_judge(epx_fault_r2_figures *fig, const epx_fault_case *fc, const char *op_name,
                       int R, const int *st, int hangs, double resumed_limit_s);

/* R4 "destroy after the peers died": SIGKILLs and reaps ranks 1..R-1 (their
 * wait statuses in status), then raises release. */
void epx_fault_kill_peers(const pid_t *pids, int *status, int R);
/* R4 "exit with a call in flight", on the rank: starts a notify on another
 * thread (one that waits for a peer that never calls), and 0.2 s later (the
 * fault time in t_fault) exits with 0. */
__attribute__((noreturn)) void epx_fault_exit_with_notify_in_flight(epx_fault_loop *s);
/* R4 "exit with a call in flight", on the controller: waits (limit_s at
 * most) for rank 0 to end, stores its wait status and raises release.
 * Returns the seconds from t_fault to then, or 1e9 (said on stderr) when it
 * did not exit with 0. */
double epx_fault_reap_exit(const pid_t *pids, int *status, double limit_s);

/* ------------------------------------------------------------ exact sequence (R3, R12) */

typedef struct epx_fault_seq {
  int R, el, H, K, maxT, llT;
  int tokens[EPX_FAULT_MAX_RANKS];
  epx_test_routing routing;
  epx_test_payload payload;
  int int32, align;
  int ll_fp8, ll_round, ll_ue8m0;
  uint64_t seed;
  int slow_rank; /* R3: sleeps before every call; -1 = none */
  double slow_sleep_s;
  int timeout_ms;
  int soft_timeout_ms; /* R3: the soft timeout whose warnings it counts */
  int repeats;
} epx_fault_seq;

/* R3: rank 2 of 3 sleeps 80 % of timeout_ms before each call, once. */
void epx_fault_seq_r3(epx_fault_seq *sp, int timeout_ms);
/* R12: the random sequence of `seed` (shapes, skew, 0-token ranks, all -1,
 * duplicates, payloads, id types, alignment, LL formats), run twice. */
void epx_fault_seq_random(epx_fault_seq *sp, uint64_t seed, int timeout_ms);
void epx_fault_seq_problem(const epx_fault_seq *sp, epx_test_problem *p);
/* Sleeps when `rank` is the slow one. */
void epx_fault_seq_before_call(const epx_fault_seq *sp, int rank);

/* R3 warnings. Begin: turns on WARN logging (before the library reads its
 * parameters) and sends this process's stderr into a temporary file (path,
 * n >= 32 bytes); returns the saved stderr, or -1 when nothing is captured. */
int epx_fault_capture_begin(char *path, size_t n);
/* R3, after the sequence (comm destroyed, so every warning is logged):
 * restores stderr, counts into this rank's board slot (warnings) the
 * soft-timeout warnings that name the slow rank, replays every other line,
 * and, on the ranks that waited for the slow one, wants a warning naming it
 * for each of the 6 calls (notify, dispatch, combine, worst-case dispatch, LL
 * dispatch, LL combine). */
void epx_fault_r3_end(const epx_fault_seq *sp, int rank, const char *path, int saved);

#define EPX_FAULT_FNV_BASIS 0xcbf29ce484222325ull
uint64_t epx_fault_fnv(uint64_t h, const void *p, size_t n);

/* One rank's pass of the sequence: its shapes, the reference's outputs (all
 * computed before the first call) and every rank's combine inputs. */
typedef struct epx_fault_pass {
  int R, el, H, K, T, fp8;
  epxDataType_t it;                    /* topk id type */
  size_t ie, xrow, srow, lxrow, lsrow; /* bytes: id, payload row, scale row, LL rows */
  int64_t N, cap, worst, rows;         /* N_recv, N + 1, worst-case rows, max(cap, worst) */
  int64_t rpe, lrows;                  /* LL rows per expert, all LL rows */
  /* the reference's dispatch of every rank, and this rank's worst-case one */
  epx_ref_dispatch_result ref[EPX_FAULT_MAX_RANKS], refw;
  /* combine inputs of every rank */
  uint16_t *cx[EPX_FAULT_MAX_RANKS];
  float *cw[EPX_FAULT_MAX_RANKS];
  uint16_t *bias; /* [T + 1, H]; passed when with_bias */
  int with_bias;
  uint16_t *exp_cx; /* [T + 1, H] */
  float *exp_cw;    /* [T + 1, K] */
  epx_ref_ll_result lref;
  uint16_t *lout[EPX_FAULT_MAX_RANKS]; /* every rank's LL expert outputs */
  uint16_t *exp_lx;                    /* [T + 1, H] */
} epx_fault_pass;

void epx_fault_pass_init(epx_fault_pass *ps, const epx_fault_seq *sp, int rank,
                         const epx_test_world *w, const epx_test_world *wl);
void epx_fault_pass_free(epx_fault_pass *ps);

/* The arguments of the pass's calls, on the given (host or device) inputs. */
epxDispatchArgs_t epx_fault_dispatch_args(const epx_fault_seq *sp, const epx_fault_pass *ps,
                                          const void *x, const void *scales, const void *topk,
                                          const float *weights);
epxCombineArgs_t epx_fault_combine_args(const epx_fault_pass *ps, const void *x,
                                        const float *weights, const void *bias);
epxLowLatencyDispatchArgs_t epx_fault_ll_dispatch_args(const epx_fault_seq *sp,
                                                       const epx_fault_pass *ps, const void *x,
                                                       const void *topk);
epxLowLatencyCombineArgs_t epx_fault_ll_combine_args(const epx_fault_pass *ps, const void *x,
                                                     const void *topk, const float *weights);

/* Step 1 of a pass, the notify (on stream; cnt is host memory): N_recv and the
 * per-expert counts exact; hashes the counts. Nonzero on failure. */
int epx_fault_seq_notify(const epx_fault_seq *sp, const epx_fault_pass *ps, int rank,
                         epxComm_t comm, const epxDispatchArgs_t *a, epxHandle_t h, int *cnt,
                         epxStream_t stream, uint64_t *hash);

/* A backend's pass: runs the sequence once on comm, every output checked, and
 * accumulates every output byte into *hash. Nonzero on failure. */
typedef int (*epx_fault_pass_fn)(const epx_fault_seq *sp, int rank, epxComm_t comm,
                                 epx_test_world *w, epx_test_world *wl, uint64_t *hash);

/* A sequence rank once its communicator is up: builds the worlds (LL always
 * BF16), raises ready, runs `pass` sp->repeats times and checks every
 * repeat's hash against the first; then no sticky error, epxCommDestroy, and
 * frees the worlds. Nonzero on failure. */
int epx_fault_seq_repeat(const epx_fault_seq *sp, int rank, epxComm_t comm, epx_fault_pass_fn pass);

/* R12 counts: seeds run, calls made. */
typedef struct epx_fault_soak_figures {
  int seeds, calls;
} epx_fault_soak_figures;

/* Runs one sequence on sp->R ranks of seq_rank (limit_s), prints
 * "PASS|FAIL <label>: <shape> (<seconds>)" and counts it. 1 when it passed. */
int epx_fault_soak_seed(const epx_fault_seq *sp, const char *label, epx_test_rank_fn seq_rank,
                        double limit_s, epx_fault_soak_figures *fig);
/* R12: random sequences (epx_fault_seq_random with timeout_ms) from
 * EPX_SOAK_SEED (else the clock; printed) for EPX_SOAK_SECONDS (else
 * default_budget_s): at least 4 seeds, at most 400, up to the first failure.
 * 1 on a failure. */
int epx_fault_soak(double default_budget_s, int timeout_ms, epx_test_rank_fn seq_rank,
                   double limit_s, epx_fault_soak_figures *fig);

#endif /* EPX_TESTS_FAULTS_H */
