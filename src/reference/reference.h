/*
 * reference.h - a single-process CPU model of every epx operation.
 *
 * Given the inputs of every rank (an epx_ref_world), it computes what any one
 * rank must receive, following docs/semantics.md to the bit: the
 * receive order, the local-id rewrite, aligned counts, the worst-case padding
 * rows, and the FP32 summation order of both combines. Conversions and sums go
 * through src/common/numerics.h and layout_math.h only, so the reference makes
 * the same bytes as the host and CUDA backends. It is built into
 * libepx_ref.a for the tests and the benchmark, never into libepx.
 *
 * Memory: every epx_ref_* function that returns a result allocates it with
 * malloc; free it with the matching *_free function. Functions return 0 on
 * success and -1 when an allocation fails or the world is inconsistent.
 */
#ifndef EPX_REFERENCE_H
#define EPX_REFERENCE_H

#include <stddef.h>
#include <stdint.h>

#include "epx.h"

/* One rank's inputs. Unused fields may be NULL. */
typedef struct epx_ref_rank_input {
  int num_tokens;            /* T */
  const void *topk_idx;      /* [T, K] int64 or int32 (see topk_is_int64) */
  const float *topk_weights; /* [T, K] or NULL */
  const void *x;             /* [T, H] BF16 (uint16) or FP8 bytes */
  const void *x_scales;      /* FP8: [T, H/128] float or [T, ceil(H/512)] UE8M0 words */
} epx_ref_rank_input;

typedef struct epx_ref_world {
  int nranks;
  int ranks_per_node; /* 0 = nranks */
  int num_experts;
  int hidden;
  int num_topk;
  int topk_is_int64;  /* every rank's topk_idx has this type */
  const epx_ref_rank_input *inputs; /* [nranks] */
} epx_ref_world;

/* ---------------------------------------------------------- routing */

int epx_ref_num_local_experts(const epx_ref_world *w);
int epx_ref_ranks_per_node(const epx_ref_world *w);
/* 1 when token t of rank src has at least one expert on rank dst. */
int epx_ref_token_to_rank(const epx_ref_world *w, int src, int t, int dst);
/* 1 when token t of rank src lists global expert e in one of its slots. */
int epx_ref_token_has_expert(const epx_ref_world *w, int src, int t, int64_t e);

/* ----------------------------------------------------------- layout */

/* Layout of rank `rank`'s tokens (epxGetDispatchLayout). Any output may be
 * NULL. num_tokens_per_expert counts a token once per expert, even when it
 * lists that expert in two slots (the reading that keeps the sum over sources
 * equal to the unaligned num_recv_tokens_per_expert). */
int epx_ref_layout(const epx_ref_world *w, int rank, int *num_tokens_per_rank,
                   int *num_tokens_per_node, int *num_tokens_per_expert,
                   uint8_t *is_token_in_rank);

/* --------------------------------------------------- normal dispatch */

typedef struct epx_ref_dispatch_opts {
  epxDataType_t x_type;          /* epxBFloat16 or epxFloat8E4M3 */
  epxScaleFormat_t scale_format; /* FP8: epxScalesFloat32 or epxScalesUE8M0 */
  int expert_alignment;          /* 0 or 1 = none */
  int64_t num_worst_tokens;      /* > 0: rows [N_recv, this) are padding rows */
} epx_ref_dispatch_opts;

/* Everything rank `me` must receive. Arrays with `rows` rows hold
 * rows = max(num_recv, num_worst_tokens) rows; recv_x / recv_x_scales hold
 * valid data only in rows [0, num_recv) (the library leaves the rest
 * untouched) and are filled with 0xA5 past it. */
