/*
 * reference.c - the CPU model of epx's operations. See reference.h; the
 * semantics are those of docs/semantics.md, step for step.
 */
#include "reference/reference.h"

#include <stdlib.h>
#include <string.h>

#include "common/layout_math.h"
#include "common/numerics.h"

/* Rows the library never writes are filled with this in the reference's
 * buffers, the same byte the tests poison their outputs with. */
#define REF_UNWRITTEN_BYTE 0xA5

/* ---------------------------------------------------------- routing */

int epx_ref_num_local_experts(const epx_ref_world *w) { return w->num_experts / w->nranks; }

int epx_ref_ranks_per_node(const epx_ref_world *w) {
  return w->ranks_per_node > 0 ? w->ranks_per_node : w->nranks;
}

static int64_t topk_at(const epx_ref_world *w, int src, int t, int k) {
  return epx_topk_get(w->inputs[src].topk_idx, w->topk_is_int64, t, w->num_topk, k);
}

int epx_ref_token_to_rank(const epx_ref_world *w, int src, int t, int dst) {
  int el = epx_ref_num_local_experts(w);
  for (int k = 0; k < w->num_topk; ++k) {
    int64_t e = topk_at(w, src, t, k);
    if (epx_topk_valid(e) && epx_expert_rank(e, el) == dst) return 1;
  }
  return 0;
}

int epx_ref_token_has_expert(const epx_ref_world *w, int src, int t, int64_t e) {
  for (int k = 0; k < w->num_topk; ++k)
    if (topk_at(w, src, t, k) == e) return 1;
  return 0;
}

/* 1 when slot k is the first slot of token t naming its expert (so a token
 * listing an expert twice counts once). */
static int first_slot_of_expert(const epx_ref_world *w, int src, int t, int k) {
  int64_t e = topk_at(w, src, t, k);
  if (!epx_topk_valid(e)) return 0;
  for (int j = 0; j < k; ++j)
    if (topk_at(w, src, t, j) == e) return 0;
  return 1;
}

/* ----------------------------------------------------------- layout */

int epx_ref_layout(const epx_ref_world *w, int rank, int *num_tokens_per_rank,
                   int *num_tokens_per_node, int *num_tokens_per_expert,
                   uint8_t *is_token_in_rank) {
  int R = w->nranks, E = w->num_experts, T = w->inputs[rank].num_tokens;
  int rpn = epx_ref_ranks_per_node(w), nodes = R / rpn, el = epx_ref_num_local_experts(w);
  uint8_t *in_rank = calloc((size_t)R, 1);
  uint8_t *in_node = calloc((size_t)nodes, 1);
  if (!in_rank || !in_node) {
    free(in_rank);
    free(in_node);
    return -1;
  }
  if (num_tokens_per_rank) memset(num_tokens_per_rank, 0, sizeof(int) * (size_t)R);
  if (num_tokens_per_node) memset(num_tokens_per_node, 0, sizeof(int) * (size_t)nodes);
  if (num_tokens_per_expert) memset(num_tokens_per_expert, 0, sizeof(int) * (size_t)E);
  for (int t = 0; t < T; ++t) {
    memset(in_rank, 0, (size_t)R);
    memset(in_node, 0, (size_t)nodes);
    for (int k = 0; k < w->num_topk; ++k) {
      if (!first_slot_of_expert(w, rank, t, k)) continue;
      int64_t e = topk_at(w, rank, t, k);
      int r = epx_expert_rank(e, el);
      in_rank[r] = 1;
      in_node[epx_rank_node(r, rpn)] = 1;
      if (num_tokens_per_expert) num_tokens_per_expert[e]++;
    }
    for (int r = 0; r < R; ++r) {
      if (num_tokens_per_rank) num_tokens_per_rank[r] += in_rank[r];
      if (is_token_in_rank) is_token_in_rank[(size_t)t * R + r] = in_rank[r];
    }
    if (num_tokens_per_node)
      for (int n = 0; n < nodes; ++n) num_tokens_per_node[n] += in_node[n];
  }
  free(in_rank);
  free(in_node);
  return 0;
}

/* ------------------------------------------------- routing tables */

