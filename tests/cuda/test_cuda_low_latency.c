/*
 * test_cuda_low_latency.c - low-latency mode on the CUDA backend: dispatch
 * (BF16, FP8, FP8 with power-of-two scales, UE8M0), combine, split phases,
 * zero-copy combine, cumulative statistics, back-to-back ops with no host
 * synchronisation, a CUDA graph of dispatch + combine replayed with fresh
 * inputs, and faults (a bad expert id, an absent peer). Every valid output row
 * is compared bit for bit with the CPU reference; rows past recv_count must
 * keep the 0xA5 poison.
 *
 * Ranks are forked processes sharing the visible GPUs (rank r uses device
 * r % device_count); on one GPU they share it through CUDA IPC, which checks
 * correctness, not speed.
 *
 *   test_cuda_low_latency            run every case
 *   test_cuda_low_latency NAME...    run the named cases
 * With EPX_TEST_EXEC_RANKS=1 each rank re-executes this binary, so that
 * compute-sanitizer --target-processes all sees every rank.
 */
#include <cuda_runtime_api.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/harness.h"
#include "common/layout_math.h"
#include "common/world.h"
#include "reference/reference.h"

#define SPAWN_TIMEOUT_S 300

typedef enum lmode {
  MODE_CYCLES = 0, /* dispatch, check, combine, check; `iterations` times */
  MODE_BACK_TO_BACK, /* dispatch, combine, dispatch, combine enqueued with no sync, then checks */
  MODE_GRAPH,        /* dispatch + combine captured once, replayed `iterations` times */
  MODE_BAD_ID,       /* rank 0 sends expert id E: every rank's next call fails */
  MODE_ABSENT        /* rank 1 never calls: rank 0 times out */
} lmode;

typedef struct lcase {
  const char *name;
  lmode mode;
  int R, E, H, K, T, maxT;
  int vary;
  unsigned zero_mask;
  epx_test_routing routing;
  int int32;
  int fp8, round_scale, ue8m0;
  int stats, hook_dispatch, hook_combine, zero_copy;
  int iterations;
  uint64_t seed;
} lcase;

