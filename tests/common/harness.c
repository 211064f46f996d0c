/*
 * harness.c - process spawning, deterministic inputs and exact comparison for
 * the epx tests and the benchmark. See harness.h.
 */
#include "common/harness.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/layout_math.h"
#include "common/numerics.h"

/* Seconds a rank may keep running after another rank has failed: enough for
 * its own error path (a library timeout) to report, short enough not to stall. */
#define EPX_TEST_FAIL_GRACE_S 3.0
/* Polling period of the parent while it waits for its children. */
#define EPX_TEST_POLL_NS 1000000L

/* Salts that separate the random streams of one (seed, rank). */
#define SALT_TOPK 0x746f706bull
#define SALT_WEIGHTS 0x77656967ull
#define SALT_X 0x78787878ull
#define SALT_FP8 0x66703878ull
#define SALT_SCALE 0x7363616cull
#define SALT_TAGGED 0x74616767ull
#define SALT_WIDE 0x77696465ull

/* ------------------------------------------------------------ processes */

double epx_test_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void describe_status(int rank, int status) {
  if (WIFEXITED(status))
    fprintf(stderr, "[spawn] rank %d exited with status %d\n", rank, WEXITSTATUS(status));
  else if (WIFSIGNALED(status))
    fprintf(stderr, "[spawn] rank %d killed by signal %d (%s)\n", rank, WTERMSIG(status),
            strsignal(WTERMSIG(status)));
  else
    fprintf(stderr, "[spawn] rank %d ended with wait status 0x%x\n", rank, status);
}

/* EPX_TEST_GDB=1: print the stacks of a rank before it is killed (needs gdb). */
static void dump_stacks(int rank, pid_t pid) {
  const char *g = getenv("EPX_TEST_GDB");
  if (!g || strcmp(g, "1") != 0) return;
  char cmd[256];
  snprintf(cmd, sizeof cmd,
           "gdb -p %d -batch -ex 'thread apply all bt' 2>/dev/null | grep -E '^(#|Thread)' >&2",
           (int)pid);
  fprintf(stderr, "[spawn] stacks of rank %d (pid %d):\n", rank, (int)pid);
  if (system(cmd) != 0) fprintf(stderr, "[spawn] (gdb failed)\n");
}

/* What the id helper sends back through its pipe. */
typedef struct id_message {
  int32_t result;
  char error[256];
  epxUniqueId id;
} id_message;

/* Makes the unique id in a helper process, which then keeps the rendezvous
 * service alive until it is killed. epxGetUniqueId starts a service thread;
 * forking the ranks from a process that has such a thread can hand a child a
 * lock the thread held at the fork (AddressSanitizer's allocator lock, for
 * one), so the process that forks the ranks must stay single-threaded. */
static int make_id_in_helper(epxUniqueId *id, pid_t *helper) {
  int fds[2];
  if (pipe(fds) != 0) {
    fprintf(stderr, "[spawn] pipe: %s\n", strerror(errno));
    return 1;
  }
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "[spawn] fork: %s\n", strerror(errno));
    close(fds[0]);
    close(fds[1]);
    return 1;
  }
  if (pid == 0) {
    close(fds[0]);
    id_message m;
    memset(&m, 0, sizeof m);
    m.result = (int32_t)epxGetUniqueId(&m.id);
    if (m.result != epxSuccess) snprintf(m.error, sizeof m.error, "%s", epxCommGetLastError(NULL));
    ssize_t w = write(fds[1], &m, sizeof m);
    close(fds[1]);
    if (w != (ssize_t)sizeof m || m.result != epxSuccess) _exit(1);
    for (;;) pause(); /* the service thread serves the ranks; the parent kills us */
  }
  close(fds[1]);
  id_message m;
  size_t got = 0;
  while (got < sizeof m) {
    ssize_t n = read(fds[0], (char *)&m + got, sizeof m - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += (size_t)n;
  }
  close(fds[0]);
  if (got != sizeof m || m.result != epxSuccess) {
    if (got == sizeof m)
      fprintf(stderr, "[spawn] epxGetUniqueId: %s: %s\n",
              epxGetErrorString((epxResult_t)m.result), m.error);
    else
      fprintf(stderr, "[spawn] the unique-id helper died\n");
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return 1;
  }
  *id = m.id;
  *helper = pid;
  return 0;
}