/* count[s * R + d]: tokens of source s that go to rank d. */
static int *rank_counts(const epx_ref_world *w) {
  int R = w->nranks;
  int *count = calloc((size_t)R * R, sizeof(int));
  if (!count) return NULL;
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < w->inputs[s].num_tokens; ++t)
      for (int d = 0; d < R; ++d) count[s * R + d] += epx_ref_token_to_rank(w, s, t, d);
  return count;
}

int64_t epx_ref_recv_row(const epx_ref_world *w, int src, int t, int dst) {
  if (!epx_ref_token_to_rank(w, src, t, dst)) return -1;
  int64_t row = 0;
  for (int s = 0; s < src; ++s)
    for (int u = 0; u < w->inputs[s].num_tokens; ++u) row += epx_ref_token_to_rank(w, s, u, dst);
  for (int u = 0; u < t; ++u) row += epx_ref_token_to_rank(w, src, u, dst);
  return row;
}

/* --------------------------------------------------- normal dispatch */

void epx_ref_dispatch_free(epx_ref_dispatch_result *r) {
  if (!r) return;
  free(r->recv_x);
  free(r->recv_x_scales);
  free(r->recv_topk_idx);
  free(r->recv_topk_weights);
  free(r->recv_src_idx);
  free(r->recv_src_rank);
  free(r->recv_rank_prefix);
  free(r->rank_prefix_matrix);
  free(r->num_recv_tokens_per_expert);
  free(r->num_recv_tokens_per_expert_raw);
  memset(r, 0, sizeof(*r));
}

int epx_ref_dispatch(const epx_ref_world *w, int me, const epx_ref_dispatch_opts *opts,
                     epx_ref_dispatch_result *out) {
  int R = w->nranks, H = w->hidden, K = w->num_topk, el = epx_ref_num_local_experts(w);
  int is_fp8 = opts->x_type == epxFloat8E4M3;
  int sfmt = is_fp8 ? (int)opts->scale_format : 0;
  size_t xrow = epx_payload_row_bytes(H, is_fp8);
  size_t srow = epx_scale_row_bytes(H, sfmt);
  size_t idx_es = w->topk_is_int64 ? 8u : 4u;
  memset(out, 0, sizeof(*out));

  int *count = rank_counts(w);
  if (!count) return -1;
  out->rank_prefix_matrix = malloc(sizeof(int) * (size_t)R * R);
  out->recv_rank_prefix = malloc(sizeof(int) * (size_t)R);
  if (!out->rank_prefix_matrix || !out->recv_rank_prefix) goto fail;
  /* [s][r] = rows on r from sources <= s: an inclusive scan down each column. */
  for (int r = 0; r < R; ++r) {
    int *col = malloc(sizeof(int) * (size_t)R), *scan = malloc(sizeof(int) * (size_t)R);
    if (!col || !scan) {
      free(col);
      free(scan);
      goto fail;
    }
    for (int s = 0; s < R; ++s) col[s] = count[s * R + r];
    epx_inclusive_scan(col, scan, R);
    for (int s = 0; s < R; ++s) out->rank_prefix_matrix[s * R + r] = scan[s];
    free(col);
    free(scan);
  }
  for (int s = 0; s < R; ++s) out->recv_rank_prefix[s] = out->rank_prefix_matrix[s * R + me];
  out->num_recv = out->recv_rank_prefix[R - 1];
  out->rows = out->num_recv > opts->num_worst_tokens ? out->num_recv : opts->num_worst_tokens;

  size_t rows = (size_t)out->rows;
  out->recv_x = malloc(rows * xrow + 1);
  out->recv_x_scales = srow ? malloc(rows * srow + 1) : NULL;
  out->recv_topk_idx = malloc(rows * (size_t)K * idx_es + 1);
  out->recv_topk_weights = malloc(rows * (size_t)K * sizeof(float) + 1);
  out->recv_src_idx = malloc(rows * sizeof(int) + 1);
  out->recv_src_rank = malloc(rows * sizeof(int) + 1);
  out->num_recv_tokens_per_expert = calloc((size_t)el, sizeof(int));
  out->num_recv_tokens_per_expert_raw = calloc((size_t)el, sizeof(int));
  if (!out->recv_x || (srow && !out->recv_x_scales) || !out->recv_topk_idx ||
      !out->recv_topk_weights || !out->recv_src_idx || !out->recv_src_rank ||
      !out->num_recv_tokens_per_expert || !out->num_recv_tokens_per_expert_raw)
    goto fail;
  memset(out->recv_x, REF_UNWRITTEN_BYTE, rows * xrow);
  if (srow) memset(out->recv_x_scales, REF_UNWRITTEN_BYTE, rows * srow);

  int64_t row = 0;
  int64_t e_lo = (int64_t)me * el, e_hi = e_lo + el;
  for (int s = 0; s < R; ++s) {
    const epx_ref_rank_input *in = &w->inputs[s];
    for (int t = 0; t < in->num_tokens; ++t) {
      if (!epx_ref_token_to_rank(w, s, t, me)) continue;
      memcpy((uint8_t *)out->recv_x + (size_t)row * xrow, (const uint8_t *)in->x + (size_t)t * xrow,
             xrow);
      if (srow)
        memcpy((uint8_t *)out->recv_x_scales + (size_t)row * srow,
               (const uint8_t *)in->x_scales + (size_t)t * srow, srow);
      for (int k = 0; k < K; ++k) {
        int64_t e = topk_at(w, s, t, k);
        int64_t local = (epx_topk_valid(e) && e >= e_lo && e < e_hi) ? e - e_lo : -1;
        epx_topk_set(out->recv_topk_idx, w->topk_is_int64, row, K, k, local);
        out->recv_topk_weights[row * K + k] =
            (local >= 0 && in->topk_weights) ? in->topk_weights[(size_t)t * K + k] : 0.0f;
        if (local >= 0 && first_slot_of_expert(w, s, t, k))
          out->num_recv_tokens_per_expert_raw[local]++;
      }
      out->recv_src_idx[row] = t;
      out->recv_src_rank[row] = s;
      ++row;
    }
  }
  for (; row < out->rows; ++row) { /* worst-case padding rows */
    for (int k = 0; k < K; ++k) {
      epx_topk_set(out->recv_topk_idx, w->topk_is_int64, row, K, k, -1);
      out->recv_topk_weights[row * K + k] = 0.0f;
    }
    out->recv_src_idx[row] = -1;
    out->recv_src_rank[row] = -1;
  }
  for (int e = 0; e < el; ++e)
    out->num_recv_tokens_per_expert[e] =
        (int)epx_align_up(out->num_recv_tokens_per_expert_raw[e], opts->expert_alignment);
  free(count);
  return 0;
fail:
  free(count);
  epx_ref_dispatch_free(out);
  return -1;
}

