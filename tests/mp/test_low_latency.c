/*
 * test_low_latency.c - low-latency dispatch (BF16, FP8, FP8 with rounded
 * scales, FP8 with UE8M0 scales) and combine on the host backend, every valid
 * output row compared bit for bit with the CPU reference; split phases
 * (return_recv_hook + epxLowLatencyRecv), zero-copy combine through
 * epxLowLatencyGetCombineBuffer, cumulative statistics and back-to-back cycles.
 *
 *   test_low_latency            run every case
 *   test_low_latency NAME...    run the named cases
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "common/layout_math.h"
#include "common/world.h"
#include "reference/reference.h"

#define SPAWN_TIMEOUT_S 240

typedef struct lcase {
  const char *name;
  int R, rpn, E, H, K, T, maxT;
  int vary;
  unsigned zero_mask;
  epx_test_routing routing;
  int int32;
  int fp8, round_scale, ue8m0;
  int stats;          /* pass cumulative_local_expert_recv_stats */
  int hook_dispatch;  /* dispatch with return_recv_hook, then epxLowLatencyRecv */
  int hook_combine;
  int zero_copy;
  int iterations;     /* cycles, each with new routing and payloads (default 1) */
  uint64_t seed;
} lcase;

static void make_problem(const lcase *c, epx_test_problem *p, uint64_t seed) {
  memset(p, 0, sizeof(*p));
  p->nranks = c->R;
  p->ranks_per_node = c->rpn;
  p->num_experts = c->E;
  p->hidden = c->H;
  p->num_topk = c->K;
  p->routing = c->routing;
  p->seed = seed;
  for (int r = 0; r < c->R; ++r) {
    p->tokens[r] = epx_test_case_tokens(c->T, r, c->R, c->vary, c->zero_mask);
  }
}

static int check_pending(int rank, epxHandle_t h, int want) {
  epxHandleInfo_t info;
  if (epxHandleGetInfo(h, &info) != epxSuccess) {
    fprintf(stderr, "  rank %d: epxHandleGetInfo failed\n", rank);
    return 1;
  }
  if (info.state != epxHandleLowLatency || info.recv_pending != want) {
    fprintf(stderr, "  rank %d: handle state %d recv_pending %d, expected LowLatency and %d\n",
            rank, (int)info.state, info.recv_pending, want);
    return 1;
  }
  return 0;
}

/* counts[e]: tokens (all sources) listing expert e, once per token. */
static void expert_counts(const epx_test_world *w, int *counts) {
  int E = w->p.num_experts, K = w->p.num_topk;
  memset(counts, 0, sizeof(int) * E);
  for (int s = 0; s < w->p.nranks; ++s)
    for (int t = 0; t < w->p.tokens[s]; ++t)
      for (int k = 0; k < K; ++k) {
        int64_t e = epx_topk_get(w->topk[s], w->is_int64, t, K, k);
        if (e < 0) continue;
        int dup = 0;
        for (int j = 0; j < k; ++j) dup |= epx_topk_get(w->topk[s], w->is_int64, t, K, j) == e;
        if (!dup) counts[e]++;
      }
}

typedef struct ll_bufs {
  size_t xrow, srow;
  int64_t rpe, rows;
  void *recv_x, *scales;
  int *count, *src_info;
  int64_t *range;
} ll_bufs;

static void ll_bufs_poison(ll_bufs *b, int el, int R) {
  epx_test_poison(b->recv_x, (size_t)b->rows * b->xrow);
  if (b->scales) epx_test_poison(b->scales, (size_t)b->rows * b->srow);
  epx_test_poison(b->count, sizeof(int) * el);
  epx_test_poison(b->src_info, sizeof(int) * (size_t)b->rows);
  epx_test_poison(b->range, sizeof(int64_t) * (size_t)el * R);
}

/* The zero-copy buffer this process saw first (one communicator per process). */
static void *combine_buffer_seen;

