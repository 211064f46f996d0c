/*
 * bench_check.c - one iteration's outputs against the CPU reference. See bench_check.h.
 */
#include "bench_check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/layout_math.h"

void bench_world_build(benchWorld *bw, const epx_test_problem *p, benchDtype d) {
  memset(bw, 0, sizeof(*bw));
  bw->p = *p;
  int H = p->hidden, K = p->num_topk;
  for (int r = 0; r < p->nranks; ++r) {
    size_t T = (size_t)p->tokens[r];
    bw->topk[r] = epx_test_xmalloc(sizeof(int64_t) * (T * (size_t)K + 1));
    bw->weights[r] = epx_test_xmalloc(sizeof(float) * (T * (size_t)K + 1));
    epx_test_fill_topk(p, r, bw->topk[r], 1);
    epx_test_fill_weights(p, r, bw->weights[r]);
    if (d == BENCH_FP8) {
      bw->x[r] = epx_test_xmalloc(T * (size_t)H + 1);
      bw->scales[r] = epx_test_xmalloc(sizeof(float) * (T * (size_t)epx_scale_cols_f32(H) + 1));
      epx_test_fill_x_fp8(p, r, bw->x[r]);
      epx_test_fill_scales_f32(p, r, bw->scales[r]);
    } else {
      bw->x[r] = epx_test_xmalloc(sizeof(uint16_t) * (T * (size_t)H + 1));
      epx_test_fill_x_bf16(p, r, bw->x[r]);
    }
    bw->in[r] =
        (epx_ref_rank_input){p->tokens[r], bw->topk[r], bw->weights[r], bw->x[r], bw->scales[r]};
  }
  bw->w = (epx_ref_world){p->nranks, p->ranks_per_node, p->num_experts, H, K, 1, bw->in};
}

void bench_world_free(benchWorld *bw) {
  for (int r = 0; r < bw->p.nranks; ++r) {
    free(bw->topk[r]);
    free(bw->weights[r]);
    free(bw->x[r]);
    free(bw->scales[r]);
  }
  memset(bw, 0, sizeof(*bw));
}

int64_t bench_check_layout(const benchWorld *bw, int me, const int *num_tokens_per_rank,
                           const int *num_tokens_per_node, const int *num_tokens_per_expert,
                           const uint8_t *is_token_in_rank) {
  const epx_ref_world *w = &bw->w;
  int R = w->nranks, E = w->num_experts, T = w->inputs[me].num_tokens;
  int nodes = R / epx_ref_ranks_per_node(w);
  int *per_rank = epx_test_xmalloc(sizeof(int) * (size_t)R);
  int *per_node = epx_test_xmalloc(sizeof(int) * (size_t)nodes);
  int *per_expert = epx_test_xmalloc(sizeof(int) * (size_t)E);
  uint8_t *in_rank = epx_test_xmalloc((size_t)T * (size_t)R + 1);
  int64_t bad = -1;
  if (epx_ref_layout(w, me, per_rank, per_node, per_expert, in_rank) == 0) {
    bad = epx_test_compare("layout num_tokens_per_rank", EPX_ELEM_I32, per_rank,
                           num_tokens_per_rank, 1, R);
    if (num_tokens_per_node)
      bad += epx_test_compare("layout num_tokens_per_node", EPX_ELEM_I32, per_node,
                              num_tokens_per_node, 1, nodes);
    bad += epx_test_compare("layout num_tokens_per_expert", EPX_ELEM_I32, per_expert,
                            num_tokens_per_expert, 1, E);
    bad +=
        epx_test_compare("layout is_token_in_rank", EPX_ELEM_U8, in_rank, is_token_in_rank, T, R);
  }
  free(per_rank);
  free(per_node);
  free(per_expert);
  free(in_rank);
  return bad;
}

static epx_ref_dispatch_opts dispatch_opts(benchDtype d) {
  epx_ref_dispatch_opts o;
  memset(&o, 0, sizeof(o));
  o.x_type = d == BENCH_FP8 ? epxFloat8E4M3 : epxBFloat16;
  o.scale_format = d == BENCH_FP8 ? epxScalesFloat32 : epxScalesNone;
  return o;
}

