/*
 * test_bad_inputs.c - invalid arguments (reliability.md R5) and API misuse
 * (R6) on the host backend.
 *
 * Each case makes one collective call invalid on one rank (or on every rank)
 * and checks the contract of include/epx.h:
 *  - the faulty rank gets epxInvalidArgument (or epxInvalidUsage for misuse)
 *    with a message naming the argument (epxCommGetLastError);
 *  - every other rank gets epxRemoteError for the same call;
 *  - no output of any rank is modified (all poisoned before, still poisoned);
 *  - the next valid call is exact on every rank.
 *
 *   test_bad_inputs            run every case
 *   test_bad_inputs NAME...    run the named cases
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "common/layout_math.h"
#include "common/world.h"
#include "reference/reference.h"

#define SPAWN_TIMEOUT_S 120
#define BI_E 24
#define BI_H 256
#define BI_K 4
#define BI_T 32
#define BI_LLT 32

typedef enum bad_op {
  OP_LAYOUT,         /* epxGetDispatchLayout (local) */
  OP_NOTIFY,         /* epxDispatchNotify */
  OP_DISPATCH_WORST, /* epxDispatch, empty handle, num_worst_tokens > 0 */
  OP_DISPATCH,       /* epxDispatch after a valid notify */
  OP_COMBINE,        /* epxCombine after a valid dispatch */
  OP_LL_DISPATCH,    /* epxLowLatencyDispatch */
  OP_LL_COMBINE,     /* epxLowLatencyCombine after a valid LL dispatch */
  OP_LL_RECV,        /* epxLowLatencyRecv with nothing pending (local) */
  OP_LL_PENDING      /* a call on a handle whose send-only dispatch awaits its receive */
} bad_op;

typedef enum mutation {
  M_NONE,
  M_EXPERT_E,       /* one id = E */
  M_EXPERT_M2,      /* one id = -2 */
  M_EXPERT_MAX,     /* one id = INT64_MAX (INT32_MAX for int32 ids) */
  M_T_ABOVE_MAX,    /* num_tokens = limit + 1 */
  M_T_NEGATIVE,     /* num_tokens = -1 */
  M_X_DTYPE,        /* x_type = epxFloat32 */
  M_X_NULL,         /* x = NULL */
  M_X_PLUS1,        /* x one byte past an aligned address */
  M_X_PLUS8,        /* x 8 bytes past a 16-byte aligned address */
  M_TOPK_ABOVE,     /* num_topk = config max_topk + 1 */
  M_TOPK_33,        /* num_topk = 33 */
  M_TOPK_NULL,      /* topk_idx = NULL with T > 0 */
  M_IDX_TYPE,       /* topk_idx_type = epxFloat32 */
  M_FP8_HIDDEN,     /* FP8 with hidden 192 (not a multiple of 128) */
  M_HIDDEN_ABOVE,   /* hidden above config.hidden */
  M_SCALE_NONE,     /* FP8 payload with scale_format None */
  M_SCALES_NULL,    /* FP8 payload with x_scales NULL */
  M_CAPACITY,       /* outputs->capacity_rows one short */
  M_RECV_X_NULL,    /* outputs->recv_x NULL */
  M_BIAS_MISALIGNED,
  M_UE8M0_NO_ROUND, /* LL use_ue8m0 without round_scale */
  M_WEIGHTS_NULL,   /* LL combine topk_weights NULL */
  M_ALIGNMENT_NEG,  /* expert_alignment = -1 */
  M_EMPTY_HANDLE,   /* a freshly created (Empty) handle */
  M_FOREIGN_HANDLE, /* a handle of another communicator */
  M_PENDING_COMBINE, /* LL combine before epxLowLatencyRecv of the dispatch */
  M_PENDING_DISPATCH /* a second LL dispatch before epxLowLatencyRecv */
} mutation;

typedef struct bcase {
  const char *name;
  int R;
  int faulty; /* rank with the bad call; -1 = every rank */
  bad_op op;
  mutation mut;
  int int32;
  epx_test_payload payload;
  epxResult_t want;
  const char *msg; /* substring the faulty rank's message must contain */
  uint64_t seed;
} bcase;

/* ------------------------------------------------------------ helpers */

/* The faulty rank must see `want` and a message containing `msg`; the others
 * epxRemoteError (or `want` too when every rank is faulty). */
static int check_bad_result(int rank, const bcase *c, epxComm_t comm, epxResult_t res,
                            int collective, const char *what) {
  int faulty = c->faulty < 0 || c->faulty == rank;
  epxResult_t want = faulty ? c->want : (collective ? epxRemoteError : epxSuccess);
  const char *m = epxCommGetLastError(comm);
  if (res != want) {
    fprintf(stderr, "  rank %d: %s returned %s (%s), expected %s\n", rank, what,
            epxGetErrorString(res), m, epxGetErrorString(want));
    return 1;
  }
  if (faulty && c->msg && !strstr(m, c->msg)) {
    fprintf(stderr, "  rank %d: %s message \"%s\" does not name \"%s\"\n", rank, what, m, c->msg);
    return 1;
  }
  if (res != epxSuccess && (!m || !*m)) {
    fprintf(stderr, "  rank %d: %s failed with an empty message\n", rank, what);
    return 1;
  }
  return 0;
}

static int still_poisoned(int rank, const char *what, const void *p, size_t bytes) {
  if (epx_test_is_poisoned(p, bytes)) return 0;
  fprintf(stderr, "  rank %d: %s was modified by a failed call\n", rank, what);
  return 1;
}

static int check_state(int rank, epxHandle_t h, epxHandleState_t want, const char *when) {
  epxHandleInfo_t info;
  if (epxHandleGetInfo(h, &info) != epxSuccess || info.state != want) {
    fprintf(stderr, "  rank %d: handle state %d %s, expected %d\n", rank, (int)info.state, when,
            (int)want);
    return 1;
  }
  return 0;
}

/* Scratch copies the mutations point into; freed at the end of the case. */
typedef struct scratch {
  void *topk;
  void *x;
  void *bias;
} scratch;

static void *copy_topk_with(const epx_test_world *w, int rank, int64_t at, int64_t value,
                            int rows_extra) {
  int K = w->p.num_topk, T = w->p.tokens[rank];
  size_t es = w->is_int64 ? 8 : 4;
  size_t bytes = (size_t)(T + rows_extra) * K * es;
  void *t = epx_test_xaligned(bytes + 64);
  memset(t, 0xff, bytes + 64); /* extra rows: -1 */
  memcpy(t, w->topk[rank], (size_t)T * K * es);
  if (at >= 0) epx_topk_set(t, w->is_int64, at / K, K, (int)(at % K), value);
  return t;
}

static void *shifted_copy(const void *src, size_t bytes, size_t shift, void **base) {
  uint8_t *b = epx_test_xaligned(bytes + 64);
  memcpy(b + shift, src, bytes);
  *base = b;
  return b + shift;
}