static int one_cycle(epxComm_t comm, const lcase *c, int rank, epxHandle_t h, ll_bufs *b,
                     int *stats, int *stats_expected, int it) {
  int R = c->R, el = c->E / R, H = c->H, K = c->K;
  epx_test_problem p;
  make_problem(c, &p, c->seed + 101 * (uint64_t)it);
  epx_test_world w;
  epx_test_world_init(&w, &p, !c->int32, EPX_PAYLOAD_BF16, c->seed * 7 + (uint64_t)it);
  int fail = 0;

  /* ---- dispatch ---- */
  epx_ref_ll_opts ro = {c->maxT, c->fp8, c->round_scale, c->ue8m0};
  epx_ref_ll_result ref;
  if (epx_ref_ll_dispatch(&w.ref, rank, &ro, &ref) != 0) {
    fprintf(stderr, "  rank %d: reference ll dispatch failed\n", rank);
    epx_test_world_free(&w);
    return 1;
  }
  ll_bufs_poison(b, el, R);
  epxLowLatencyDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = w.x[rank];
  a.topk_idx = w.topk[rank];
  a.topk_idx_type = c->int32 ? epxInt32 : epxInt64;
  a.num_tokens = p.tokens[rank];
  a.hidden = H;
  a.num_topk = K;
  a.use_fp8 = c->fp8;
  a.round_scale = c->round_scale;
  a.use_ue8m0 = c->ue8m0;
  a.cumulative_local_expert_recv_stats = c->stats ? stats : NULL;
  a.return_recv_hook = c->hook_dispatch;
  epxLowLatencyDispatchOutputs_t o = {b->recv_x, b->scales, b->count, b->src_info, b->range};
  fail |= epx_test_expect_success(rank, comm, epxLowLatencyDispatch(comm, &a, h, &o, NULL), "epxLowLatencyDispatch");
  if (!fail && c->hook_dispatch) {
    fail |= check_pending(rank, h, 1);
    if (!fail) fail |= epx_test_expect_success(rank, comm, epxLowLatencyRecv(comm, h, NULL), "epxLowLatencyRecv");
  }
  if (!fail) fail |= check_pending(rank, h, 0);
  if (!fail) {
    fail |= epx_test_rank_compare(rank, "recv_count", EPX_ELEM_I32, ref.recv_count, b->count, 1, el);
    fail |= epx_test_rank_compare(rank, "recv_layout_range", EPX_ELEM_I64, ref.recv_layout_range, b->range, el, R);
    for (int e = 0; e < el && !fail; ++e) {
      int n = ref.recv_count[e];
      size_t at = (size_t)e * (size_t)b->rpe;
      char what[64];
      snprintf(what, sizeof what, "expert %d recv_x", e);
      fail |= epx_test_rank_compare(rank, what, c->fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16,
                  (uint8_t *)ref.recv_x + at * b->xrow, (uint8_t *)b->recv_x + at * b->xrow, n, H);
      if (c->fp8) {
        snprintf(what, sizeof what, "expert %d recv_x_scales", e);
        fail |= epx_test_rank_compare(rank, what, c->ue8m0 ? EPX_ELEM_I32 : EPX_ELEM_F32,
                    (uint8_t *)ref.recv_x_scales + at * b->srow,
                    (uint8_t *)b->scales + at * b->srow, n, (int64_t)(b->srow / 4));
      }
      snprintf(what, sizeof what, "expert %d recv_src_info", e);
      fail |= epx_test_rank_compare(rank, what, EPX_ELEM_I32, ref.recv_src_info + at, b->src_info + at, n, 1);
    }
    if (c->stats) {
      for (int e = 0; e < el; ++e) stats_expected[e] += ref.recv_count[e];
      fail |= epx_test_rank_compare(rank, "cumulative_local_expert_recv_stats", EPX_ELEM_I32, stats_expected, stats,
                  1, el);
    }
  }

  /* ---- combine: tagged expert outputs in the valid rows of every rank ---- */
  if (!fail) {
    int *counts = epx_test_xmalloc(sizeof(int) * c->E);
    expert_counts(&w, counts);
    uint16_t *outs[EPX_TEST_MAX_RANKS];
    for (int r = 0; r < R; ++r) {
      outs[r] = epx_test_xaligned((size_t)b->rows * H * 2);
      epx_test_poison(outs[r], (size_t)b->rows * H * 2);
      for (int e = 0; e < el; ++e)
        epx_test_fill_bf16_wide(c->seed * 13 + (uint64_t)it, r * 4096 + e, counts[r * el + e], H,
                                  outs[r] + (size_t)e * b->rpe * H);
    }
    int T = p.tokens[rank];
    uint16_t *exp_x = epx_test_xaligned((size_t)(T + 1) * H * 2);
    uint16_t *got_x = epx_test_xaligned((size_t)(T + 1) * H * 2);
    epx_ref_ll_combine(&w.ref, rank, c->maxT, (const uint16_t *const *)outs, w.weights[rank],
                       exp_x);
    epx_test_poison(got_x, (size_t)(T + 1) * H * 2);
    epxLowLatencyCombineArgs_t ca;
    memset(&ca, 0, sizeof ca);
    ca.x = outs[rank];
    ca.topk_idx = w.topk[rank];
    ca.topk_idx_type = a.topk_idx_type;
    ca.topk_weights = w.weights[rank];
    ca.num_tokens = T;
    ca.hidden = H;
    ca.num_topk = K;
    ca.return_recv_hook = c->hook_combine;
    if (c->zero_copy) {
      void *buf = NULL;
      fail |= epx_test_expect_success(rank, comm, epxLowLatencyGetCombineBuffer(comm, &buf),
                     "epxLowLatencyGetCombineBuffer");
      if (!fail && !buf) {
        fprintf(stderr, "  rank %d: epxLowLatencyGetCombineBuffer gave NULL\n", rank);
        fail = 1;
      }
      /* the buffer stays the same for the life of the communicator */
      if (!fail && combine_buffer_seen && buf != combine_buffer_seen) {
        fprintf(stderr, "  rank %d: epxLowLatencyGetCombineBuffer moved from %p to %p\n", rank,
                combine_buffer_seen, buf);
        fail = 1;
      }
      combine_buffer_seen = buf;
      if (!fail) {
        memcpy(buf, outs[rank], (size_t)b->rows * H * 2);
        ca.x = NULL;
        ca.zero_copy = 1;
      }
    }
    if (!fail)
      fail |= epx_test_expect_success(rank, comm, epxLowLatencyCombine(comm, &ca, h, got_x, NULL),
                     "epxLowLatencyCombine");
    if (!fail && c->hook_combine) {
      fail |= check_pending(rank, h, 1);
      if (!fail)
        fail |= epx_test_expect_success(rank, comm, epxLowLatencyRecv(comm, h, NULL), "epxLowLatencyRecv (combine)");
      if (!fail) fail |= check_pending(rank, h, 0);
    }
    if (!fail) fail |= epx_test_rank_compare(rank, "combined_x", EPX_ELEM_BF16, exp_x, got_x, T, H);
    if (!fail && !epx_test_is_poisoned((uint8_t *)got_x + (size_t)T * H * 2, (size_t)H * 2)) {
      fprintf(stderr, "  rank %d: combined_x written past row T\n", rank);
      fail = 1;
    }
    for (int r = 0; r < R; ++r) free(outs[r]);
    free(counts);
    free(exp_x);
    free(got_x);
  }
  epx_ref_ll_free(&ref);
  epx_test_world_free(&w);
  return fail;
}

