/*
 * bench_host.c - the benchmark's device for the host backend: buffers are ordinary host
 * memory, a call is timed by the wall clock around it (a host-backend call returns once its
 * outputs are written), and caches are flushed by writing a buffer larger than the last-level
 * cache between timed iterations.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"

/* Larger than the last-level cache of the machines we run on (a 2-core VM to a 64-core host). */
#define HOST_FLUSH_BYTES ((size_t)64 << 20)
/* Ranks of a host run when --ranks is not given. */
#define HOST_DEFAULT_RANKS 4
/* Alignment of benchmark buffers: a cache line, more than the 16 bytes epx asks for. */
#define HOST_ALIGN 64

static unsigned char *flush_buf;
static unsigned flush_round;
static struct timespec timer_t0;

static int host_default_ranks(void) { return HOST_DEFAULT_RANKS; }

static void *host_alloc(size_t bytes) {
  void *p = NULL;
  int err = posix_memalign(&p, HOST_ALIGN, bytes ? bytes : HOST_ALIGN);
  if (err) {
    fprintf(stderr, "epx-bench: cannot allocate %zu bytes: %s\n", bytes, strerror(err));
    return NULL;
  }
  return p;
}

static void host_free(void *p) { free(p); }

static int host_rank_setup(int rank, int nranks) {
  flush_buf = host_alloc(HOST_FLUSH_BYTES);
  return flush_buf ? 0 : 1;
}

static void host_rank_teardown(void) {
  free(flush_buf);
  flush_buf = NULL;
}

static int host_copy(void *dst, const void *src, size_t bytes) {
  memcpy(dst, src, bytes);
  return 0;
}

static int host_fill(void *dst, int byte, size_t bytes) {
  memset(dst, byte, bytes);
  return 0;
}

static epxStream_t host_stream(void) { return NULL; }

static void host_flush_cache(void) {
  if (!flush_buf) return;
  /* A different byte each round, and one read back, so the writes cannot be elided. */
  memset(flush_buf, (int)(++flush_round & 0xffu), HOST_FLUSH_BYTES);
  volatile unsigned char sink = flush_buf[flush_round % HOST_FLUSH_BYTES];
  (void)sink;
}

static void host_timer_start(void) { clock_gettime(CLOCK_MONOTONIC, &timer_t0); }

static double host_timer_stop_us(void) {
  struct timespec t1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  return (double)(t1.tv_sec - timer_t0.tv_sec) * 1e6 +
         (double)(t1.tv_nsec - timer_t0.tv_nsec) * 1e-3;
}

const benchDevice bench_host_device = {
    .name = "host",
    .backend = epxBackendHost,
    .host_addressable = 1,
    .default_ranks = host_default_ranks,
    .rank_setup = host_rank_setup,
    .rank_teardown = host_rank_teardown,
    .alloc = host_alloc,
    .free = host_free,
    .upload = host_copy,
    .download = host_copy,
    .fill = host_fill,
    .stream = host_stream,
    .flush_cache = host_flush_cache,
    .timer_start = host_timer_start,
    .timer_stop_us = host_timer_stop_us,
    /* No baseline on the host; the default timer is the wall clock already. */
};