static int spawn_ranks(int nranks, epx_test_rank_fn fn, void *arg, int timeout_s,
                       const epxUniqueId *id_in);

int epx_test_unique_id(epxUniqueId *id, int *helper_pid) {
  setenv("EPX_SOCKET_LOOPBACK", "1", 1);
  pid_t helper = -1;
  if (make_id_in_helper(id, &helper) != 0) return 1;
  *helper_pid = (int)helper;
  return 0;
}

void epx_test_unique_id_release(int helper_pid) {
  if (helper_pid <= 0) return;
  kill((pid_t)helper_pid, SIGKILL);
  waitpid((pid_t)helper_pid, NULL, 0);
}

int epx_test_spawn_with_id(int nranks, epx_test_rank_fn fn, void *arg, int timeout_s,
                           const epxUniqueId *given_id) {
  if (nranks < 1 || nranks > EPX_TEST_MAX_RANKS) {
    fprintf(stderr, "[spawn] bad rank count %d\n", nranks);
    return 1;
  }
  setenv("EPX_SOCKET_LOOPBACK", "1", 1);
  if (given_id) return spawn_ranks(nranks, fn, arg, timeout_s, given_id);
  epxUniqueId id;
  pid_t helper = -1;
  if (make_id_in_helper(&id, &helper) != 0) return 1;
  int rc = spawn_ranks(nranks, fn, arg, timeout_s, &id);
  kill(helper, SIGKILL);
  waitpid(helper, NULL, 0);
  return rc;
}

static int spawn_ranks(int nranks, epx_test_rank_fn fn, void *arg, int timeout_s,
                       const epxUniqueId *id_in) {
  epxUniqueId id = *id_in;
  pid_t pids[EPX_TEST_MAX_RANKS];
  int done[EPX_TEST_MAX_RANKS];
  int status[EPX_TEST_MAX_RANKS];
  fflush(NULL); /* children must not inherit (and later repeat) buffered output */
  for (int r = 0; r < nranks; ++r) {
    pid_t pid = fork();
    if (pid < 0) {
      fprintf(stderr, "[spawn] fork: %s\n", strerror(errno));
      for (int q = 0; q < r; ++q) kill(pids[q], SIGKILL);
      for (int q = 0; q < r; ++q) waitpid(pids[q], NULL, 0);
      return 1;
    }
    if (pid == 0) {
      int rc = fn(r, nranks, &id, arg);
      /* exit, not _exit: under AddressSanitizer the leak check runs in every
       * rank, and a leak fails the case (LeakSanitizer's exit status). */
      exit(rc == 0 ? 0 : (rc & 0xff) ? (rc & 0xff) : 1);
    }
    pids[r] = pid;
    done[r] = 0;
    status[r] = 0;
  }

  double start = epx_test_now();
  double deadline = start + (double)timeout_s;
  int remaining = nranks, failed = 0, timed_out = 0;
  while (remaining > 0) {
    for (int r = 0; r < nranks; ++r) {
      if (done[r]) continue;
      int st = 0;
      pid_t w = waitpid(pids[r], &st, WNOHANG);
      if (w == pids[r] || (w < 0 && errno == ECHILD)) {
        done[r] = 1;
        status[r] = w == pids[r] ? st : 0x7f00; /* lost child: count as failure */
        --remaining;
        if (!(WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0)) {
          describe_status(r, status[r]);
          if (!failed) {
            failed = 1;
            double grace = epx_test_now() + EPX_TEST_FAIL_GRACE_S;
            if (grace < deadline) deadline = grace;
          }
        }
      }
    }
    if (remaining == 0) break;
    if (epx_test_now() > deadline) {
      timed_out = 1;
      for (int r = 0; r < nranks; ++r) {
        if (done[r]) continue;
        dump_stacks(r, pids[r]);
        kill(pids[r], SIGKILL);
        waitpid(pids[r], &status[r], 0);
        done[r] = 1;
        fprintf(stderr, "[spawn] rank %d still running after %.1f s: killed\n", r,
                epx_test_now() - start);
      }
      remaining = 0;
      break;
    }
    struct timespec ts = {0, EPX_TEST_POLL_NS};
    nanosleep(&ts, NULL);
  }
  return (failed || timed_out) ? 1 : 0;
}