static int run_rank(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const lcase *c = arg;
  int el = c->E / c->R;
  epx_test_problem p;
  make_problem(c, &p, c->seed);
  epxConfig_t cfg = epx_test_config(&p, c->maxT);
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, nranks, id, &cfg)) return 1;
  epxHandle_t h = NULL;
  int fail = epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  ll_bufs b;
  memset(&b, 0, sizeof b);
  b.xrow = epx_payload_row_bytes(c->H, c->fp8);
  b.srow = c->fp8 ? epx_scale_row_bytes(c->H, c->ue8m0 ? 2 : 1) : 0;
  b.rpe = epx_ll_rows_per_expert(c->R, c->maxT);
  b.rows = (int64_t)el * b.rpe;
  b.recv_x = epx_test_xaligned((size_t)b.rows * b.xrow);
  b.scales = b.srow ? epx_test_xaligned((size_t)b.rows * b.srow) : NULL;
  b.count = epx_test_xaligned(sizeof(int) * el);
  b.src_info = epx_test_xaligned(sizeof(int) * (size_t)b.rows);
  b.range = epx_test_xaligned(sizeof(int64_t) * (size_t)el * c->R);
  int *stats = epx_test_xaligned(sizeof(int) * el), *stats_exp = epx_test_xmalloc(sizeof(int) * el);
  for (int e = 0; e < el; ++e) stats[e] = stats_exp[e] = 3 * e + 1;
  int iters = c->iterations > 0 ? c->iterations : 1;
  for (int it = 0; it < iters && !fail; ++it)
    fail |= one_cycle(comm, c, rank, h, &b, stats, stats_exp, it);
  epxHandleDestroy(h);
  if (epxCommDestroy(comm) != epxSuccess) fail = 1;
  free(b.recv_x);
  free(b.scales);
  free(b.count);
  free(b.src_info);
  free(b.range);
  free(stats);
  free(stats_exp);
  return fail;
}