/* ---------------------------------------------------- normal combine */

int epx_ref_combine(const epx_ref_world *w, int me, const epx_ref_combine_inputs *in,
                    uint16_t *combined_x, float *combined_topk_weights) {
  int R = w->nranks, H = w->hidden, K = w->num_topk, T = w->inputs[me].num_tokens;
  int rpn = epx_ref_ranks_per_node(w), nodes = R / rpn;
  int *count = rank_counts(w);
  int64_t *next_row = malloc(sizeof(int64_t) * (size_t)R);
  int64_t *row_on = malloc(sizeof(int64_t) * (size_t)R);
  float *acc = malloc(sizeof(float) * (size_t)(H > K ? H : K) + 4);
  float *part = malloc(sizeof(float) * (size_t)(H > K ? H : K) + 4);
  if (!count || !next_row || !row_on || !acc || !part) {
    free(count);
    free(next_row);
    free(row_on);
    free(acc);
    free(part);
    return -1;
  }
  /* first row of my tokens on each rank: rows from sources before me */
  for (int d = 0; d < R; ++d) {
    next_row[d] = 0;
    for (int s = 0; s < me; ++s) next_row[d] += count[s * R + d];
  }
  int do_weights = in->weights && combined_topk_weights;
  for (int t = 0; t < T; ++t) {
    for (int d = 0; d < R; ++d) row_on[d] = epx_ref_token_to_rank(w, me, t, d) ? next_row[d]++ : -1;
    /* payload */
    for (int c = 0; c < H; ++c) acc[c] = 0.0f;
    for (int n = 0; n < nodes; ++n) {
      for (int c = 0; c < H; ++c) part[c] = 0.0f;
      for (int r = n * rpn; r < (n + 1) * rpn; ++r) {
        if (row_on[r] < 0) continue;
        const uint16_t *src = in->x[r] + (size_t)row_on[r] * H;
        for (int c = 0; c < H; ++c) part[c] = epx_add_rn(part[c], epx_bf16_to_f32(src[c]));
      }
      for (int c = 0; c < H; ++c) acc[c] = epx_add_rn(acc[c], part[c]);
    }
    for (int b = 0; b < 2; ++b) {
      if (!in->bias[b]) continue;
      const uint16_t *bias = in->bias[b] + (size_t)t * H;
      for (int c = 0; c < H; ++c) acc[c] = epx_add_rn(acc[c], epx_bf16_to_f32(bias[c]));
    }
    for (int c = 0; c < H; ++c) combined_x[(size_t)t * H + c] = epx_f32_to_bf16(acc[c]);
    /* weights: the same order of sums, no bias */
    if (do_weights) {
      for (int k = 0; k < K; ++k) acc[k] = 0.0f;
      for (int n = 0; n < nodes; ++n) {
        for (int k = 0; k < K; ++k) part[k] = 0.0f;
        for (int r = n * rpn; r < (n + 1) * rpn; ++r) {
          if (row_on[r] < 0) continue;
          const float *wr = in->weights[r] + (size_t)row_on[r] * K;
          for (int k = 0; k < K; ++k) part[k] = epx_add_rn(part[k], wr[k]);
        }
        for (int k = 0; k < K; ++k) acc[k] = epx_add_rn(acc[k], part[k]);
      }
      for (int k = 0; k < K; ++k) combined_topk_weights[(size_t)t * K + k] = acc[k];
    }
  }
  free(count);
  free(next_row);
  free(row_on);
  free(acc);
  free(part);
  return 0;
}