int epx_test_spawn(int nranks, epx_test_rank_fn fn, void *arg, int timeout_s) {
  return epx_test_spawn_with_id(nranks, fn, arg, timeout_s, NULL);
}

/* ------------------------------------------------------------------ RNG */

uint64_t epx_test_splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t epx_test_hash4(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  uint64_t s = a;
  uint64_t h = epx_test_splitmix64(&s);
  s = h ^ b;
  h = epx_test_splitmix64(&s);
  s = h ^ c;
  h = epx_test_splitmix64(&s);
  s = h ^ d;
  return epx_test_splitmix64(&s);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void epx_test_rng_seed(epx_test_rng *rng, uint64_t seed) {
  uint64_t s = seed;
  for (int i = 0; i < 4; ++i) rng->s[i] = epx_test_splitmix64(&s);
}

uint64_t epx_test_rng_next(epx_test_rng *rng) {
  uint64_t *s = rng->s;
  uint64_t result = rotl64(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl64(s[3], 45);
  return result;
}

uint32_t epx_test_rng_below(epx_test_rng *rng, uint32_t n) {
  /* Lemire's multiply-shift: bias < n / 2^32, irrelevant here. */
  return (uint32_t)(((epx_test_rng_next(rng) >> 32) * (uint64_t)n) >> 32);
}

double epx_test_rng_uniform(epx_test_rng *rng) {
  return (double)(epx_test_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0);
}

double epx_test_rng_normal(epx_test_rng *rng) {
  double u1 = epx_test_rng_uniform(rng), u2 = epx_test_rng_uniform(rng);
  if (u1 < 1e-300) u1 = 1e-300;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ------------------------------------------------------------- problems */

int epx_test_max_tokens(const epx_test_problem *p) {
  int m = 0;
  for (int r = 0; r < p->nranks; ++r)
    if (p->tokens[r] > m) m = p->tokens[r];
  return m;
}

int epx_test_ranks_per_node(const epx_test_problem *p) {
  return p->ranks_per_node > 0 ? p->ranks_per_node : p->nranks;
}

/* K distinct experts drawn uniformly from `pool` (size n, permuted in place),
 * in random order. This has exactly the distribution of "top-K of i.i.d.
 * |randn| + 1 scores, in descending score order" (every ordered K-subset is
 * equally likely), without drawing E normals per token. */
static void pick_distinct(epx_test_rng *rng, int *pool, int n, int k, int64_t *out) {
  for (int i = 0; i < k; ++i) {
    int j = i + (int)epx_test_rng_below(rng, (uint32_t)(n - i));
    int tmp = pool[i];
    pool[i] = pool[j];
    pool[j] = tmp;
    out[i] = pool[i];
  }
}

void epx_test_fill_topk(const epx_test_problem *p, int rank, void *topk_idx, int is_int64) {
  int T = p->tokens[rank], K = p->num_topk, E = p->num_experts;
  epx_test_rng rng;
  epx_test_rng_seed(&rng, epx_test_hash4(p->seed, (uint64_t)rank, SALT_TOPK, (uint64_t)p->routing));
  int *pool = epx_test_xmalloc(sizeof(int) * (size_t)(E > 0 ? E : 1));
  int64_t slots[EPX_MAX_TOPK];
  for (int t = 0; t < T; ++t) {
    switch (p->routing) {
      case EPX_ROUTING_ALL_MINUS1:
        for (int k = 0; k < K; ++k) slots[k] = -1;
        break;
      case EPX_ROUTING_RANDOM_DUP:
        for (int k = 0; k < K; ++k) slots[k] = (int64_t)epx_test_rng_below(&rng, (uint32_t)E + 1) - 1;
        break;
      case EPX_ROUTING_SKEWED:
      case EPX_ROUTING_UNIFORM:
      default:
        if (p->routing == EPX_ROUTING_SKEWED && epx_test_rng_uniform(&rng) < 0.9) {
          /* expert 0 in a random slot, the others distinct among 1..E-1 */
          for (int e = 0; e < E - 1; ++e) pool[e] = e + 1;
          int kk = K - 1 < E - 1 ? K - 1 : E - 1;
          int64_t rest[EPX_MAX_TOPK];
          pick_distinct(&rng, pool, E - 1, kk, rest);
          int at = (int)epx_test_rng_below(&rng, (uint32_t)K);
          int j = 0;
          for (int k = 0; k < K; ++k) slots[k] = k == at ? 0 : (j < kk ? rest[j++] : -1);
          break;
        }
        /* uniform routing, and the other 10 % of skewed tokens */
        for (int e = 0; e < E; ++e) pool[e] = e;
        int kk = K < E ? K : E;
        pick_distinct(&rng, pool, E, kk, slots);
        for (int k = kk; k < K; ++k) slots[k] = -1;
        if (p->routing == EPX_ROUTING_UNIFORM && epx_test_rng_below(&rng, 8) == 0)
          slots[epx_test_rng_below(&rng, (uint32_t)K)] = -1;
        break;
    }
    for (int k = 0; k < K; ++k) epx_topk_set(topk_idx, is_int64, t, K, k, slots[k]);
  }
  free(pool);
}

void epx_test_fill_weights(const epx_test_problem *p, int rank, float *weights) {
  int64_t n = (int64_t)p->tokens[rank] * p->num_topk;
  epx_test_rng rng;
  epx_test_rng_seed(&rng, epx_test_hash4(p->seed, (uint64_t)rank, SALT_WEIGHTS, 0));
  for (int64_t i = 0; i < n; ++i) {
    /* (0, 1] with a full 24-bit mantissa, so products round */
    uint32_t m = (uint32_t)(epx_test_rng_next(&rng) >> 40); /* 24 bits */
    weights[i] = (float)(m + 1u) * (1.0f / 16777216.0f);
  }
}

/* A random BF16 with |v| in [1/16, 8): never zero, never subnormal. */
static uint16_t random_bf16(uint64_t h) {
  uint32_t sign = (uint32_t)(h & 1u);
  int e = (int)((h >> 1) % 7u) - 4;
  uint32_t mant = (uint32_t)(h >> 8) & 0x7fu;
  return (uint16_t)((sign << 15) | ((uint32_t)(127 + e) << 7) | mant);
}

static uint16_t small_int_bf16(int v) { return epx_f32_to_bf16((float)v); }

static void fill_bf16_row(uint64_t seed, uint64_t salt, int rank, int64_t token, int hidden,
                          uint16_t *row) {
  uint64_t base = epx_test_hash4(seed, salt, (uint64_t)rank, (uint64_t)token);
  for (int c = 0; c < hidden; ++c) {
    uint64_t s = base + (uint64_t)c * 0x9e3779b97f4a7c15ull;
    row[c] = random_bf16(epx_test_splitmix64(&s));
  }
  if (hidden > 0) row[0] = small_int_bf16(rank + 1);
  if (hidden > 1) row[1] = small_int_bf16((int)(token % 256) + 1);
  if (hidden > 2) row[2] = small_int_bf16((int)((token / 256) % 256) + 1);
}

void epx_test_fill_x_bf16(const epx_test_problem *p, int rank, uint16_t *x) {
  int T = p->tokens[rank], H = p->hidden;
  for (int t = 0; t < T; ++t) fill_bf16_row(p->seed, SALT_X, rank, t, H, x + (size_t)t * H);
}

void epx_test_fill_bf16_tagged(uint64_t seed, int tag, int64_t rows, int hidden, uint16_t *out) {
  for (int64_t r = 0; r < rows; ++r)
    fill_bf16_row(seed, SALT_TAGGED, tag, r, hidden, out + (size_t)r * hidden);
}

void epx_test_fill_bf16_wide(uint64_t seed, int tag, int64_t rows, int hidden, uint16_t *out) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t *row = out + (size_t)r * hidden;
    fill_bf16_row(seed, SALT_WIDE, tag, r, hidden, row);
    uint64_t base = epx_test_hash4(seed, SALT_WIDE ^ 1u, (uint64_t)(uint32_t)tag, (uint64_t)r);
    for (int c = 3; c < hidden; ++c) {
      uint64_t s = base + (uint64_t)c * 0x9e3779b97f4a7c15ull;
      uint64_t h = epx_test_splitmix64(&s);
      uint32_t sign = (uint32_t)(h & 1u);
      int e = (int)((h >> 1) % 41u) - 20; /* 2^-20 .. 2^20 */
      uint32_t mant = (uint32_t)(h >> 8) & 0x7fu;
      row[c] = (uint16_t)((sign << 15) | ((uint32_t)(127 + e) << 7) | mant);
    }
  }
}

/* A random finite nonzero E4M3 byte (never +-0, never NaN). */
static uint8_t random_e4m3(uint64_t h) {
  uint8_t b = (uint8_t)h;
  if ((b & 0x7fu) == 0) b |= 1u;
  if ((b & 0x7fu) == 0x7fu) b ^= 1u;
  return b;
}

void epx_test_fill_x_fp8(const epx_test_problem *p, int rank, uint8_t *x) {
  int T = p->tokens[rank], H = p->hidden;
  for (int t = 0; t < T; ++t) {
    uint8_t *row = x + (size_t)t * H;
    uint64_t base = epx_test_hash4(p->seed, SALT_FP8, (uint64_t)rank, (uint64_t)t);
    for (int c = 0; c < H; ++c) {
      uint64_t s = base + (uint64_t)c * 0x9e3779b97f4a7c15ull;
      row[c] = random_e4m3(epx_test_splitmix64(&s));
    }
    if (H > 0) row[0] = (uint8_t)(1 + rank);
    if (H > 1) row[1] = (uint8_t)(1 + t % 120);
    if (H > 2) row[2] = (uint8_t)(1 + t / 120 % 120);
    if (H > 3) row[3] = (uint8_t)(1 + t / 14400 % 120);
  }
}

void epx_test_fill_scales_f32(const epx_test_problem *p, int rank, float *scales) {
  int T = p->tokens[rank], cols = epx_scale_cols_f32(p->hidden);
  for (int t = 0; t < T; ++t) {
    for (int g = 0; g < cols; ++g) {
      uint64_t h = epx_test_hash4(p->seed, SALT_SCALE, ((uint64_t)rank << 32) | (uint32_t)t,
                                  (uint64_t)g);
      int e = (int)(h % 14u) - 10; /* 2^-10 .. 2^3 */
      uint32_t bits = ((uint32_t)(127 + e) << 23) | (uint32_t)((h >> 8) & 0x7fffffu);
      scales[(size_t)t * cols + g] = epx_f32_from_bits(bits);
    }
  }
}

void epx_test_fill_scales_ue8m0(const epx_test_problem *p, int rank, uint32_t *scales) {
  int T = p->tokens[rank], groups = epx_scale_cols_f32(p->hidden);
  int words = epx_scale_cols_ue8m0(p->hidden);
  for (int t = 0; t < T; ++t) {
    uint32_t *row = scales + (size_t)t * words;
    for (int w = 0; w < words; ++w) row[w] = 0; /* unused groups of the last word stay 0 */
    for (int g = 0; g < groups; ++g) {
      uint64_t h = epx_test_hash4(p->seed, SALT_SCALE ^ 1u, ((uint64_t)rank << 32) | (uint32_t)t,
                                  (uint64_t)g);
      uint32_t byte = 107u + (uint32_t)(h % 28u); /* 2^-20 .. 2^7 */
      row[g / EPX_UE8M0_PER_WORD] |= byte << (8u * (uint32_t)(g % EPX_UE8M0_PER_WORD));
    }
  }
}

static int small_int_of_bf16(uint16_t v, int *out) {
  float f = epx_bf16_to_f32(v);
  if (!(f >= 1.0f && f <= 256.0f)) return 0;
  int i = (int)f;
  if ((float)i != f) return 0;
  *out = i;
  return 1;
}

int epx_test_decode_bf16(const uint16_t *row, int hidden, int *rank, int *token) {
  int a, b, c;
  if (hidden < 3) return 0;
  if (!small_int_of_bf16(row[0], &a) || !small_int_of_bf16(row[1], &b) ||
      !small_int_of_bf16(row[2], &c))
    return 0;
  *rank = a - 1;
  *token = (b - 1) + 256 * (c - 1);
  return 1;
}

int epx_test_decode_fp8(const uint8_t *row, int hidden, int *rank, int *token) {
  if (hidden < 4) return 0;
  for (int i = 0; i < 4; ++i)
    if (row[i] < 1 || row[i] > 121) return 0;
  *rank = row[0] - 1;
  *token = (row[1] - 1) + 120 * (row[2] - 1) + 14400 * (row[3] - 1);
  return 1;
}

/* --------------------------------------------------------------- checks */

void epx_test_poison(void *p, size_t bytes) {
  if (p && bytes) memset(p, EPX_TEST_POISON_BYTE, bytes);
}

int epx_test_is_poisoned(const void *p, size_t bytes) {
  const uint8_t *b = p;
  for (size_t i = 0; i < bytes; ++i)
    if (b[i] != EPX_TEST_POISON_BYTE) return 0;
  return 1;
}

size_t epx_test_elem_size(epx_test_elem e) {
  switch (e) {
    case EPX_ELEM_U8:
    case EPX_ELEM_FP8:
      return 1;
    case EPX_ELEM_BF16:
      return 2;
    case EPX_ELEM_F32:
    case EPX_ELEM_I32:
      return 4;
    case EPX_ELEM_I64:
      return 8;
  }
  return 1;
}

static void format_elem(char *buf, size_t n, epx_test_elem e, const void *p) {
  switch (e) {
    case EPX_ELEM_U8: {
      uint8_t v;
      memcpy(&v, p, 1);
      snprintf(buf, n, "%u", v);
      break;
    }
    case EPX_ELEM_FP8: {
      uint8_t v;
      memcpy(&v, p, 1);
      snprintf(buf, n, "0x%02x (%g)", v, (double)epx_e4m3_to_f32(v));
      break;
    }
    case EPX_ELEM_BF16: {
      uint16_t v;
      memcpy(&v, p, 2);
      snprintf(buf, n, "0x%04x (%g)", v, (double)epx_bf16_to_f32(v));
      break;
    }
    case EPX_ELEM_F32: {
      uint32_t v;
      memcpy(&v, p, 4);
      snprintf(buf, n, "0x%08x (%.9g)", v, (double)epx_f32_from_bits(v));
      break;
    }
    case EPX_ELEM_I32: {
      int32_t v;
      memcpy(&v, p, 4);
      snprintf(buf, n, "%" PRId32, v);
      break;
    }
    case EPX_ELEM_I64: {
      int64_t v;
      memcpy(&v, p, 8);
      snprintf(buf, n, "%" PRId64, v);
      break;
    }
  }
}

static void format_src(char *buf, size_t n, epx_test_elem e, const void *row, int64_t cols) {
  int r = -1, t = -1, ok = 0;
  if (e == EPX_ELEM_BF16) ok = epx_test_decode_bf16(row, (int)cols, &r, &t);
  if (e == EPX_ELEM_FP8) ok = epx_test_decode_fp8(row, (int)cols, &r, &t);
  if (ok)
    snprintf(buf, n, "rank %d token %d", r, t);
  else
    snprintf(buf, n, "?");
}

int64_t epx_test_compare(const char *what, epx_test_elem elem, const void *expected,
                         const void *got, int64_t rows, int64_t cols) {
  size_t es = epx_test_elem_size(elem);
  const uint8_t *a = expected, *b = got;
  int64_t diffs = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t *ra = a + (size_t)(r * cols) * es, *rb = b + (size_t)(r * cols) * es;
    if (memcmp(ra, rb, (size_t)cols * es) == 0) continue;
    for (int64_t c = 0; c < cols; ++c) {
      if (memcmp(ra + (size_t)c * es, rb + (size_t)c * es, es) == 0) continue;
      if (diffs == 0) {
        char ev[64], gv[64], es_src[48], gs_src[48];
        format_elem(ev, sizeof ev, elem, ra + (size_t)c * es);
        format_elem(gv, sizeof gv, elem, rb + (size_t)c * es);
        fprintf(stderr, "  %s: first difference at row %" PRId64 " col %" PRId64
                        ": expected %s, got %s\n",
                what, r, c, ev, gv);
        if (elem == EPX_ELEM_BF16 || elem == EPX_ELEM_FP8) {
          format_src(es_src, sizeof es_src, elem, ra, cols);
          format_src(gs_src, sizeof gs_src, elem, rb, cols);
          fprintf(stderr, "  %s: row %" PRId64 " expected source %s, received source %s\n",
                  what, r, es_src, gs_src);
        }
      }
      ++diffs;
    }
  }
  if (diffs)
    fprintf(stderr, "  %s: %" PRId64 " of %" PRId64 " elements differ\n", what, diffs,
            rows * cols);
  return diffs;
}

