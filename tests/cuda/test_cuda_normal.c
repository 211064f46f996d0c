/*
 * test_cuda_normal.c - normal mode on the CUDA backend (layout, notify,
 * dispatch, combine, worst-case dispatch and its CUDA-graph replay), every
 * output compared bit for bit with the CPU reference.
 *
 * Ranks are forked processes sharing the visible GPUs (rank r uses device
 * r % device_count); with one GPU all ranks share it through CUDA IPC, which
 * checks correctness, not speed. Device outputs are poisoned (0xA5) before
 * each call; rows a call must not write must still be poisoned afterwards.
 *
 *   test_cuda_normal            run every case
 *   test_cuda_normal NAME...    run the named cases
 *
 * Build (no Makefile rule yet), after `make`:
 *   cc -std=c11 -O2 -D_GNU_SOURCE -Iinclude -Isrc -Itests -I$CUDA_HOME/include \
 *      tests/cuda/test_cuda_normal.c tests/common/harness.c tests/common/world.c \
 *      build/libepx_ref.a build/libepx.a -L$CUDA_HOME/lib64 -lcudart -lstdc++ -lpthread -lrt -lm \
 *      -o build/tests/test_cuda_normal
 */
#include <cuda_runtime_api.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/harness.h"
#include "common/layout_math.h"
#include "common/world.h"
#include "reference/reference.h"

#define SPAWN_TIMEOUT_S 180

typedef struct ncase {
  const char *name;
  int R, rpn, E, H, K, T;
  int vary;
  unsigned zero_mask;
  epx_test_routing routing;
  int int32;
  epx_test_payload payload;
  int weights;
  int alignment;
  int nbias;
  int comb_weights;
  int worst;      /* no-host-sync dispatch */
  int graph;      /* worst-case dispatch captured in a CUDA graph, replayed this many times */
  int cached;     /* 1: cached re-dispatch with topk_idx, 2: without */
  int iterations;
  uint64_t seed;
} ncase;

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
  /* cudaMemset runs on the legacy stream, which does not order with the
   * non-blocking test stream: finish it before the buffer is used there. */
  CK(cudaDeviceSynchronize());
  return p;
}
static void *dup_to_device(const void *h, size_t bytes) {
  void *d = dalloc(bytes);
  if (bytes) CK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
  return d;
}
static void *to_host(const void *d, size_t bytes) {
  void *h = epx_test_xmalloc(bytes + 16);
  CK(cudaStreamSynchronize(g_stream));
  if (bytes) CK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
  return h;
}
static void dpoison(void *d, size_t bytes) { CK(cudaMemsetAsync(d, EPX_TEST_POISON_BYTE, bytes, g_stream)); }

static void make_problem(const ncase *c, epx_test_problem *p) {
  memset(p, 0, sizeof(*p));
  p->nranks = c->R;
  p->ranks_per_node = c->rpn;
  p->num_experts = c->E;
  p->hidden = c->H;
  p->num_topk = c->K;
  p->routing = c->routing;
  p->seed = c->seed;
  for (int r = 0; r < c->R; ++r) {
    p->tokens[r] = epx_test_case_tokens(c->T, r, c->R, c->vary, c->zero_mask);
  }
}

/* The device copy of this rank's inputs. */
typedef struct dev_inputs {
  void *x, *scales, *topk;
  float *weights;
} dev_inputs;

static void inputs_upload(dev_inputs *d, const epx_test_world *w, int rank) {
  int T = w->p.tokens[rank], H = w->p.hidden, K = w->p.num_topk;
  int fp8 = w->payload != EPX_PAYLOAD_BF16;
  d->x = dup_to_device(w->x[rank], (size_t)T * epx_payload_row_bytes(H, fp8));
  d->scales = fp8 ? dup_to_device(w->scales[rank], (size_t)T * epx_scale_row_bytes(H, (int)w->payload)) : NULL;
  d->topk = dup_to_device(w->topk[rank], (size_t)T * K * (w->is_int64 ? 8 : 4));
  d->weights = dup_to_device(w->weights[rank], (size_t)T * K * sizeof(float));
}
static void inputs_free(dev_inputs *d) {
  cudaFree(d->x);
  cudaFree(d->scales);
  cudaFree(d->topk);
  cudaFree(d->weights);
  memset(d, 0, sizeof *d);
}

