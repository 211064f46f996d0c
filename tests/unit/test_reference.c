/*
 * test_reference.c - the CPU reference (src/reference) against cases small
 * enough to work out by hand: 2 ranks, 4 experts, a few tokens, and a 4-rank
 * case whose sums depend on the node-first order.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/harness.h"
#include "common/layout_math.h"
#include "common/numerics.h"
#include "reference/reference.h"

static int failures;

#define CHECK(cond, ...) EPX_TEST_CHECK(failures, NULL, cond, __VA_ARGS__)

#define CHECK_INTS(got, want, n, what)                                                  \
  do {                                                                                  \
    for (int i_ = 0; i_ < (n); ++i_)                                                    \
      CHECK((int64_t)(got)[i_] == (int64_t)(want)[i_], "%s[%d] = %lld, want %lld", what, i_, \
            (long long)(got)[i_], (long long)(want)[i_]);                               \
  } while (0)

#define CHECK_FLOATS(got, want, n, what)                                              \
  do {                                                                                \
    for (int i_ = 0; i_ < (n); ++i_)                                                  \
      CHECK(epx_f32_bits((got)[i_]) == epx_f32_bits((want)[i_]), "%s[%d] = %.9g, want %.9g", \
            what, i_, (double)(got)[i_], (double)(want)[i_]);                         \
  } while (0)

/* ------------------------------------------------------------ world A
 * 2 ranks, 4 experts (2 local each), K = 2, H = 8 (16-byte BF16 rows).
 *   rank 0: t0 [0, 3] -> ranks 0, 1     rank 1: t0 [-1, -1] -> nowhere
 *           t1 [1, -1] -> rank 0                t1 [3, 0]   -> ranks 1, 0
 *           t2 [2, 2] -> rank 1 (expert 2 listed twice)
 * BF16 payload x[r][t][c] = 100 r + 10 t + c + 1 (exact small integers). */
enum { AH = 8, AK = 2 };
static const int64_t a_topk0[3 * AK] = {0, 3, 1, -1, 2, 2};
static const int64_t a_topk1[2 * AK] = {-1, -1, 3, 0};
static const float a_w0[3 * AK] = {0.5f, 0.25f, 0.75f, 0.125f, 1.0f, 2.0f};
static const float a_w1[2 * AK] = {3.0f, 4.0f, 0.5f, 1.5f};
static uint16_t a_x0[3 * AH], a_x1[2 * AH];
static epx_ref_rank_input a_in[2];
static epx_ref_world a_world;

static uint16_t bf(float f) { return epx_f32_to_bf16(f); }

static void make_world_a(int ranks_per_node) {
  for (int t = 0; t < 3; ++t)
    for (int c = 0; c < AH; ++c) a_x0[t * AH + c] = bf((float)(10 * t + c + 1));
  for (int t = 0; t < 2; ++t)
    for (int c = 0; c < AH; ++c) a_x1[t * AH + c] = bf((float)(100 + 10 * t + c + 1));
  a_in[0] = (epx_ref_rank_input){3, a_topk0, a_w0, a_x0, NULL};
  a_in[1] = (epx_ref_rank_input){2, a_topk1, a_w1, a_x1, NULL};
  a_world = (epx_ref_world){2, ranks_per_node, 4, AH, AK, 1, a_in};
}

static void layout_two_ranks(void) {
  make_world_a(1);
  int per_rank[2], per_node[2], per_expert[4];
  uint8_t in_rank[3 * 2];
  CHECK(epx_ref_layout(&a_world, 0, per_rank, per_node, per_expert, in_rank) == 0, "layout");
  int want_rank0[2] = {2, 2}, want_expert0[4] = {1, 1, 1, 1};
  uint8_t want_in0[6] = {1, 1, 1, 0, 0, 1};
  CHECK_INTS(per_rank, want_rank0, 2, "rank0 per_rank");
  CHECK_INTS(per_node, want_rank0, 2, "rank0 per_node (one rank per node)");
  CHECK_INTS(per_expert, want_expert0, 4, "rank0 per_expert (expert 2 listed twice counts once)");
  CHECK_INTS(in_rank, want_in0, 6, "rank0 is_token_in_rank");

  CHECK(epx_ref_layout(&a_world, 1, per_rank, per_node, per_expert, in_rank) == 0, "layout");
  int want_rank1[2] = {1, 1}, want_expert1[4] = {1, 0, 0, 1};
  uint8_t want_in1[4] = {0, 0, 1, 1};
  CHECK_INTS(per_rank, want_rank1, 2, "rank1 per_rank");
  CHECK_INTS(per_expert, want_expert1, 4, "rank1 per_expert");
  CHECK_INTS(in_rank, want_in1, 4, "rank1 is_token_in_rank");

  make_world_a(2); /* one node: a token counts once per node */
  CHECK(epx_ref_layout(&a_world, 0, NULL, per_node, NULL, NULL) == 0, "layout");
  CHECK(per_node[0] == 3, "rank0 per_node one node = %d", per_node[0]);
  CHECK(epx_ref_layout(&a_world, 1, NULL, per_node, NULL, NULL) == 0, "layout");
  CHECK(per_node[0] == 1, "rank1 per_node one node = %d", per_node[0]);
}