#define CK(call)                                                                          \
  do {                                                                                    \
    cudaError_t ck_e_ = (call);                                                           \
    if (ck_e_ != cudaSuccess) {                                                           \
      fprintf(stderr, "  %s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(ck_e_)); \
      exit(3);                                                                            \
    }                                                                                     \
  } while (0)

static cudaStream_t g_stream;

static void *dalloc(size_t bytes) {
  void *p = NULL;
  CK(cudaMalloc(&p, bytes + 16));
  CK(cudaMemset(p, EPX_TEST_POISON_BYTE, bytes + 16));
  CK(cudaDeviceSynchronize()); /* the legacy-stream memset before the non-blocking stream's use */
  return p;
}
static void dpoison(void *d, size_t bytes) { CK(cudaMemsetAsync(d, EPX_TEST_POISON_BYTE, bytes, g_stream)); }
static void upload(void *d, const void *h, size_t bytes) {
  if (bytes) CK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, g_stream));
}
static void *to_host(const void *d, size_t bytes) {
  void *h = epx_test_xmalloc(bytes + 16);
  CK(cudaStreamSynchronize(g_stream));
  if (bytes) CK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
  return h;
}

static void make_problem(const lcase *c, epx_test_problem *p, uint64_t seed) {
  memset(p, 0, sizeof(*p));
  p->nranks = c->R;
  p->num_experts = c->E;
  p->hidden = c->H;
  p->num_topk = c->K;
  p->routing = c->routing;
  p->seed = seed;
  for (int r = 0; r < c->R; ++r) {
    p->tokens[r] = epx_test_case_tokens(c->T, r, c->R, c->vary, c->zero_mask);
  }
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

/* Device buffers of one dispatch + combine. */
typedef struct lbufs {
  size_t xrow, srow;
  int64_t rpe, rows;
  void *x, *topk;   /* inputs [maxT, H] BF16, [maxT, K] */
  float *weights;   /* [maxT, K] */
  void *recv_x, *scales;
  int *count, *src_info;
  int64_t *range;
  void *comb_in;    /* [rows, H] BF16 expert outputs (or the zero-copy buffer) */
  void *combined;   /* [maxT + 1, H] BF16 */
} lbufs;

static void bufs_alloc(lbufs *b, const lcase *c) {
  int el = c->E / c->R;
  memset(b, 0, sizeof *b);
  b->xrow = epx_payload_row_bytes(c->H, c->fp8);
  b->srow = c->fp8 ? epx_scale_row_bytes(c->H, c->ue8m0 ? 2 : 1) : 0;
  b->rpe = epx_ll_rows_per_expert(c->R, c->maxT);
  b->rows = (int64_t)el * b->rpe;
  b->x = dalloc((size_t)c->maxT * c->H * 2);
  b->topk = dalloc((size_t)c->maxT * c->K * 8);
  b->weights = dalloc((size_t)c->maxT * c->K * 4);
  b->recv_x = dalloc((size_t)b->rows * b->xrow);
  b->scales = b->srow ? dalloc((size_t)b->rows * b->srow) : NULL;
  b->count = dalloc(sizeof(int) * el);
  b->src_info = dalloc(sizeof(int) * (size_t)b->rows);
  b->range = dalloc(sizeof(int64_t) * (size_t)el * c->R);
  b->comb_in = dalloc((size_t)b->rows * c->H * 2);
  b->combined = dalloc((size_t)(c->maxT + 1) * c->H * 2);
}

static void bufs_free(lbufs *b) {
  cudaFree(b->x), cudaFree(b->topk), cudaFree(b->weights), cudaFree(b->recv_x);
  cudaFree(b->scales), cudaFree(b->count), cudaFree(b->src_info), cudaFree(b->range);
  cudaFree(b->comb_in), cudaFree(b->combined);
}

/* One cycle's host-side expectations. */
typedef struct lcycle {
  epx_test_world w;
  epx_ref_ll_result ref;
  uint16_t *outs[EPX_TEST_MAX_RANKS]; /* every rank's expert outputs (valid rows filled) */
  uint16_t *exp_combined;             /* [T_me, H] */
} lcycle;

static int cycle_build(lcycle *y, const lcase *c, int rank, int it) {
  int R = c->R, el = c->E / R, H = c->H;
  epx_test_problem p;
  make_problem(c, &p, c->seed + 101 * (uint64_t)it);
  epx_test_world_init(&y->w, &p, !c->int32, EPX_PAYLOAD_BF16, c->seed * 7 + (uint64_t)it);
  epx_ref_ll_opts ro = {c->maxT, c->fp8, c->round_scale, c->ue8m0};
  if (epx_ref_ll_dispatch(&y->w.ref, rank, &ro, &y->ref) != 0) {
    fprintf(stderr, "  rank %d: reference ll dispatch failed\n", rank);
    return 1;
  }
  int *counts = epx_test_xmalloc(sizeof(int) * c->E);
  expert_counts(&y->w, counts);
  int64_t rpe = epx_ll_rows_per_expert(R, c->maxT);
  for (int r = 0; r < R; ++r) {
    /* malloc'd, not touched past the valid rows: only those are read */
    y->outs[r] = epx_test_xaligned((size_t)el * rpe * H * 2);
    for (int e = 0; e < el; ++e)
      epx_test_fill_bf16_wide(c->seed * 13 + (uint64_t)it, r * 4096 + e, counts[r * el + e], H,
                              y->outs[r] + (size_t)e * rpe * H);
  }
  free(counts);
  int T = p.tokens[rank];
  y->exp_combined = epx_test_xaligned((size_t)(T + 1) * H * 2);
  epx_ref_ll_combine(&y->w.ref, rank, c->maxT, (const uint16_t *const *)y->outs,
                     y->w.weights[rank], y->exp_combined);
  return 0;
}

static void cycle_free(lcycle *y, const lcase *c) {
  for (int r = 0; r < c->R; ++r) free(y->outs[r]);
  free(y->exp_combined);
  epx_ref_ll_free(&y->ref);
  epx_test_world_free(&y->w);
}

/* Stream-ordered: new inputs into the device buffers, outputs poisoned. */
static void cycle_upload(const lcycle *y, const lcase *c, int rank, lbufs *b, void *comb_target) {
  int T = y->w.p.tokens[rank], H = c->H, K = c->K, el = c->E / c->R;
  upload(b->x, y->w.x[rank], (size_t)T * H * 2);
  upload(b->topk, y->w.topk[rank], (size_t)T * K * (c->int32 ? 4 : 8));
  upload(b->weights, y->w.weights[rank], (size_t)T * K * 4);
  for (int e = 0; e < el; ++e) {
    int n = y->ref.recv_count[e];
    size_t at = (size_t)e * b->rpe * H;
    upload((uint16_t *)comb_target + at, y->outs[rank] + at, (size_t)n * H * 2);
  }
  dpoison(b->recv_x, (size_t)b->rows * b->xrow);
  if (b->scales) dpoison(b->scales, (size_t)b->rows * b->srow);
  dpoison(b->count, sizeof(int) * el);
  dpoison(b->src_info, sizeof(int) * (size_t)b->rows);
  dpoison(b->range, sizeof(int64_t) * (size_t)el * c->R);
  dpoison(b->combined, (size_t)(c->maxT + 1) * H * 2);
}

static epxLowLatencyDispatchArgs_t dargs(const lcycle *y, const lcase *c, int rank, lbufs *b,
                                         int *stats) {
  epxLowLatencyDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = b->x;
  a.topk_idx = b->topk;
  a.topk_idx_type = c->int32 ? epxInt32 : epxInt64;
  a.num_tokens = y->w.p.tokens[rank];
  a.hidden = c->H;
  a.num_topk = c->K;
  a.use_fp8 = c->fp8;
  a.round_scale = c->round_scale;
  a.use_ue8m0 = c->ue8m0;
  a.cumulative_local_expert_recv_stats = c->stats ? stats : NULL;
  a.return_recv_hook = c->hook_dispatch;
  return a;
}

static int enqueue_dispatch(epxComm_t comm, epxHandle_t h, const lcycle *y, const lcase *c,
                            int rank, lbufs *b, int *stats) {
  epxLowLatencyDispatchArgs_t a = dargs(y, c, rank, b, stats);
  epxLowLatencyDispatchOutputs_t o = {b->recv_x, b->scales, b->count, b->src_info, b->range};
  int fail = epx_test_expect_success(rank, comm, epxLowLatencyDispatch(comm, &a, h, &o, g_stream), "epxLowLatencyDispatch");
  if (!fail && c->hook_dispatch) {
    epxHandleInfo_t info;
    epxHandleGetInfo(h, &info);
    if (!info.recv_pending) fprintf(stderr, "  rank %d: recv_pending not set\n", rank), fail = 1;
    if (!fail) fail |= epx_test_expect_success(rank, comm, epxLowLatencyRecv(comm, h, g_stream), "epxLowLatencyRecv");
  }
  return fail;
}

static int enqueue_combine(epxComm_t comm, epxHandle_t h, const lcycle *y, const lcase *c,
                           int rank, lbufs *b) {
  epxLowLatencyCombineArgs_t ca;
  memset(&ca, 0, sizeof ca);
  ca.x = c->zero_copy ? NULL : b->comb_in;
  ca.zero_copy = c->zero_copy;
  ca.topk_idx = b->topk;
  ca.topk_idx_type = c->int32 ? epxInt32 : epxInt64;
  ca.topk_weights = b->weights;
  ca.num_tokens = y->w.p.tokens[rank];
  ca.hidden = c->H;
  ca.num_topk = c->K;
  ca.return_recv_hook = c->hook_combine;
  int fail = epx_test_expect_success(rank, comm, epxLowLatencyCombine(comm, &ca, h, b->combined, g_stream),
                    "epxLowLatencyCombine");
  if (!fail && c->hook_combine)
    fail |= epx_test_expect_success(rank, comm, epxLowLatencyRecv(comm, h, g_stream), "epxLowLatencyRecv (combine)");
  return fail;
}

static int check_dispatch(const lcycle *y, const lcase *c, int rank, const lbufs *b) {
  int R = c->R, el = c->E / R, H = c->H;
  int fail = 0;
  int *cnt = to_host(b->count, sizeof(int) * el);
  fail |= epx_test_rank_compare(rank, "recv_count", EPX_ELEM_I32, y->ref.recv_count, cnt, 1, el);
  free(cnt);
  int64_t *range = to_host(b->range, sizeof(int64_t) * el * R);
  fail |= epx_test_rank_compare(rank, "recv_layout_range", EPX_ELEM_I64, y->ref.recv_layout_range, range, el, R);
  free(range);
  for (int e = 0; e < el && !fail; ++e) {
    int n = y->ref.recv_count[e];
    int extra = n < b->rpe ? 1 : 0; /* the first row past the valid ones must stay poisoned */
    size_t at = (size_t)e * (size_t)b->rpe;
    char what[64];
    uint8_t *gx = to_host((uint8_t *)b->recv_x + at * b->xrow, (size_t)(n + extra) * b->xrow);
    snprintf(what, sizeof what, "expert %d recv_x", e);
    fail |= epx_test_rank_compare(rank, what, c->fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16,
                (uint8_t *)y->ref.recv_x + at * b->xrow, gx, n, H);
    if (extra && !epx_test_is_poisoned(gx + (size_t)n * b->xrow, b->xrow)) {
      fprintf(stderr, "  rank %d: expert %d row %d (past recv_count) was written\n", rank, e, n);
      fail = 1;
    }
    free(gx);
    if (c->fp8) {
      void *gs = to_host((uint8_t *)b->scales + at * b->srow, (size_t)n * b->srow);
      snprintf(what, sizeof what, "expert %d recv_x_scales", e);
      fail |= epx_test_rank_compare(rank, what, c->ue8m0 ? EPX_ELEM_I32 : EPX_ELEM_F32,
                  (uint8_t *)y->ref.recv_x_scales + at * b->srow, gs, n, (int64_t)(b->srow / 4));
      free(gs);
    }
    int *gi = to_host(b->src_info + at, sizeof(int) * (size_t)n);
    snprintf(what, sizeof what, "expert %d recv_src_info", e);
    fail |= epx_test_rank_compare(rank, what, EPX_ELEM_I32, y->ref.recv_src_info + at, gi, n, 1);
    free(gi);
  }
  return fail;
}

static int check_combine(const lcycle *y, const lcase *c, int rank, const lbufs *b) {
  int T = y->w.p.tokens[rank], H = c->H;
  uint16_t *g = to_host(b->combined, (size_t)(T + 1) * H * 2);
  int fail = epx_test_rank_compare(rank, "combined_x", EPX_ELEM_BF16, y->exp_combined, g, T, H);
  if (!epx_test_is_poisoned(g + (size_t)T * H, (size_t)H * 2)) {
    fprintf(stderr, "  rank %d: combined_x written past row T\n", rank);
    fail = 1;
  }
  free(g);
  return fail;
}

static int check_stats(const lcase *c, int rank, const int *dstats, const int *exp) {
  if (!c->stats) return 0;
  int el = c->E / c->R;
  int *g = to_host(dstats, sizeof(int) * el);
  int fail = epx_test_rank_compare(rank, "cumulative_local_expert_recv_stats", EPX_ELEM_I32, exp, g, 1, el);
  free(g);
  return fail;
}

static void add_stats(const lcase *c, const lcycle *y, int *exp) {
  for (int e = 0; e < c->E / c->R; ++e) exp[e] += y->ref.recv_count[e];
}

static int run_rank(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const lcase *c = arg;
  int el = c->E / c->R;
  int ndev = 0;
  CK(cudaGetDeviceCount(&ndev));
  CK(cudaSetDevice(rank % ndev));
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  epx_test_problem p;
  make_problem(c, &p, c->seed);
  epxConfig_t cfg = epx_test_config(&p, c->maxT);
  cfg.backend = epxBackendCuda;
  cfg.cuda_device = rank % ndev;
  if (c->mode == MODE_ABSENT) cfg.timeout_ms = 1500;
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, nranks, id, &cfg)) return 1;
  epxHandle_t h = NULL;
  int fail = epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  lbufs b[2];
  bufs_alloc(&b[0], c);
  memset(&b[1], 0, sizeof b[1]);
  if (c->mode == MODE_BACK_TO_BACK) bufs_alloc(&b[1], c);
  int *dstats = dalloc(sizeof(int) * el);
  int *stats_exp = epx_test_xmalloc(sizeof(int) * el);
  for (int e = 0; e < el; ++e) stats_exp[e] = 3 * e + 1;
  upload(dstats, stats_exp, sizeof(int) * el);
  void *zc = NULL;
  if (!fail && c->zero_copy) {
    fail |= epx_test_expect_success(rank, comm, epxLowLatencyGetCombineBuffer(comm, &zc), "epxLowLatencyGetCombineBuffer");
    void *zc2 = NULL;
    if (!fail) fail |= epx_test_expect_success(rank, comm, epxLowLatencyGetCombineBuffer(comm, &zc2), "GetCombineBuffer again");
    if (!fail && (zc == NULL || zc2 != zc)) fprintf(stderr, "  rank %d: combine buffer moved\n", rank), fail = 1;
  }
  int iters = c->iterations > 0 ? c->iterations : 1;
  double t0 = epx_test_now();

  if (fail) {
  } else if (c->mode == MODE_CYCLES) {
    for (int it = 0; it < iters && !fail; ++it) {
      lcycle y;
      memset(&y, 0, sizeof y);
      fail |= cycle_build(&y, c, rank, it);
      if (!fail) {
        cycle_upload(&y, c, rank, &b[0], zc ? zc : b[0].comb_in);
        fail |= enqueue_dispatch(comm, h, &y, c, rank, &b[0], dstats);
        if (!fail) fail |= check_dispatch(&y, c, rank, &b[0]);
        add_stats(c, &y, stats_exp);
        if (!fail) fail |= check_stats(c, rank, dstats, stats_exp);
        if (!fail) fail |= enqueue_combine(comm, h, &y, c, rank, &b[0]);
        if (!fail) fail |= check_combine(&y, c, rank, &b[0]);
      }
      cycle_free(&y, c);
    }
  } else if (c->mode == MODE_BACK_TO_BACK) {
    /* Two handles, two buffer sets, four ops, no host synchronisation between
     * them (the uploads are stream-ordered copies). */
    epxHandle_t h2 = NULL;
    fail |= epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h2), "epxHandleCreate");
    for (int it = 0; it < iters && !fail; ++it) {
      lcycle y[2];
      memset(y, 0, sizeof y);
      fail |= cycle_build(&y[0], c, rank, 2 * it);
      fail |= cycle_build(&y[1], c, rank, 2 * it + 1);
      if (!fail) {
        cycle_upload(&y[0], c, rank, &b[0], b[0].comb_in);
        fail |= enqueue_dispatch(comm, h, &y[0], c, rank, &b[0], dstats);
        if (!fail) fail |= enqueue_combine(comm, h, &y[0], c, rank, &b[0]);
        cycle_upload(&y[1], c, rank, &b[1], b[1].comb_in);
        if (!fail) fail |= enqueue_dispatch(comm, h2, &y[1], c, rank, &b[1], dstats);
        if (!fail) fail |= enqueue_combine(comm, h2, &y[1], c, rank, &b[1]);
        add_stats(c, &y[0], stats_exp);
        add_stats(c, &y[1], stats_exp);
        for (int i = 0; i < 2 && !fail; ++i) {
          fail |= check_dispatch(&y[i], c, rank, &b[i]);
          if (!fail) fail |= check_combine(&y[i], c, rank, &b[i]);
        }
        if (!fail) fail |= check_stats(c, rank, dstats, stats_exp);
      }
      cycle_free(&y[0], c);
      cycle_free(&y[1], c);
    }
    epxHandleDestroy(h2);
  } else if (c->mode == MODE_GRAPH) {
    /* Capture with the first cycle's token count: T is a captured argument, so
     * every replay's world keeps it (make_problem gives every cycle the same T). */
    lcycle y;
    memset(&y, 0, sizeof y);
    fail |= cycle_build(&y, c, rank, 0);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    int have_exec = 0;
    if (!fail) {
      CK(cudaStreamSynchronize(g_stream));
      CK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeRelaxed));
      int f1 = enqueue_dispatch(comm, h, &y, c, rank, &b[0], dstats);
      int f2 = f1 ? 1 : enqueue_combine(comm, h, &y, c, rank, &b[0]);
      CK(cudaStreamEndCapture(g_stream, &graph));
      fail |= f1 | f2;
      if (!fail) {
        CK(cudaGraphInstantiate(&exec, graph, 0));
        have_exec = 1;
      }
    }
    cycle_free(&y, c);
    for (int it = 0; it < iters && !fail; ++it) {
      memset(&y, 0, sizeof y);
      fail |= cycle_build(&y, c, rank, it + 1);
      if (!fail) {
        cycle_upload(&y, c, rank, &b[0], b[0].comb_in);
        CK(cudaGraphLaunch(exec, g_stream));
        add_stats(c, &y, stats_exp);
        fail |= check_dispatch(&y, c, rank, &b[0]);
        if (!fail) fail |= check_combine(&y, c, rank, &b[0]);
        if (!fail) fail |= check_stats(c, rank, dstats, stats_exp);
        if (fail) fprintf(stderr, "  rank %d: graph replay %d differs\n", rank, it);
      }
      cycle_free(&y, c);
    }
    if (have_exec) {
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }
  } else if (c->mode == MODE_BAD_ID) {
    lcycle y;
    memset(&y, 0, sizeof y);
    fail |= cycle_build(&y, c, rank, 0);
    if (!fail) {
      cycle_upload(&y, c, rank, &b[0], b[0].comb_in);
      if (rank == 0) {
        int64_t bad = c->E; /* token 1, slot 2: only the device sees it */
        if (c->int32) {
          int32_t b32 = (int32_t)bad;
          upload((int32_t *)b[0].topk + 1 * c->K + 2, &b32, 4);
        } else {
          upload((int64_t *)b[0].topk + 1 * c->K + 2, &bad, 8);
        }
      }
      fail |= enqueue_dispatch(comm, h, &y, c, rank, &b[0], dstats);
      CK(cudaStreamSynchronize(g_stream));
      int *cnt = to_host(b[0].count, sizeof(int) * el);
      if (!epx_test_is_poisoned(cnt, sizeof(int) * el))
        fprintf(stderr, "  rank %d: recv_count written by a failed dispatch\n", rank), fail = 1;
      free(cnt);
      epxResult_t want = rank == 0 ? epxInvalidArgument : epxRemoteError;
      /* The error was found on the device; the next call reports it. */
      epxLowLatencyDispatchArgs_t a = dargs(&y, c, rank, &b[0], dstats);
      epxLowLatencyDispatchOutputs_t o = {b[0].recv_x, b[0].scales, b[0].count, b[0].src_info, b[0].range};
      epxResult_t got = epxLowLatencyDispatch(comm, &a, h, &o, g_stream);
      fprintf(stderr, "  rank %d: next call -> %s: %s\n", rank, epxGetErrorString(got), epxCommGetLastError(comm));
      if (got != want) fprintf(stderr, "  rank %d: expected %s\n", rank, epxGetErrorString(want)), fail = 1;
    }
    cycle_free(&y, c);
  } else if (c->mode == MODE_ABSENT) {
    lcycle y;
    memset(&y, 0, sizeof y);
    fail |= cycle_build(&y, c, rank, 0);
    if (!fail && rank == 0) {
      cycle_upload(&y, c, rank, &b[0], b[0].comb_in);
      CK(cudaStreamSynchronize(g_stream));
      double ts = epx_test_now();
      fail |= enqueue_dispatch(comm, h, &y, c, rank, &b[0], dstats);
      CK(cudaStreamSynchronize(g_stream)); /* returns: the device wait is bounded */
      double dt = epx_test_now() - ts;
      fprintf(stderr, "  rank 0: the stream finished after %.2f s (timeout 1.5 s)\n", dt);
      if (dt < 1.4 || dt > 4.0) fail = 1;
      epxLowLatencyDispatchArgs_t a = dargs(&y, c, rank, &b[0], dstats);
      epxLowLatencyDispatchOutputs_t o = {b[0].recv_x, b[0].scales, b[0].count, b[0].src_info, b[0].range};
      epxResult_t got = epxLowLatencyDispatch(comm, &a, h, &o, g_stream);
      fprintf(stderr, "  rank 0: next call -> %s: %s\n", epxGetErrorString(got), epxCommGetLastError(comm));
      if (got != epxTimeout) fail = 1;
      epxResult_t ae = epxSuccess;
      epxCommGetAsyncError(comm, &ae);
      if (ae != epxTimeout) fprintf(stderr, "  rank 0: async error %s\n", epxGetErrorString(ae)), fail = 1;
    } else if (!fail) {
      usleep(3000 * 1000);
    }
    cycle_free(&y, c);
  }
  if (!fail && (c->mode == MODE_CYCLES || c->mode == MODE_GRAPH || c->mode == MODE_BACK_TO_BACK))
    fprintf(stderr, "  rank %d: %d iteration(s) in %.3f s (one GPU shared by all ranks)\n", rank,
            iters, epx_test_now() - t0);
  epxHandleDestroy(h);
  double td = epx_test_now();
  epxResult_t dr = epxCommDestroy(comm);
  if (dr != epxSuccess || epx_test_now() - td > 2.0) {
    fprintf(stderr, "  rank %d: epxCommDestroy: %s after %.2f s\n", rank, epxGetErrorString(dr),
            epx_test_now() - td);
    fail = 1;
  }
  bufs_free(&b[0]);
  bufs_free(&b[1]);
  cudaFree(dstats);
  free(stats_exp);
  cudaStreamDestroy(g_stream);
  return fail;
}

