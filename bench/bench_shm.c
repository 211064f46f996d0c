/*
 * bench_shm.c - the channel between the ranks of a job and the parent.
 *
 * One anonymous shared mapping, made by the parent before it forks the ranks, so every rank
 * inherits it at the same address. Ranks write their own slots only (times, bytes, verdicts);
 * the parent reads them after every rank has exited, so no locking is needed beyond the
 * barrier's atomics. Lock-free atomics on int are address-free, hence valid across processes.
 *
 * The start gate's words (bench.h) have a page of their own at the end of the mapping, so a
 * device can map just them (cudaHostRegister works on whole pages).
 */
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

/* The gate's page. `go` on a cache line of its own: the GPUs poll it while rank 0 writes it. */
typedef struct benchGateWords {
  volatile uint32_t go;
  unsigned char pad[124];
  volatile uint32_t timed_out[EPX_TEST_MAX_RANKS];
} benchGateWords;

struct benchShm {
  size_t map_bytes;
  size_t gate_offset, gate_bytes; /* the gate's page, from the start of the mapping */
  int nranks, iters;
  atomic_int arrived;    /* ranks in the current barrier */
  atomic_int generation; /* barriers completed */
  atomic_int failed;     /* a rank gave up: nobody waits any more */
  size_t buffer_bytes;
  int sms;
  int flags[EPX_TEST_MAX_RANKS];
  unsigned char baseline_id[BENCH_BASELINE_ID_BYTES];
  int verdict[BENCH_NUM_DTYPES][BENCH_NUM_SERIES][EPX_TEST_MAX_RANKS];
  benchRankBytes bytes[BENCH_NUM_DTYPES][BENCH_NUM_SERIES][EPX_TEST_MAX_RANKS];
  double times[]; /* [dtype][series][rank][iter] */
};

/* Spins between two looks at the clock in a barrier wait. */
#define BENCH_BARRIER_SPINS_PER_CLOCK 256

static size_t times_count(int nranks, int iters) {
  return (size_t)BENCH_NUM_DTYPES * BENCH_NUM_SERIES * (size_t)nranks * (size_t)iters;
}

benchShm *bench_shm_create(int nranks, int iters) {
  if (nranks < 1 || nranks > EPX_TEST_MAX_RANKS || iters < 1) {
    fprintf(stderr, "epx-bench: bad channel size (%d ranks, %d iterations)\n", nranks, iters);
    return NULL;
  }
  long page = sysconf(_SC_PAGESIZE);
  size_t pg = page > 0 ? (size_t)page : 4096;
  size_t gate_bytes = (sizeof(benchGateWords) + pg - 1) / pg * pg;
  size_t data = sizeof(benchShm) + times_count(nranks, iters) * sizeof(double);
  size_t gate_offset = (data + pg - 1) / pg * pg;
  size_t bytes = gate_offset + gate_bytes;
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    perror("epx-bench: mmap of the rank channel");
    return NULL;
  }
  benchShm *s = p;
  s->map_bytes = bytes;
  s->gate_offset = gate_offset;
  s->gate_bytes = gate_bytes;
  s->nranks = nranks;
  s->iters = iters;
  bench_shm_reset(s);
  return s;
}

void bench_shm_destroy(benchShm *s) {
  if (s) munmap(s, s->map_bytes);
}