int epx_test_expect_res(epxResult_t res, epxResult_t want, const char *ctx, const char *file,
                        int line) {
  if (res == want) return 0;
  fprintf(stderr, "  %s:%d: %s returned %s (%d), expected %s (%d)\n", file, line, ctx,
          epxGetErrorString(res), (int)res, epxGetErrorString(want), (int)want);
  return 1;
}

void *epx_test_xmalloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  if (!p) {
    fprintf(stderr, "out of memory allocating %zu bytes\n", bytes);
    abort();
  }
  return p;
}

void *epx_test_xaligned(size_t bytes) {
  void *p = NULL;
  size_t n = (bytes + 63) / 64 * 64;
  if (posix_memalign(&p, 64, n ? n : 64) != 0 || !p) {
    fprintf(stderr, "out of memory allocating %zu aligned bytes\n", bytes);
    abort();
  }
  return p;
}

/* ---- exec mode ---- */

int epx_test_exec_rank(int rank, int nranks, const epxUniqueId *id, void *case_name) {
  char hex[2 * EPX_UNIQUE_ID_BYTES + 1], r[16], n[16], self[4096];
  for (int i = 0; i < EPX_UNIQUE_ID_BYTES; ++i)
    snprintf(hex + 2 * i, 3, "%02x", (unsigned char)id->internal[i]);
  snprintf(r, sizeof r, "%d", rank);
  snprintf(n, sizeof n, "%d", nranks);
  /* The wrapper's /proc/self/exe would be the wrapper: pass the real path. */
  ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
  if (len <= 0) {
    perror("readlink /proc/self/exe");
    return 1;
  }
  self[len] = '\0';
  const char *wrapper = getenv("EPX_TEST_RANK_WRAPPER");
  if (wrapper && *wrapper) {
    setenv("EPX_TEST_RANK", r, 1);
    char *args[] = {(char *)wrapper, self, "--rank-exec", (char *)case_name, r, n, hex, NULL};
    execv(wrapper, args);
    perror("execv EPX_TEST_RANK_WRAPPER");
    return 1;
  }
  char *args[] = {self, "--rank-exec", (char *)case_name, r, n, hex, NULL};
  execv(self, args);
  perror("execv self");
  return 1;
}