static const lcase cases[] = {
    /* small: the compute-sanitizer cases */
    {.name = "small_two_ranks_bf16", .R = 2, .E = 8, .H = 256, .K = 4, .T = 12, .maxT = 16,
     .stats = 1, .iterations = 2, .seed = 1},
    {.name = "small_two_ranks_fp8", .R = 2, .E = 8, .H = 256, .K = 4, .T = 12, .maxT = 16,
     .fp8 = 1, .stats = 1, .iterations = 2, .seed = 2},
    {.name = "two_ranks_fp8_round_scale_int32", .R = 2, .E = 16, .H = 1024, .K = 6, .T = 32,
     .maxT = 40, .vary = 1, .int32 = 1, .fp8 = 1, .round_scale = 1, .stats = 1, .seed = 3},
    {.name = "three_ranks_ue8m0_h640", .R = 3, .E = 12, .H = 640, .K = 5, .T = 20, .maxT = 24,
     .fp8 = 1, .round_scale = 1, .ue8m0 = 1, .stats = 1, .seed = 4},
    {.name = "four_ranks_zero_tokens_on_rank_2", .R = 4, .E = 16, .H = 256, .K = 4, .T = 24,
     .maxT = 24, .zero_mask = 0x4, .fp8 = 1, .stats = 1, .seed = 5},
    {.name = "two_ranks_zero_tokens_everywhere", .R = 2, .E = 8, .H = 128, .K = 2, .T = 0,
     .maxT = 8, .stats = 1, .iterations = 2, .seed = 6},
    {.name = "four_ranks_repeated_experts_and_minus1", .R = 4, .E = 8, .H = 256, .K = 8, .T = 20,
     .maxT = 20, .routing = EPX_ROUTING_RANDOM_DUP, .stats = 1, .seed = 7},
    {.name = "two_ranks_split_phases", .R = 2, .E = 16, .H = 1024, .K = 8, .T = 24, .maxT = 32,
     .fp8 = 1, .hook_dispatch = 1, .hook_combine = 1, .stats = 1, .iterations = 2, .seed = 8},
    {.name = "three_ranks_zero_copy_combine", .R = 3, .E = 12, .H = 512, .K = 4, .T = 16,
     .maxT = 16, .zero_copy = 1, .hook_combine = 1, .iterations = 3, .seed = 9},
    {.name = "two_ranks_back_to_back_no_sync", .mode = MODE_BACK_TO_BACK, .R = 2, .E = 16,
     .H = 512, .K = 4, .T = 24, .maxT = 24, .vary = 1, .fp8 = 1, .stats = 1, .iterations = 3,
     .seed = 10},
    {.name = "two_ranks_graph_1000_replays", .mode = MODE_GRAPH, .R = 2, .E = 16, .H = 256,
     .K = 4, .T = 16, .maxT = 16, .fp8 = 1, .stats = 1, .iterations = 1000, .seed = 11},
    {.name = "standard_two_ranks_t128_h7168_k8_e256_fp8", .R = 2, .E = 256, .H = 7168, .K = 8,
     .T = 128, .maxT = 128, .fp8 = 1, .stats = 1, .iterations = 2, .seed = 12},
    {.name = "standard_four_ranks_t128_h7168_k8_e256_fp8", .R = 4, .E = 256, .H = 7168, .K = 8,
     .T = 128, .maxT = 128, .fp8 = 1, .stats = 1, .iterations = 2, .seed = 13},
    {.name = "standard_four_ranks_t128_h7168_k8_e256_bf16", .R = 4, .E = 256, .H = 7168, .K = 8,
     .T = 128, .maxT = 128, .seed = 14},
    {.name = "fault_bad_expert_id", .mode = MODE_BAD_ID, .R = 2, .E = 16, .H = 256, .K = 4,
     .T = 8, .maxT = 8, .seed = 15},
    {.name = "fault_absent_peer_times_out", .mode = MODE_ABSENT, .R = 2, .E = 16, .H = 256,
     .K = 4, .T = 8, .maxT = 8, .seed = 16},
};