static int check_layout(epxComm_t comm, const epx_test_world *w, const dev_inputs *d, int rank) {
  int R = w->p.nranks, E = w->p.num_experts, T = w->p.tokens[rank];
  int nodes = R / epx_test_ranks_per_node(&w->p);
  int *per_rank = dalloc(sizeof(int) * R), *per_node = dalloc(sizeof(int) * nodes);
  int *per_expert = dalloc(sizeof(int) * E);
  uint8_t *in_rank = dalloc((size_t)T * R + 1);
  epxLayout_t lay = {per_rank, per_node, per_expert, in_rank};
  int fail = epx_test_expect_success(rank, comm,
                    epxGetDispatchLayout(comm, d->topk, w->is_int64 ? epxInt64 : epxInt32, T,
                                         w->p.num_topk, &lay, g_stream),
                    "epxGetDispatchLayout");
  if (!fail) {
    int *e_rank = epx_test_xmalloc(sizeof(int) * R), *e_node = epx_test_xmalloc(sizeof(int) * nodes);
    int *e_expert = epx_test_xmalloc(sizeof(int) * E);
    uint8_t *e_in = epx_test_xmalloc((size_t)T * R + 1);
    epx_ref_layout(&w->ref, rank, e_rank, e_node, e_expert, e_in);
    int *g_rank = to_host(per_rank, sizeof(int) * R), *g_node = to_host(per_node, sizeof(int) * nodes);
    int *g_expert = to_host(per_expert, sizeof(int) * E);
    uint8_t *g_in = to_host(in_rank, (size_t)T * R);
    fail |= epx_test_rank_compare(rank, "num_tokens_per_rank", EPX_ELEM_I32, e_rank, g_rank, 1, R);
    fail |= epx_test_rank_compare(rank, "num_tokens_per_node", EPX_ELEM_I32, e_node, g_node, 1, nodes);
    fail |= epx_test_rank_compare(rank, "num_tokens_per_expert", EPX_ELEM_I32, e_expert, g_expert, 1, E);
    fail |= epx_test_rank_compare(rank, "is_token_in_rank", EPX_ELEM_U8, e_in, g_in, T, R);
    free(e_rank), free(e_node), free(e_expert), free(e_in);
    free(g_rank), free(g_node), free(g_expert), free(g_in);
  }
  cudaFree(per_rank), cudaFree(per_node), cudaFree(per_expert), cudaFree(in_rank);
  return fail;
}

typedef struct dispatch_bufs {
  int64_t cap;
  void *recv_x, *recv_scales, *recv_topk_idx;
  float *recv_weights;
  int *recv_src_idx, *recv_rank_prefix, *per_expert, *num_recv;
  size_t xrow, srow, idx_es;
  int K, R, el;
} dispatch_bufs;

static void bufs_poison(dispatch_bufs *b) {
  size_t rows = (size_t)b->cap + 1;
  dpoison(b->recv_x, rows * b->xrow);
  if (b->recv_scales) dpoison(b->recv_scales, rows * b->srow);
  if (b->recv_topk_idx) dpoison(b->recv_topk_idx, rows * b->K * b->idx_es);
  if (b->recv_weights) dpoison(b->recv_weights, rows * b->K * sizeof(float));
  dpoison(b->recv_src_idx, rows * sizeof(int));
  dpoison(b->recv_rank_prefix, sizeof(int) * b->R);
  dpoison(b->per_expert, sizeof(int) * b->el);
  dpoison(b->num_recv, sizeof(int));
}

static void bufs_alloc(dispatch_bufs *b, const epx_test_world *w, int64_t cap, int with_topk,
                       int with_weights) {
  int H = w->p.hidden;
  int fp8 = w->payload != EPX_PAYLOAD_BF16;
  memset(b, 0, sizeof(*b));
  b->cap = cap;
  b->K = w->p.num_topk;
  b->R = w->p.nranks;
  b->el = w->p.num_experts / w->p.nranks;
  b->xrow = epx_payload_row_bytes(H, fp8);
  b->srow = epx_scale_row_bytes(H, (int)w->payload);
  b->idx_es = w->is_int64 ? 8 : 4;
  size_t rows = (size_t)cap + 1;
  b->recv_x = dalloc(rows * b->xrow);
  if (b->srow) b->recv_scales = dalloc(rows * b->srow);
  if (with_topk) b->recv_topk_idx = dalloc(rows * b->K * b->idx_es);
  if (with_weights) b->recv_weights = dalloc(rows * b->K * sizeof(float));
  b->recv_src_idx = dalloc(rows * sizeof(int));
  b->recv_rank_prefix = dalloc(sizeof(int) * b->R);
  b->per_expert = dalloc(sizeof(int) * b->el);
  b->num_recv = dalloc(sizeof(int));
}

static void bufs_free(dispatch_bufs *b) {
  cudaFree(b->recv_x), cudaFree(b->recv_scales), cudaFree(b->recv_topk_idx);
  cudaFree(b->recv_weights), cudaFree(b->recv_src_idx), cudaFree(b->recv_rank_prefix);
  cudaFree(b->per_expert), cudaFree(b->num_recv);
  memset(b, 0, sizeof(*b));
}