static int64_t bad_id(const bcase *c, const epx_test_world *w) {
  if (c->mut == M_EXPERT_E) return w->p.num_experts;
  if (c->mut == M_EXPERT_M2) return -2;
  return w->is_int64 ? INT64_MAX : INT32_MAX;
}

/* Applies the mutation to normal-mode dispatch args (and outputs). */
static void mutate_dispatch(const bcase *c, const epx_test_world *w, int rank,
                            epxDispatchArgs_t *a, epxDispatchOutputs_t *o, scratch *s) {
  int T = w->p.tokens[rank], K = w->p.num_topk;
  size_t xbytes = (size_t)T * epx_payload_row_bytes(w->p.hidden, w->payload != EPX_PAYLOAD_BF16);
  switch (c->mut) {
    case M_EXPERT_E:
    case M_EXPERT_M2:
    case M_EXPERT_MAX:
      s->topk = copy_topk_with(w, rank, (int64_t)(T / 2) * K + (K - 1), bad_id(c, w), 0);
      a->topk_idx = s->topk;
      break;
    case M_T_ABOVE_MAX:
      s->topk = copy_topk_with(w, rank, -1, 0, 2);
      a->topk_idx = s->topk;
      a->num_tokens = BI_T + 1;
      break;
    case M_T_NEGATIVE: a->num_tokens = -1; break;
    case M_X_DTYPE: a->x_type = epxFloat32; break;
    case M_X_NULL: a->x = NULL; break;
    case M_X_PLUS1: a->x = shifted_copy(a->x, xbytes, 1, &s->x); break;
    case M_X_PLUS8: a->x = shifted_copy(a->x, xbytes, 8, &s->x); break;
    case M_TOPK_ABOVE:
    case M_TOPK_33: {
      int k2 = c->mut == M_TOPK_ABOVE ? K + 1 : 33;
      size_t bytes = (size_t)T * k2 * (w->is_int64 ? 8 : 4);
      s->topk = epx_test_xaligned(bytes);
      memset(s->topk, 0xff, bytes);
      a->topk_idx = s->topk;
      a->num_topk = k2;
      a->topk_weights = NULL;
      if (o) o->recv_topk_weights = NULL;
      break;
    }
    case M_TOPK_NULL: a->topk_idx = NULL; break;
    case M_IDX_TYPE: a->topk_idx_type = epxFloat32; break;
    case M_FP8_HIDDEN: a->hidden = 192; break;
    case M_HIDDEN_ABOVE: a->hidden = BI_H + 8; break;
    case M_SCALE_NONE: a->scale_format = epxScalesNone; break;
    case M_SCALES_NULL: a->x_scales = NULL; break;
    case M_CAPACITY:
      if (o) o->capacity_rows -= 1;
      break;
    case M_RECV_X_NULL:
      if (o) o->recv_x = NULL;
      break;
    case M_ALIGNMENT_NEG: a->expert_alignment = -1; break;
    default: break;
  }
}

/* ----------------------------------------------- normal-mode pieces */

typedef struct nbufs {
  int64_t cap;
  size_t xrow, srow, idx_es;
  void *recv_x, *scales, *topk;
  float *weights;
  int *src, *prefix, *per_expert, *num_recv;
} nbufs;

static void nbufs_init(nbufs *b, const epx_test_world *w, int64_t cap) {
  int H = w->p.hidden, K = w->p.num_topk, R = w->p.nranks, el = w->p.num_experts / R;
  memset(b, 0, sizeof(*b));
  b->cap = cap;
  b->xrow = epx_payload_row_bytes(H, w->payload != EPX_PAYLOAD_BF16);
  b->srow = epx_scale_row_bytes(H, (int)w->payload);
  b->idx_es = w->is_int64 ? 8 : 4;
  size_t rows = (size_t)cap + 1;
  b->recv_x = epx_test_xaligned(rows * b->xrow);
  b->scales = b->srow ? epx_test_xaligned(rows * b->srow) : NULL;
  b->topk = epx_test_xaligned(rows * K * b->idx_es);
  b->weights = epx_test_xaligned(rows * K * 4);
  b->src = epx_test_xaligned(rows * 4);
  b->prefix = epx_test_xaligned((size_t)R * 4);
  b->per_expert = epx_test_xaligned((size_t)el * 4);
  b->num_recv = epx_test_xaligned(4);
}

static void nbufs_poison(nbufs *b, const epx_test_world *w) {
  int K = w->p.num_topk, R = w->p.nranks, el = w->p.num_experts / R;
  size_t rows = (size_t)b->cap + 1;
  epx_test_poison(b->recv_x, rows * b->xrow);
  if (b->scales) epx_test_poison(b->scales, rows * b->srow);
  epx_test_poison(b->topk, rows * K * b->idx_es);
  epx_test_poison(b->weights, rows * K * 4);
  epx_test_poison(b->src, rows * 4);
  epx_test_poison(b->prefix, (size_t)R * 4);
  epx_test_poison(b->per_expert, (size_t)el * 4);
  epx_test_poison(b->num_recv, 4);
}

static int nbufs_untouched(int rank, nbufs *b, const epx_test_world *w) {
  int K = w->p.num_topk, R = w->p.nranks, el = w->p.num_experts / R;
  size_t rows = (size_t)b->cap + 1;
  int f = still_poisoned(rank, "recv_x", b->recv_x, rows * b->xrow);
  if (b->scales) f |= still_poisoned(rank, "recv_x_scales", b->scales, rows * b->srow);
  f |= still_poisoned(rank, "recv_topk_idx", b->topk, rows * K * b->idx_es);
  f |= still_poisoned(rank, "recv_topk_weights", b->weights, rows * K * 4);
  f |= still_poisoned(rank, "recv_src_idx", b->src, rows * 4);
  f |= still_poisoned(rank, "recv_rank_prefix", b->prefix, (size_t)R * 4);
  f |= still_poisoned(rank, "num_recv_tokens_per_expert", b->per_expert, (size_t)el * 4);
  f |= still_poisoned(rank, "num_recv_tokens", b->num_recv, 4);
  return f;
}

static void nbufs_free(nbufs *b) {
  free(b->recv_x);
  free(b->scales);
  free(b->topk);
  free(b->weights);
  free(b->src);
  free(b->prefix);
  free(b->per_expert);
  free(b->num_recv);
}

static epxDispatchOutputs_t nbufs_outputs(nbufs *b) {
  epxDispatchOutputs_t o = {b->recv_x, b->scales, b->topk, b->weights, b->src,
                            b->prefix, b->per_expert, b->num_recv, b->cap};
  return o;
}

static epxDispatchArgs_t dispatch_args(const epx_test_world *w, int rank) {
  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = w->x[rank];
  a.x_type = w->payload == EPX_PAYLOAD_BF16 ? epxBFloat16 : epxFloat8E4M3;
  a.x_scales = w->scales[rank];
  a.scale_format = w->payload == EPX_PAYLOAD_BF16     ? epxScalesNone
                   : w->payload == EPX_PAYLOAD_FP8_F32 ? epxScalesFloat32
                                                       : epxScalesUE8M0;
  a.topk_idx = w->topk[rank];
  a.topk_idx_type = w->is_int64 ? epxInt64 : epxInt32;
  a.topk_weights = w->weights[rank];
  a.num_tokens = w->p.tokens[rank];
  a.hidden = w->p.hidden;
  a.num_topk = w->p.num_topk;
  a.expert_alignment = 1;
  return a;
}