/* ---- exec mode (see test_cuda_normal.c) ---- */

static int rank_exec_main(int argc, char **argv) {
  epxUniqueId id;
  const char *name;
  int rank, nranks;
  if (epx_test_parse_rank_exec(argc, argv, &name, &rank, &nranks, &id) != 0) return 2;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
    if (strcmp(cases[i].name, name) == 0) return run_rank(rank, nranks, &id, (void *)&cases[i]);
  return 2;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--rank-exec") == 0) return rank_exec_main(argc, argv);
  const char *ex = getenv("EPX_TEST_EXEC_RANKS");
  int use_exec = ex && strcmp(ex, "1") == 0;
  int ncases = (int)(sizeof cases / sizeof cases[0]), ran = 0, failed = 0;
  for (int i = 0; i < ncases; ++i) {
    const lcase *c = &cases[i];
    if (!epx_test_case_wanted(argc, argv, c->name)) continue;
    if (epx_test_run_case(c->name, c->seed, c->R, use_exec ? epx_test_exec_rank : run_rank,
                          use_exec ? (void *)c->name : (void *)c, SPAWN_TIMEOUT_S))
      failed++;
    ++ran;
  }
  if (ran == 0) {
    fprintf(stderr, "no case matched\n");
    return 1;
  }
  if (failed) {
    printf("%d of %d cases failed\n", failed, ran);
    return 1;
  }
  printf("all %d cases passed\n", ran);
  return 0;
}