/* ------------------------------------------------------ low latency */

void epx_ref_ll_free(epx_ref_ll_result *r) {
  if (!r) return;
  free(r->recv_x);
  free(r->recv_x_scales);
  free(r->recv_src_info);
  free(r->recv_src_rank);
  free(r->recv_layout_range);
  free(r->recv_count);
  memset(r, 0, sizeof(*r));
}

int64_t epx_ref_ll_row(const epx_ref_world *w, int src, int t, int64_t e) {
  if (!epx_ref_token_has_expert(w, src, t, e)) return -1;
  int64_t row = 0;
  for (int s = 0; s < src; ++s)
    for (int u = 0; u < w->inputs[s].num_tokens; ++u) row += epx_ref_token_has_expert(w, s, u, e);
  for (int u = 0; u < t; ++u) row += epx_ref_token_has_expert(w, src, u, e);
  return row;
}

int epx_ref_ll_dispatch(const epx_ref_world *w, int me, const epx_ref_ll_opts *opts,
                        epx_ref_ll_result *out) {
  int R = w->nranks, H = w->hidden, el = epx_ref_num_local_experts(w);
  int fp8 = opts->use_fp8 != 0;
  int sfmt = !fp8 ? 0 : opts->use_ue8m0 ? 2 : 1;
  size_t xrow = epx_payload_row_bytes(H, fp8), srow = epx_scale_row_bytes(H, sfmt);
  int64_t rpe = epx_ll_rows_per_expert(R, opts->max_tokens_per_rank);
  size_t total_rows = (size_t)el * (size_t)rpe;
  memset(out, 0, sizeof(*out));
  out->rows_per_expert = rpe;
  out->recv_x = malloc(total_rows * xrow + 1);
  out->recv_x_scales = srow ? malloc(total_rows * srow + 1) : NULL;
  out->recv_src_info = malloc(total_rows * sizeof(int) + 1);
  out->recv_src_rank = malloc(total_rows * sizeof(int) + 1);
  out->recv_layout_range = malloc((size_t)el * R * sizeof(int64_t) + 1);
  out->recv_count = calloc((size_t)el + 1, sizeof(int));
  if (!out->recv_x || (srow && !out->recv_x_scales) || !out->recv_src_info ||
      !out->recv_src_rank || !out->recv_layout_range || !out->recv_count) {
    epx_ref_ll_free(out);
    return -1;
  }
  memset(out->recv_x, REF_UNWRITTEN_BYTE, total_rows * xrow);
  if (srow) memset(out->recv_x_scales, REF_UNWRITTEN_BYTE, total_rows * srow);
  memset(out->recv_src_info, REF_UNWRITTEN_BYTE, total_rows * sizeof(int));
  memset(out->recv_src_rank, REF_UNWRITTEN_BYTE, total_rows * sizeof(int));

  for (int le = 0; le < el; ++le) {
    int64_t e = (int64_t)me * el + le;
    int rows = 0;
    for (int s = 0; s < R; ++s) {
      const epx_ref_rank_input *in = &w->inputs[s];
      int first = rows;
      for (int t = 0; t < in->num_tokens; ++t) {
        if (!epx_ref_token_has_expert(w, s, t, e)) continue;
        size_t at = (size_t)epx_ll_row_index(le, rows, R, opts->max_tokens_per_rank);
        const uint16_t *xs = (const uint16_t *)in->x + (size_t)t * H;
        uint8_t *dst = (uint8_t *)out->recv_x + at * xrow;
        if (fp8) {
          float *sf = sfmt == 1 ? (float *)((uint8_t *)out->recv_x_scales + at * srow) : NULL;
          uint32_t *su = sfmt == 2 ? (uint32_t *)((uint8_t *)out->recv_x_scales + at * srow) : NULL;
          epx_fp8_cast_token(xs, H, opts->round_scale, dst, sf, su);
        } else {
          memcpy(dst, xs, xrow);
        }
        out->recv_src_info[at] = t;
        out->recv_src_rank[at] = s;
        ++rows;
      }
      out->recv_layout_range[(size_t)le * R + s] = epx_ll_range_pack(first, rows - first);
    }
    out->recv_count[le] = rows;
  }
  return 0;
}

