/*
 * test_host_smoke.c - a quick end-to-end run of the host backend with data a
 * person can check by hand: every payload value is a small integer (exact in
 * BF16 and in every FP32 sum), so results are compared exactly without the
 * reference. 4 processes, uneven token counts (one rank has none), repeated
 * and -1 top-k slots, and 3-token rounds so every op takes several rounds.
 *
 * Covered: notify + dispatch + combine, cached re-dispatch, worst-case
 * dispatch, low-latency dispatch + combine with and without the receive hook,
 * and an invalid call on one rank (epxInvalidArgument there, epxRemoteError
 * elsewhere) followed by an exact call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "common/layout_math.h"
#include "common/numerics.h"
#include "epx.h"

#define R 4
#define E 8  /* two experts per rank */
#define EL (E / R)
#define H 128
#define K 3
#define MAXT 12
#define CHUNK "3"

static const int tokens_of[R] = {7, 0, 11, 5};

/* Expert of slot k of token t of rank r: a fixed pattern with repeats and -1s. */
static int64_t expert_of(int r, int t, int k) {
  if ((r + t + k) % 5 == 0) return -1;
  if (k == 2 && t % 3 == 0) return (r * 3 + t * 5) % E; /* repeats slot 0 */
  return (r * 3 + t * 5 + k * 3) % E;
}

/* Payload value of column c of token t of rank r: a small exact integer. */
static float value_of(int r, int t, int c) { return (float)(r * 16 + t + (c % 4)); }

static int goes_to(int r, int t, int dst) {
  for (int k = 0; k < K; ++k) {
    int64_t e = expert_of(r, t, k);
    if (e >= 0 && e / EL == dst) return 1;
  }
  return 0;
}

static int fails = 0;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      fprintf(stderr, "[rank %d] %s:%d: ", me, __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                              \
      fprintf(stderr, "\n");                                     \
      ++fails;                                                   \
    }                                                            \
  } while (0)
#define CALL(expr)                                                                     \
  do {                                                                                 \
    epxResult_t res_ = (expr);                                                         \
    if (res_ != epxSuccess) {                                                          \
      fprintf(stderr, "[rank %d] %s:%d: %s -> %s: %s\n", me, __FILE__, __LINE__, #expr, \
              epxGetErrorString(res_), epxCommGetLastError(comm));                     \
      return 1;                                                                        \
    }                                                                                  \
  } while (0)

/* Payload arrays must be 16-byte aligned (the API moves 16-byte vectors). */
typedef struct inputs {
  _Alignas(16) uint16_t x[MAXT * H];
  int64_t topk[MAXT * K];
  float weights[MAXT * K];
  int T;
} inputs;

static void make_inputs(int r, inputs *in) {
  in->T = tokens_of[r];
  for (int t = 0; t < in->T; ++t) {
    for (int k = 0; k < K; ++k) {
      in->topk[t * K + k] = expert_of(r, t, k);
      in->weights[t * K + k] = 1.0f / (float)(1 << k); /* 1, 0.5, 0.25: exact products */
    }
    for (int c = 0; c < H; ++c) in->x[t * H + c] = epx_f32_to_bf16(value_of(r, t, c));
  }
}

/* Expected normal receive of rank me: (source, token) per row. */
static int expected_rows(int me, int *src, int *tok) {
  int n = 0;
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < tokens_of[s]; ++t)
      if (goes_to(s, t, me)) {
        src[n] = s;
        tok[n] = t;
        ++n;
      }
  return n;
}