int64_t bench_check_dispatch(const benchWorld *bw, int me, benchDtype d, int64_t num_recv,
                             const epxDispatchOutputs_t *got) {
  const epx_ref_world *w = &bw->w;
  int R = w->nranks, H = w->hidden, K = w->num_topk, E_local = epx_ref_num_local_experts(w);
  epx_ref_dispatch_opts opts = dispatch_opts(d);
  epx_ref_dispatch_result ref;
  if (epx_ref_dispatch(w, me, &opts, &ref) != 0) return -1;
  int64_t bad = 0;
  if (num_recv != ref.num_recv) {
    fprintf(stderr, "rank %d: dispatch: num_recv_tokens is %lld, expected %lld\n", me,
            (long long)num_recv, (long long)ref.num_recv);
    bad = 1;
  } else {
    int64_t n = ref.num_recv;
    if (d == BENCH_FP8) {
      bad += epx_test_compare("dispatch recv_x (fp8)", EPX_ELEM_FP8, ref.recv_x, got->recv_x, n, H);
      bad += epx_test_compare("dispatch recv_x_scales", EPX_ELEM_F32, ref.recv_x_scales,
                              got->recv_x_scales, n, epx_scale_cols_f32(H));
    } else {
      bad +=
          epx_test_compare("dispatch recv_x (bf16)", EPX_ELEM_BF16, ref.recv_x, got->recv_x, n, H);
    }
    if (got->recv_topk_idx)
      bad += epx_test_compare("dispatch recv_topk_idx", EPX_ELEM_I64, ref.recv_topk_idx,
                              got->recv_topk_idx, n, K);
    if (got->recv_topk_weights)
      bad += epx_test_compare("dispatch recv_topk_weights", EPX_ELEM_F32, ref.recv_topk_weights,
                              got->recv_topk_weights, n, K);
    if (got->recv_src_idx)
      bad += epx_test_compare("dispatch recv_src_idx", EPX_ELEM_I32, ref.recv_src_idx,
                              got->recv_src_idx, 1, n);
    if (got->recv_rank_prefix)
      bad += epx_test_compare("dispatch recv_rank_prefix", EPX_ELEM_I32, ref.recv_rank_prefix,
                              got->recv_rank_prefix, 1, R);
    if (got->num_recv_tokens_per_expert)
      bad += epx_test_compare("dispatch num_recv_tokens_per_expert", EPX_ELEM_I32,
                              ref.num_recv_tokens_per_expert, got->num_recv_tokens_per_expert, 1,
                              E_local);
    if (got->num_recv_tokens && *got->num_recv_tokens != ref.num_recv) {
      fprintf(stderr, "rank %d: dispatch: outputs->num_recv_tokens is %d, expected %lld\n", me,
              *got->num_recv_tokens, (long long)ref.num_recv);
      bad += 1;
    }
  }
  epx_ref_dispatch_free(&ref);
  return bad;
}

int64_t bench_check_combine(const benchWorld *bw, int me, const uint16_t *combined_x,
                            const float *combined_topk_weights) {
  const epx_ref_world *w = &bw->w;
  int R = w->nranks, H = w->hidden, K = w->num_topk, T = w->inputs[me].num_tokens;
  epx_ref_dispatch_opts opts = dispatch_opts(BENCH_BF16);
  epx_ref_dispatch_result *recv = calloc((size_t)R, sizeof(*recv));
  const uint16_t **xs = calloc((size_t)R, sizeof(*xs));
  const float **ws = calloc((size_t)R, sizeof(*ws));
  uint16_t *want_x = epx_test_xmalloc(sizeof(uint16_t) * ((size_t)T * (size_t)H + 1));
  float *want_w = epx_test_xmalloc(sizeof(float) * ((size_t)T * (size_t)K + 1));
  int64_t bad = -1;
  int r = 0;
  if (!recv || !xs || !ws) goto done;
  /* Every rank's combine input is its own dispatch output: rebuild them all. */
  for (; r < R; ++r) {
    if (epx_ref_dispatch(w, r, &opts, &recv[r]) != 0) goto done;
    xs[r] = recv[r].recv_x;
    ws[r] = recv[r].recv_topk_weights;
  }
  epx_ref_combine_inputs in = {xs, ws, {NULL, NULL}};
  if (epx_ref_combine(w, me, &in, want_x, want_w) != 0) goto done;
  bad = epx_test_compare("combine combined_x", EPX_ELEM_BF16, want_x, combined_x, T, H);
  if (combined_topk_weights)
    bad += epx_test_compare("combine combined_topk_weights", EPX_ELEM_F32, want_w,
                            combined_topk_weights, T, K);
done:
  for (int q = 0; q < r && recv; ++q) epx_ref_dispatch_free(&recv[q]);
  free(recv);
  free(xs);
  free(ws);
  free(want_x);
  free(want_w);
  return bad;
}

