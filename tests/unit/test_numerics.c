/*
 * test_numerics.c - BF16, F24, FP8 E4M3 and the low-latency FP8 cast
 * (src/common/numerics.h) against values worked out by hand.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/harness.h"
#include "common/numerics.h"

static int failures;

#define CHECK(cond, ...) EPX_TEST_CHECK(failures, NULL, cond, __VA_ARGS__)

static float fbits(uint32_t u) { return epx_f32_from_bits(u); }

/* -------------------------------------------------------------- F24 */

/* FP32 rounded to its upper 24 bits (a candidate format for low-latency combine's partial sums). */
static void f24_rounding(void) {
  struct {
    uint32_t in;
    uint32_t out; /* F24 bits */
  } cases[] = {
      {0x00000000u, 0x000000u}, /* +0 */
      {0x80000000u, 0x800000u}, /* -0 */
      {0x3f800000u, 0x3f8000u}, /* 1, exact */
      {0xc0490f00u, 0xc0490fu}, /* -3.1415405 (low byte 0): exact */
      {0x3f800080u, 0x3f8000u}, /* 1 + 2^-16: tie, stays even */
      {0x3f800180u, 0x3f8002u}, /* 1 + 3 * 2^-16: tie, odd rounds up */
      {0xbf800180u, 0xbf8002u}, /* the same tie, negative */
      {0x3f80007fu, 0x3f8000u}, /* just below the tie */
      {0x3f800081u, 0x3f8001u}, /* just above the tie */
      {0x3f80ffc0u, 0x3f8100u}, /* carry into the next fraction bits */
      {0x3fffff80u, 0x400000u}, /* tie with odd last bit: carry into the exponent (2.0) */
      {0x00000080u, 0x000000u}, /* subnormal tie to even (0) */
      {0x00000180u, 0x000002u}, /* subnormal tie to even (2) */
      {0x00000100u, 0x000001u}, /* smallest F24 subnormal, exact */
      {0x7f800000u, 0x7f8000u}, /* +inf */
      {0xff800000u, 0xff8000u}, /* -inf */
      {0x7f7fff00u, 0x7f7fffu}, /* largest finite F24, exact */
      {0x7f7fff7fu, 0x7f7fffu}, /* just below the tie above it: stays finite */
      {0x7f7fff80u, 0x7f8000u}, /* tie above the largest finite: overflows to inf */
      {0x7f7fffffu, 0x7f8000u}, /* FLT_MAX overflows to inf */
      {0xff7fffffu, 0xff8000u}, /* -FLT_MAX to -inf */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    uint32_t got = epx_f32_to_f24(fbits(cases[i].in));
    CHECK(got == cases[i].out, "f24(0x%08x) = 0x%06x, want 0x%06x", cases[i].in, got,
          cases[i].out);
    CHECK(got <= 0xffffffu, "f24(0x%08x) = 0x%08x has bits above 24", cases[i].in, got);
    CHECK(epx_f32_bits(epx_f24_to_f32(got)) == cases[i].out << 8, "f24 0x%06x back to FP32",
          cases[i].out);
  }
  CHECK(isinf(epx_f24_to_f32(epx_f32_to_f24(INFINITY))) &&
            epx_f24_to_f32(epx_f32_to_f24(-INFINITY)) < 0.0f,
        "inf stays inf");
  /* NaNs stay NaN, quiet, sign kept (a NaN whose payload is in the low byte too) */
  uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0x7f800080u, 0xffc00001u, 0x7fffffffu, 0xff800100u};
  for (size_t i = 0; i < sizeof nans / sizeof nans[0]; ++i) {
    uint32_t v = epx_f32_to_f24(fbits(nans[i]));
    float back = epx_f24_to_f32(v);
    CHECK(isnan(back), "f24(NaN 0x%08x) = 0x%06x is not NaN", nans[i], v);
    CHECK((v & 0x4000u) != 0, "f24(NaN 0x%08x) = 0x%06x is not quiet", nans[i], v);
    CHECK((v >> 23) == (nans[i] >> 31), "f24(NaN 0x%08x) lost its sign", nans[i]);
  }
  /* every value with a zero low byte passes unchanged, and rounding is to the
   * nearest F24 (ties even) for a sweep of low bytes over many exponents */
  for (uint32_t hi = 0; hi < 0x1000000u; hi += 0x1235u) {
    if (((hi << 8) & 0x7f800000u) == 0x7f800000u) continue; /* inf / NaN: above */
    CHECK(epx_f32_to_f24(fbits(hi << 8)) == hi, "exact 0x%06x changed", hi);
    for (uint32_t low = 1; low < 256; low += 37) {
      uint32_t u = (hi << 8) | low, want = hi + (low > 128u || (low == 128u && (hi & 1u)));
      CHECK(epx_f32_to_f24(fbits(u)) == want, "f24(0x%08x) = 0x%06x, want 0x%06x", u,
            epx_f32_to_f24(fbits(u)), want);
    }
  }
  /* relative error of a normal value: at most 2^-16 */
  float x = 1.2345678f, y = epx_f24_to_f32(epx_f32_to_f24(x));
  CHECK(fabsf(y - x) <= ldexpf(x, -16), "f24 relative error %g", (double)((y - x) / x));
}

