/*
 * layout_math.h - the one source of truth for who owns what and where rows go.
 *
 * Expert ownership, node membership, alignment, scale-row sizes and the
 * low-latency receive layout are small pure functions used by the core
 * (validation, size hints), the host backend, the reference and the GPU
 * kernels alike. Unit-tested in tests/unit/test_layout_math.c.
 */
#ifndef EPX_COMMON_LAYOUT_MATH_H
#define EPX_COMMON_LAYOUT_MATH_H

#include <stddef.h>
#include <stdint.h>

#include "common/numerics.h"
#include "common/platform.h"

/* Largest top-k: the low-latency handle keeps one bit per top-k slot in a uint32. */
#define EPX_MAX_TOPK 32
/* Payload rows move in 16-byte vectors, so a row must be a multiple of this. */
#define EPX_ROW_ALIGN_BYTES 16

/* ---- ownership ---- */

EPX_HD int epx_expert_rank(int64_t expert, int num_local_experts) {
  return (int)(expert / num_local_experts);
}
EPX_HD int epx_local_expert(int64_t expert, int num_local_experts) {
  return (int)(expert % num_local_experts);
}
EPX_HD int epx_rank_node(int rank, int ranks_per_node) { return rank / ranks_per_node; }
EPX_HD int64_t epx_align_up(int64_t n, int64_t alignment) {
  return alignment <= 1 ? n : (n + alignment - 1) / alignment * alignment;
}

/* A top-k id is routable when it names an expert; -1 means "no expert".
 * Validation rejects everything else before this is used. */
EPX_HD int epx_topk_valid(int64_t id) { return id >= 0; }

/* Reads slot k of token t from an int32 or int64 topk_idx array. */
EPX_HD int64_t epx_topk_get(const void *topk_idx, int is_int64, int64_t t, int num_topk, int k) {
  int64_t i = t * num_topk + k;
  return is_int64 ? ((const int64_t *)topk_idx)[i] : (int64_t)((const int32_t *)topk_idx)[i];
}
EPX_HD void epx_topk_set(void *topk_idx, int is_int64, int64_t t, int num_topk, int k, int64_t v) {
  int64_t i = t * num_topk + k;
  if (is_int64)
    ((int64_t *)topk_idx)[i] = v;
  else
    ((int32_t *)topk_idx)[i] = (int32_t)v;
}

/* ---- row sizes ---- */

/* Scale columns per row: float32 scales one per group, UE8M0 four groups per word. */
EPX_HD int epx_scale_cols_f32(int hidden) { return hidden / EPX_FP8_GROUP; }
EPX_HD int epx_scale_cols_ue8m0(int hidden) {
  return (hidden / EPX_FP8_GROUP + EPX_UE8M0_PER_WORD - 1) / EPX_UE8M0_PER_WORD;
}
/* Bytes of one scale row for a scale format (0 = none, 1 = float32, 2 = UE8M0;
 * the values of epxScaleFormat_t). Both formats store 4-byte words. */
EPX_HD size_t epx_scale_row_bytes(int hidden, int scale_format) {
  if (scale_format == 1) return (size_t)epx_scale_cols_f32(hidden) * 4u;
  if (scale_format == 2) return (size_t)epx_scale_cols_ue8m0(hidden) * 4u;
  return 0;
}
/* Bytes of one payload row: BF16 is 2 bytes a channel, FP8 one. */
EPX_HD size_t epx_payload_row_bytes(int hidden, int is_fp8) {
  return (size_t)hidden * (is_fp8 ? 1u : 2u);
}

/* ---- low-latency receive layout ----
 * recv_x[e][row], e < E_local, row < R * maxT: one block of rows per local
 * expert; within it, sources ascending, each source's rows contiguous. */
EPX_HD int64_t epx_ll_rows_per_expert(int nranks, int max_tokens) {
  return (int64_t)nranks * max_tokens;
}
EPX_HD int64_t epx_ll_row_index(int local_expert, int64_t row, int nranks, int max_tokens) {
  return (int64_t)local_expert * epx_ll_rows_per_expert(nranks, max_tokens) + row;
}
/* recv_layout_range packing: first row in the high 32 bits, count in the low. */
EPX_HD int64_t epx_ll_range_pack(int first_row, int count) {
  return (int64_t)(((uint64_t)(uint32_t)first_row << 32) | (uint32_t)count);
}
EPX_HD int epx_ll_range_first(int64_t packed) { return (int)((uint64_t)packed >> 32); }
EPX_HD int epx_ll_range_count(int64_t packed) { return (int)(uint32_t)packed; }

/* ---- prefix sums ---- */

/* out[i] = in[0] + ... + in[i]; returns the total. */
EPX_HD int64_t epx_inclusive_scan(const int *in, int *out, int n) {
  int64_t s = 0;
  for (int i = 0; i < n; ++i) {
    s += in[i];
    out[i] = (int)s;
  }
  return s;
}
/* out[i] = in[0] + ... + in[i-1]; returns the total. */
EPX_HD int64_t epx_exclusive_scan(const int *in, int *out, int n) {
  int64_t s = 0;
  for (int i = 0; i < n; ++i) {
    int v = in[i];
    out[i] = (int)s;
    s += v;
  }
  return s;
}

#endif /* EPX_COMMON_LAYOUT_MATH_H */
