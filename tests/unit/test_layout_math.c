/*
 * test_layout_math.c - ownership, alignment, row sizes, the low-latency
 * receive layout and the scans of src/common/layout_math.h.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/harness.h"
#include "common/layout_math.h"

static int failures;

#define CHECK(cond, ...) EPX_TEST_CHECK(failures, NULL, cond, __VA_ARGS__)

static void ownership(void) {
  /* E = 256 over 8 ranks: 32 local experts each */
  CHECK(epx_expert_rank(0, 32) == 0, "expert 0");
  CHECK(epx_expert_rank(31, 32) == 0 && epx_local_expert(31, 32) == 31, "expert 31");
  CHECK(epx_expert_rank(32, 32) == 1 && epx_local_expert(32, 32) == 0, "expert 32");
  CHECK(epx_expert_rank(255, 32) == 7 && epx_local_expert(255, 32) == 31, "expert 255");
  /* E = 288 over 4 ranks: 72 each */
  CHECK(epx_expert_rank(287, 72) == 3 && epx_local_expert(287, 72) == 71, "expert 287");
  CHECK(epx_expert_rank(144, 72) == 2 && epx_local_expert(144, 72) == 0, "expert 144");
  /* one expert per rank */
  for (int e = 0; e < 8; ++e)
    CHECK(epx_expert_rank(e, 1) == e && epx_local_expert(e, 1) == 0, "E_local 1, expert %d", e);
  /* nodes */
  CHECK(epx_rank_node(0, 4) == 0 && epx_rank_node(3, 4) == 0 && epx_rank_node(4, 4) == 1,
        "rank_node");
  CHECK(epx_rank_node(7, 1) == 7 && epx_rank_node(7, 8) == 0, "rank_node extremes");
  /* valid ids */
  CHECK(epx_topk_valid(0) && epx_topk_valid(255) && !epx_topk_valid(-1), "topk_valid");
}

static void alignment(void) {
  CHECK(epx_align_up(0, 128) == 0, "0 -> 0");
  CHECK(epx_align_up(1, 128) == 128, "1 -> 128");
  CHECK(epx_align_up(128, 128) == 128, "128 -> 128");
  CHECK(epx_align_up(129, 128) == 256, "129 -> 256");
  CHECK(epx_align_up(7, 1) == 7 && epx_align_up(7, 0) == 7, "alignment 1 and 0: none");
  CHECK(epx_align_up(5, 3) == 6, "non-power-of-two alignment");
  CHECK(epx_align_up((int64_t)1 << 40, 128) == (int64_t)1 << 40, "large");
}

static void topk_access(void) {
  int64_t a64[6];
  int32_t a32[6];
  for (int t = 0; t < 3; ++t)
    for (int k = 0; k < 2; ++k) {
      epx_topk_set(a64, 1, t, 2, k, t * 10 + k);
      epx_topk_set(a32, 0, t, 2, k, -(t * 10 + k));
    }
  CHECK(a64[5] == 21 && a32[5] == -21 && a64[2] == 10 && a32[2] == -10, "set layout");
  for (int t = 0; t < 3; ++t)
    for (int k = 0; k < 2; ++k) {
      CHECK(epx_topk_get(a64, 1, t, 2, k) == t * 10 + k, "get int64 (%d,%d)", t, k);
      CHECK(epx_topk_get(a32, 0, t, 2, k) == -(t * 10 + k), "get int32 (%d,%d)", t, k);
    }
  /* int32 -1 sign-extends */
  a32[0] = -1;
  CHECK(epx_topk_get(a32, 0, 0, 2, 0) == -1, "int32 -1");
  a64[0] = INT64_MAX;
  CHECK(epx_topk_get(a64, 1, 0, 2, 0) == INT64_MAX, "int64 max survives");
}

static void row_sizes(void) {
  CHECK(epx_scale_cols_f32(7168) == 56, "f32 cols 7168");
  CHECK(epx_scale_cols_f32(128) == 1, "f32 cols 128");
  CHECK(epx_scale_cols_f32(2048) == 16, "f32 cols 2048");
  CHECK(epx_scale_cols_ue8m0(7168) == 14, "ue8m0 cols 7168");
  CHECK(epx_scale_cols_ue8m0(128) == 1, "ue8m0 cols 128");
  CHECK(epx_scale_cols_ue8m0(512) == 1, "ue8m0 cols 512");
  CHECK(epx_scale_cols_ue8m0(640) == 2, "ue8m0 cols 640");
  CHECK(epx_scale_cols_ue8m0(2048) == 4, "ue8m0 cols 2048");
  CHECK(epx_scale_row_bytes(7168, 0) == 0, "no scales");
  CHECK(epx_scale_row_bytes(7168, 1) == 224, "f32 row 7168");
  CHECK(epx_scale_row_bytes(7168, 2) == 56, "ue8m0 row 7168");
  CHECK(epx_scale_row_bytes(640, 2) == 8, "ue8m0 row 640");
  CHECK(epx_payload_row_bytes(7168, 0) == 14336, "bf16 row");
  CHECK(epx_payload_row_bytes(7168, 1) == 7168, "fp8 row");
  CHECK(epx_payload_row_bytes(2880, 0) == 5760 && 5760 % EPX_ROW_ALIGN_BYTES == 0, "2880 row");
  CHECK(EPX_MAX_TOPK == 32, "max topk");
}

