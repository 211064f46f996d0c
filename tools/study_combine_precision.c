/*
 * study_combine_precision.c - what summing a rank's experts before sending
 * would do to low-latency combine's results (a lead of the low-latency issue:
 * one message per (token, rank) instead of per (token, top-k slot)).
 *
 * The contract (spec §4): out[t] = bf16(sum over k in order of
 * w[t,k] * x_k), FP32 accumulation, one rounding ("contract" below). Three
 * alternatives, each summed in rank order at the source:
 *   fp32 partials: each rank sums its own slots (k order) in FP32 and sends
 *                  the FP32 partial (4H bytes per (token, rank));
 *   f24 partials:  the same partial rounded to F24 (epx_f32_to_f24, 16
 *                  significant bits) before it is sent (3H bytes): the
 *                  format tried on branch wip/ll-combine-partials (correct,
 *                  but its CUDA combine measured slower than main's);
 *   bf16 partials: the same partial rounded to BF16 before it is sent
 *                  (2H bytes).
 * Inputs: random routing (top-K of E distinct experts over R ranks), weights
 * exp(N(0,1)) normalised to 1, expert outputs N(0,1) rounded to BF16; the
 * same float helpers as the library (src/common/numerics.h).
 *
 * Prints, for each alternative: how many outputs differ from the contract's
 * bits, the largest difference in BF16 ulps (ordered-integer distance), and
 * the mean error against the exact real sum relative to |sum| (floored at
 * 1e-3), next to the contract's own. Usage: study-combine-precision [tokens]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/numerics.h"

enum { K = 8, E = 256, R = 4, H = 512, EL = E / R };

static uint64_t rng = 88172645463325252ull;
static double uniform(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (double)(rng >> 11) * (1.0 / 9007199254740992.0);
}
static double normal(void) {
  return sqrt(-2.0 * log(uniform() + 1e-300)) * cos(6.283185307179586 * uniform());
}

static int ulp_distance(uint16_t a, uint16_t b) {
  int32_t ia = (a & 0x8000) ? -(int32_t)(a & 0x7fff) : (int32_t)a;
  int32_t ib = (b & 0x8000) ? -(int32_t)(b & 0x7fff) : (int32_t)b;
  return abs(ia - ib);
}

typedef struct Tally {
  long differ, max_ulp;
  double rel;
} Tally;

static void tally(Tally *t, uint16_t got, uint16_t contract, double truth) {
  const int d = ulp_distance(got, contract);
  t->differ += d != 0;
  if (d > t->max_ulp) t->max_ulp = d;
  const double scale = fabs(truth) > 1e-3 ? fabs(truth) : 1e-3;
  t->rel += fabs((double)epx_bf16_to_f32(got) - truth) / scale;
}

int main(int argc, char **argv) {
  const int tokens = argc > 1 ? atoi(argv[1]) : 20000;
  if (tokens < 1) {
    fprintf(stderr, "usage: %s [tokens >= 1]\n", argv[0]);
    return 2;
  }
  Tally contract = {0, 0, 0.0}, fp32 = {0, 0, 0.0}, f24 = {0, 0, 0.0}, bf16 = {0, 0, 0.0};
  long n = 0;
  for (int t = 0; t < tokens; ++t) {
    int ids[K];
    float w[K];
    double wsum = 0.0;
    for (int k = 0; k < K; ++k) {
      int fresh;
      do {
        ids[k] = (int)(uniform() * E);
        fresh = 1;
        for (int j = 0; j < k; ++j) fresh &= ids[j] != ids[k];
      } while (!fresh);
      w[k] = (float)exp(normal());
      wsum += w[k];
    }
    for (int k = 0; k < K; ++k) w[k] = (float)(w[k] / wsum);
    for (int h = 0; h < H; ++h) {
      float x[K];
      double truth = 0.0;
      for (int k = 0; k < K; ++k) {
        x[k] = epx_bf16_to_f32(epx_f32_to_bf16((float)normal()));
        truth += (double)w[k] * x[k];
      }
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) acc = epx_add_rn(acc, epx_mul_rn(w[k], x[k]));
      const uint16_t exact = epx_f32_to_bf16(acc);
      float acc32 = 0.0f, acc24 = 0.0f, acc16 = 0.0f;
      for (int r = 0; r < R; ++r) {
        float part = 0.0f;
        int any = 0;
        for (int k = 0; k < K; ++k)
          if (ids[k] / EL == r) {
            part = epx_add_rn(part, epx_mul_rn(w[k], x[k]));
            any = 1;
          }
        if (!any) continue;
        acc32 = epx_add_rn(acc32, part);
        acc24 = epx_add_rn(acc24, epx_f24_to_f32(epx_f32_to_f24(part)));
        acc16 = epx_add_rn(acc16, epx_bf16_to_f32(epx_f32_to_bf16(part)));
      }
      tally(&contract, exact, exact, truth);
      tally(&fp32, epx_f32_to_bf16(acc32), exact, truth);
      tally(&f24, epx_f32_to_bf16(acc24), exact, truth);
      tally(&bf16, epx_f32_to_bf16(acc16), exact, truth);
      ++n;
    }
  }
  printf("%ld outputs (%d tokens x %d channels), top-%d of %d experts over %d ranks\n", n, tokens,
         H, K, E, R);
  printf("%-14s %12s %10s %14s\n", "combine", "differ", "max ulp", "mean rel err");
  const Tally *rows[4] = {&contract, &fp32, &f24, &bf16};
  const char *names[4] = {"contract", "fp32 partials", "f24 partials", "bf16 partials"};
  for (int i = 0; i < 4; ++i)
    printf("%-14s %11.3f%% %10ld %14.3e\n", names[i], 100.0 * (double)rows[i]->differ / (double)n,
           rows[i]->max_ulp, rows[i]->rel / (double)n);
  return 0;
}