/* ------------------------------------------------------------- BF16 */

static void bf16_known_values(void) {
  struct {
    uint32_t in;
    uint16_t out;
  } cases[] = {
      {0x00000000u, 0x0000},  /* +0 */
      {0x80000000u, 0x8000},  /* -0 */
      {0x3f800000u, 0x3f80},  /* 1 */
      {0xbfc00000u, 0xbfc0},  /* -1.5 */
      {0x3f808000u, 0x3f80},  /* 1 + 2^-8: tie, stays even */
      {0x3f818000u, 0x3f82},  /* 1 + 3*2^-8: tie, odd rounds up */
      {0x3f808001u, 0x3f81},  /* just above the tie */
      {0x3f807fffu, 0x3f80},  /* just below the tie */
      {0x00008000u, 0x0000},  /* subnormal tie to even (0) */
      {0x00018000u, 0x0002},  /* subnormal tie to even (2) */
      {0x00010000u, 0x0001},  /* smallest BF16 subnormal, exact */
      {0x7f800000u, 0x7f80},  /* +inf */
      {0xff800000u, 0xff80},  /* -inf */
      {0x7f7fffffu, 0x7f80},  /* FLT_MAX rounds to inf */
      {0x7f7f0000u, 0x7f7f},  /* largest finite BF16, exact */
      {0x43e00000u, 0x43e0},  /* 448 */
      {0x49742400u, 0x4974},  /* 1e6 rounds down to 999424 */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    uint16_t got = epx_f32_to_bf16(fbits(cases[i].in));
    CHECK(got == cases[i].out, "bf16(0x%08x) = 0x%04x, want 0x%04x", cases[i].in, got,
          cases[i].out);
  }
  /* NaNs stay NaN, quiet, sign kept */
  uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0xffc00001u, 0x7fffffffu};
  for (size_t i = 0; i < sizeof nans / sizeof nans[0]; ++i) {
    uint16_t h = epx_f32_to_bf16(fbits(nans[i]));
    CHECK((h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0, "bf16(NaN 0x%08x) = 0x%04x", nans[i], h);
    CHECK((h & 0x40u) != 0, "bf16(NaN 0x%08x) = 0x%04x is not quiet", nans[i], h);
    CHECK((h >> 15) == (nans[i] >> 31), "bf16(NaN 0x%08x) lost its sign", nans[i]);
  }
  CHECK(epx_bf16_to_f32(0x3f80) == 1.0f, "bf16 1.0");
  CHECK(epx_bf16_to_f32(0xc000) == -2.0f, "bf16 -2.0");
  CHECK(epx_f32_bits(epx_bf16_to_f32(0x8000)) == 0x80000000u, "bf16 -0");
  CHECK(isinf(epx_bf16_to_f32(0x7f80)), "bf16 inf");
  CHECK(isnan(epx_bf16_to_f32(0x7fc0)), "bf16 NaN");
}