static void ll_layout(void) {
  CHECK(epx_ll_rows_per_expert(8, 128) == 1024, "rows per expert");
  CHECK(epx_ll_row_index(0, 0, 8, 128) == 0, "row index origin");
  CHECK(epx_ll_row_index(3, 5, 8, 128) == 3 * 1024 + 5, "row index");
  CHECK(epx_ll_row_index(31, 1023, 8, 128) == 32 * 1024 - 1, "last row");
  /* a large layout does not overflow 32 bits */
  CHECK(epx_ll_row_index(100000, 7, 64, 1024) == (int64_t)100000 * 65536 + 7, "64-bit rows");

  int64_t p = epx_ll_range_pack(0, 0);
  CHECK(p == 0, "pack(0,0)");
  p = epx_ll_range_pack(5, 7);
  CHECK(p == (((int64_t)5 << 32) | 7), "pack(5,7) = %lld", (long long)p);
  CHECK(epx_ll_range_first(p) == 5 && epx_ll_range_count(p) == 7, "unpack(5,7)");
  p = epx_ll_range_pack(0, 1024);
  CHECK(epx_ll_range_first(p) == 0 && epx_ll_range_count(p) == 1024, "count only");
  p = epx_ll_range_pack(123456, 0);
  CHECK(epx_ll_range_first(p) == 123456 && epx_ll_range_count(p) == 0, "first only");
  p = epx_ll_range_pack(0x7fffffff, 0x7fffffff);
  CHECK(epx_ll_range_first(p) == 0x7fffffff && epx_ll_range_count(p) == 0x7fffffff, "max");
  for (int f = 0; f < 5000; f += 37)
    for (int c = 0; c < 5000; c += 91) {
      int64_t q = epx_ll_range_pack(f, c);
      CHECK(epx_ll_range_first(q) == f && epx_ll_range_count(q) == c, "round trip %d %d", f, c);
    }
}

static void scans(void) {
  int in[6] = {3, 0, 5, 1, 0, 2}, out[6];
  int64_t total = epx_inclusive_scan(in, out, 6);
  int inc[6] = {3, 3, 8, 9, 9, 11};
  CHECK(total == 11 && memcmp(out, inc, sizeof inc) == 0, "inclusive");
  total = epx_exclusive_scan(in, out, 6);
  int exc[6] = {0, 3, 3, 8, 9, 9};
  CHECK(total == 11 && memcmp(out, exc, sizeof exc) == 0, "exclusive");
  /* in place */
  int buf[4] = {1, 2, 3, 4};
  epx_exclusive_scan(buf, buf, 4);
  CHECK(buf[0] == 0 && buf[1] == 1 && buf[2] == 3 && buf[3] == 6, "exclusive in place");
  int buf2[4] = {1, 2, 3, 4};
  epx_inclusive_scan(buf2, buf2, 4);
  CHECK(buf2[0] == 1 && buf2[1] == 3 && buf2[2] == 6 && buf2[3] == 10, "inclusive in place");
  /* empty */
  CHECK(epx_inclusive_scan(in, out, 0) == 0 && epx_exclusive_scan(in, out, 0) == 0, "empty");
  /* the total is 64-bit */
  int big[3] = {2000000000, 2000000000, 1};
  int o3[3];
  CHECK(epx_exclusive_scan(big, o3, 3) == 4000000001LL, "64-bit total");
}

int main(void) {
  static const epx_test_unit tests[] = {
      {"expert_and_node_ownership", ownership},
      {"align_up", alignment},
      {"topk_get_set_int32_int64", topk_access},
      {"scale_and_payload_row_sizes", row_sizes},
      {"ll_rows_and_range_pack_unpack", ll_layout},
      {"inclusive_exclusive_scans", scans},
  };
  return epx_test_run_units(tests, sizeof tests / sizeof tests[0], &failures);
}