static void dispatch_two_ranks(void) {
  make_world_a(1);
  epx_ref_dispatch_opts o = {epxBFloat16, epxScalesNone, 4, 0};
  epx_ref_dispatch_result r;

  /* rank 0 receives (0,t0), (0,t1), (1,t1) */
  CHECK(epx_ref_dispatch(&a_world, 0, &o, &r) == 0, "dispatch");
  CHECK(r.num_recv == 3 && r.rows == 3, "rank0 N_recv %lld", (long long)r.num_recv);
  int64_t want_idx[6] = {0, -1, 1, -1, -1, 0};
  float want_w[6] = {0.5f, 0.0f, 0.75f, 0.0f, 0.0f, 1.5f};
  int want_src[3] = {0, 1, 1}, want_srank[3] = {0, 0, 1}, want_prefix[2] = {2, 3};
  int want_pm[4] = {2, 2, 3, 3}, want_cnt[2] = {4, 4}, want_raw[2] = {2, 1};
  CHECK_INTS((int64_t *)r.recv_topk_idx, want_idx, 6, "rank0 recv_topk_idx");
  CHECK_FLOATS(r.recv_topk_weights, want_w, 6, "rank0 recv_topk_weights");
  CHECK_INTS(r.recv_src_idx, want_src, 3, "rank0 recv_src_idx");
  CHECK_INTS(r.recv_src_rank, want_srank, 3, "rank0 src rank");
  CHECK_INTS(r.recv_rank_prefix, want_prefix, 2, "rank0 recv_rank_prefix");
  CHECK_INTS(r.rank_prefix_matrix, want_pm, 4, "rank_prefix_matrix");
  CHECK_INTS(r.num_recv_tokens_per_expert, want_cnt, 2, "rank0 per expert (aligned to 4)");
  CHECK_INTS(r.num_recv_tokens_per_expert_raw, want_raw, 2, "rank0 per expert raw");
  CHECK(memcmp(r.recv_x, a_x0, 2 * AH * 2) == 0, "rank0 rows 0-1 are rank 0 tokens 0-1");
  CHECK(memcmp((uint16_t *)r.recv_x + 2 * AH, a_x1 + AH, AH * 2) == 0, "rank0 row 2 = (1,t1)");
  epx_ref_dispatch_free(&r);

  /* rank 1 receives (0,t0), (0,t2), (1,t1); worst-case mode with 5 rows */
  o.expert_alignment = 1;
  o.num_worst_tokens = 5;
  CHECK(epx_ref_dispatch(&a_world, 1, &o, &r) == 0, "dispatch");
  CHECK(r.num_recv == 3 && r.rows == 5, "rank1 N_recv %lld rows %lld", (long long)r.num_recv,
        (long long)r.rows);
  int64_t want_idx1[10] = {-1, 1, 0, 0, 1, -1, -1, -1, -1, -1};
  float want_w1[10] = {0.0f, 0.25f, 1.0f, 2.0f, 0.5f, 0.0f, 0, 0, 0, 0};
  int want_src1[5] = {0, 2, 1, -1, -1}, want_cnt1[2] = {1, 2};
  CHECK_INTS((int64_t *)r.recv_topk_idx, want_idx1, 10, "rank1 recv_topk_idx");
  CHECK_FLOATS(r.recv_topk_weights, want_w1, 10, "rank1 recv_topk_weights");
  CHECK_INTS(r.recv_src_idx, want_src1, 5, "rank1 recv_src_idx");
  CHECK_INTS(r.num_recv_tokens_per_expert, want_cnt1, 2, "rank1 per expert (expert 2 once)");
  CHECK(memcmp((uint16_t *)r.recv_x + AH, a_x0 + 2 * AH, AH * 2) == 0, "rank1 row 1 = (0,t2)");
  const uint8_t *tail = (const uint8_t *)r.recv_x + 3 * AH * 2;
  int untouched = 1;
  for (int i = 0; i < 2 * AH * 2; ++i) untouched &= tail[i] == 0xA5;
  CHECK(untouched, "padding rows of recv_x are left unwritten");
  epx_ref_dispatch_free(&r);

  /* int32 ids give int32 outputs */
  int32_t t0[6] = {0, 3, 1, -1, 2, 2}, t1[4] = {-1, -1, 3, 0};
  a_in[0].topk_idx = t0;
  a_in[1].topk_idx = t1;
  a_world.topk_is_int64 = 0;
  o.num_worst_tokens = 0;
  CHECK(epx_ref_dispatch(&a_world, 1, &o, &r) == 0, "dispatch int32");
  int32_t want32[6] = {-1, 1, 0, 0, 1, -1};
  CHECK_INTS((int32_t *)r.recv_topk_idx, want32, 6, "rank1 int32 recv_topk_idx");
  epx_ref_dispatch_free(&r);
}

