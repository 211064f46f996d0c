/*
 * harness.h - what every epx test and the benchmark share.
 *
 *  - epx_test_spawn(): runs one function per rank in forked processes with a
 *    wall-clock limit, the way a launcher would run an expert-parallel job.
 *  - A deterministic problem generator: routing, gate weights and payloads are
 *    pure functions of (seed, rank), so every process can rebuild every rank's
 *    inputs and the CPU reference can predict any rank's outputs.
 *  - Payloads encode where they came from: BF16 columns 0..2 hold the source
 *    rank and token as small exact integers, FP8 bytes 0..3 likewise, so a
 *    misrouted row names its origin in the failure message.
 *  - Poison fill and an exact (bitwise) comparison that prints the first
 *    difference.
 */
#ifndef EPX_TESTS_HARNESS_H
#define EPX_TESTS_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "epx.h"

/* ------------------------------------------------------------ processes */

typedef int (*epx_test_rank_fn)(int rank, int nranks, const epxUniqueId *id, void *arg);

/* Sets EPX_SOCKET_LOOPBACK=1, makes a unique id (in a helper process that
 * keeps the rendezvous service alive, so that the forking process never has a
 * second thread), forks `nranks` children that
 * each run exit(fn(rank, nranks, &id, arg)), and waits at most timeout_s
 * seconds of wall time; on timeout every child still running is killed with
 * SIGKILL. Once one child has failed, the others get a short grace period and
 * are then killed (with EPX_TEST_GDB=1, their stacks are printed first).
 * Returns 0 only if every child exited with status 0; prints the rank and the
 * reason of every failure. */
int epx_test_spawn(int nranks, epx_test_rank_fn fn, void *arg, int timeout_s);

/* Same, with a caller-made unique id (e.g. to hand out a stale or foreign one).
 * When `id` is NULL a fresh one is made. Caution: if the caller made the id
 * with epxGetUniqueId in this process, its service thread is running while
 * the ranks are forked (unsafe under AddressSanitizer). */
int epx_test_spawn_with_id(int nranks, epx_test_rank_fn fn, void *arg, int timeout_s,
                           const epxUniqueId *id);

/* For tests that fork their ranks themselves (fault injection): sets
 * EPX_SOCKET_LOOPBACK=1 and makes a unique id in a helper process that serves
 * the rendezvous, as epx_test_spawn does, so the caller stays single-threaded.
 * *helper_pid receives the helper's pid; end it with epx_test_unique_id_release
 * once the ranks have initialised. Returns 0 on success. */
int epx_test_unique_id(epxUniqueId *id, int *helper_pid);
void epx_test_unique_id_release(int helper_pid);

/* 1 when a test binary run with no case names should run `name`, or when
 * `name` is among argv[1..]: how every test selects its cases. */
int epx_test_case_wanted(int argc, char **argv, const char *name);

/* ---- exec mode ----
 * A rank function that re-executes the test binary as
 * "<self> --rank-exec CASE RANK NRANKS ID-HEX" (arg is the case name), so
 * tools that watch a process from exec on see every rank. When
 * EPX_TEST_RANK_WRAPPER names an executable, the rank runs as
 * "<wrapper> <self> --rank-exec ..." with EPX_TEST_RANK=<rank> in its
 * environment: tools/gpu-check wraps each rank in its own compute-sanitizer. */
int epx_test_exec_rank(int rank, int nranks, const epxUniqueId *id, void *case_name);
/* Parses the arguments made by epx_test_exec_rank; 0 on success. */
int epx_test_parse_rank_exec(int argc, char **argv, const char **case_name, int *rank,
                             int *nranks, epxUniqueId *id);

/* Seconds of CLOCK_MONOTONIC. */
double epx_test_now(void);

/* ------------------------------------------------------------------ RNG */

/* splitmix64: one step of the sequence whose state is *state. */
uint64_t epx_test_splitmix64(uint64_t *state);
/* A stateless 64-bit mix of up to four words (for per-element hashes). */
uint64_t epx_test_hash4(uint64_t a, uint64_t b, uint64_t c, uint64_t d);

/* xoshiro256** seeded through splitmix64. */
typedef struct epx_test_rng {
  uint64_t s[4];
} epx_test_rng;