static void bf16_round_trip(void) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    float f = epx_bf16_to_f32((uint16_t)h);
    CHECK(epx_f32_bits(f) == h << 16, "bf16_to_f32(0x%04x) not exact", h);
    uint16_t back = epx_f32_to_bf16(f);
    if (isnan(f))
      CHECK(isnan(epx_bf16_to_f32(back)), "NaN 0x%04x did not stay NaN (0x%04x)", h, back);
    else
      CHECK(back == h, "bf16 0x%04x -> 0x%04x", h, back);
  }
}

/* ------------------------------------------------------------- E4M3 */

static void e4m3_known_values(void) {
  struct {
    float in;
    uint8_t out;
  } cases[] = {
      {0.0f, 0x00},
      {-0.0f, 0x80},
      {1.0f, 0x38},
      {-2.0f, 0xc0},
      {1.0625f, 0x38},  /* 1 + 1/16: tie between 1 and 1.125, even -> 1 */
      {1.1875f, 0x3a},  /* 1 + 3/16: tie between 1.125 and 1.25, even -> 1.25 */
      {1.0626f, 0x39},  /* just above the tie */
      {448.0f, 0x7e},   /* largest finite */
      {-448.0f, 0xfe},
      {464.0f, 0x7e},   /* tie between 448 and 480 (not representable): even -> 448 */
      {480.0f, 0x7e},   /* saturates instead of reaching 0x7f (NaN) */
      {1e6f, 0x7e},     /* saturates */
      {-1e6f, 0xfe},
      {INFINITY, 0x7e}, /* saturating conversion: inf -> 448 */
      {-INFINITY, 0xfe},
      {0.015625f, 0x08},         /* 2^-6, smallest normal */
      {0.001953125f, 0x01},      /* 2^-9, smallest subnormal */
      {0.0009765625f, 0x00},     /* 2^-10: tie between 0 and 2^-9 -> 0 */
      {0.0029296875f, 0x02},     /* 1.5 * 2^-9: tie between 1 and 2 -> 2 */
      {0.0048828125f, 0x02},     /* 2.5 * 2^-9: tie between 2 and 3 -> 2 */
      {0.0146484375f, 0x08},     /* 7.5 * 2^-9: tie between 7 and 8 -> 8 (normal) */
      {0.00048828125f, 0x00},    /* 2^-11 -> 0 */
      {0.0009766f, 0x01},        /* just above 2^-10 */
      {-0.001953125f, 0x81},
      {240.0f, 0x77},            /* 1.875 * 128 */
      {232.0f, 0x76},            /* 1.8125 * 128: tie between 224 and 240, even -> 224 */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    uint8_t got = epx_f32_to_e4m3(cases[i].in);
    CHECK(got == cases[i].out, "e4m3(%g) = 0x%02x, want 0x%02x", (double)cases[i].in, got,
          cases[i].out);
  }
  CHECK(epx_f32_to_e4m3(NAN) == 0x7f, "e4m3(NaN) = 0x%02x", epx_f32_to_e4m3(NAN));
  CHECK(epx_f32_to_e4m3(-NAN) == 0xff, "e4m3(-NaN) = 0x%02x", epx_f32_to_e4m3(-NAN));
  CHECK(epx_e4m3_to_f32(0x7e) == 448.0f, "e4m3 0x7e");
  CHECK(epx_e4m3_to_f32(0xfe) == -448.0f, "e4m3 0xfe");
  CHECK(epx_e4m3_to_f32(0x01) == 0.001953125f, "e4m3 0x01");
  CHECK(epx_e4m3_to_f32(0x07) == 7.0f / 512.0f, "e4m3 0x07");
  CHECK(epx_e4m3_to_f32(0x08) == 0.015625f, "e4m3 0x08");
  CHECK(epx_e4m3_to_f32(0x38) == 1.0f, "e4m3 0x38");
  CHECK(epx_f32_bits(epx_e4m3_to_f32(0x80)) == 0x80000000u, "e4m3 -0");
  CHECK(isnan(epx_e4m3_to_f32(0x7f)), "e4m3 0x7f is NaN");
  CHECK(isnan(epx_e4m3_to_f32(0xff)), "e4m3 0xff is NaN");
}