static epxDispatchOutputs_t bufs_outputs(const dispatch_bufs *b) {
  epxDispatchOutputs_t o;
  memset(&o, 0, sizeof o);
  o.recv_x = b->recv_x;
  o.recv_x_scales = b->recv_scales;
  o.recv_topk_idx = b->recv_topk_idx;
  o.recv_topk_weights = b->recv_weights;
  o.recv_src_idx = b->recv_src_idx;
  o.recv_rank_prefix = b->recv_rank_prefix;
  o.num_recv_tokens_per_expert = b->per_expert;
  o.num_recv_tokens = b->num_recv;
  o.capacity_rows = b->cap;
  return o;
}

static epxDispatchArgs_t make_args(const epx_test_world *w, const dev_inputs *d, int rank,
                                   const ncase *c) {
  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = d->x;
  a.x_type = w->payload == EPX_PAYLOAD_BF16 ? epxBFloat16 : epxFloat8E4M3;
  a.x_scales = d->scales;
  a.scale_format = w->payload == EPX_PAYLOAD_BF16      ? epxScalesNone
                   : w->payload == EPX_PAYLOAD_FP8_F32 ? epxScalesFloat32
                                                       : epxScalesUE8M0;
  a.topk_idx = d->topk;
  a.topk_idx_type = w->is_int64 ? epxInt64 : epxInt32;
  a.topk_weights = c->weights ? d->weights : NULL;
  a.num_tokens = w->p.tokens[rank];
  a.hidden = w->p.hidden;
  a.num_topk = w->p.num_topk;
  a.expert_alignment = c->alignment;
  return a;
}

/* Copies the outputs back and compares them with the reference. */
static int check_dispatch(int rank, const epx_test_world *w, const dispatch_bufs *b,
                          const epx_ref_dispatch_result *ref, int64_t rows_meta) {
  int K = w->p.num_topk, R = w->p.nranks, el = w->p.num_experts / R, H = w->p.hidden;
  int64_t N = ref->num_recv;
  size_t rows = (size_t)b->cap + 1;
  int fail = 0;
  epx_test_elem xe = w->payload == EPX_PAYLOAD_BF16 ? EPX_ELEM_BF16 : EPX_ELEM_FP8;
  uint8_t *x = to_host(b->recv_x, rows * b->xrow);
  fail |= epx_test_rank_compare(rank, "recv_x", xe, ref->recv_x, x, N, H);
  if (b->cap > N && !epx_test_is_poisoned(x + (size_t)N * b->xrow, (size_t)(b->cap - N) * b->xrow)) {
    fprintf(stderr, "  rank %d: recv_x rows [%" PRId64 ", %" PRId64 ") were written\n", rank, N, b->cap);
    fail = 1;
  }
  free(x);
  if (b->srow) {
    void *s = to_host(b->recv_scales, rows * b->srow);
    fail |= epx_test_rank_compare(rank, "recv_x_scales", w->payload == EPX_PAYLOAD_FP8_F32 ? EPX_ELEM_F32 : EPX_ELEM_I32,
                ref->recv_x_scales, s, N, (int64_t)(b->srow / 4));
    free(s);
  }
  if (b->recv_topk_idx) {
    void *t = to_host(b->recv_topk_idx, rows * K * b->idx_es);
    fail |= epx_test_rank_compare(rank, "recv_topk_idx", w->is_int64 ? EPX_ELEM_I64 : EPX_ELEM_I32, ref->recv_topk_idx,
                t, rows_meta, K);
    free(t);
  }
  if (b->recv_weights) {
    void *t = to_host(b->recv_weights, rows * K * sizeof(float));
    fail |= epx_test_rank_compare(rank, "recv_topk_weights", EPX_ELEM_F32, ref->recv_topk_weights, t, rows_meta, K);
    free(t);
  }
  int *src = to_host(b->recv_src_idx, rows * sizeof(int));
  fail |= epx_test_rank_compare(rank, "recv_src_idx", EPX_ELEM_I32, ref->recv_src_idx, src, rows_meta, 1);
  free(src);
  int *pre = to_host(b->recv_rank_prefix, sizeof(int) * R);
  fail |= epx_test_rank_compare(rank, "recv_rank_prefix", EPX_ELEM_I32, ref->recv_rank_prefix, pre, 1, R);
  free(pre);
  int *pe = to_host(b->per_expert, sizeof(int) * el);
  fail |= epx_test_rank_compare(rank, "num_recv_tokens_per_expert", EPX_ELEM_I32, ref->num_recv_tokens_per_expert, pe, 1, el);
  free(pe);
  int *nr = to_host(b->num_recv, sizeof(int));
  int n32 = (int)N;
  fail |= epx_test_rank_compare(rank, "num_recv_tokens", EPX_ELEM_I32, &n32, nr, 1, 1);
  free(nr);
  return fail;
}