static void dispatch_fp8_scales_copied(void) {
  make_world_a(1);
  /* H = 128: one group; FP8 bytes and UE8M0 words are copied verbatim */
  enum { H = 128 };
  static uint8_t q0[3 * H], q1[2 * H];
  uint32_t s0[3] = {0x11, 0x22, 0x33}, s1[2] = {0x44, 0x55};
  for (int i = 0; i < 3 * H; ++i) q0[i] = (uint8_t)(i % 120 + 1);
  for (int i = 0; i < 2 * H; ++i) q1[i] = (uint8_t)(i % 100 + 2);
  a_in[0].x = q0;
  a_in[0].x_scales = s0;
  a_in[1].x = q1;
  a_in[1].x_scales = s1;
  a_world.hidden = H;
  epx_ref_dispatch_opts o = {epxFloat8E4M3, epxScalesUE8M0, 1, 0};
  epx_ref_dispatch_result r;
  CHECK(epx_ref_dispatch(&a_world, 1, &o, &r) == 0, "dispatch fp8");
  uint32_t want_s[3] = {0x11, 0x33, 0x55};
  CHECK_INTS((uint32_t *)r.recv_x_scales, want_s, 3, "rank1 scales");
  CHECK(memcmp((uint8_t *)r.recv_x + H, q0 + 2 * H, H) == 0, "rank1 fp8 row 1");
  CHECK(memcmp((uint8_t *)r.recv_x + 2 * H, q1 + H, H) == 0, "rank1 fp8 row 2");
  epx_ref_dispatch_free(&r);
}