static int check_dispatch_exact(int rank, const epx_test_world *w, nbufs *b,
                                 const epx_ref_dispatch_result *ref, int64_t rows_meta) {
  int K = w->p.num_topk, R = w->p.nranks, el = w->p.num_experts / R;
  int64_t N = ref->num_recv;
  int f = epx_test_rank_compare(rank, "recv_x", w->payload == EPX_PAYLOAD_BF16 ? EPX_ELEM_BF16 : EPX_ELEM_FP8,
              ref->recv_x, b->recv_x, N, w->p.hidden);
  if (b->srow)
    f |= epx_test_rank_compare(rank, "recv_x_scales", EPX_ELEM_I32, ref->recv_x_scales, b->scales, N,
             (int64_t)b->srow / 4);
  f |= epx_test_rank_compare(rank, "recv_topk_idx", w->is_int64 ? EPX_ELEM_I64 : EPX_ELEM_I32, ref->recv_topk_idx,
           b->topk, rows_meta, K);
  f |= epx_test_rank_compare(rank, "recv_topk_weights", EPX_ELEM_F32, ref->recv_topk_weights, b->weights, rows_meta,
           K);
  f |= epx_test_rank_compare(rank, "recv_src_idx", EPX_ELEM_I32, ref->recv_src_idx, b->src, rows_meta, 1);
  f |= epx_test_rank_compare(rank, "recv_rank_prefix", EPX_ELEM_I32, ref->recv_rank_prefix, b->prefix, 1, R);
  f |= epx_test_rank_compare(rank, "num_recv_tokens_per_expert", EPX_ELEM_I32, ref->num_recv_tokens_per_expert,
           b->per_expert, 1, el);
  int n32 = (int)N;
  f |= epx_test_rank_compare(rank, "num_recv_tokens", EPX_ELEM_I32, &n32, b->num_recv, 1, 1);
  return f;
}

/* Combine inputs of every rank and the expected result for this rank. */
typedef struct comb {
  uint16_t *x[EPX_TEST_MAX_RANKS];
  float *w[EPX_TEST_MAX_RANKS];
  uint16_t *bias;
  uint16_t *expect_x, *out_x;
  float *expect_w, *out_w;
} comb;

static void comb_init(comb *c, const epx_test_world *w, int rank,
                      const epx_ref_dispatch_result *ref, uint64_t seed) {
  int R = w->p.nranks, H = w->p.hidden, K = w->p.num_topk, T = w->p.tokens[rank];
  memset(c, 0, sizeof(*c));
  for (int r = 0; r < R; ++r) {
    int64_t n = ref->rank_prefix_matrix[(R - 1) * R + r];
    c->x[r] = epx_test_xaligned((size_t)(n + 1) * H * 2);
    c->w[r] = epx_test_xaligned((size_t)(n + 1) * K * 4);
    epx_test_fill_bf16_wide(seed, r, n, H, c->x[r]);
    epx_test_fill_f32_tagged(seed, r, n, K, c->w[r]);
  }
  c->bias = epx_test_xaligned((size_t)(T + 1) * H * 2 + 64);
  epx_test_fill_bf16_tagged(seed + 1, 100 + rank, T, H, c->bias);
  c->expect_x = epx_test_xaligned((size_t)(T + 1) * H * 2);
  c->expect_w = epx_test_xaligned((size_t)(T + 1) * K * 4);
  c->out_x = epx_test_xaligned((size_t)(T + 1) * H * 2);
  c->out_w = epx_test_xaligned((size_t)(T + 1) * K * 4);
  epx_ref_combine_inputs ci = {(const uint16_t *const *)c->x, (const float *const *)c->w,
                               {c->bias, NULL}};
  epx_ref_combine(&w->ref, rank, &ci, c->expect_x, c->expect_w);
  epx_test_poison(c->out_x, (size_t)(T + 1) * H * 2);
  epx_test_poison(c->out_w, (size_t)(T + 1) * K * 4);
}

static void comb_free(comb *c, int R) {
  for (int r = 0; r < R; ++r) {
    free(c->x[r]);
    free(c->w[r]);
  }
  free(c->bias);
  free(c->expect_x);
  free(c->expect_w);
  free(c->out_x);
  free(c->out_w);
}

static epxCombineArgs_t comb_args(comb *c, const epx_test_world *w, int rank) {
  epxCombineArgs_t a;
  memset(&a, 0, sizeof a);
  a.x = c->x[rank];
  a.topk_weights = c->w[rank];
  a.bias[0] = c->bias;
  a.hidden = w->p.hidden;
  a.num_topk = w->p.num_topk;
  return a;
}

static int comb_check(int rank, comb *c, const epx_test_world *w) {
  int T = w->p.tokens[rank];
  int f = epx_test_rank_compare(rank, "combined_x", EPX_ELEM_BF16, c->expect_x, c->out_x, T, w->p.hidden);
  f |= epx_test_rank_compare(rank, "combined_topk_weights", EPX_ELEM_F32, c->expect_w, c->out_w, T, w->p.num_topk);
  return f;
}

/* A private one-rank communicator, for a handle that belongs to another comm. */
static int self_allgather(void *user, const void *send, void *recv, size_t bytes) {
  (void)user;
  memcpy(recv, send, bytes);
  return 0;
}

/* ------------------------------------------------------ the cases */