static int combine_and_check(epxComm_t comm, const epx_test_world *w, int rank, const ncase *c,
                             epxHandle_t h, const epx_ref_dispatch_result *ref, uint64_t seed) {
  int R = w->p.nranks, H = w->p.hidden, K = w->p.num_topk, T = w->p.tokens[rank];
  uint16_t *cx[EPX_TEST_MAX_RANKS];
  float *cw[EPX_TEST_MAX_RANKS];
  for (int r = 0; r < R; ++r) {
    int64_t n = ref->rank_prefix_matrix[(R - 1) * R + r];
    cx[r] = epx_test_xaligned((size_t)(n + 1) * H * 2);
    cw[r] = epx_test_xaligned((size_t)(n + 1) * K * sizeof(float));
    epx_test_fill_bf16_tagged(seed, r, n, H, cx[r]);
    epx_test_fill_f32_tagged(seed, r, n, K, cw[r]);
  }
  uint16_t *bias[2] = {NULL, NULL};
  void *dbias[2] = {NULL, NULL};
  for (int i = 0; i < c->nbias; ++i) {
    bias[i] = epx_test_xaligned((size_t)(T + 1) * H * 2);
    epx_test_fill_bf16_tagged(seed ^ 0xb1a5ull, 1000 * (i + 1) + rank, T, H, bias[i]);
    dbias[i] = dup_to_device(bias[i], (size_t)T * H * 2);
  }
  uint16_t *exp_x = epx_test_xaligned((size_t)(T + 1) * H * 2);
  float *exp_w = epx_test_xaligned((size_t)(T + 1) * K * sizeof(float));
  epx_ref_combine_inputs ci = {(const uint16_t *const *)cx, (const float *const *)cw, {bias[0], bias[1]}};
  epx_ref_combine(&w->ref, rank, &ci, exp_x, exp_w);

  int64_t n_me = ref->num_recv;
  void *dx = dup_to_device(cx[rank], (size_t)n_me * H * 2);
  float *dw = dup_to_device(cw[rank], (size_t)n_me * K * sizeof(float));
  uint16_t *out_x = dalloc((size_t)(T + 1) * H * 2);
  float *out_w = dalloc((size_t)(T + 1) * K * sizeof(float));
  epxCombineArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = dx;
  a.topk_weights = c->comb_weights ? dw : NULL;
  a.bias[0] = dbias[0];
  a.bias[1] = dbias[1];
  a.hidden = H;
  a.num_topk = K;
  epxCombineOutputs_t o = {out_x, c->comb_weights ? out_w : NULL};
  int fail = epx_test_expect_success(rank, comm, epxCombine(comm, &a, h, &o, g_stream), "epxCombine");
  if (!fail) {
    uint16_t *gx = to_host(out_x, (size_t)T * H * 2);
    float *gw = to_host(out_w, (size_t)(T + 1) * K * sizeof(float));
    fail |= epx_test_rank_compare(rank, "combined_x", EPX_ELEM_BF16, exp_x, gx, T, H);
    if (c->comb_weights)
      fail |= epx_test_rank_compare(rank, "combined_topk_weights", EPX_ELEM_F32, exp_w, gw, T, K);
    else if (!epx_test_is_poisoned(gw, (size_t)(T + 1) * K * sizeof(float)))
      fprintf(stderr, "  rank %d: combined_topk_weights not requested but written\n", rank), fail = 1;
    free(gx), free(gw);
  }
  for (int r = 0; r < R; ++r) free(cx[r]), free(cw[r]);
  for (int i = 0; i < 2; ++i) free(bias[i]), cudaFree(dbias[i]);
  free(exp_x), free(exp_w);
  cudaFree(dx), cudaFree(dw), cudaFree(out_x), cudaFree(out_w);
  return fail;
}

/* Worst-case dispatch captured once in a CUDA graph, then replayed: each
 * replay runs the count exchange and the copies again (epochs live on the
 * device), and must reproduce the reference exactly. */