static void combine_two_ranks(void) {
  make_world_a(1);
  /* Combine inputs: rank 0 rows (0,t0), (0,t1), (1,t1); rank 1 rows (0,t0), (0,t2), (1,t1).
   * Column 0 of every row is 1.0 on rank 0 and 2^-8 on rank 1, so (0,t0) sums to
   * 1 + 2^-8, a BF16 tie that rounds to 1.0 without a bias; with bias0 = 2^-8 the
   * FP32 sum is 1 + 2^-7, exact in BF16: it is rounded once, at the end. */
  uint16_t c0[3 * AH], c1[3 * AH];
  for (int i = 0; i < 3 * AH; ++i) {
    c0[i] = bf((float)(i + 1));
    c1[i] = bf((float)(1024 + 8 * i)); /* exact in BF16 */
  }
  for (int row = 0; row < 3; ++row) {
    c0[row * AH] = bf(1.0f);
    c1[row * AH] = bf(0.00390625f);
  }
  const uint16_t *xs[2] = {c0, c1};
  float wt0[3 * AK] = {1, 2, 3, 4, 5, 6}, wt1[3 * AK] = {10, 20, 30, 40, 50, 60};
  const float *ws[2] = {wt0, wt1};
  uint16_t out[3 * AH];
  float outw[3 * AK];
  epx_ref_combine_inputs in = {xs, ws, {NULL, NULL}};

  CHECK(epx_ref_combine(&a_world, 0, &in, out, outw) == 0, "combine");
  /* t0 = c0 row 0 + c1 row 0; t1 = c0 row 1; t2 = c1 row 1 */
  CHECK(out[0] == bf(1.0f), "t0 col0 = 0x%04x (tie to even)", out[0]);
  CHECK(out[1] == bf(2.0f + 1032.0f), "t0 col1 = 0x%04x", out[1]);
  CHECK(out[AH + 0] == bf(1.0f) && out[AH + 3] == bf(12.0f), "t1");
  CHECK(out[2 * AH + 0] == bf(0.00390625f) && out[2 * AH + 5] == bf(1128.0f), "t2");
  float want_w0[6] = {11, 22, 3, 4, 30, 40};
  CHECK_FLOATS(outw, want_w0, 6, "rank0 combined weights");

  uint16_t b0[3 * AH], b1[3 * AH];
  for (int i = 0; i < 3 * AH; ++i) {
    b0[i] = bf(0.00390625f);
    b1[i] = bf(-0.5f);
  }
  in.bias[0] = b0;
  CHECK(epx_ref_combine(&a_world, 0, &in, out, NULL) == 0, "combine bias0");
  CHECK(out[0] == 0x3f81, "t0 col0 with bias = 0x%04x, want 0x3f81 (1 + 2^-7)", out[0]);
  in.bias[1] = b1;
  CHECK(epx_ref_combine(&a_world, 0, &in, out, NULL) == 0, "combine two biases");
  CHECK(out[0] == bf(1.0078125f - 0.5f), "t0 col0 with two biases = 0x%04x", out[0]);

  /* rank 1: t0 went nowhere: the biases alone; t1 = c0 row 2 + c1 row 2 */
  uint16_t bb0[2 * AH], bb1[2 * AH];
  for (int i = 0; i < 2 * AH; ++i) {
    bb0[i] = bf(3.0f);
    bb1[i] = bf(0.25f);
  }
  uint16_t out1[2 * AH];
  float outw1[2 * AK];
  in.bias[0] = NULL;
  in.bias[1] = NULL;
  CHECK(epx_ref_combine(&a_world, 1, &in, out1, outw1) == 0, "combine rank1");
  CHECK(out1[0] == 0 && out1[AH - 1] == 0, "token sent nowhere, no bias: 0");
  CHECK(outw1[0] == 0.0f && outw1[1] == 0.0f, "weights of a token sent nowhere: 0");
  CHECK(out1[AH + 4] == bf(21.0f + 1184.0f), "rank1 t1 col4 = 0x%04x", out1[AH + 4]);
  float want_w1[4] = {0, 0, 55, 66};
  CHECK_FLOATS(outw1, want_w1, 4, "rank1 combined weights");
  in.bias[0] = bb0;
  in.bias[1] = bb1;
  CHECK(epx_ref_combine(&a_world, 1, &in, out1, NULL) == 0, "combine rank1 biases");
  CHECK(out1[0] == bf(3.25f) && out1[AH - 1] == bf(3.25f), "token sent nowhere: biases alone");
}

/* 4 ranks, 2 per node, E = 4 (one per rank), K = 4: rank 0's token 0 goes to
 * every rank. combined_topk_weights in FP32 separate node-first from flat sums:
 * node 0: (0 + 1) + 2^-24 = 1 (tie to even), node 1: 2^-24 + 2^-24 = 2^-23,
 * total 1 + 2^-23; a flat sum over ranks would give 1. */