static int check_dispatch_outputs(int me, const uint16_t *recv_x, const int64_t *recv_topk,
                                  const float *recv_w, const int *src_idx, int n_recv,
                                  int64_t rows) {
  int src[R * MAXT], tok[R * MAXT];
  int n = expected_rows(me, src, tok);
  CHECK(n_recv == n, "N_recv %d, expected %d", n_recv, n);
  if (n_recv != n) return 1;
  for (int row = 0; row < n; ++row) {
    int s = src[row], t = tok[row];
    CHECK(src_idx[row] == t, "row %d: src_idx %d, expected %d", row, src_idx[row], t);
    for (int c = 0; c < H; ++c)
      if (recv_x[row * H + c] != epx_f32_to_bf16(value_of(s, t, c))) {
        CHECK(0, "row %d col %d: payload %g, expected %g (rank %d token %d)", row, c,
              epx_bf16_to_f32(recv_x[row * H + c]), value_of(s, t, c), s, t);
        break;
      }
    for (int k = 0; k < K; ++k) {
      int64_t e = expert_of(s, t, k);
      int64_t local = (e >= 0 && e / EL == me) ? e - me * EL : -1;
      float w = local >= 0 ? 1.0f / (float)(1 << k) : 0.0f;
      CHECK(recv_topk[row * K + k] == local, "row %d slot %d: local id %lld, expected %lld", row,
            k, (long long)recv_topk[row * K + k], (long long)local);
      CHECK(recv_w[row * K + k] == w, "row %d slot %d: weight %g, expected %g", row, k,
            recv_w[row * K + k], w);
    }
  }
  for (int64_t row = n; row < rows; ++row) { /* worst-case padding */
    CHECK(src_idx[row] == -1, "padding row %lld: src_idx %d", (long long)row, src_idx[row]);
    for (int k = 0; k < K; ++k)
      CHECK(recv_topk[row * K + k] == -1 && recv_w[row * K + k] == 0.0f,
            "padding row %lld slot %d not cleared", (long long)row, k);
  }
  return 0;
}