static int graph_dispatch(epxComm_t comm, const epx_test_world *w, int rank, const ncase *c,
                          epxHandle_t h, epxDispatchArgs_t *a, dispatch_bufs *b,
                          const epx_ref_dispatch_result *ref, int64_t num_worst) {
  epxDispatchOutputs_t out = bufs_outputs(b);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamSynchronize(g_stream));
  CK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeRelaxed));
  epxResult_t res = epxDispatch(comm, a, h, &out, g_stream);
  CK(cudaStreamEndCapture(g_stream, &graph));
  if (epx_test_expect_success(rank, comm, res, "epxDispatch (captured)")) return 1;
  CK(cudaGraphInstantiate(&exec, graph, 0));
  int fail = 0;
  for (int i = 0; i < c->graph && !fail; ++i) {
    bufs_poison(b);
    CK(cudaGraphLaunch(exec, g_stream));
    fail |= check_dispatch(rank, w, b, ref, num_worst);
  }
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  return fail;
}

static int cycle(epxComm_t comm, epx_test_world *w, dev_inputs *d, int rank, const ncase *c,
                 epxHandle_t h, int it) {
  int R = w->p.nranks, el = w->p.num_experts / R;
  int fail = 0;
  epxDispatchArgs_t a = make_args(w, d, rank, c);
  int64_t num_worst = (int64_t)R * epx_test_max_tokens(&w->p);
  if (num_worst < 1) num_worst = 1;
  int worst = c->worst || c->graph;
  epx_ref_dispatch_opts o = {a.x_type, a.scale_format, c->alignment, worst ? num_worst : 0};
  epx_ref_dispatch_result ref;
  if (epx_ref_dispatch(&w->ref, rank, &o, &ref) != 0) {
    fprintf(stderr, "  rank %d: reference dispatch failed\n", rank);
    return 1;
  }
  int64_t cap = ref.num_recv;
  if (!worst) {
    int64_t n = -7;
    int cnt[4096];
    memset(cnt, 0xa5, sizeof cnt);
    fail |= epx_test_expect_success(rank, comm, epxDispatchNotify(comm, &a, h, &n, cnt, g_stream), "epxDispatchNotify");
    if (!fail) {
      if (n != ref.num_recv) {
        fprintf(stderr, "  rank %d: notify N_recv %" PRId64 ", expected %" PRId64 "\n", rank, n, ref.num_recv);
        fail = 1;
      }
      fail |= epx_test_rank_compare(rank, "notify num_recv_tokens_per_expert", EPX_ELEM_I32, ref.num_recv_tokens_per_expert,
                  cnt, 1, el);
    }
  } else {
    a.num_worst_tokens = num_worst;
    cap = num_worst;
  }
  dispatch_bufs b;
  bufs_alloc(&b, w, cap, 1, c->weights);
  if (!fail) {
    if (c->graph) {
      fail |= graph_dispatch(comm, w, rank, c, h, &a, &b, &ref, num_worst);
    } else {
      epxDispatchOutputs_t out = bufs_outputs(&b);
      fail |= epx_test_expect_success(rank, comm, epxDispatch(comm, &a, h, &out, g_stream), "epxDispatch");
      if (!fail) fail |= check_dispatch(rank, w, &b, &ref, worst ? num_worst : ref.num_recv);
    }
  }
  bufs_free(&b);
  if (!fail) fail |= combine_and_check(comm, w, rank, c, h, &ref, c->seed * 31 + 7 + (uint64_t)it);

  if (!fail && c->cached) {
    epx_test_world_new_payload(w, c->seed * 131 + 17 + (uint64_t)it);
    inputs_free(d);
    inputs_upload(d, w, rank);
    epx_ref_dispatch_result ref2;
    epx_ref_dispatch_opts o2 = {a.x_type, a.scale_format, c->alignment, 0};
    epx_ref_dispatch(&w->ref, rank, &o2, &ref2);
    epxDispatchArgs_t a2 = make_args(w, d, rank, c);
    int with_topk = c->cached == 1;
    if (!with_topk) a2.topk_idx = NULL, a2.topk_weights = NULL;
    dispatch_bufs b2;
    bufs_alloc(&b2, w, ref2.num_recv, with_topk, with_topk && c->weights);
    epxDispatchOutputs_t out2 = bufs_outputs(&b2);
    fail |= epx_test_expect_success(rank, comm, epxDispatch(comm, &a2, h, &out2, g_stream), "cached epxDispatch");
    if (!fail) fail |= check_dispatch(rank, w, &b2, &ref2, ref2.num_recv);
    bufs_free(&b2);
    if (!fail) fail |= combine_and_check(comm, w, rank, c, h, &ref2, c->seed * 37 + 1);
    epx_ref_dispatch_free(&ref2);
  }
  epx_ref_dispatch_free(&ref);
  return fail;
}