static void combine_node_order(void) {
  int64_t topk[4] = {0, 1, 2, 3}, none[4] = {-1, -1, -1, -1};
  uint16_t x[4 * 8];
  for (int i = 0; i < 32; ++i) x[i] = bf(1.0f);
  epx_ref_rank_input in4[4] = {{1, topk, NULL, x, NULL},
                               {0, none, NULL, x, NULL},
                               {0, none, NULL, x, NULL},
                               {0, none, NULL, x, NULL}};
  epx_ref_world w = {4, 2, 4, 8, 4, 1, in4};
  float tiny = ldexpf(1.0f, -24);
  float w0[4] = {1.0f, 0, 0, 0}, w1[4] = {tiny, 0, 0, 0}, w2[4] = {tiny, 0, 0, 0},
        w3[4] = {tiny, 0, 0, 0};
  const float *ws[4] = {w0, w1, w2, w3};
  uint16_t r0[8], r1[8], r2[8], r3[8];
  for (int c = 0; c < 8; ++c) {
    r0[c] = bf(1.0f);
    r1[c] = bf(1.0f);
    r2[c] = bf(1.0f);
    r3[c] = bf(1.0f);
  }
  const uint16_t *xs[4] = {r0, r1, r2, r3};
  epx_ref_combine_inputs ci = {xs, ws, {NULL, NULL}};
  uint16_t out[8];
  float outw[4];
  CHECK(epx_ref_combine(&w, 0, &ci, out, outw) == 0, "combine 4 ranks");
  CHECK(epx_f32_bits(outw[0]) == 0x3f800001u, "node-first sum = %a, want 1 + 2^-23", (double)outw[0]);
  CHECK(out[0] == bf(4.0f), "payload 4 x 1.0");
  /* with one node: ((((0 + 1) + t) + t) + t) = 1 exactly */
  w.ranks_per_node = 4;
  CHECK(epx_ref_combine(&w, 0, &ci, out, outw) == 0, "combine 4 ranks one node");
  CHECK(outw[0] == 1.0f, "one-node sum = %a, want 1", (double)outw[0]);
}

static void ll_two_ranks(void) {
  make_world_a(1);
  enum { MAXT = 4 };
  epx_ref_ll_opts o = {MAXT, 0, 0, 0};
  epx_ref_ll_result r;
  CHECK(epx_ref_ll_dispatch(&a_world, 0, &o, &r) == 0, "ll dispatch");
  CHECK(r.rows_per_expert == 8, "rows per expert");
  int want_cnt0[2] = {2, 1};
  CHECK_INTS(r.recv_count, want_cnt0, 2, "rank0 recv_count");
  /* expert 0: (0,t0) row 0, (1,t1) row 1; expert 1: (0,t1) row 0 */
  CHECK(r.recv_src_info[0] == 0 && r.recv_src_info[1] == 1 && r.recv_src_info[8] == 1,
        "rank0 src_info");
  CHECK(r.recv_src_rank[0] == 0 && r.recv_src_rank[1] == 1 && r.recv_src_rank[8] == 0,
        "rank0 src rank");
  int64_t want_range0[4] = {epx_ll_range_pack(0, 1), epx_ll_range_pack(1, 1),
                            epx_ll_range_pack(0, 1), epx_ll_range_pack(1, 0)};
  CHECK_INTS(r.recv_layout_range, want_range0, 4, "rank0 layout range");
  CHECK(memcmp((uint16_t *)r.recv_x + 1 * AH, a_x1 + AH, AH * 2) == 0, "e0 row1 = (1,t1)");
  CHECK(memcmp((uint16_t *)r.recv_x + 8 * AH, a_x0 + AH, AH * 2) == 0, "e1 row0 = (0,t1)");
  epx_ref_ll_free(&r);

  CHECK(epx_ref_ll_dispatch(&a_world, 1, &o, &r) == 0, "ll dispatch rank1");
  int want_cnt1[2] = {1, 2};
  CHECK_INTS(r.recv_count, want_cnt1, 2, "rank1 recv_count (expert 2 listed twice: once)");
  int64_t want_range1[4] = {epx_ll_range_pack(0, 1), epx_ll_range_pack(1, 0),
                            epx_ll_range_pack(0, 1), epx_ll_range_pack(1, 1)};
  CHECK_INTS(r.recv_layout_range, want_range1, 4, "rank1 layout range");
  CHECK(r.recv_src_info[0] == 2 && r.recv_src_info[8] == 0 && r.recv_src_info[9] == 1,
        "rank1 src_info");
  CHECK(epx_ref_ll_row(&a_world, 1, 1, 3) == 1 && epx_ref_ll_row(&a_world, 0, 2, 2) == 0 &&
            epx_ref_ll_row(&a_world, 1, 0, 2) == -1,
        "ll_row");
  epx_ref_ll_free(&r);

  /* FP8: a row is epx_fp8_cast_token of the source token */
  enum { H = 256 };
  static uint16_t y0[3 * H], y1[2 * H];
  for (int i = 0; i < 3 * H; ++i) y0[i] = bf((float)(i % 17) * 0.37f - 2.0f);
  for (int i = 0; i < 2 * H; ++i) y1[i] = bf((float)(i % 13) * 1.5f - 9.0f);
  a_in[0].x = y0;
  a_in[1].x = y1;
  a_world.hidden = H;
  epx_ref_ll_opts of = {MAXT, 1, 1, 1};
  CHECK(epx_ref_ll_dispatch(&a_world, 1, &of, &r) == 0, "ll dispatch fp8");
  uint8_t q[H];
  uint32_t words[1] = {0};
  /* local expert 1 (global 3), row 1 = (1, t1) */
  epx_fp8_cast_token(y1 + H, H, 1, q, NULL, words);
  CHECK(memcmp((uint8_t *)r.recv_x + 9 * H, q, H) == 0, "fp8 row");
  CHECK(((uint32_t *)r.recv_x_scales)[9] == words[0], "ue8m0 word 0x%08x vs 0x%08x",
        ((uint32_t *)r.recv_x_scales)[9], words[0]);
  CHECK((words[0] >> 16) == 0, "two groups: bytes 2-3 of the word are zero");
  epx_ref_ll_free(&r);
}