static int run_normal(int rank, const bcase *c, epxComm_t comm, epx_test_world *w) {
  int R = w->p.nranks, el = w->p.num_experts / R;
  int faulty = (c->faulty < 0 || c->faulty == rank);
  int f = 0;
  scratch s = {NULL, NULL, NULL};
  epxHandle_t h = NULL, h_other = NULL;
  epxComm_t other = NULL;
  f |= epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  int64_t num_worst = (int64_t)R * BI_T;
  epx_ref_dispatch_opts ro = {dispatch_args(w, rank).x_type, dispatch_args(w, rank).scale_format,
                              1, c->op == OP_DISPATCH_WORST ? num_worst : 0};
  epx_ref_dispatch_result ref;
  epx_ref_dispatch(&w->ref, rank, &ro, &ref);
  int64_t cap = c->op == OP_DISPATCH_WORST ? num_worst : ref.num_recv;
  nbufs b;
  nbufs_init(&b, w, cap);
  comb cb;
  comb_init(&cb, w, rank, &ref, c->seed * 3 + 1);
  if (f) goto done;

  if (faulty && c->mut == M_EMPTY_HANDLE)
    f |= epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h_other), "epxHandleCreate (2nd)");
  if (faulty && c->mut == M_FOREIGN_HANDLE) {
    epxConfig_t oc = epx_test_config(&w->p, 0);
    oc.ranks_per_node = 0;
    epxResult_t r = epxCommInitRankWithAllGather(&other, 1, 0, self_allgather, NULL, &oc);
    f |= epx_test_expect_success(rank, NULL, r, "epxCommInitRankWithAllGather (private comm)");
    if (!f) f |= epx_test_expect_success(rank, other, epxHandleCreate(other, &h_other), "epxHandleCreate (other)");
  }
  if (f) goto done;
  epxHandle_t h_bad = h_other ? h_other : h;

  /* Stage 1: the calls before the bad one, valid everywhere. */
  if (c->op == OP_DISPATCH || c->op == OP_COMBINE) {
    epxDispatchArgs_t a = dispatch_args(w, rank);
    int64_t n = -1;
    f |= epx_test_expect_success(rank, comm, epxDispatchNotify(comm, &a, h, &n, NULL, NULL), "epxDispatchNotify");
    if (f) goto done;
  }
  if (c->op == OP_COMBINE) {
    nbufs_poison(&b, w);
    epxDispatchArgs_t a = dispatch_args(w, rank);
    epxDispatchOutputs_t o = nbufs_outputs(&b);
    f |= epx_test_expect_success(rank, comm, epxDispatch(comm, &a, h, &o, NULL), "epxDispatch");
    if (!f) f |= check_dispatch_exact(rank, w, &b, &ref, ref.num_recv);
    if (f) goto done;
  }

  /* Stage 2: the bad call. */
  if (c->op == OP_NOTIFY) {
    epxDispatchArgs_t a = dispatch_args(w, rank);
    if (faulty) mutate_dispatch(c, w, rank, &a, NULL, &s);
    int64_t n = -12345;
    int *cnt = epx_test_xmalloc(sizeof(int) * el);
    epx_test_poison(cnt, sizeof(int) * el);
    epxResult_t r = epxDispatchNotify(comm, &a, h_bad, &n, cnt, NULL);
    f |= check_bad_result(rank, c, comm, r, 1, "epxDispatchNotify");
    if (n != -12345) {
      fprintf(stderr, "  rank %d: num_recv_tokens written by a failed notify\n", rank);
      f = 1;
    }
    f |= still_poisoned(rank, "notify num_recv_tokens_per_expert", cnt, sizeof(int) * el);
    f |= check_state(rank, h, epxHandleEmpty, "after a failed notify");
    free(cnt);
  } else if (c->op == OP_DISPATCH || c->op == OP_DISPATCH_WORST) {
    nbufs_poison(&b, w);
    epxDispatchArgs_t a = dispatch_args(w, rank);
    if (c->op == OP_DISPATCH_WORST) a.num_worst_tokens = num_worst;
    epxDispatchOutputs_t o = nbufs_outputs(&b);
    if (faulty) mutate_dispatch(c, w, rank, &a, &o, &s);
    epxResult_t r = epxDispatch(comm, &a, h_bad, &o, NULL);
    f |= check_bad_result(rank, c, comm, r, 1, "epxDispatch");
    f |= nbufs_untouched(rank, &b, w);
    if (c->op == OP_DISPATCH_WORST)
      f |= check_state(rank, h, epxHandleEmpty, "after a failed dispatch");
  } else if (c->op == OP_COMBINE) {
    epxCombineArgs_t a = comb_args(&cb, w, rank);
    if (faulty) {
      if (c->mut == M_X_NULL) a.x = NULL;
      if (c->mut == M_X_PLUS8) a.x = shifted_copy(a.x, (size_t)ref.num_recv * w->p.hidden * 2, 8, &s.x);
      if (c->mut == M_BIAS_MISALIGNED)
        a.bias[0] = shifted_copy(a.bias[0], (size_t)w->p.tokens[rank] * w->p.hidden * 2, 2, &s.bias);
      if (c->mut == M_HIDDEN_ABOVE) a.hidden = BI_H + 8;
      if (c->mut == M_TOPK_ABOVE) a.num_topk = w->p.num_topk + 1;
    }
    epxCombineOutputs_t o = {cb.out_x, cb.out_w};
    epxResult_t r = epxCombine(comm, &a, h_bad, &o, NULL);
    f |= check_bad_result(rank, c, comm, r, 1, "epxCombine");
    size_t T = (size_t)w->p.tokens[rank];
    f |= still_poisoned(rank, "combined_x", cb.out_x, (T + 1) * w->p.hidden * 2);
    f |= still_poisoned(rank, "combined_topk_weights", cb.out_w, (T + 1) * w->p.num_topk * 4);
  }
  if (f) goto done;

  /* Stage 3: valid calls, exact everywhere. */
  if (c->op == OP_NOTIFY || c->op == OP_DISPATCH_WORST) {
    epxDispatchArgs_t a = dispatch_args(w, rank);
    if (c->op == OP_NOTIFY) {
      int64_t n = -1;
      f |= epx_test_expect_success(rank, comm, epxDispatchNotify(comm, &a, h, &n, NULL, NULL),
                     "epxDispatchNotify after the failed call");
      if (!f && n != ref.num_recv) {
        fprintf(stderr, "  rank %d: N_recv %" PRId64 ", expected %" PRId64 "\n", rank, n,
                ref.num_recv);
        f = 1;
      }
    } else {
      a.num_worst_tokens = num_worst;
    }
    if (f) goto done;
    nbufs_poison(&b, w);
    epxDispatchOutputs_t o = nbufs_outputs(&b);
    f |= epx_test_expect_success(rank, comm, epxDispatch(comm, &a, h, &o, NULL), "epxDispatch after the failed call");
    if (!f) f |= check_dispatch_exact(rank, w, &b, &ref, cap);
  } else if (c->op == OP_DISPATCH) {
    nbufs_poison(&b, w);
    epxDispatchArgs_t a = dispatch_args(w, rank);
    epxDispatchOutputs_t o = nbufs_outputs(&b);
    f |= epx_test_expect_success(rank, comm, epxDispatch(comm, &a, h, &o, NULL), "epxDispatch after the failed call");
    if (!f) f |= check_dispatch_exact(rank, w, &b, &ref, ref.num_recv);
  }
  if (f) goto done;
  {
    epxCombineArgs_t a = comb_args(&cb, w, rank);
    epxCombineOutputs_t o = {cb.out_x, cb.out_w};
    f |= epx_test_expect_success(rank, comm, epxCombine(comm, &a, h, &o, NULL), "epxCombine after the failed call");
    if (!f) f |= comb_check(rank, &cb, w);
  }
done:
  epxHandleDestroy(h);
  if (h_other) epxHandleDestroy(h_other);
  if (other) epxCommDestroy(other);
  nbufs_free(&b);
  comb_free(&cb, R);
  epx_ref_dispatch_free(&ref);
  free(s.topk);
  free(s.x);
  free(s.bias);
  return f;
}

/* ------------------------------------------------------ low latency */