int epx_test_parse_rank_exec(int argc, char **argv, const char **case_name, int *rank,
                             int *nranks, epxUniqueId *id) {
  if (argc != 6 || strcmp(argv[1], "--rank-exec") != 0) return 1;
  const char *hex = argv[5];
  if (strlen(hex) != 2 * EPX_UNIQUE_ID_BYTES) return 1;
  for (int i = 0; i < EPX_UNIQUE_ID_BYTES; ++i) {
    unsigned v;
    if (sscanf(hex + 2 * i, "%2x", &v) != 1) return 1;
    id->internal[i] = (char)v;
  }
  *case_name = argv[2];
  *rank = atoi(argv[3]);
  *nranks = atoi(argv[4]);
  return 0;
}

int epx_test_case_wanted(int argc, char **argv, const char *name) {
  if (argc <= 1) return 1;
  for (int a = 1; a < argc; ++a)
    if (strcmp(argv[a], name) == 0) return 1;
  return 0;
}

int epx_test_rank_compare(int rank, const char *what, epx_test_elem e, const void *exp,
                          const void *got, int64_t rows, int64_t cols) {
  char name[160];
  snprintf(name, sizeof name, "rank %d %s", rank, what);
  return epx_test_compare(name, e, exp, got, rows, cols) != 0;
}

