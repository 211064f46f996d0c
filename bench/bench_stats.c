/*
 * bench_stats.c - percentiles, the slowest rank, and the bytes an operation moves.
 *
 * Times: every timed iteration starts from a barrier; the time of an iteration is that of
 * its slowest rank, and p50/p99 are taken over iterations (nearest rank).
 *
 * Bytes (spec.md §8), counted from the routing alone, so that figures compare across
 * backends and implementations:
 *  - logical, normal mode: received tokens including those from itself, in BF16 bytes
 *    (N_recv * H * 2; FP8: times (1 + 4/128) / 2) - DeepEP's count;
 *  - logical, low latency: every valid (token, expert) selection of the rank's own tokens,
 *    dispatch H + H/128*4 + 16 bytes (FP8) or 2H (BF16), combine 2H;
 *  - physical: payload (and FP8 scale) bytes that must leave the rank for other ranks, one
 *    copy per (token, destination rank) - the floor any implementation moves; rows to itself
 *    are not counted. Dispatch sends the rank's own tokens out; combine sends back the rows
 *    received from other ranks (a rank sums its experts of a token before sending).
 * Rates use the bytes of the slowest rank (largest median time) and the p50 time. The phases
 * of a low-latency op (send alone, receive alone) get times and no rates: the bytes of the
 * spec's figures are those of the whole call.
 */
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "common/layout_math.h"

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double bench_percentile(double *v, int n, double q) {
  if (n <= 0) return 0.0;
  qsort(v, (size_t)n, sizeof(double), cmp_double);
  int idx = (int)(q * (double)n + 0.999999) - 1; /* ceil(q*n) - 1 */
  if (idx < 0) idx = 0;
  if (idx >= n) idx = n - 1;
  return v[idx];
}

void bench_count_routing(const epx_test_problem *p, int rank, benchRouting *out) {
  memset(out, 0, sizeof(*out));
  int K = p->num_topk;
  int E_local = p->num_experts / p->nranks;
  int64_t *topk =
      epx_test_xmalloc(sizeof(int64_t) * (size_t)(epx_test_max_tokens(p) + 1) * (size_t)K);
  out->tokens = p->tokens[rank];
  for (int src = 0; src < p->nranks; ++src) {
    epx_test_fill_topk(p, src, topk, 1);
    for (int t = 0; t < p->tokens[src]; ++t) {
      uint64_t dest = 0; /* bit r: the token has an expert on rank r (nranks <= 64) */
      for (int k = 0; k < K; ++k) {
        int64_t e = topk[(size_t)t * K + k];
        if (!epx_topk_valid(e)) continue;
        dest |= 1ull << epx_expert_rank(e, E_local);
        if (src == rank) out->selections++;
      }
      uint64_t me = 1ull << rank;
      if (src == rank) out->send_remote += __builtin_popcountll(dest & ~me);
      if (dest & me) {
        out->recv_rows++;
        if (src != rank) out->recv_remote++;
      }
    }
  }
  free(topk);
}

void bench_count_pairs(const epx_test_problem *p, int rank, int64_t *send_rows,
                       int64_t *recv_rows) {
  int K = p->num_topk;
  int E_local = p->num_experts / p->nranks;
  int64_t *topk =
      epx_test_xmalloc(sizeof(int64_t) * (size_t)(epx_test_max_tokens(p) + 1) * (size_t)K);
  for (int r = 0; r < p->nranks; ++r) send_rows[r] = recv_rows[r] = 0;
  for (int src = 0; src < p->nranks; ++src) {
    epx_test_fill_topk(p, src, topk, 1);
    for (int t = 0; t < p->tokens[src]; ++t) {
      uint64_t dest = 0; /* bit r: the token has an expert on rank r (nranks <= 64) */
      for (int k = 0; k < K; ++k) {
        int64_t e = topk[(size_t)t * K + k];
        if (epx_topk_valid(e)) dest |= 1ull << epx_expert_rank(e, E_local);
      }
      if (src == rank)
        for (int r = 0; r < p->nranks; ++r) send_rows[r] += (int64_t)((dest >> r) & 1u);
      if ((dest >> rank) & 1u) recv_rows[src]++;
    }
  }
  free(topk);
}