void epx_test_rng_seed(epx_test_rng *rng, uint64_t seed);
uint64_t epx_test_rng_next(epx_test_rng *rng);
/* Uniform in [0, n), n > 0 (no modulo bias worth mentioning for n < 2^32). */
uint32_t epx_test_rng_below(epx_test_rng *rng, uint32_t n);
/* Uniform double in [0, 1). */
double epx_test_rng_uniform(epx_test_rng *rng);
/* Standard normal (Box-Muller). */
double epx_test_rng_normal(epx_test_rng *rng);

/* ------------------------------------------------------------- problems */

#define EPX_TEST_MAX_RANKS 64

typedef enum epx_test_routing {
  /* top-K of |randn| + 1 scores per token, then about one token in eight has
   * one random slot set to -1 (the benchmark's standard routing). */
  EPX_ROUTING_UNIFORM = 0,
  /* 90 % of the tokens have expert 0 among their K (in a random slot); the
   * rest route uniformly. */
  EPX_ROUTING_SKEWED = 1,
  /* every slot -1: no token goes anywhere. */
  EPX_ROUTING_ALL_MINUS1 = 2,
  /* every slot independently uniform in [-1, E): repeats and -1s included,
   * to exercise "a token counts once per expert". */
  EPX_ROUTING_RANDOM_DUP = 3
} epx_test_routing;

typedef struct epx_test_problem {
  int nranks;
  int ranks_per_node; /* 0 = nranks */
  int num_experts;
  int hidden;
  int num_topk;
  int tokens[EPX_TEST_MAX_RANKS]; /* T of each rank */
  epx_test_routing routing;
  uint64_t seed;
} epx_test_problem;

/* Largest per-rank T of the problem. */
int epx_test_max_tokens(const epx_test_problem *p);
/* Effective ranks_per_node (0 means all ranks). */
int epx_test_ranks_per_node(const epx_test_problem *p);

/* Fill rank `rank`'s inputs. Sizes: topk [T, K] (int64 when is_int64, else
 * int32), weights [T, K], x BF16 [T, H], x FP8 [T, H] bytes, scales float
 * [T, H/128] or UE8M0 int32 [T, ceil(H/512)]. Each is a pure function of
 * (p->seed, rank, token, column) and the routing kind. */
void epx_test_fill_topk(const epx_test_problem *p, int rank, void *topk_idx, int is_int64);
void epx_test_fill_weights(const epx_test_problem *p, int rank, float *weights);
void epx_test_fill_x_bf16(const epx_test_problem *p, int rank, uint16_t *x);
void epx_test_fill_x_fp8(const epx_test_problem *p, int rank, uint8_t *x);
void epx_test_fill_scales_f32(const epx_test_problem *p, int rank, float *scales);
void epx_test_fill_scales_ue8m0(const epx_test_problem *p, int rank, uint32_t *scales);
/* A BF16 [rows, H] array of seeded nonzero values that encode (tag, row) like
 * x does: for combine inputs, biases and expert outputs. */
void epx_test_fill_bf16_tagged(uint64_t seed, int tag, int64_t rows, int hidden, uint16_t *out);
/* Like epx_test_fill_bf16_tagged, but the random columns span |v| in
 * [2^-20, 2^21) with random signs, so that FP32 sums of a few rows round and
 * cancel: a summation order that differs from the contract shows up in the
 * result. Used for combine inputs and expert outputs. */
void epx_test_fill_bf16_wide(uint64_t seed, int tag, int64_t rows, int hidden, uint16_t *out);

/* Payload encodings. BF16 row: col0 = rank + 1, col1 = token % 256 + 1,
 * col2 = token / 256 + 1 (exact small integers); the other columns are seeded
 * random values with |v| in [1/16, 8). FP8 row: bytes 0..3 = 1 + rank,
 * 1 + token % 120, 1 + token / 120 % 120, 1 + token / 14400; the rest random
 * finite nonzero E4M3 bytes. Decoders return 1 and set rank/token when the row
 * looks like an encoded one, else 0. */
int epx_test_decode_bf16(const uint16_t *row, int hidden, int *rank, int *token);
int epx_test_decode_fp8(const uint8_t *row, int hidden, int *rank, int *token);

/* --------------------------------------------------------------- checks */

#define EPX_TEST_POISON_BYTE 0xA5

void epx_test_poison(void *p, size_t bytes);
/* 1 when every byte is still the poison byte. */
int epx_test_is_poisoned(const void *p, size_t bytes);

typedef enum epx_test_elem {
  EPX_ELEM_U8 = 0,
  EPX_ELEM_BF16 = 1, /* uint16 BF16; rows decoded as payloads */
  EPX_ELEM_FP8 = 2,  /* uint8 E4M3; rows decoded as payloads */
  EPX_ELEM_F32 = 3,
  EPX_ELEM_I32 = 4,
  EPX_ELEM_I64 = 5
} epx_test_elem;