int epx_test_expect_success(int rank, epxComm_t comm, epxResult_t res, const char *what) {
  if (res == epxSuccess) return 0;
  fprintf(stderr, "  rank %d: %s returned %s: %s\n", rank, what, epxGetErrorString(res),
          epxCommGetLastError(comm));
  return 1;
}

int epx_test_case_tokens(int T, int r, int nranks, int vary, unsigned zero_mask) {
  int t = T;
  if (vary) t = T - (int)((int64_t)T * r / (2 * nranks)) - (r % 3);
  if (t < 0) t = 0;
  if (zero_mask & (1u << r)) t = 0;
  return t;
}

void epx_test_check_failed(int *counter, const char *where, const char *file, int line,
                           const char *cond, const char *fmt, ...) {
  if (where)
    fprintf(stderr, "  [%s] %s:%d: %s: ", where, file, line, cond);
  else
    fprintf(stderr, "  %s:%d: %s: ", file, line, cond);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  ++*counter;
}

int epx_test_run_units(const epx_test_unit *units, size_t count, const int *failures) {
  for (size_t i = 0; i < count; ++i) {
    int before = *failures;
    units[i].fn();
    if (*failures != before) {
      printf("FAIL %s\n", units[i].name);
      return 1;
    }
    printf("PASS %s\n", units[i].name);
  }
  return 0;
}