static void e4m3_round_trip(void) {
  int finite = 0;
  for (int b = 0; b < 256; ++b) {
    float f = epx_e4m3_to_f32((uint8_t)b);
    if ((b & 0x7f) == 0x7f) continue;
    ++finite;
    CHECK(!isnan(f), "e4m3 0x%02x decodes to NaN", b);
    uint8_t back = epx_f32_to_e4m3(f);
    CHECK(back == b, "e4m3 0x%02x -> %g -> 0x%02x", b, (double)f, back);
    /* monotone: positive codes increase with the byte */
    if (b > 0 && b < 0x7f) CHECK(epx_e4m3_to_f32((uint8_t)(b - 1)) < f, "e4m3 not monotone at 0x%02x", b);
  }
  CHECK(finite == 254, "finite E4M3 codes: %d", finite);
  /* every float rounds to a neighbour: check a sweep against a brute-force nearest-even */
  for (int i = -20000; i <= 20000; ++i) {
    float x = (float)i * 0.0251f;
    uint8_t got = epx_f32_to_e4m3(x);
    /* brute force over the finite codes of the same sign */
    int best = -1;
    double bestd = 1e30;
    for (int b = 0; b < 128; ++b) {
      if (b == 0x7f) continue;
      int code = (x < 0 ? 0x80 : 0) | b;
      double d = fabs((double)epx_e4m3_to_f32((uint8_t)code) - (double)x);
      if (d < bestd || (d == bestd && (code & 1) == 0)) {
        bestd = d;
        best = code;
      }
    }
    CHECK(got == best, "e4m3(%.9g) = 0x%02x, nearest-even 0x%02x", (double)x, got, best);
  }
}

/* ------------------------------------------------------ scales, cast */

static void pow2_and_ue8m0(void) {
  CHECK(epx_pow2_ceil(1.0f) == 1.0f, "pow2_ceil(1)");
  CHECK(epx_pow2_ceil(1.5f) == 2.0f, "pow2_ceil(1.5)");
  CHECK(epx_pow2_ceil(0.75f) == 1.0f, "pow2_ceil(0.75)");
  CHECK(epx_pow2_ceil(3.0f) == 4.0f, "pow2_ceil(3)");
  CHECK(epx_pow2_ceil(0.5f) == 0.5f, "pow2_ceil(0.5)");
  CHECK(epx_pow2_ceil(1.0000001f) == 2.0f, "pow2_ceil(1+ulp)");
  CHECK(epx_pow2_ceil(0.0078125f) == 0.0078125f, "pow2_ceil(2^-7)");
  CHECK(epx_pow2_ceil(fbits(0x00000001u)) == fbits(0x00800000u), "pow2_ceil(min subnormal)");
  for (int e = -60; e <= 60; ++e) {
    float p = ldexpf(1.0f, e);
    CHECK(epx_pow2_ceil(p) == p, "pow2_ceil(2^%d)", e);
    CHECK(epx_pow2_ceil(p * 1.25f) == 2.0f * p, "pow2_ceil(1.25*2^%d)", e);
    CHECK(epx_pow2_ceil(p * 0.75f) == p, "pow2_ceil(0.75*2^%d)", e);
  }
  CHECK(epx_ue8m0_from_scale(1.0f) == 127, "ue8m0(1)");
  CHECK(epx_ue8m0_from_scale(2.0f) == 128, "ue8m0(2)");
  CHECK(epx_ue8m0_from_scale(0.5f) == 126, "ue8m0(0.5)");
  CHECK(epx_ue8m0_from_scale(0.0078125f) == 120, "ue8m0(2^-7)");
  for (int e = 1; e < 255; ++e)
    CHECK(epx_ue8m0_from_scale(epx_ue8m0_to_scale((uint8_t)e)) == e, "ue8m0 round trip %d", e);
  CHECK(epx_ue8m0_to_scale(127) == 1.0f, "ue8m0 127 -> 1");
}