static int run_rank(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const ncase *c = arg;
  int ndev = 0;
  CK(cudaGetDeviceCount(&ndev));
  CK(cudaSetDevice(rank % ndev));
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  epx_test_problem p;
  make_problem(c, &p);
  epxConfig_t cfg = epx_test_config(&p, 0);
  cfg.backend = epxBackendCuda;
  cfg.cuda_device = rank % ndev;
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, nranks, id, &cfg)) return 1;
  epx_test_world w;
  epx_test_world_init(&w, &p, !c->int32, c->payload, c->seed ^ 0x5eedull);
  dev_inputs d;
  inputs_upload(&d, &w, rank);
  /* A layout failure is reported but does not hide the dispatch results. */
  int layout_fail = check_layout(comm, &w, &d, rank);
  int fail = 0;
  epxHandle_t h = NULL;
  if (!fail) fail |= epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  int iters = c->iterations > 0 ? c->iterations : 1;
  for (int it = 0; it < iters && !fail; ++it) {
    if (it > 0) {
      epx_test_world_new_payload(&w, c->seed + 1000 + (uint64_t)it);
      inputs_free(&d);
      inputs_upload(&d, &w, rank);
      fail |= epx_test_expect_success(rank, comm, epxHandleReset(h), "epxHandleReset");
      if (fail) break;
    }
    fail |= cycle(comm, &w, &d, rank, c, h, it);
  }
  epxHandleDestroy(h);
  epxResult_t dr = epxCommDestroy(comm);
  if (dr != epxSuccess) {
    fprintf(stderr, "  rank %d: epxCommDestroy: %s\n", rank, epxGetErrorString(dr));
    fail = 1;
  }
  inputs_free(&d);
  epx_test_world_free(&w);
  cudaStreamDestroy(g_stream);
  return fail | layout_fail;
}

/* ---- faults: every rank fails the call with the right code, then a valid
 * cycle is exact (per-call errors), or the wait ends in time (timeout, abort). */

typedef enum fault_kind {
  FAULT_INVALID_ARGS, /* rank 1's notify fails host validation */
  FAULT_BAD_EXPERT_ID, /* rank 0's topk_idx holds id E: only the device can see it */
  FAULT_MISMATCH,      /* ranks call notify with different num_topk */
  FAULT_TIMEOUT,       /* rank 1 never calls */
  FAULT_ABORT          /* rank 1 never calls; rank 0 aborts from another thread */
} fault_kind;

typedef struct fcase {
  const char *name;
  fault_kind kind;
} fcase;

static const ncase fault_base = {.name = "fault", .R = 2, .E = 16, .H = 256, .K = 4, .T = 64,
                                 .weights = 1, .nbias = 1, .comb_weights = 1, .seed = 201};

static void *abort_later(void *arg) {
  usleep(300 * 1000);
  epxCommAbort((epxComm_t)arg);
  return NULL;
}

static int expect_code(int rank, epxComm_t comm, epxResult_t got, epxResult_t want, const char *what) {
  fprintf(stderr, "  rank %d: %s -> %s: %s\n", rank, what, epxGetErrorString(got),
          epxCommGetLastError(comm));
  if (got == want) return 0;
  fprintf(stderr, "  rank %d: %s returned %s, expected %s\n", rank, what, epxGetErrorString(got),
          epxGetErrorString(want));
  return 1;
}

