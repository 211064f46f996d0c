/*
 * bench_check.h - one iteration's outputs against the CPU reference (src/reference).
 *
 * A benchWorld holds every rank's inputs, regenerated from the seed (tests/common/harness.h),
 * which is what the reference needs to predict one rank's outputs. Comparisons are exact
 * (bitwise): the reference makes the same bytes as every backend. Every check returns the
 * number of differing elements (0 = correct, printed by epx_test_compare), or -1 when the
 * reference could not run (out of memory).
 */
#ifndef EPX_BENCH_CHECK_H
#define EPX_BENCH_CHECK_H

#include "bench.h"
#include "reference/reference.h"

typedef struct benchWorld {
  epx_test_problem p;
  epx_ref_world w;
  epx_ref_rank_input in[EPX_TEST_MAX_RANKS];
  int64_t *topk[EPX_TEST_MAX_RANKS];
  float *weights[EPX_TEST_MAX_RANKS];
  void *x[EPX_TEST_MAX_RANKS];       /* BF16 or FP8, as built */
  float *scales[EPX_TEST_MAX_RANKS]; /* FP8: float32 [T, H/128] */
} benchWorld;

/* Every rank's int64 topk, weights and x of dtype `d` (FP8 with float32 scales). */
void bench_world_build(benchWorld *bw, const epx_test_problem *p, benchDtype d);
void bench_world_free(benchWorld *bw);

/* Layout of rank `me`; num_tokens_per_node may be NULL. */
int64_t bench_check_layout(const benchWorld *bw, int me, const int *num_tokens_per_rank,
                           const int *num_tokens_per_node, const int *num_tokens_per_expert,
                           const uint8_t *is_token_in_rank);

/* Normal dispatch of rank `me` (host views of the outputs; NULL outputs are skipped);
 * num_recv is what epxDispatchNotify returned. */
int64_t bench_check_dispatch(const benchWorld *bw, int me, benchDtype d, int64_t num_recv,
                             const epxDispatchOutputs_t *got);

/* Normal combine of rank `me`, when every rank combined its BF16 dispatch output (recv_x and
 * recv_topk_weights). Needs a BF16 world. combined_topk_weights may be NULL. */
int64_t bench_check_combine(const benchWorld *bw, int me, const uint16_t *combined_x,
                            const float *combined_topk_weights);

/* Low-latency dispatch of rank `me`: only the valid rows of each local expert are compared.
 * Needs a BF16 world (low-latency inputs are BF16; FP8 is cast inside). */
int64_t bench_check_ll_dispatch(const benchWorld *bw, int me, int max_tokens, int use_fp8,
                                const epxLowLatencyDispatchOutputs_t *got);

/* Low-latency combine of rank `me`, when every rank combined its BF16 dispatch output. */
int64_t bench_check_ll_combine(const benchWorld *bw, int me, int max_tokens,
                               const uint16_t *combined_x);

#endif /* EPX_BENCH_CHECK_H */