void bench_shm_reset(benchShm *s) {
  atomic_store(&s->arrived, 0);
  atomic_store(&s->generation, 0);
  atomic_store(&s->failed, 0);
  s->buffer_bytes = 0;
  s->sms = 0;
  memset(s->flags, 0, sizeof(s->flags));
  memset(s->baseline_id, 0, sizeof(s->baseline_id));
  memset(s->verdict, 0, sizeof(s->verdict));
  memset(s->bytes, 0, sizeof(s->bytes));
  memset(s->times, 0, times_count(s->nranks, s->iters) * sizeof(double));
  memset((char *)s + s->gate_offset, 0, s->gate_bytes);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int bench_barrier(benchShm *s, double timeout_s) {
  int gen = atomic_load(&s->generation);
  if (atomic_fetch_add(&s->arrived, 1) == s->nranks - 1) {
    /* Last to arrive: reset the count before opening, so a rank that leaves and enters the
     * next barrier at once counts into a fresh one. */
    atomic_store(&s->arrived, 0);
    atomic_fetch_add(&s->generation, 1);
    return atomic_load(&s->failed) ? 1 : 0;
  }
  double deadline = now_s() + timeout_s;
  /* Yield rather than sleep: ranks may outnumber cores, and a sleeping rank would wake late
   * and skew the start of the timed region. */
  for (unsigned spins = 0; atomic_load(&s->generation) == gen; ++spins) {
    if (atomic_load(&s->failed)) return 1;
    if (spins % BENCH_BARRIER_SPINS_PER_CLOCK == 0 && now_s() > deadline) {
      fprintf(stderr, "epx-bench: barrier: ranks missing after %.0f s\n", timeout_s);
      bench_shm_fail(s);
      return 1;
    }
    sched_yield();
  }
  return atomic_load(&s->failed) ? 1 : 0;
}

void bench_shm_fail(benchShm *s) { atomic_store(&s->failed, 1); }
int bench_shm_failed(const benchShm *s) { return atomic_load(&((benchShm *)s)->failed); }

static size_t times_offset(const benchShm *s, benchDtype d, benchSeries op, int rank) {
  return ((((size_t)d * BENCH_NUM_SERIES + (size_t)op) * (size_t)s->nranks) + (size_t)rank) *
         (size_t)s->iters;
}

double *bench_shm_times(benchShm *s, benchDtype d, benchSeries op, int rank) {
  return s->times + times_offset(s, d, op, rank);
}
const double *bench_shm_times_c(const benchShm *s, benchDtype d, benchSeries op, int rank) {
  return s->times + times_offset(s, d, op, rank);
}
benchRankBytes *bench_shm_bytes(benchShm *s, benchDtype d, benchSeries op, int rank) {
  return &s->bytes[d][op][rank];
}
const benchRankBytes *bench_shm_bytes_c(const benchShm *s, benchDtype d, benchSeries op, int rank) {
  return &s->bytes[d][op][rank];
}
void bench_shm_set_verdict(benchShm *s, benchDtype d, benchSeries op, int rank, benchVerdict v) {
  s->verdict[d][op][rank] = (int)v;
}
benchVerdict bench_shm_verdict(const benchShm *s, benchDtype d, benchSeries op, int rank) {
  return (benchVerdict)s->verdict[d][op][rank];
}
void bench_shm_set_buffer_bytes(benchShm *s, size_t bytes) { s->buffer_bytes = bytes; }
size_t bench_shm_buffer_bytes(const benchShm *s) { return s->buffer_bytes; }
int bench_shm_iters(const benchShm *s) { return s->iters; }
void bench_shm_set_sms(benchShm *s, int sms) { s->sms = sms; }
int bench_shm_sms(const benchShm *s) { return s->sms; }
int *bench_shm_flags(benchShm *s) { return s->flags; }
void *bench_shm_baseline_id(benchShm *s) { return s->baseline_id; }

static benchGateWords *gate_words(benchShm *s) {
  return (benchGateWords *)(void *)((char *)s + s->gate_offset);
}
void *bench_shm_gate_page(benchShm *s, size_t *bytes) {
  *bytes = s->gate_bytes;
  return gate_words(s);
}
volatile uint32_t *bench_shm_gate_go(benchShm *s) { return &gate_words(s)->go; }
volatile uint32_t *bench_shm_gate_timed_out(benchShm *s, int rank) {
  return &gate_words(s)->timed_out[rank];
}
void bench_shm_gate_open(benchShm *s, uint32_t gen) {
  /* Everything before it (the barrier) first; then the store, pushed out at once. */
  __sync_synchronize();
  gate_words(s)->go = gen;
  __sync_synchronize();
}