static const lcase cases[] = {
    {.name = "ll_one_rank_bf16", .R = 1, .E = 4, .H = 128, .K = 2, .T = 16, .maxT = 16,
     .stats = 1, .seed = 1},
    {.name = "ll_two_ranks_bf16_h7168_k8", .R = 2, .E = 8, .H = 7168, .K = 8, .T = 16,
     .maxT = 16, .stats = 1, .seed = 2},
    {.name = "ll_two_ranks_fp8", .R = 2, .E = 16, .H = 2048, .K = 6, .T = 32, .maxT = 32,
     .fp8 = 1, .stats = 1, .seed = 3},
    {.name = "ll_four_ranks_fp8_round_scale_int32", .R = 4, .E = 32, .H = 1024, .K = 8, .T = 40,
     .maxT = 48, .vary = 1, .int32 = 1, .fp8 = 1, .round_scale = 1, .stats = 1, .seed = 4},
    {.name = "ll_four_ranks_two_nodes_fp8_ue8m0_h7168", .R = 4, .rpn = 2, .E = 64, .H = 7168,
     .K = 8, .T = 16, .maxT = 16, .fp8 = 1, .round_scale = 1, .ue8m0 = 1, .stats = 1, .seed = 5},
    {.name = "ll_three_ranks_e288_k6_ue8m0_h640", .R = 3, .E = 288, .H = 640, .K = 6, .T = 8,
     .maxT = 8, .fp8 = 1, .round_scale = 1, .ue8m0 = 1, .seed = 6},
    {.name = "ll_eight_ranks_e256_k8_fp8", .R = 8, .E = 256, .H = 1024, .K = 8, .T = 16,
     .maxT = 16, .vary = 1, .fp8 = 1, .stats = 1, .seed = 7},
    {.name = "ll_four_ranks_zero_tokens_on_rank_2", .R = 4, .E = 16, .H = 256, .K = 4, .T = 24,
     .maxT = 24, .zero_mask = 0x4, .stats = 1, .seed = 8},
    {.name = "ll_two_ranks_all_minus1", .R = 2, .E = 8, .H = 128, .K = 4, .T = 10, .maxT = 16,
     .routing = EPX_ROUTING_ALL_MINUS1, .fp8 = 1, .stats = 1, .seed = 9},
    {.name = "ll_four_ranks_skewed_to_expert0", .R = 4, .E = 16, .H = 512, .K = 6, .T = 64,
     .maxT = 64, .routing = EPX_ROUTING_SKEWED, .fp8 = 1, .round_scale = 1, .seed = 10},
    {.name = "ll_four_ranks_repeated_experts", .R = 4, .E = 8, .H = 256, .K = 8, .T = 20,
     .maxT = 20, .routing = EPX_ROUTING_RANDOM_DUP, .stats = 1, .seed = 11},
    {.name = "ll_two_ranks_split_phases", .R = 2, .E = 16, .H = 1024, .K = 8, .T = 24, .maxT = 32,
     .fp8 = 1, .hook_dispatch = 1, .hook_combine = 1, .stats = 1, .seed = 12},
    {.name = "ll_four_ranks_zero_copy_combine", .R = 4, .E = 32, .H = 2048, .K = 8, .T = 16,
     .maxT = 16, .zero_copy = 1, .seed = 13},
    {.name = "ll_three_ranks_back_to_back_cycles", .R = 3, .E = 12, .H = 512, .K = 4, .T = 20,
     .maxT = 24, .vary = 1, .fp8 = 1, .round_scale = 1, .stats = 1, .iterations = 4, .seed = 14},
    {.name = "ll_two_ranks_cycles_hooks_zero_copy", .R = 2, .E = 8, .H = 256, .K = 3, .T = 12,
     .maxT = 12, .hook_dispatch = 1, .hook_combine = 1, .zero_copy = 1, .iterations = 3,
     .stats = 1, .seed = 15},
    {.name = "ll_eight_ranks_k1_one_expert_each", .R = 8, .E = 8, .H = 128, .K = 1, .T = 8,
     .maxT = 8, .int32 = 1, .seed = 16},
};