int epx_ref_ll_combine(const epx_ref_world *w, int me, int max_tokens_per_rank,
                       const uint16_t *const *expert_out, const float *topk_weights,
                       uint16_t *combined_x) {
  int R = w->nranks, H = w->hidden, K = w->num_topk, E = w->num_experts;
  int el = epx_ref_num_local_experts(w), T = w->inputs[me].num_tokens;
  /* next_row[e]: row of my next token listing expert e in e's block */
  int64_t *next_row = calloc((size_t)E + 1, sizeof(int64_t));
  int64_t *row_of = malloc(sizeof(int64_t) * (size_t)E + 8);
  float *acc = malloc(sizeof(float) * (size_t)H + 4);
  if (!next_row || !row_of || !acc) {
    free(next_row);
    free(row_of);
    free(acc);
    return -1;
  }
  for (int s = 0; s < me; ++s)
    for (int u = 0; u < w->inputs[s].num_tokens; ++u)
      for (int k = 0; k < K; ++k)
        if (first_slot_of_expert(w, s, u, k)) next_row[topk_at(w, s, u, k)]++;
  for (int t = 0; t < T; ++t) {
    /* rows of this token, once per expert however many slots name it */
    for (int k = 0; k < K; ++k)
      if (first_slot_of_expert(w, me, t, k)) {
        int64_t e = topk_at(w, me, t, k);
        row_of[e] = next_row[e]++;
      }
    for (int c = 0; c < H; ++c) acc[c] = 0.0f;
    for (int k = 0; k < K; ++k) {
      int64_t e = topk_at(w, me, t, k);
      if (!epx_topk_valid(e)) continue;
      int owner = epx_expert_rank(e, el), le = epx_local_expert(e, el);
      size_t at = (size_t)epx_ll_row_index(le, row_of[e], R, max_tokens_per_rank);
      const uint16_t *src = expert_out[owner] + at * (size_t)H;
      float wk = topk_weights[(size_t)t * K + k];
      for (int c = 0; c < H; ++c)
        acc[c] = epx_add_rn(acc[c], epx_mul_rn(wk, epx_bf16_to_f32(src[c])));
    }
    for (int c = 0; c < H; ++c) combined_x[(size_t)t * H + c] = epx_f32_to_bf16(acc[c]);
  }
  free(next_row);
  free(row_of);
  free(acc);
  return 0;
}