typedef struct lbufs {
  int64_t rpe, rows;
  size_t xrow, srow;
  void *recv_x, *scales;
  int *count, *src;
  int64_t *range;
} lbufs;

static void lbufs_poison(lbufs *b, int el, int R) {
  epx_test_poison(b->recv_x, (size_t)b->rows * b->xrow);
  epx_test_poison(b->scales, (size_t)b->rows * b->srow);
  epx_test_poison(b->count, (size_t)el * 4);
  epx_test_poison(b->src, (size_t)b->rows * 4);
  epx_test_poison(b->range, (size_t)el * R * 8);
}

static int lbufs_untouched(int rank, lbufs *b, int el, int R) {
  int f = still_poisoned(rank, "ll recv_x", b->recv_x, (size_t)b->rows * b->xrow);
  f |= still_poisoned(rank, "ll recv_x_scales", b->scales, (size_t)b->rows * b->srow);
  f |= still_poisoned(rank, "ll recv_count", b->count, (size_t)el * 4);
  f |= still_poisoned(rank, "ll recv_src_info", b->src, (size_t)b->rows * 4);
  f |= still_poisoned(rank, "ll recv_layout_range", b->range, (size_t)el * R * 8);
  return f;
}

static int run_ll(int rank, const bcase *c, epxComm_t comm, epx_test_world *w) {
  int R = w->p.nranks, el = w->p.num_experts / R, H = w->p.hidden, K = w->p.num_topk;
  int T = w->p.tokens[rank];
  int faulty = (c->faulty < 0 || c->faulty == rank);
  int f = 0;
  scratch s = {NULL, NULL, NULL};
  epxHandle_t h = NULL, h_empty = NULL;
  lbufs b;
  memset(&b, 0, sizeof b);
  b.rpe = epx_ll_rows_per_expert(R, BI_LLT);
  b.rows = (int64_t)el * b.rpe;
  b.xrow = (size_t)H; /* FP8 */
  b.srow = epx_scale_row_bytes(H, 1);
  b.recv_x = epx_test_xaligned((size_t)b.rows * b.xrow);
  b.scales = epx_test_xaligned((size_t)b.rows * b.srow);
  b.count = epx_test_xaligned((size_t)el * 4);
  b.src = epx_test_xaligned((size_t)b.rows * 4);
  b.range = epx_test_xaligned((size_t)el * R * 8);
  epx_ref_ll_opts ro = {BI_LLT, 1, 0, 0};
  epx_ref_ll_result ref;
  epx_ref_ll_dispatch(&w->ref, rank, &ro, &ref);
  /* expert outputs of every rank: tagged rows in every row (cheap at this size) */
  uint16_t *outs[EPX_TEST_MAX_RANKS];
  for (int r = 0; r < R; ++r) {
    outs[r] = epx_test_xaligned((size_t)b.rows * H * 2);
    epx_test_fill_bf16_wide(c->seed + 5, r, b.rows, H, outs[r]);
  }
  uint16_t *exp_x = epx_test_xaligned((size_t)(T + 1) * H * 2);
  uint16_t *got_x = epx_test_xaligned((size_t)(T + 1) * H * 2);
  epx_ref_ll_combine(&w->ref, rank, BI_LLT, (const uint16_t *const *)outs, w->weights[rank], exp_x);

  f |= epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h), "epxHandleCreate");
  if (!f && faulty && c->mut == M_EMPTY_HANDLE)
    f |= epx_test_expect_success(rank, comm, epxHandleCreate(comm, &h_empty), "epxHandleCreate (2nd)");
  if (f) goto done;

  epxLowLatencyDispatchArgs_t da;
  memset(&da, 0, sizeof da);
  da.x = w->x[rank];
  da.topk_idx = w->topk[rank];
  da.topk_idx_type = w->is_int64 ? epxInt64 : epxInt32;
  da.num_tokens = T;
  da.hidden = H;
  da.num_topk = K;
  da.use_fp8 = 1;
  epxLowLatencyDispatchOutputs_t lo = {b.recv_x, b.scales, b.count, b.src, b.range};

  if (c->op == OP_LL_RECV) {
    /* local misuse: no collective call is made */
    epxResult_t r = epxLowLatencyRecv(comm, h, NULL);
    f |= check_bad_result(rank, c, comm, r, 0, "epxLowLatencyRecv");
    if (f) goto done;
    da.return_recv_hook = 1; /* the valid calls below use the split phases */
  }
  if (c->op == OP_LL_DISPATCH) {
    epxLowLatencyDispatchArgs_t bad = da;
    if (faulty) {
      switch (c->mut) {
        case M_EXPERT_E:
        case M_EXPERT_M2:
        case M_EXPERT_MAX:
          s.topk = copy_topk_with(w, rank, (int64_t)(T - 1) * K, bad_id(c, w), 0);
          bad.topk_idx = s.topk;
          break;
        case M_T_ABOVE_MAX:
          s.topk = copy_topk_with(w, rank, -1, 0, 2);
          bad.topk_idx = s.topk;
          bad.num_tokens = BI_LLT + 1;
          break;
        case M_UE8M0_NO_ROUND: bad.use_ue8m0 = 1; break;
        case M_FP8_HIDDEN: bad.hidden = 192; break;
        case M_X_PLUS8: bad.x = shifted_copy(bad.x, (size_t)T * H * 2, 8, &s.x); break;
        case M_X_NULL: bad.x = NULL; break;
        case M_TOPK_ABOVE: bad.num_topk = K + 1; break;
        default: break;
      }
    }
    lbufs_poison(&b, el, R);
    epxLowLatencyDispatchOutputs_t o = lo;
    if (faulty && c->mut == M_RECV_X_NULL) o.recv_x = NULL;
    epxResult_t r = epxLowLatencyDispatch(comm, &bad, h, &o, NULL);
    f |= check_bad_result(rank, c, comm, r, 1, "epxLowLatencyDispatch");
    f |= lbufs_untouched(rank, &b, el, R);
    if (f) goto done;
  }
  /* valid dispatch, exact */
  lbufs_poison(&b, el, R);
  if (c->op == OP_LL_PENDING) da.return_recv_hook = 1;
  f |= epx_test_expect_success(rank, comm, epxLowLatencyDispatch(comm, &da, h, &lo, NULL), "epxLowLatencyDispatch");
  if (!f && c->op == OP_LL_PENDING) {
    /* the misuse: a call on the handle while its receive is pending */
    epxResult_t r;
    if (c->mut == M_PENDING_COMBINE) {
      epxLowLatencyCombineArgs_t pa;
      memset(&pa, 0, sizeof pa);
      pa.x = outs[rank];
      pa.topk_idx = w->topk[rank];
      pa.topk_idx_type = da.topk_idx_type;
      pa.topk_weights = w->weights[rank];
      pa.num_tokens = T;
      pa.hidden = H;
      pa.num_topk = K;
      epx_test_poison(got_x, (size_t)(T + 1) * H * 2);
      r = epxLowLatencyCombine(comm, &pa, h, got_x, NULL);
      f |= check_bad_result(rank, c, comm, r, 1, "epxLowLatencyCombine while a receive is pending");
      f |= still_poisoned(rank, "ll combined_x", got_x, (size_t)(T + 1) * H * 2);
    } else {
      lbufs b2 = b;
      b2.recv_x = epx_test_xaligned((size_t)b.rows * b.xrow);
      b2.scales = epx_test_xaligned((size_t)b.rows * b.srow);
      b2.count = epx_test_xaligned((size_t)el * 4);
      b2.src = epx_test_xaligned((size_t)b.rows * 4);
      b2.range = epx_test_xaligned((size_t)el * R * 8);
      lbufs_poison(&b2, el, R);
      epxLowLatencyDispatchOutputs_t lo2 = {b2.recv_x, b2.scales, b2.count, b2.src, b2.range};
      r = epxLowLatencyDispatch(comm, &da, h, &lo2, NULL);
      f |= check_bad_result(rank, c, comm, r, 1, "epxLowLatencyDispatch while a receive is pending");
      f |= lbufs_untouched(rank, &b2, el, R);
      free(b2.recv_x);
      free(b2.scales);
      free(b2.count);
      free(b2.src);
      free(b2.range);
    }
  }
  if (!f && da.return_recv_hook) f |= epx_test_expect_success(rank, comm, epxLowLatencyRecv(comm, h, NULL), "epxLowLatencyRecv");
  if (f) goto done;
  f |= epx_test_rank_compare(rank, "ll recv_count", EPX_ELEM_I32, ref.recv_count, b.count, 1, el);
  f |= epx_test_rank_compare(rank, "ll recv_layout_range", EPX_ELEM_I64, ref.recv_layout_range, b.range, el, R);
  for (int e = 0; e < el && !f; ++e) {
    size_t at = (size_t)e * (size_t)b.rpe;
    f |= epx_test_rank_compare(rank, "ll recv_x", EPX_ELEM_FP8, (uint8_t *)ref.recv_x + at * b.xrow,
             (uint8_t *)b.recv_x + at * b.xrow, ref.recv_count[e], H);
    f |= epx_test_rank_compare(rank, "ll recv_x_scales", EPX_ELEM_F32, (uint8_t *)ref.recv_x_scales + at * b.srow,
             (uint8_t *)b.scales + at * b.srow, ref.recv_count[e], (int64_t)b.srow / 4);
    f |= epx_test_rank_compare(rank, "ll recv_src_info", EPX_ELEM_I32, ref.recv_src_info + at, b.src + at,
             ref.recv_count[e], 1);
  }
  if (f) goto done;

  epxLowLatencyCombineArgs_t ca;
  memset(&ca, 0, sizeof ca);
  ca.x = outs[rank];
  ca.topk_idx = w->topk[rank];
  ca.topk_idx_type = da.topk_idx_type;
  ca.topk_weights = w->weights[rank];
  ca.num_tokens = T;
  ca.hidden = H;
  ca.num_topk = K;
  ca.return_recv_hook = da.return_recv_hook;
  if (c->op == OP_LL_COMBINE) {
    epxLowLatencyCombineArgs_t bad = ca;
    epxHandle_t hb = h;
    if (faulty) {
      if (c->mut == M_WEIGHTS_NULL) bad.topk_weights = NULL;
      if (c->mut == M_X_NULL) bad.x = NULL;
      if (c->mut == M_EMPTY_HANDLE) hb = h_empty;
      if (c->mut == M_T_ABOVE_MAX) bad.num_tokens = T + 1;
    }
    epx_test_poison(got_x, (size_t)(T + 1) * H * 2);
    epxResult_t r = epxLowLatencyCombine(comm, &bad, hb, got_x, NULL);
    f |= check_bad_result(rank, c, comm, r, 1, "epxLowLatencyCombine");
    f |= still_poisoned(rank, "ll combined_x", got_x, (size_t)(T + 1) * H * 2);
    if (f) goto done;
  }
  epx_test_poison(got_x, (size_t)(T + 1) * H * 2);
  f |= epx_test_expect_success(rank, comm, epxLowLatencyCombine(comm, &ca, h, got_x, NULL), "epxLowLatencyCombine");
  if (!f && ca.return_recv_hook)
    f |= epx_test_expect_success(rank, comm, epxLowLatencyRecv(comm, h, NULL), "epxLowLatencyRecv (combine)");
  if (!f) f |= epx_test_rank_compare(rank, "ll combined_x", EPX_ELEM_BF16, exp_x, got_x, T, H);
