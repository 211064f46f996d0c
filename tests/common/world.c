/*
 * world.c - see world.h.
 */
#include "common/world.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/layout_math.h"
#include "common/numerics.h"

/* Hard timeout of every wait in the tests: long enough for a loaded 2-core CI
 * machine, short enough that a hang fails the test before the spawn limit. */
#define EPX_TEST_DEFAULT_TIMEOUT_MS 20000

static void fill_payload(epx_test_world *w, int r, uint64_t payload_seed) {
  epx_test_problem q = w->p;
  q.seed = payload_seed;
  if (w->payload == EPX_PAYLOAD_BF16) {
    epx_test_fill_x_bf16(&q, r, w->x[r]);
  } else {
    epx_test_fill_x_fp8(&q, r, w->x[r]);
    if (w->payload == EPX_PAYLOAD_FP8_F32)
      epx_test_fill_scales_f32(&q, r, w->scales[r]);
    else
      epx_test_fill_scales_ue8m0(&q, r, w->scales[r]);
  }
}

void epx_test_world_init(epx_test_world *w, const epx_test_problem *p, int is_int64,
                         epx_test_payload payload, uint64_t payload_seed) {
  memset(w, 0, sizeof(*w));
  w->p = *p;
  w->is_int64 = is_int64;
  w->payload = payload;
  int H = p->hidden, K = p->num_topk;
  for (int r = 0; r < p->nranks; ++r) {
    size_t T = (size_t)p->tokens[r];
    w->topk[r] = epx_test_xaligned(T * (size_t)K * (is_int64 ? 8u : 4u));
    w->weights[r] = epx_test_xaligned(T * (size_t)K * sizeof(float));
    epx_test_fill_topk(p, r, w->topk[r], is_int64);
    epx_test_fill_weights(p, r, w->weights[r]);
    if (payload == EPX_PAYLOAD_BF16) {
      w->x[r] = epx_test_xaligned(T * (size_t)H * 2u);
    } else {
      w->x[r] = epx_test_xaligned(T * (size_t)H);
      w->scales[r] = epx_test_xaligned(T * epx_scale_row_bytes(H, (int)payload));
    }
    fill_payload(w, r, payload_seed);
    w->in[r].num_tokens = (int)T;
    w->in[r].topk_idx = w->topk[r];
    w->in[r].topk_weights = w->weights[r];
    w->in[r].x = w->x[r];
    w->in[r].x_scales = w->scales[r];
  }
  w->ref.nranks = p->nranks;
  w->ref.ranks_per_node = epx_test_ranks_per_node(p);
  w->ref.num_experts = p->num_experts;
  w->ref.hidden = H;
  w->ref.num_topk = K;
  w->ref.topk_is_int64 = is_int64;
  w->ref.inputs = w->in;
}

void epx_test_world_new_payload(epx_test_world *w, uint64_t payload_seed) {
  for (int r = 0; r < w->p.nranks; ++r) fill_payload(w, r, payload_seed);
}

void epx_test_world_free(epx_test_world *w) {
  for (int r = 0; r < w->p.nranks; ++r) {
    free(w->topk[r]);
    free(w->weights[r]);
    free(w->x[r]);
    free(w->scales[r]);
  }
  memset(w, 0, sizeof(*w));
}

void epx_test_fill_f32_tagged(uint64_t seed, int tag, int64_t rows, int cols, float *out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      uint64_t h = epx_test_hash4(seed, 0x66333274ull, ((uint64_t)(uint32_t)tag << 40) ^ (uint64_t)r,
                                  (uint64_t)c);
      /* exponent 126 or 127: (0.5, 2) with a random 23-bit mantissa */
      uint32_t bits = ((uint32_t)(126 + (h & 1u)) << 23) | (uint32_t)((h >> 8) & 0x7fffffu);
      out[(size_t)r * cols + c] = epx_f32_from_bits(bits);
    }
}

epxConfig_t epx_test_config(const epx_test_problem *p, int ll_max_tokens) {
  epxConfig_t c = EPX_CONFIG_INITIALIZER;
  c.backend = epxBackendHost;
  c.ranks_per_node = p->ranks_per_node;
  c.num_experts = p->num_experts;
  c.hidden = p->hidden;
  c.max_topk = p->num_topk;
  int maxT = epx_test_max_tokens(p);
  c.max_tokens_per_rank = maxT > 0 ? maxT : 1;
  c.ll_max_tokens_per_rank = ll_max_tokens;
  const char *t = getenv("EPX_TEST_TIMEOUT_MS");
  c.timeout_ms = t && *t ? atoi(t) : EPX_TEST_DEFAULT_TIMEOUT_MS;
  return c;
}

int epx_test_comm_init(epxComm_t *comm, int rank, int nranks, const epxUniqueId *id,
                       const epxConfig_t *cfg) {
  epxResult_t r = epxCommInitRank(comm, nranks, *id, rank, cfg);
  if (r != epxSuccess) {
    fprintf(stderr, "  rank %d: epxCommInitRank: %s: %s\n", rank, epxGetErrorString(r),
            epxCommGetLastError(NULL));
    return 1;
  }
  return 0;
}