static int run_fault(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const fcase *f = arg;
  const ncase *c = &fault_base;
  int ndev = 0;
  CK(cudaGetDeviceCount(&ndev));
  CK(cudaSetDevice(rank % ndev));
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  epx_test_problem p;
  make_problem(c, &p);
  epxConfig_t cfg = epx_test_config(&p, 0);
  cfg.backend = epxBackendCuda;
  cfg.cuda_device = rank % ndev;
  cfg.timeout_ms = f->kind == FAULT_TIMEOUT ? 1500 : 20000;
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, nranks, id, &cfg)) return 1;
  epx_test_world w;
  epx_test_world_init(&w, &p, !c->int32, c->payload, c->seed ^ 0x5eedull);
  dev_inputs d;
  inputs_upload(&d, &w, rank);
  epxHandle_t h = NULL;
  int fail = epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  epxDispatchArgs_t a = make_args(&w, &d, rank, c);
  int64_t n = -7;
  int cnt[64];
  int recover = 1;
  double t0 = epx_test_now();
  if (f->kind == FAULT_INVALID_ARGS) {
    if (rank == 1) a.hidden = 7;
    fail |= expect_code(rank, comm, epxDispatchNotify(comm, &a, h, &n, cnt, g_stream),
                        rank == 1 ? epxInvalidArgument : epxRemoteError, "notify, rank 1 invalid");
  } else if (f->kind == FAULT_BAD_EXPERT_ID) {
    void *bad = NULL;
    if (rank == 0) {
      size_t bytes = (size_t)p.tokens[0] * p.num_topk * 8;
      int64_t *host = epx_test_xmalloc(bytes);
      memcpy(host, w.topk[0], bytes);
      host[5 * p.num_topk + 2] = p.num_experts; /* token 5, slot 2 */
      bad = dup_to_device(host, bytes);
      free(host);
      a.topk_idx = bad;
    }
    fail |= expect_code(rank, comm, epxDispatchNotify(comm, &a, h, &n, cnt, g_stream),
                        rank == 0 ? epxInvalidArgument : epxRemoteError, "notify, bad id on rank 0");
    cudaFree(bad);
  } else if (f->kind == FAULT_MISMATCH) {
    if (rank == 1) a.num_topk = 3;
    fail |= expect_code(rank, comm, epxDispatchNotify(comm, &a, h, &n, cnt, g_stream), epxMismatch,
                        "notify, num_topk differs");
  } else {
    recover = 0;
    if (rank == 0) {
      pthread_t th;
      if (f->kind == FAULT_ABORT) pthread_create(&th, NULL, abort_later, comm);
      epxResult_t want = f->kind == FAULT_ABORT ? epxAborted : epxTimeout;
      fail |= expect_code(rank, comm, epxDispatchNotify(comm, &a, h, &n, cnt, g_stream), want,
                          "notify, rank 1 absent");
      double dt = epx_test_now() - t0;
      double lo = f->kind == FAULT_ABORT ? 0.25 : 1.4, hi = f->kind == FAULT_ABORT ? 1.3 : 3.5;
      fprintf(stderr, "  rank 0: returned after %.2f s (expected %.2f..%.2f)\n", dt, lo, hi);
      if (dt < lo || dt > hi) fail = 1;
      if (f->kind == FAULT_ABORT) pthread_join(th, NULL);
      epxResult_t ae = epxSuccess;
      epxCommGetAsyncError(comm, &ae);
      if (ae != want) fprintf(stderr, "  rank 0: async error %s\n", epxGetErrorString(ae)), fail = 1;
    } else {
      usleep(3500 * 1000);
    }
  }
  if (recover && !fail) {
    fprintf(stderr, "  rank %d: %.2f s to the error; now a valid cycle\n", rank, epx_test_now() - t0);
    fail |= cycle(comm, &w, &d, rank, c, h, 0);
  }
  epxHandleDestroy(h);
  double td = epx_test_now();
  epxResult_t dr = epxCommDestroy(comm);
  td = epx_test_now() - td;
  if (dr != epxSuccess || td > 1.0) {
    fprintf(stderr, "  rank %d: epxCommDestroy: %s after %.2f s\n", rank, epxGetErrorString(dr), td);
    fail = 1;
  }
  inputs_free(&d);
  epx_test_world_free(&w);
  cudaStreamDestroy(g_stream);
  return fail;
}

static const fcase fault_cases[] = {
    {"fault_invalid_args_on_one_rank_then_exact", FAULT_INVALID_ARGS},
    {"fault_bad_expert_id_on_device_then_exact", FAULT_BAD_EXPERT_ID},
    {"fault_num_topk_mismatch_then_exact", FAULT_MISMATCH},
    {"fault_absent_peer_times_out", FAULT_TIMEOUT},
    {"fault_abort_ends_wait", FAULT_ABORT},
};