int epx_test_run_case(const char *name, uint64_t seed, int nranks, epx_test_rank_fn fn, void *arg,
                      int timeout_s) {
  double t0 = epx_test_now();
  int rc = epx_test_spawn(nranks, fn, arg, timeout_s);
  if (rc != 0)
    printf("FAIL %s seed=%" PRIu64 "\n", name, seed);
  else
    printf("PASS %s (%.2f s)\n", name, epx_test_now() - t0);
  fflush(stdout);
  return rc;
}

void epx_test_random_plan(int default_count, uint64_t default_seed, int *count, uint64_t *seed) {
  const char *n = getenv("EPX_TEST_RANDOM_CASES");
  const char *sd = getenv("EPX_TEST_SEED");
  *count = n && *n ? atoi(n) : default_count;
  *seed = sd && *sd ? strtoull(sd, NULL, 0) : default_seed;
}

int epx_test_suite_main(const epx_test_suite *suite, int argc, char **argv) {
  int ran = 0, want_random = argc == 1;
  for (int a = 1; a < argc; ++a) want_random |= strcmp(argv[a], "random") == 0;
  for (int i = 0; i < suite->fixed_count; ++i) {
    const void *c = suite->fixed(i);
    if (!epx_test_case_wanted(argc, argv, suite->name_of(c))) continue;
    if (suite->run(c)) return 1;
    ++ran;
  }
  if (want_random) {
    int n;
    uint64_t base;
    epx_test_random_plan(suite->random_count, suite->random_seed, &n, &base);
    void *c = malloc(suite->case_bytes);
    if (!c) {
      printf("FAIL cannot allocate a random case\n");
      return 1;
    }
    for (int i = 0; i < n; ++i) {
      char name[160];
      suite->random(base + (uint64_t)i, c, name, sizeof name);
      if (suite->run(c)) {
        free(c);
        return 1;
      }
      ++ran;
    }
    free(c);
  }
  if (ran == 0) {
    printf("FAIL no case matched\n");
    return 1;
  }
  printf("%s: %d cases passed\n", suite->binary, ran);
  return 0;
}