done:
  epxHandleDestroy(h);
  epxHandleDestroy(h_empty);
  for (int r = 0; r < R; ++r) free(outs[r]);
  free(exp_x);
  free(got_x);
  free(b.recv_x);
  free(b.scales);
  free(b.count);
  free(b.src);
  free(b.range);
  epx_ref_ll_free(&ref);
  free(s.topk);
  free(s.x);
  free(s.bias);
  return f;
}

static int run_layout(int rank, const bcase *c, epxComm_t comm, epx_test_world *w) {
  int R = w->p.nranks, E = w->p.num_experts, T = w->p.tokens[rank], K = w->p.num_topk;
  int faulty = (c->faulty < 0 || c->faulty == rank);
  int per_rank[EPX_TEST_MAX_RANKS], e_rank[EPX_TEST_MAX_RANKS];
  int *per_expert = epx_test_xmalloc(sizeof(int) * E), *e_expert = epx_test_xmalloc(sizeof(int) * E);
  uint8_t *in_rank = epx_test_xmalloc((size_t)T * R + 1), *e_in = epx_test_xmalloc((size_t)T * R + 1);
  void *bad = NULL;
  epxLayout_t lay = {per_rank, NULL, per_expert, in_rank};
  const void *topk = w->topk[rank];
  int t_arg = T, k_arg = K;
  if (faulty) {
    if (c->mut == M_EXPERT_E || c->mut == M_EXPERT_M2 || c->mut == M_EXPERT_MAX)
      topk = bad = copy_topk_with(w, rank, 3, bad_id(c, w), 0);
    if (c->mut == M_T_ABOVE_MAX) {
      topk = bad = copy_topk_with(w, rank, -1, 0, 2);
      t_arg = BI_T + 1;
    }
    if (c->mut == M_TOPK_33) k_arg = 33;
  }
  epx_test_poison(per_rank, sizeof per_rank);
  epx_test_poison(per_expert, sizeof(int) * E);
  epx_test_poison(in_rank, (size_t)T * R);
  epxResult_t r = epxGetDispatchLayout(comm, topk, w->is_int64 ? epxInt64 : epxInt32, t_arg, k_arg,
                                       &lay, NULL);
  int f = check_bad_result(rank, c, comm, r, 0, "epxGetDispatchLayout");
  if (faulty) {
    f |= still_poisoned(rank, "num_tokens_per_rank", per_rank, sizeof per_rank);
    f |= still_poisoned(rank, "num_tokens_per_expert", per_expert, sizeof(int) * E);
    f |= still_poisoned(rank, "is_token_in_rank", in_rank, (size_t)T * R);
  }
  if (!f) {
    r = epxGetDispatchLayout(comm, w->topk[rank], w->is_int64 ? epxInt64 : epxInt32, T, K, &lay,
                             NULL);
    f |= epx_test_expect_success(rank, comm, r, "epxGetDispatchLayout after the failed call");
    epx_ref_layout(&w->ref, rank, e_rank, NULL, e_expert, e_in);
    if (!f) {
      f |= epx_test_rank_compare(rank, "num_tokens_per_rank", EPX_ELEM_I32, e_rank, per_rank, 1, R);
      f |= epx_test_rank_compare(rank, "num_tokens_per_expert", EPX_ELEM_I32, e_expert, per_expert, 1, E);
      f |= epx_test_rank_compare(rank, "is_token_in_rank", EPX_ELEM_U8, e_in, in_rank, T, R);
    }
  }
  free(bad);
  free(per_expert);
  free(e_expert);
  free(in_rank);
  free(e_in);
  return f;
}