static const ncase cases[] = {
    /* small: the compute-sanitizer case */
    {.name = "small_two_ranks_bf16_cached", .R = 2, .E = 16, .H = 256, .K = 4, .T = 64, .weights = 1,
     .nbias = 2, .comb_weights = 1, .cached = 1, .seed = 101},
    {.name = "small_two_ranks_worst_case_graph", .R = 2, .E = 16, .H = 256, .K = 4, .T = 64,
     .weights = 1, .graph = 2, .nbias = 1, .comb_weights = 1, .seed = 102},
    {.name = "four_ranks_worst_case_int32_vary", .R = 4, .E = 32, .H = 512, .K = 8, .T = 200,
     .vary = 1, .int32 = 1, .weights = 1, .worst = 1, .nbias = 1, .comb_weights = 1, .seed = 103},
    {.name = "four_ranks_h7168_fp8_f32_align128", .R = 4, .E = 256, .H = 7168, .K = 8, .T = 24,
     .payload = EPX_PAYLOAD_FP8_F32, .weights = 1, .alignment = 128, .comb_weights = 1, .seed = 104},
    {.name = "two_ranks_worst_case_fp8_ue8m0_cached", .R = 2, .E = 16, .H = 1024, .K = 6, .T = 100,
     .payload = EPX_PAYLOAD_FP8_UE8M0, .weights = 1, .worst = 1, .cached = 1, .alignment = 128,
     .seed = 105},
    {.name = "four_ranks_repeated_experts_and_minus1", .R = 4, .E = 16, .H = 128, .K = 8, .T = 300,
     .routing = EPX_ROUTING_RANDOM_DUP, .weights = 1, .alignment = 128, .comb_weights = 1, .seed = 106},
    {.name = "four_ranks_zero_tokens_on_ranks_1_and_3", .R = 4, .E = 16, .H = 256, .K = 4, .T = 64,
     .zero_mask = 0xa, .weights = 1, .nbias = 2, .comb_weights = 1, .seed = 107},
    {.name = "three_ranks_all_minus1_biases_alone", .R = 3, .E = 12, .H = 128, .K = 4, .T = 50,
     .routing = EPX_ROUTING_ALL_MINUS1, .weights = 1, .nbias = 2, .comb_weights = 1, .seed = 108},
    {.name = "four_ranks_two_virtual_nodes_t4096", .R = 4, .rpn = 2, .E = 256, .H = 128, .K = 8,
     .T = 4096, .weights = 1, .comb_weights = 1, .seed = 109},
    {.name = "three_ranks_back_to_back_cycles", .R = 3, .E = 24, .H = 384, .K = 6, .T = 90, .vary = 1,
     .weights = 1, .nbias = 1, .comb_weights = 1, .iterations = 3, .cached = 2, .seed = 110},
    /* 1100 experts (275 a rank): the layout's shared histogram at 1105 bins, int32 ids with duplicates */
    {.name = "four_ranks_1100_experts_int32", .R = 4, .E = 1100, .H = 128, .K = 8, .T = 257, .int32 = 1,
     .routing = EPX_ROUTING_RANDOM_DUP, .weights = 1, .comb_weights = 1, .seed = 113},
    {.name = "standard_two_ranks_t4096_h7168_k8_e256", .R = 2, .E = 256, .H = 7168, .K = 8,
     .T = 4096, .weights = 1, .comb_weights = 1, .nbias = 1, .seed = 111},
    {.name = "standard_four_ranks_t4096_h7168_k8_e256", .R = 4, .E = 256, .H = 7168, .K = 8,
     .T = 4096, .weights = 1, .comb_weights = 1, .seed = 112},
};

/* ---- exec mode: with EPX_TEST_EXEC_RANKS=1 each forked rank re-executes this
 * binary ("--rank-exec NAME RANK NRANKS ID-HEX"), so tools that follow exec
 * but not a bare fork (compute-sanitizer --target-processes all) see every
 * rank's kernels. ---- */

static int rank_exec_main(int argc, char **argv) {
  epxUniqueId id;
  const char *name;
  int rank, nranks;
  if (epx_test_parse_rank_exec(argc, argv, &name, &rank, &nranks, &id) != 0) return 2;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
    if (strcmp(cases[i].name, name) == 0) return run_rank(rank, nranks, &id, (void *)&cases[i]);
  for (size_t i = 0; i < sizeof fault_cases / sizeof fault_cases[0]; ++i)
    if (strcmp(fault_cases[i].name, name) == 0)
      return run_fault(rank, nranks, &id, (void *)&fault_cases[i]);
  return 2;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--rank-exec") == 0) return rank_exec_main(argc, argv);
  const char *ex = getenv("EPX_TEST_EXEC_RANKS");
  int use_exec = ex && strcmp(ex, "1") == 0;
  int ncases = (int)(sizeof cases / sizeof cases[0]), ran = 0;
  for (int i = 0; i < ncases; ++i) {
    const ncase *c = &cases[i];
    if (!epx_test_case_wanted(argc, argv, c->name)) continue;
    if (epx_test_run_case(c->name, c->seed, c->R, use_exec ? epx_test_exec_rank : run_rank,
                          use_exec ? (void *)c->name : (void *)c, SPAWN_TIMEOUT_S))
      return 1;
    ++ran;
  }
  int nfaults = (int)(sizeof fault_cases / sizeof fault_cases[0]);
  for (int i = 0; i < nfaults; ++i) {
    const fcase *f = &fault_cases[i];
    if (!epx_test_case_wanted(argc, argv, f->name)) continue;
    double t0 = epx_test_now();
    int rc = use_exec ? epx_test_spawn(2, epx_test_exec_rank, (void *)f->name, 60)
                      : epx_test_spawn(2, run_fault, (void *)f, 60);
    if (rc != 0) {
      printf("FAIL %s\n", f->name);
      return 1;
    }
    printf("PASS %s (%.2f s)\n", f->name, epx_test_now() - t0);
    fflush(stdout);
    ++ran;
  }
  if (ran == 0) {
    fprintf(stderr, "no case matched\n");
    return 1;
  }
  printf("all %d cases passed\n", ran);
  return 0;
}