static void ll_combine_two_ranks(void) {
  make_world_a(1);
  enum { MAXT = 4, RPE = 8 };
  /* expert outputs [2 local, 8 rows, H]: value = 1000 r + 100 le + row (+ c/8 in col c) */
  static uint16_t o0[2 * RPE * AH], o1[2 * RPE * AH];
  for (int le = 0; le < 2; ++le)
    for (int row = 0; row < RPE; ++row)
      for (int c = 0; c < AH; ++c) {
        o0[(le * RPE + row) * AH + c] = bf((float)(100 * le + row) + (float)c / 8.0f);
        o1[(le * RPE + row) * AH + c] = bf((float)(1000 + 100 * le + row) + (float)c / 8.0f);
      }
  const uint16_t *outs[2] = {o0, o1};
  uint16_t cx0[3 * AH], cx1[2 * AH];
  CHECK(epx_ref_ll_combine(&a_world, 0, MAXT, outs, a_w0, cx0) == 0, "ll combine");
  /* t0: 0.5 * o0[e0 row0] + 0.25 * o1[e3 (le1) row0] */
  for (int c = 0; c < AH; ++c) {
    float v0 = epx_bf16_to_f32(o0[c]), v1 = epx_bf16_to_f32(o1[(1 * RPE + 0) * AH + c]);
    float acc = epx_add_rn(epx_add_rn(0.0f, epx_mul_rn(0.5f, v0)), epx_mul_rn(0.25f, v1));
    CHECK(cx0[c] == epx_f32_to_bf16(acc), "t0 col %d", c);
  }
  /* t1: 0.75 * o0[e1 row0]; t2: expert 2 twice -> (1 + 2) * o1[e2 (le0) row0] */
  CHECK(cx0[AH + 0] == bf(0.75f * 100.0f), "t1 = 0x%04x", cx0[AH]);
  CHECK(cx0[2 * AH + 0] == bf(3.0f * 1000.0f), "t2 = 0x%04x", cx0[2 * AH]);
  CHECK(epx_ref_ll_combine(&a_world, 1, MAXT, outs, a_w1, cx1) == 0, "ll combine rank1");
  /* t0: nowhere -> 0; t1: 0.5 * o1[e3 row1] + 1.5 * o0[e0 row1] */
  CHECK(cx1[0] == 0 && cx1[AH - 1] == 0, "token with no expert: 0");
  CHECK(cx1[AH] == bf(0.5f * epx_bf16_to_f32(bf(1101.0f)) + 1.5f * 1.0f), "rank1 t1 = 0x%04x", cx1[AH]);
}

int main(void) {
  static const epx_test_unit tests[] = {
      {"reference_layout_two_ranks", layout_two_ranks},
      {"reference_dispatch_two_ranks_order_ids_counts_padding", dispatch_two_ranks},
      {"reference_dispatch_fp8_scales_copied", dispatch_fp8_scales_copied},
      {"reference_combine_two_ranks_rounding_biases", combine_two_ranks},
      {"reference_combine_node_first_order", combine_node_order},
      {"reference_ll_dispatch_two_ranks", ll_two_ranks},
      {"reference_ll_combine_two_ranks", ll_combine_two_ranks},
  };
  return epx_test_run_units(tests, sizeof tests / sizeof tests[0], &failures);
}