typedef struct epx_ref_dispatch_result {
  int64_t num_recv;
  int64_t rows;
  void *recv_x;              /* [rows, H] x_type */
  void *recv_x_scales;       /* [rows, scale words] or NULL (BF16) */
  void *recv_topk_idx;       /* [rows, K] int64 or int32 like the inputs */
  float *recv_topk_weights;  /* [rows, K]: 0 where the id is -1 (0 everywhere without weights) */
  int *recv_src_idx;         /* [rows]: source token, -1 in padding rows */
  int *recv_src_rank;        /* [rows]: source rank (not an epx output), -1 in padding rows */
  int *recv_rank_prefix;     /* [R]: column `me` of rank_prefix_matrix */
  int *rank_prefix_matrix;   /* [R, R]: [s][r] = rows on r from sources <= s */
  int *num_recv_tokens_per_expert; /* [E_local], aligned */
  int *num_recv_tokens_per_expert_raw; /* [E_local], before alignment */
} epx_ref_dispatch_result;

int epx_ref_dispatch(const epx_ref_world *w, int me, const epx_ref_dispatch_opts *opts,
                     epx_ref_dispatch_result *out);
void epx_ref_dispatch_free(epx_ref_dispatch_result *r);

/* Row of token t of rank src in rank dst's receive order, or -1 when the
 * token does not go to dst. */
int64_t epx_ref_recv_row(const epx_ref_world *w, int src, int t, int dst);

/* ---------------------------------------------------- normal combine */

/* Combine inputs of every rank: x[r] is rank r's [N_recv_r, H] BF16 (in its
 * dispatch receive order), weights[r] its [N_recv_r, K] floats or NULL. */
typedef struct epx_ref_combine_inputs {
  const uint16_t *const *x;      /* [nranks] */
  const float *const *weights;   /* [nranks] or NULL (no weights) */
  const uint16_t *bias[2];       /* rank me's [T_me, H] BF16 biases, or NULL */
} epx_ref_combine_inputs;

/* combined_x [T_me, H] BF16 and, when `in->weights` is given and
 * combined_topk_weights is not NULL, [T_me, K] floats; both caller-allocated. */
int epx_ref_combine(const epx_ref_world *w, int me, const epx_ref_combine_inputs *in,
                    uint16_t *combined_x, float *combined_topk_weights);

/* ------------------------------------------------------ low latency */

typedef struct epx_ref_ll_opts {
  int max_tokens_per_rank; /* the communicator's ll_max_tokens_per_rank */
  int use_fp8;
  int round_scale;
  int use_ue8m0;
} epx_ref_ll_opts;

/* Rank me's low-latency receive buffers, each full size:
 * recv_x [E_local, R*maxT, H] (FP8 bytes or BF16), recv_x_scales
 * [E_local, R*maxT, cols] (float or UE8M0 words; NULL for BF16), recv_src_info
 * [E_local, R*maxT], recv_layout_range [E_local, R], recv_count [E_local].
 * Rows past recv_count[e] are 0xA5-filled (the library does not write them);
 * compare only the valid rows. */
typedef struct epx_ref_ll_result {
  int64_t rows_per_expert; /* R * maxT */
  void *recv_x;
  void *recv_x_scales;
  int *recv_src_info;
  int *recv_src_rank;      /* not an epx output: the source rank of each row */
  int64_t *recv_layout_range;
  int *recv_count;
} epx_ref_ll_result;

int epx_ref_ll_dispatch(const epx_ref_world *w, int me, const epx_ref_ll_opts *opts,
                        epx_ref_ll_result *out);
void epx_ref_ll_free(epx_ref_ll_result *r);

/* Row of token t of rank src in local expert `local_expert`'s block on the
 * rank owning global expert e (-1 when the token does not list e). */
int64_t epx_ref_ll_row(const epx_ref_world *w, int src, int t, int64_t e);

/* Low-latency combine for rank me: expert_out[r] is rank r's
 * [E_local, R*maxT, H] BF16 expert outputs; topk_weights are rank me's
 * [T_me, K]. Output combined_x [T_me, H], caller-allocated. */
int epx_ref_ll_combine(const epx_ref_world *w, int me, int max_tokens_per_rank,
                       const uint16_t *const *expert_out, const float *topk_weights,
                       uint16_t *combined_x);

#endif /* EPX_REFERENCE_H */