static int run_rank(int me, int nranks, const epxUniqueId *id, void *arg) {
  (void)arg;
  epxComm_t comm = NULL;
  epxConfig_t cfg = EPX_CONFIG_INITIALIZER;
  cfg.backend = epxBackendHost;
  cfg.num_experts = E;
  cfg.hidden = H;
  cfg.max_topk = K;
  cfg.max_tokens_per_rank = MAXT;
  cfg.ll_max_tokens_per_rank = MAXT;
  cfg.timeout_ms = 20000;
  epxResult_t ir = epxCommInitRank(&comm, nranks, *id, me, &cfg);
  if (ir != epxSuccess) {
    fprintf(stderr, "[rank %d] init: %s: %s\n", me, epxGetErrorString(ir),
            epxCommGetLastError(NULL));
    return 1;
  }
  static inputs in;
  make_inputs(me, &in);
  int T = in.T;

  /* ---- normal: notify, dispatch, combine ---- */
  epxHandle_t h = NULL;
  CALL(epxHandleCreate(comm, &h));
  epxDispatchArgs_t da;
  memset(&da, 0, sizeof da);
  da.x = in.x;
  da.x_type = epxBFloat16;
  da.scale_format = epxScalesNone;
  da.topk_idx = in.topk;
  da.topk_idx_type = epxInt64;
  da.topk_weights = in.weights;
  da.num_tokens = T;
  da.hidden = H;
  da.num_topk = K;
  da.expert_alignment = 4;
  int64_t n_recv = -1;
  int per_expert[EL];
  CALL(epxDispatchNotify(comm, &da, h, &n_recv, per_expert, NULL));
  int src[R * MAXT], tok[R * MAXT];
  int n = expected_rows(me, src, tok);
  CHECK(n_recv == n, "notify: N_recv %lld, expected %d", (long long)n_recv, n);
  for (int e = 0; e < EL; ++e) {
    int raw = 0;
    for (int s = 0; s < R; ++s)
      for (int t = 0; t < tokens_of[s]; ++t) {
        int has = 0;
        for (int k = 0; k < K; ++k) has |= expert_of(s, t, k) == me * EL + e;
        raw += has;
      }
    CHECK(per_expert[e] == (raw + 3) / 4 * 4, "expert %d: count %d, expected %d aligned", e,
          per_expert[e], raw);
  }

  static _Alignas(16) uint16_t recv_x[R * MAXT * H];
  static _Alignas(16) uint16_t combined[MAXT * H];
  static int64_t recv_topk[R * MAXT * K];
  static float recv_w[R * MAXT * K], combined_w[MAXT * K];
  static int src_idx[R * MAXT];
  int prefix[R], n_out = -1;
  epxDispatchOutputs_t o;
  memset(&o, 0, sizeof o);
  o.recv_x = recv_x;
  o.recv_topk_idx = recv_topk;
  o.recv_topk_weights = recv_w;
  o.recv_src_idx = src_idx;
  o.recv_rank_prefix = prefix;
  o.num_recv_tokens = &n_out;
  o.capacity_rows = R * MAXT;
  CALL(epxDispatch(comm, &da, h, &o, NULL));
  check_dispatch_outputs(me, recv_x, recv_topk, recv_w, src_idx, n_out, n_out);
  int acc = 0;
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < tokens_of[s]; ++t) acc += goes_to(s, t, me);
    CHECK(prefix[s] == acc, "recv_rank_prefix[%d] = %d, expected %d", s, prefix[s], acc);
  }

  /* Combine the received rows as they are: token t comes back times the
   * number of ranks it went to; weights likewise. */
  epxCombineArgs_t ca;
  memset(&ca, 0, sizeof ca);
  ca.x = recv_x;
  ca.topk_weights = recv_w;
  ca.hidden = H;
  ca.num_topk = K;
  epxCombineOutputs_t co = {combined, combined_w};
  CALL(epxCombine(comm, &ca, h, &co, NULL));
  for (int t = 0; t < T; ++t) {
    int copies = 0;
    for (int d = 0; d < R; ++d) copies += goes_to(me, t, d);
    for (int c = 0; c < H; ++c) {
      float want = (float)copies * value_of(me, t, c);
      if (combined[t * H + c] != epx_f32_to_bf16(want)) {
        CHECK(0, "combine token %d col %d: %g, expected %g", t, c,
              epx_bf16_to_f32(combined[t * H + c]), want);
        break;
      }
    }
    for (int k = 0; k < K; ++k) {
      /* only the owner of slot k's expert kept its weight */
      int64_t e = expert_of(me, t, k);
      float want = e >= 0 ? 1.0f / (float)(1 << k) : 0.0f;
      CHECK(combined_w[t * K + k] == want, "combined weight %d/%d: %g, expected %g", t, k,
            combined_w[t * K + k], want);
    }
  }

  /* Cached re-dispatch: same routing, no count exchange. */
  memset(recv_x, 0xA5, sizeof recv_x);
  CALL(epxDispatch(comm, &da, h, &o, NULL));
  check_dispatch_outputs(me, recv_x, recv_topk, recv_w, src_idx, n_out, n_out);

  /* Worst-case mode with a fresh handle. */
  epxHandle_t hw = NULL;
  CALL(epxHandleCreate(comm, &hw));
  da.num_worst_tokens = R * MAXT;
  memset(recv_topk, 0xA5, sizeof recv_topk);
  memset(src_idx, 0xA5, sizeof src_idx);
  CALL(epxDispatch(comm, &da, hw, &o, NULL));
  check_dispatch_outputs(me, recv_x, recv_topk, recv_w, src_idx, n_out, R * MAXT);
  da.num_worst_tokens = 0;

  /* ---- an invalid call on rank 1 fails everywhere, then all is well ---- */
  epxDispatchArgs_t bad = da;
  if (me == 1) bad.num_topk = 0;
  epxResult_t r = epxDispatchNotify(comm, &bad, h, &n_recv, NULL, NULL);
  CHECK(r == (me == 1 ? epxInvalidArgument : epxRemoteError), "invalid call: got %s",
        epxGetErrorString(r));
  CALL(epxDispatchNotify(comm, &da, h, &n_recv, NULL, NULL));
  CHECK(n_recv == n, "notify after invalid call: N_recv %lld, expected %d", (long long)n_recv, n);

  /* ---- low latency ---- */
  static _Alignas(16) uint16_t ll_x[EL * R * MAXT * H];
  static _Alignas(16) uint16_t ll_combined[MAXT * H];
  int ll_count[EL], ll_src[EL * R * MAXT];
  int64_t ll_range[EL * R];
  epxHandle_t hl = NULL;
  CALL(epxHandleCreate(comm, &hl));
  for (int hook = 0; hook < 2; ++hook) {
    epxLowLatencyDispatchArgs_t la;
    memset(&la, 0, sizeof la);
    la.x = in.x;
    la.topk_idx = in.topk;
    la.topk_idx_type = epxInt64;
    la.num_tokens = T;
    la.hidden = H;
    la.num_topk = K;
    la.return_recv_hook = hook;
    epxLowLatencyDispatchOutputs_t lo = {ll_x, NULL, ll_count, ll_src, ll_range};
    CALL(epxLowLatencyDispatch(comm, &la, hl, &lo, NULL));
    if (hook) CALL(epxLowLatencyRecv(comm, hl, NULL));
    for (int e = 0; e < EL; ++e) {
      int row = 0;
      for (int s = 0; s < R; ++s) {
        int first = row;
        for (int t = 0; t < tokens_of[s]; ++t) {
          int has = 0;
          for (int k = 0; k < K; ++k) has |= expert_of(s, t, k) == me * EL + e;
          if (!has) continue;
          int64_t at = epx_ll_row_index(e, row, R, MAXT);
          CHECK(ll_src[at] == t, "LL expert %d row %d: src %d, expected %d", e, row, ll_src[at], t);
          CHECK(ll_x[at * H + 5] == epx_f32_to_bf16(value_of(s, t, 5)),
                "LL expert %d row %d: payload of the wrong token", e, row);
          ++row;
        }
        CHECK(ll_range[e * R + s] == epx_ll_range_pack(first, row - first),
              "LL range of expert %d from rank %d", e, s);
      }
      CHECK(ll_count[e] == row, "LL expert %d: count %d, expected %d", e, ll_count[e], row);
    }
    /* Experts return their inputs: combined = sum_k w_k * x over valid slots. */
    epxLowLatencyCombineArgs_t lc;
    memset(&lc, 0, sizeof lc);
    lc.x = ll_x;
    lc.topk_idx = in.topk;
    lc.topk_idx_type = epxInt64;
    lc.topk_weights = in.weights;
    lc.num_tokens = T;
    lc.hidden = H;
    lc.num_topk = K;
    lc.return_recv_hook = hook;
    CALL(epxLowLatencyCombine(comm, &lc, hl, ll_combined, NULL));
    if (hook) CALL(epxLowLatencyRecv(comm, hl, NULL));
    for (int t = 0; t < T; ++t) {
      float wsum = 0.0f;
      for (int k = 0; k < K; ++k)
        if (expert_of(me, t, k) >= 0) wsum += 1.0f / (float)(1 << k);
      for (int c = 0; c < H; ++c) {
        float want = wsum * value_of(me, t, c);
        if (ll_combined[t * H + c] != epx_f32_to_bf16(want)) {
          CHECK(0, "LL combine (hook %d) token %d col %d: %g, expected %g", hook, t, c,
                epx_bf16_to_f32(ll_combined[t * H + c]), want);
          break;
        }
      }
    }
  }

  CALL(epxHandleDestroy(hl));
  CALL(epxHandleDestroy(hw));
  CALL(epxHandleDestroy(h));
  CALL(epxCommDestroy(comm));
  return fails ? 1 : 0;
}

int main(void) {
  /* Read by the parent already (for the unique id), so set it before forking. */
  setenv("EPX_HOST_CHUNK_TOKENS", CHUNK, 1);
  int rc = epx_test_spawn(R, run_rank, NULL, 120);
  printf("%s host_smoke\n", rc == 0 ? "PASS" : "FAIL");
  return rc == 0 ? 0 : 1;
}