/* Bytes of one dispatched row: BF16 payload, or FP8 payload plus float32 scales. */
static double row_bytes(benchDtype d, int hidden) {
  return d == BENCH_FP8 ? (double)hidden + (double)(hidden / EPX_FP8_GROUP) * 4.0
                        : 2.0 * (double)hidden;
}

benchRankBytes bench_series_bytes(benchDtype d, benchSeries s, int hidden, const benchRouting *r) {
  benchRankBytes b = {0.0, 0.0};
  double bf16_row = 2.0 * (double)hidden;
  switch (s) {
    case BENCH_DISPATCH_E2E:
    case BENCH_DISPATCH:
      b.logical =
          (double)r->recv_rows * bf16_row * (d == BENCH_FP8 ? (1.0 + 4.0 / 128.0) / 2.0 : 1.0);
      b.physical = (double)r->send_remote * row_bytes(d, hidden);
      break;
    case BENCH_COMBINE:
    case BENCH_COMBINE_E2E:
      b.logical = (double)r->recv_rows * bf16_row;
      b.physical = (double)r->recv_remote * bf16_row;
      break;
    case BENCH_LL_DISPATCH:
    case BENCH_LL_DISPATCH_E2E:
      b.logical =
          (double)r->selections *
          (d == BENCH_FP8 ? (double)hidden + (double)hidden / 128.0 * 4.0 + 16.0 : bf16_row);
      b.physical = (double)r->send_remote * row_bytes(d, hidden);
      break;
    case BENCH_LL_COMBINE:
    case BENCH_LL_COMBINE_E2E:
      b.logical = (double)r->selections * bf16_row;
      b.physical = (double)r->recv_remote * bf16_row;
      break;
    case BENCH_LAYOUT:
    case BENCH_LAYOUT_E2E:
    case BENCH_LL_DISPATCH_SEND: /* a phase has a time only (bench.h) */
    case BENCH_LL_DISPATCH_RECV:
    case BENCH_LL_COMBINE_SEND:
    case BENCH_LL_COMBINE_RECV:
    case BENCH_NCCL_DISPATCH:
    case BENCH_NCCL_COMBINE:
    case BENCH_NUM_SERIES: break;
  }
  return b;
}

/* p50 and p99 of the per-iteration maximum over ranks; *slowest = rank of largest median. */
static void series_times(const benchShm *s, int nranks, benchDtype d, benchSeries op, double *p50,
                         double *p99, int *slowest) {
  int iters = bench_shm_iters(s);
  double *m = epx_test_xmalloc(sizeof(double) * (size_t)iters);
  double *own = epx_test_xmalloc(sizeof(double) * (size_t)iters);
  for (int i = 0; i < iters; ++i) {
    m[i] = 0.0;
    for (int r = 0; r < nranks; ++r) {
      double t = bench_shm_times_c(s, d, op, r)[i];
      if (t > m[i]) m[i] = t;
    }
  }
  double best = -1.0;
  *slowest = 0;
  for (int r = 0; r < nranks; ++r) {
    memcpy(own, bench_shm_times_c(s, d, op, r), sizeof(double) * (size_t)iters);
    double med = bench_percentile(own, iters, 0.5);
    if (med > best) {
      best = med;
      *slowest = r;
    }
  }
  /* p99 first: bench_percentile sorts, and both read the same sorted array. */
  *p99 = bench_percentile(m, iters, 0.99);
  *p50 = bench_percentile(m, iters, 0.5);
  free(m);
  free(own);
}

static benchVerdict worst_verdict(const benchShm *s, int nranks, benchDtype d, benchSeries op) {
  benchVerdict v = BENCH_CORRECT;
  for (int r = 0; r < nranks; ++r) {
    benchVerdict x = bench_shm_verdict(s, d, op, r);
    if (x == BENCH_NOT_RUN) return BENCH_NOT_RUN;
    if (x == BENCH_NOT_SUPPORTED) return BENCH_NOT_SUPPORTED;
    if (x == BENCH_WRONG) v = BENCH_WRONG;
    if (x == BENCH_UNCHECKED && v != BENCH_WRONG) v = BENCH_UNCHECKED;
  }
  return v;
}