static int run_rank(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const bcase *c = arg;
  epx_test_problem p;
  memset(&p, 0, sizeof p);
  p.nranks = nranks;
  p.num_experts = BI_E;
  p.hidden = BI_H;
  p.num_topk = BI_K;
  p.routing = EPX_ROUTING_UNIFORM;
  p.seed = c->seed;
  for (int r = 0; r < nranks; ++r) p.tokens[r] = BI_T;
  epxConfig_t cfg = epx_test_config(&p, BI_LLT);
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, nranks, id, &cfg)) return 1;
  int is_ll = c->op == OP_LL_DISPATCH || c->op == OP_LL_COMBINE || c->op == OP_LL_RECV ||
              c->op == OP_LL_PENDING;
  epx_test_world w;
  epx_test_world_init(&w, &p, !c->int32, is_ll ? EPX_PAYLOAD_BF16 : c->payload, c->seed + 99);
  int f;
  if (c->op == OP_LAYOUT)
    f = run_layout(rank, c, comm, &w);
  else if (is_ll)
    f = run_ll(rank, c, comm, &w);
  else
    f = run_normal(rank, c, comm, &w);
  /* the communicator must still be healthy */
  epxResult_t async = epxSuccess;
  epxCommGetAsyncError(comm, &async);
  if (async != epxSuccess) {
    fprintf(stderr, "  rank %d: sticky error %s after the case\n", rank, epxGetErrorString(async));
    f = 1;
  }
  if (epxCommDestroy(comm) != epxSuccess) f = 1;
  epx_test_world_free(&w);
  return f;
}