size_t epx_test_elem_size(epx_test_elem e);

/* Bitwise comparison of [rows, cols] elements. Prints "what", the first
 * differing (row, col, expected, got) and, for BF16/FP8 payload rows, the
 * source rank/token decoded from the expected and the received row; then the
 * number of differing elements. Returns that number (0 = equal). */
int64_t epx_test_compare(const char *what, epx_test_elem elem, const void *expected,
                         const void *got, int64_t rows, int64_t cols);

/* Prints and returns nonzero when a result differs from the expected one. */
#define EPX_TEST_EXPECT_RES(res, want, ctx)                                                 \
  epx_test_expect_res((res), (want), (ctx), __FILE__, __LINE__)
int epx_test_expect_res(epxResult_t res, epxResult_t want, const char *ctx, const char *file,
                        int line);

/* malloc that never returns NULL (aborts the test process instead), and
 * a 64-byte aligned variant; both freed with free(). */
void *epx_test_xmalloc(size_t bytes);
void *epx_test_xaligned(size_t bytes);

/* epx_test_compare with the rank and the output's name in the message; 1 on a difference. */
int epx_test_rank_compare(int rank, const char *what, epx_test_elem e, const void *exp,
                          const void *got, int64_t rows, int64_t cols);
/* 0 on epxSuccess; otherwise prints the call, the result and the library's message, returns 1. */
int epx_test_expect_success(int rank, epxComm_t comm, epxResult_t res, const char *what);
/* Tokens of rank r in a case with base count T: with `vary`, ranks get fewer
 * tokens as r grows (uneven loads); ranks in zero_mask get none. */
int epx_test_case_tokens(int T, int r, int nranks, int vary, unsigned zero_mask);

/* A failed check: prints "  [where] file:line: cond: message" to stderr (no
 * brackets when where is NULL) and bumps *counter. Tests reach it through
 * EPX_TEST_CHECK, usually wrapped as their own CHECK. */
void epx_test_check_failed(int *counter, const char *where, const char *file, int line,
                           const char *cond, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
#define EPX_TEST_CHECK(counter, where, cond, ...)                                     \
  do {                                                                                \
    if (!(cond)) epx_test_check_failed(&(counter), (where), __FILE__, __LINE__, #cond, \
                                       __VA_ARGS__);                                  \
  } while (0)

/* A named unit test; it reports failures by bumping *failures. */
typedef struct epx_test_unit {
  const char *name;
  void (*fn)(void);
} epx_test_unit;
/* Runs the units in order, printing PASS/FAIL, and stops at the first unit
 * that raised *failures. Returns the exit status for main. */
int epx_test_run_units(const epx_test_unit *units, size_t count, const int *failures);
/* Runs one multi-rank case (epx_test_spawn) and prints "PASS name (t s)" or
 * "FAIL name seed=S". Returns epx_test_spawn's result (0 = passed). */
int epx_test_run_case(const char *name, uint64_t seed, int nranks, epx_test_rank_fn fn, void *arg,
                      int timeout_s);
/* How many random cases to run and from which seed: EPX_TEST_RANDOM_CASES and
 * EPX_TEST_SEED when set, else the defaults. */
void epx_test_random_plan(int default_count, uint64_t default_seed, int *count, uint64_t *seed);

/* A test binary of fixed cases plus seeded random ones (test_normal,
 * test_low_latency). With no arguments it runs every fixed case, then the
 * random ones (epx_test_random_plan); otherwise the named fixed cases, and
 * the random ones when "random" is among the arguments. Stops at the first
 * failure. */
typedef struct epx_test_suite {
  const char *binary;       /* named in the summary line */
  int fixed_count;
  const void *(*fixed)(int i);            /* fixed case i */
  const char *(*name_of)(const void *c);  /* a case's name (case selection) */
  int (*run)(const void *c);              /* 0 = passed */
  /* Fills the case_bytes at c and its name (for name_len bytes) from a seed. */
  void (*random)(uint64_t seed, void *c, char *name, size_t name_len);
  size_t case_bytes;
  int random_count;         /* defaults for epx_test_random_plan */
  uint64_t random_seed;
} epx_test_suite;
/* Returns the exit status for main. */
int epx_test_suite_main(const epx_test_suite *suite, int argc, char **argv);

#endif /* EPX_TESTS_HARNESS_H */
