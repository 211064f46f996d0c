/*
 * world.h - every rank's inputs of one test problem, built in every process,
 * wired to the CPU reference (src/reference/reference.h).
 *
 * A process builds the whole world (all ranks' routing and payloads) so that
 * the reference can predict its own outputs; generation is deterministic, so
 * every process builds the same world.
 */
#ifndef EPX_TESTS_WORLD_H
#define EPX_TESTS_WORLD_H

#include <stdint.h>

#include "common/harness.h"
#include "epx.h"
#include "reference/reference.h"

typedef enum epx_test_payload {
  EPX_PAYLOAD_BF16 = 0,
  EPX_PAYLOAD_FP8_F32 = 1,   /* FP8 bytes + float32 scales */
  EPX_PAYLOAD_FP8_UE8M0 = 2  /* FP8 bytes + UE8M0 words */
} epx_test_payload;

typedef struct epx_test_world {
  epx_test_problem p;
  int is_int64;
  epx_test_payload payload;
  void *topk[EPX_TEST_MAX_RANKS];      /* [T, K] */
  float *weights[EPX_TEST_MAX_RANKS];  /* [T, K] */
  void *x[EPX_TEST_MAX_RANKS];         /* [T, H] BF16 or FP8, 64-byte aligned */
  void *scales[EPX_TEST_MAX_RANKS];    /* FP8 only */
  epx_ref_rank_input in[EPX_TEST_MAX_RANKS];
  epx_ref_world ref;
} epx_test_world;

/* Builds every rank's topk_idx, weights and payload. Payload values come from
 * payload_seed (routing and weights from p->seed), so a cached re-dispatch can
 * move new payloads along the same routing. */
void epx_test_world_init(epx_test_world *w, const epx_test_problem *p, int is_int64,
                         epx_test_payload payload, uint64_t payload_seed);
/* Replaces every rank's payload with one made from a new seed. */
void epx_test_world_new_payload(epx_test_world *w, uint64_t payload_seed);
void epx_test_world_free(epx_test_world *w);

/* float [rows, cols] of seeded values in (0, 2) with full mantissas. */
void epx_test_fill_f32_tagged(uint64_t seed, int tag, int64_t rows, int cols, float *out);

/* A host-backend config for the problem: hidden, experts, top-k and max tokens
 * taken from it, ll_max_tokens_per_rank as given, timeout_ms from
 * EPX_TEST_TIMEOUT_MS (default 20000). */
epxConfig_t epx_test_config(const epx_test_problem *p, int ll_max_tokens);

/* Initialises this rank's communicator, printing the error on failure. */
int epx_test_comm_init(epxComm_t *comm, int rank, int nranks, const epxUniqueId *id,
                       const epxConfig_t *cfg);

#endif /* EPX_TESTS_WORLD_H */