#define IA epxInvalidArgument
#define IU epxInvalidUsage
static const bcase cases[] = {
    /* R5: invalid arguments on one rank */
    {"notify_expert_id_equal_to_E", 2, 1, OP_NOTIFY, M_EXPERT_E, 0, EPX_PAYLOAD_BF16, IA, "topk_idx", 1},
    {"notify_expert_id_minus2_int32", 3, 0, OP_NOTIFY, M_EXPERT_M2, 1, EPX_PAYLOAD_BF16, IA, "topk_idx", 2},
    {"notify_expert_id_int64_max", 2, 0, OP_NOTIFY, M_EXPERT_MAX, 0, EPX_PAYLOAD_BF16, IA, "topk_idx", 3},
    {"dispatch_worst_expert_id_equal_to_E", 3, 2, OP_DISPATCH_WORST, M_EXPERT_E, 0, EPX_PAYLOAD_BF16, IA, "topk_idx", 4},
    {"dispatch_worst_expert_id_int32_max", 2, 1, OP_DISPATCH_WORST, M_EXPERT_MAX, 1, EPX_PAYLOAD_BF16, IA, "topk_idx", 5},
    {"notify_tokens_above_max", 2, 1, OP_NOTIFY, M_T_ABOVE_MAX, 0, EPX_PAYLOAD_BF16, IA, "num_tokens", 6},
    {"notify_negative_tokens", 2, 0, OP_NOTIFY, M_T_NEGATIVE, 0, EPX_PAYLOAD_BF16, IA, "num_tokens", 7},
    {"dispatch_wrong_x_dtype", 2, 1, OP_DISPATCH, M_X_DTYPE, 0, EPX_PAYLOAD_BF16, IA, "x_type", 8},
    {"dispatch_null_x", 3, 1, OP_DISPATCH, M_X_NULL, 0, EPX_PAYLOAD_BF16, IA, "x", 9},
    {"dispatch_x_misaligned_by_1_byte", 2, 0, OP_DISPATCH, M_X_PLUS1, 0, EPX_PAYLOAD_BF16, IA, "x", 10},
    {"dispatch_worst_x_misaligned_by_8_bytes", 2, 1, OP_DISPATCH_WORST, M_X_PLUS8, 0, EPX_PAYLOAD_BF16, IA, "x", 11},
    {"notify_topk_above_config_max_topk", 2, 1, OP_NOTIFY, M_TOPK_ABOVE, 0, EPX_PAYLOAD_BF16, IA, "num_topk", 12},
    {"dispatch_worst_topk_33", 2, 0, OP_DISPATCH_WORST, M_TOPK_33, 0, EPX_PAYLOAD_BF16, IA, "num_topk", 13},
    {"notify_null_topk_idx", 2, 1, OP_NOTIFY, M_TOPK_NULL, 0, EPX_PAYLOAD_BF16, IA, "topk_idx", 14},
    {"notify_topk_idx_type_float", 2, 1, OP_NOTIFY, M_IDX_TYPE, 0, EPX_PAYLOAD_BF16, IA, "topk_idx_type", 15},
    {"dispatch_fp8_hidden_not_multiple_of_128", 2, 1, OP_DISPATCH, M_FP8_HIDDEN, 0, EPX_PAYLOAD_FP8_F32, IA, "hidden", 16},
    {"dispatch_hidden_above_config", 2, 0, OP_DISPATCH, M_HIDDEN_ABOVE, 0, EPX_PAYLOAD_BF16, IA, "hidden", 17},
    {"dispatch_fp8_without_scale_format", 2, 1, OP_DISPATCH, M_SCALE_NONE, 0, EPX_PAYLOAD_FP8_UE8M0, IA, "scale_format", 18},
    {"dispatch_fp8_null_scales", 2, 1, OP_DISPATCH, M_SCALES_NULL, 0, EPX_PAYLOAD_FP8_F32, IA, "x_scales", 19},
    {"dispatch_capacity_one_row_short", 2, 1, OP_DISPATCH, M_CAPACITY, 0, EPX_PAYLOAD_BF16, IA, "capacity_rows", 20},
    {"dispatch_null_recv_x", 3, 2, OP_DISPATCH, M_RECV_X_NULL, 0, EPX_PAYLOAD_BF16, IA, "recv_x", 21},
    {"dispatch_negative_expert_alignment", 2, 1, OP_DISPATCH, M_ALIGNMENT_NEG, 0, EPX_PAYLOAD_BF16, IA, "expert_alignment", 22},
    {"combine_null_x", 2, 1, OP_COMBINE, M_X_NULL, 0, EPX_PAYLOAD_BF16, IA, "x", 23},
    {"combine_x_misaligned", 3, 0, OP_COMBINE, M_X_PLUS8, 0, EPX_PAYLOAD_BF16, IA, "x", 24},
    {"combine_bias_misaligned", 2, 1, OP_COMBINE, M_BIAS_MISALIGNED, 0, EPX_PAYLOAD_BF16, IA, "bias[0]", 25},
    {"combine_hidden_above_config", 2, 0, OP_COMBINE, M_HIDDEN_ABOVE, 0, EPX_PAYLOAD_BF16, IA, "hidden", 26},
    {"combine_weights_topk_differs_from_dispatch", 2, 1, OP_COMBINE, M_TOPK_ABOVE, 0, EPX_PAYLOAD_BF16, IA, "num_topk", 27},
    {"ll_dispatch_expert_id_equal_to_E", 2, 1, OP_LL_DISPATCH, M_EXPERT_E, 0, EPX_PAYLOAD_BF16, IA, "topk_idx", 28},
    {"ll_dispatch_expert_id_minus2", 3, 2, OP_LL_DISPATCH, M_EXPERT_M2, 1, EPX_PAYLOAD_BF16, IA, "topk_idx", 29},
    {"ll_dispatch_expert_id_int64_max", 2, 0, OP_LL_DISPATCH, M_EXPERT_MAX, 0, EPX_PAYLOAD_BF16, IA, "topk_idx", 30},
    {"ll_dispatch_tokens_above_ll_max", 2, 1, OP_LL_DISPATCH, M_T_ABOVE_MAX, 0, EPX_PAYLOAD_BF16, IA, "num_tokens", 31},
    {"ll_dispatch_ue8m0_without_round_scale", 2, 0, OP_LL_DISPATCH, M_UE8M0_NO_ROUND, 0, EPX_PAYLOAD_BF16, IA, "use_ue8m0", 32},
    {"ll_dispatch_fp8_hidden_not_multiple_of_128", 2, 1, OP_LL_DISPATCH, M_FP8_HIDDEN, 0, EPX_PAYLOAD_BF16, IA, "hidden", 33},
    {"ll_dispatch_x_misaligned", 2, 1, OP_LL_DISPATCH, M_X_PLUS8, 0, EPX_PAYLOAD_BF16, IA, "x", 34},
    {"ll_dispatch_null_recv_x", 2, 0, OP_LL_DISPATCH, M_RECV_X_NULL, 0, EPX_PAYLOAD_BF16, IA, "recv_x", 35},
    {"ll_dispatch_topk_above_config", 2, 1, OP_LL_DISPATCH, M_TOPK_ABOVE, 0, EPX_PAYLOAD_BF16, IA, "num_topk", 36},
    {"ll_combine_null_weights", 2, 1, OP_LL_COMBINE, M_WEIGHTS_NULL, 0, EPX_PAYLOAD_BF16, IA, "topk_weights", 37},
    {"ll_combine_null_x", 3, 1, OP_LL_COMBINE, M_X_NULL, 0, EPX_PAYLOAD_BF16, IA, "x", 38},
    {"ll_combine_tokens_differ_from_dispatch", 2, 0, OP_LL_COMBINE, M_T_ABOVE_MAX, 0, EPX_PAYLOAD_BF16, IA, "num_tokens", 39},
    {"layout_expert_id_equal_to_E", 2, 1, OP_LAYOUT, M_EXPERT_E, 0, EPX_PAYLOAD_BF16, IA, "topk_idx", 40},
    {"layout_expert_id_minus2_int32", 2, 0, OP_LAYOUT, M_EXPERT_M2, 1, EPX_PAYLOAD_BF16, IA, "topk_idx", 41},
    {"layout_tokens_above_max", 2, 1, OP_LAYOUT, M_T_ABOVE_MAX, 0, EPX_PAYLOAD_BF16, IA, "num_tokens", 42},
    {"layout_topk_33", 2, 1, OP_LAYOUT, M_TOPK_33, 0, EPX_PAYLOAD_BF16, IA, "num_topk", 43},
    /* R6: API misuse */
    {"combine_empty_handle_every_rank", 2, -1, OP_COMBINE, M_EMPTY_HANDLE, 0, EPX_PAYLOAD_BF16, IU, "handle", 50},
    {"combine_empty_handle_one_rank", 3, 1, OP_COMBINE, M_EMPTY_HANDLE, 0, EPX_PAYLOAD_BF16, IU, "handle", 51},
    {"combine_foreign_handle", 2, 0, OP_COMBINE, M_FOREIGN_HANDLE, 0, EPX_PAYLOAD_BF16, IU, "another communicator", 52},
    {"dispatch_foreign_handle", 2, 1, OP_DISPATCH_WORST, M_FOREIGN_HANDLE, 0, EPX_PAYLOAD_BF16, IU, "another communicator", 53},
    {"dispatch_empty_handle_without_worst_tokens", 2, -1, OP_DISPATCH, M_EMPTY_HANDLE, 0, EPX_PAYLOAD_BF16, IU, "Notify", 54},
    {"ll_combine_empty_handle", 2, 1, OP_LL_COMBINE, M_EMPTY_HANDLE, 0, EPX_PAYLOAD_BF16, IU, "handle", 55},
    {"ll_recv_with_nothing_pending", 2, -1, OP_LL_RECV, M_NONE, 0, EPX_PAYLOAD_BF16, IU, "epxLowLatencyRecv", 56},
    {"ll_combine_while_dispatch_receive_pending", 3, -1, OP_LL_PENDING, M_PENDING_COMBINE, 0, EPX_PAYLOAD_BF16, IU, "not been received", 57},
    {"ll_dispatch_while_dispatch_receive_pending", 2, -1, OP_LL_PENDING, M_PENDING_DISPATCH, 0, EPX_PAYLOAD_BF16, IU, "not been received", 58},
};

int main(int argc, char **argv) {
  int ncases = (int)(sizeof cases / sizeof cases[0]), ran = 0;
  for (int i = 0; i < ncases; ++i) {
    const bcase *c = &cases[i];
    if (!epx_test_case_wanted(argc, argv, c->name)) continue;
    double t0 = epx_test_now();
    int rc = epx_test_spawn(c->R, run_rank, (void *)c, SPAWN_TIMEOUT_S);
    if (rc != 0) {
      printf("FAIL %s seed=%" PRIu64 "\n", c->name, c->seed);
      return 1;
    }
    printf("PASS %s (%.2f s)\n", c->name, epx_test_now() - t0);
    fflush(stdout);
    ++ran;
  }
  if (ran == 0) {
    printf("FAIL no case matched\n");
    return 1;
  }
  printf("test_bad_inputs: %d cases passed\n", ran);
  return 0;
}