int bench_summarise(const benchShm *s, const benchOptions *o, benchMode mode, benchDtype d,
                    benchSeries series, benchRecord *rec) {
  int nranks = o->nranks;
  benchVerdict v = worst_verdict(s, nranks, d, series);
  if (v == BENCH_NOT_RUN) return 1;
  memset(rec, 0, sizeof(*rec));
  rec->mode = mode;
  rec->series = series;
  rec->dtype = d;
  rec->ranks = nranks;
  rec->ranks_per_node = o->ranks_per_node > 0 ? o->ranks_per_node : nranks;
  rec->tokens = bench_mode_tokens(o, mode);
  rec->hidden = o->hidden;
  rec->topk = o->topk;
  rec->experts = o->experts;
  rec->sms = bench_shm_sms(s); /* rank 0's: the mode's kernels, -1 unknown */
  rec->verdict = v;
  rec->nccl_time_us_p50 = -1.0;
  rec->buffer_bytes = series == BENCH_LAYOUT ? 0 : bench_shm_buffer_bytes(s);
  if (v == BENCH_NOT_SUPPORTED) { /* a row that says so, with no figures */
    rec->time_us_p50 = rec->time_us_p99 = rec->e2e_us = -1.0;
    rec->logical_gbps = rec->physical_gbps = -1.0;
    return 0;
  }

  int slowest = 0;
  series_times(s, nranks, d, series, &rec->time_us_p50, &rec->time_us_p99, &slowest);
  if (bench_series_phase(series)) { /* a phase: its time only (bench.h) */
    rec->e2e_us = rec->logical_gbps = rec->physical_gbps = -1.0;
    return 0;
  }
  /* e2e: the wall-clock twin where one ran (the dispatch's always: layout + notify +
   * dispatch), else the time itself (a device whose timer is the wall clock). */
  rec->e2e_us = rec->time_us_p50;
  benchSeries twin = bench_series_e2e(series);
  benchVerdict ve = twin == BENCH_NUM_SERIES ? BENCH_NOT_RUN : worst_verdict(s, nranks, d, twin);
  if (ve != BENCH_NOT_RUN && ve != BENCH_NOT_SUPPORTED) {
    double e2e_p99;
    int e2e_slowest;
    series_times(s, nranks, d, twin, &rec->e2e_us, &e2e_p99, &e2e_slowest);
  }
  if (series == BENCH_DISPATCH) { /* the exact-size dispatch is checked on its own */
    if (ve == BENCH_WRONG || (ve == BENCH_UNCHECKED && v == BENCH_CORRECT)) rec->verdict = ve;
  }
  benchSeries baseline = BENCH_NUM_SERIES;
  if (series == BENCH_DISPATCH || series == BENCH_LL_DISPATCH) baseline = BENCH_NCCL_DISPATCH;
  if (series == BENCH_COMBINE || series == BENCH_LL_COMBINE) baseline = BENCH_NCCL_COMBINE;
  if (baseline != BENCH_NUM_SERIES) {
    benchVerdict vb = worst_verdict(s, nranks, d, baseline);
    if (vb == BENCH_UNCHECKED || vb == BENCH_CORRECT) {
      double b99;
      int bslow;
      series_times(s, nranks, d, baseline, &rec->nccl_time_us_p50, &b99, &bslow);
    }
  }
  if (series == BENCH_LAYOUT) {
    rec->logical_gbps = rec->physical_gbps = -1.0;
  } else {
    const benchRankBytes *b = bench_shm_bytes_c(s, d, series, slowest);
    double us = rec->time_us_p50 > 0.0 ? rec->time_us_p50 : 1e-9;
    rec->logical_gbps = b->logical / us * 1e-3; /* bytes/us = MB/s; /1e3 = GB/s */
    rec->physical_gbps = b->physical / us * 1e-3;
  }
  return 0;
}