static void group_scale(void) {
  CHECK(epx_fp8_group_scale(448.0f, 0) == 1.0f, "scale(448)");
  CHECK(epx_fp8_group_scale(448.0f, 1) == 1.0f, "scale(448) rounded");
  CHECK(epx_fp8_group_scale(224.0f, 0) == 0.5f, "scale(224)");
  CHECK(epx_fp8_group_scale(449.0f, 0) == 449.0f / 448.0f, "scale(449)");
  CHECK(epx_fp8_group_scale(449.0f, 1) == 2.0f, "scale(449) rounded");
  CHECK(epx_fp8_group_scale(2.0f, 0) == 2.0f / 448.0f, "scale(2)");
  CHECK(epx_fp8_group_scale(2.0f, 1) == 0.0078125f, "scale(2) rounded = 2^-7");
  /* amax floor: zero groups and tiny groups get 1e-4 / 448 */
  float floor_scale = 1e-4f / 448.0f;
  CHECK(epx_fp8_group_scale(0.0f, 0) == floor_scale, "scale(0)");
  CHECK(epx_fp8_group_scale(1e-9f, 0) == floor_scale, "scale(1e-9)");
  CHECK(epx_fp8_group_scale(0.0f, 1) == ldexpf(1.0f, -22), "scale(0) rounded = 2^-22");
  CHECK(epx_fp8_group_scale(2e-4f, 0) == 2e-4f / 448.0f, "scale(2e-4)");
  /* quantize: x / scale rounded */
  CHECK(epx_fp8_quantize(1.0f, 1.0f) == 0x38, "quantize(1, 1)");
  CHECK(epx_fp8_quantize(1000.0f, 1.0f) == 0x7e, "quantize saturates");
  CHECK(epx_fp8_quantize(-0.5f, 0.25f) == 0xc0, "quantize(-0.5, 0.25) = -2");
  /* products and sums: one rounding each */
  CHECK(epx_add_rn(1.0f, ldexpf(1.0f, -24)) == 1.0f, "1 + 2^-24 ties to 1");
  CHECK(epx_add_rn(1.0f, ldexpf(3.0f, -25)) == fbits(0x3f800001u), "1 + 1.5*2^-24 rounds up");
  CHECK(epx_mul_rn(fbits(0x3f800001u), fbits(0x3f800001u)) == fbits(0x3f800002u), "(1+u)^2");
}