static epx_ref_ll_opts ll_opts(int max_tokens, int use_fp8) {
  epx_ref_ll_opts o;
  memset(&o, 0, sizeof(o));
  o.max_tokens_per_rank = max_tokens;
  o.use_fp8 = use_fp8;
  return o;
}

int64_t bench_check_ll_dispatch(const benchWorld *bw, int me, int max_tokens, int use_fp8,
                                const epxLowLatencyDispatchOutputs_t *got) {
  const epx_ref_world *w = &bw->w;
  int R = w->nranks, H = w->hidden, E_local = epx_ref_num_local_experts(w);
  epx_ref_ll_opts opts = ll_opts(max_tokens, use_fp8);
  epx_ref_ll_result ref;
  if (epx_ref_ll_dispatch(w, me, &opts, &ref) != 0) return -1;
  int64_t bad = epx_test_compare("ll_dispatch recv_count", EPX_ELEM_I32, ref.recv_count,
                                 got->recv_count, 1, E_local);
  if (bad == 0) {
    size_t xrow = epx_payload_row_bytes(H, use_fp8);
    size_t srow = epx_scale_row_bytes(H, use_fp8 ? 1 : 0);
    for (int e = 0; e < E_local; ++e) {
      size_t first = (size_t)epx_ll_row_index(e, 0, R, max_tokens);
      int n = ref.recv_count[e];
      bad += epx_test_compare(use_fp8 ? "ll_dispatch recv_x (fp8)" : "ll_dispatch recv_x (bf16)",
                              use_fp8 ? EPX_ELEM_FP8 : EPX_ELEM_BF16,
                              (const uint8_t *)ref.recv_x + first * xrow,
                              (const uint8_t *)got->recv_x + first * xrow, n, H);
      if (use_fp8)
        bad += epx_test_compare("ll_dispatch recv_x_scales", EPX_ELEM_F32,
                                (const uint8_t *)ref.recv_x_scales + first * srow,
                                (const uint8_t *)got->recv_x_scales + first * srow, n,
                                epx_scale_cols_f32(H));
      if (got->recv_src_info)
        bad += epx_test_compare("ll_dispatch recv_src_info", EPX_ELEM_I32,
                                ref.recv_src_info + first, got->recv_src_info + first, 1, n);
      if (bad) break; /* one expert's report is enough to read */
    }
    if (got->recv_layout_range)
      bad += epx_test_compare("ll_dispatch recv_layout_range", EPX_ELEM_I64, ref.recv_layout_range,
                              got->recv_layout_range, E_local, R);
  }
  epx_ref_ll_free(&ref);
  return bad;
}

int64_t bench_check_ll_combine(const benchWorld *bw, int me, int max_tokens,
                               const uint16_t *combined_x) {
  const epx_ref_world *w = &bw->w;
  int R = w->nranks, H = w->hidden, T = w->inputs[me].num_tokens;
  epx_ref_ll_opts opts = ll_opts(max_tokens, 0);
  epx_ref_ll_result *recv = calloc((size_t)R, sizeof(*recv));
  const uint16_t **outs = calloc((size_t)R, sizeof(*outs));
  uint16_t *want = epx_test_xmalloc(sizeof(uint16_t) * ((size_t)T * (size_t)H + 1));
  int64_t bad = -1;
  int r = 0;
  if (!recv || !outs) goto done;
  /* Every rank's expert outputs are its own BF16 low-latency dispatch output. */
  for (; r < R; ++r) {
    if (epx_ref_ll_dispatch(w, r, &opts, &recv[r]) != 0) goto done;
    outs[r] = recv[r].recv_x;
  }
  if (epx_ref_ll_combine(w, me, max_tokens, outs, bw->weights[me], want) != 0) goto done;
  bad = epx_test_compare("ll_combine combined_x", EPX_ELEM_BF16, want, combined_x, T, H);
done:
  for (int q = 0; q < r && recv; ++q) epx_ref_ll_free(&recv[q]);
  free(recv);
  free(outs);
  free(want);
  return bad;
}