/* Random shapes (reliability.md R12), reproducible from the printed seed:
 * EPX_TEST_SEED=<seed> EPX_TEST_RANDOM_CASES=1 test_low_latency random. */
#define DEFAULT_RANDOM_CASES 40
#define DEFAULT_RANDOM_SEED 20240701u

static void random_case(uint64_t seed, lcase *c, char *name, size_t name_len) {
  static const int rank_choices[] = {1, 2, 3, 4, 5, 6, 8};
  epx_test_rng g;
  epx_test_rng_seed(&g, seed);
  memset(c, 0, sizeof(*c));
  c->R = rank_choices[epx_test_rng_below(&g, 7)];
  c->E = c->R * (1 + (int)epx_test_rng_below(&g, 12));
  c->fp8 = epx_test_rng_below(&g, 3) != 0;
  c->round_scale = c->fp8 && epx_test_rng_below(&g, 2);
  c->ue8m0 = c->round_scale && epx_test_rng_below(&g, 2);
  c->H = c->fp8 ? 128 * (1 + (int)epx_test_rng_below(&g, 6)) : 8 * (1 + (int)epx_test_rng_below(&g, 96));
  int kmax = c->E < 9 ? c->E : 9;
  c->K = 1 + (int)epx_test_rng_below(&g, (uint32_t)kmax);
  c->maxT = 1 + (int)epx_test_rng_below(&g, 48);
  c->T = (int)epx_test_rng_below(&g, (uint32_t)c->maxT + 1);
  c->vary = (int)epx_test_rng_below(&g, 2);
  c->zero_mask = epx_test_rng_below(&g, 3) == 0 ? (unsigned)epx_test_rng_below(&g, 256) : 0u;
  c->routing = (epx_test_routing)epx_test_rng_below(&g, 4);
  c->int32 = (int)epx_test_rng_below(&g, 2);
  c->stats = (int)epx_test_rng_below(&g, 2);
  c->hook_dispatch = (int)epx_test_rng_below(&g, 2);
  c->hook_combine = (int)epx_test_rng_below(&g, 2);
  c->zero_copy = (int)epx_test_rng_below(&g, 2);
  c->iterations = 2;
  c->seed = seed;
  snprintf(name, name_len, "random_R%d_E%d_H%d_K%d_T%d_maxT%d_%s_seed%" PRIu64, c->R, c->E, c->H,
           c->K, c->T, c->maxT,
           !c->fp8 ? "bf16" : c->ue8m0 ? "ue8m0" : c->round_scale ? "fp8pow2" : "fp8", seed);
  c->name = name;
}

static int run_case(const void *c) {
  const lcase *k = (const lcase *)c;
  return epx_test_run_case(k->name, k->seed, k->R, run_rank, (void *)k, SPAWN_TIMEOUT_S) != 0;
}

static const void *fixed_case(int i) { return &cases[i]; }
static const char *case_name(const void *c) { return ((const lcase *)c)->name; }
static void random_case_into(uint64_t seed, void *c, char *name, size_t name_len) {
  random_case(seed, (lcase *)c, name, name_len);
}

int main(int argc, char **argv) {
  const epx_test_suite suite = {"test_low_latency", (int)(sizeof cases / sizeof cases[0]), fixed_case, case_name,
                                run_case, random_case_into, sizeof(lcase), DEFAULT_RANDOM_CASES,
                                DEFAULT_RANDOM_SEED};
  return epx_test_suite_main(&suite, argc, argv);
}