static void fp8_cast_token(void) {
  /* H = 640: five groups, two UE8M0 words (the second with three unused bytes). */
  enum { H = 640 };
  uint16_t x[H];
  for (int i = 0; i < H; ++i) x[i] = 0x3f80; /* 1.0 */
  x[0] = 0x4000;                             /* group 0: amax 2 */
  for (int i = 128; i < 256; ++i) x[i] = 0;  /* group 1: all zero */
  x[256] = 0xc3e0;                           /* group 2: -448 -> scale 1 */
  x[384 + 5] = 0x7fc0;                       /* group 3: a NaN never wins the amax */
  x[512 + 7] = 0x4380;                       /* group 4: 256 -> scale 256/448 */

  uint8_t q[H], qr[H];
  float s[5], sr[5];
  uint32_t words[2] = {0xdeadbeefu, 0xdeadbeefu};
  epx_fp8_cast_token(x, H, 0, q, s, NULL);
  epx_fp8_cast_token(x, H, 1, qr, sr, words);

  /* group 0, plain scale 2/448: 1.0 -> 224 (0x76), 2.0 -> 448 (0x7e) */
  CHECK(s[0] == 2.0f / 448.0f, "scale g0 %g", (double)s[0]);
  CHECK(q[0] == epx_f32_to_e4m3(2.0f / (2.0f / 448.0f)), "q[0] = 0x%02x", q[0]);
  CHECK(q[0] == 0x7e, "q[0] = 0x%02x, want 448", q[0]);
  CHECK(q[1] == 0x76, "q[1] = 0x%02x, want 224", q[1]);
  /* group 0 rounded: scale 2^-7: 2.0 -> 256 (0x78), 1.0 -> 128 (0x70) */
  CHECK(sr[0] == 0.0078125f, "rounded scale g0 %g", (double)sr[0]);
  CHECK(qr[0] == 0x78 && qr[1] == 0x70, "rounded q = 0x%02x 0x%02x", qr[0], qr[1]);
  /* group 1: zeros, floor scale */
  CHECK(s[1] == 1e-4f / 448.0f && q[128] == 0 && q[255] == 0, "zero group");
  CHECK(sr[1] == ldexpf(1.0f, -22), "rounded zero-group scale %g", (double)sr[1]);
  /* group 2: scale 1, -448 -> 0xfe, 1.0 -> 0x38 */
  CHECK(s[2] == 1.0f && q[256] == 0xfe && q[257] == 0x38, "group 2");
  /* group 3: amax 1 (NaN ignored), NaN -> 0x7f */
  CHECK(s[3] == 1.0f / 448.0f, "NaN group scale %g", (double)s[3]);
  CHECK(q[384 + 5] == 0x7f, "NaN quantized to 0x%02x", q[384 + 5]);
  CHECK(q[384] == 0x7e, "1.0 at scale 1/448 -> 0x%02x", q[384]);
  /* group 4: scale 256/448 plain; rounded 1.0 (pow2_ceil(0.571)) */
  CHECK(s[4] == 256.0f / 448.0f && q[512 + 7] == 0x7e, "group 4");
  CHECK(sr[4] == 1.0f && qr[512 + 7] == epx_f32_to_e4m3(256.0f), "rounded group 4");
  /* UE8M0: bytes 120 (2^-7), 105 (2^-22), 127 (1), 119 (2^-8 >= 1/448) | 127, then zeros */
  uint32_t w0 = 120u | (105u << 8) | (127u << 16) | (119u << 24);
  CHECK(words[0] == w0, "ue8m0 word 0 = 0x%08x, want 0x%08x", words[0], w0);
  CHECK(words[1] == 127u, "ue8m0 word 1 = 0x%08x, want 0x0000007f", words[1]);
  /* the cast is a pure function: repeated calls give the same bytes */
  uint8_t q2[H];
  epx_fp8_cast_token(x, H, 0, q2, NULL, NULL);
  CHECK(memcmp(q, q2, H) == 0, "cast not repeatable");
}

int main(void) {
  static const epx_test_unit tests[] = {
      {"bf16_known_values", bf16_known_values},
      {"bf16_round_trip_all_65536", bf16_round_trip},
      {"f24_rounding_ties_inf_nan_overflow", f24_rounding},
      {"e4m3_known_values", e4m3_known_values},
      {"e4m3_round_trip_and_nearest_even", e4m3_round_trip},
      {"pow2_ceil_and_ue8m0", pow2_and_ue8m0},
      {"fp8_group_scale_and_rn_ops", group_scale},
      {"fp8_cast_token_plain_rounded_ue8m0", fp8_cast_token},
  };
  return epx_test_run_units(tests, sizeof tests / sizeof tests[0], &failures);
}
