/*
 * numerics.h - the number formats of epx, defined once for host and device.
 *
 * BF16 and FP8 E4M3 conversions and the low-latency FP8 cast (spec.md §4) are
 * written here in plain integer arithmetic, so the host backend, the reference
 * and the CUDA kernels produce the same bytes for the same inputs. Nothing
 * here depends on the compiler's rounding mode or on fused multiply-add.
 */
#ifndef EPX_COMMON_NUMERICS_H
#define EPX_COMMON_NUMERICS_H

#include <stdint.h>

#include "common/platform.h"

/* One FP8 scale covers this many channels (DeepSeek-V3's block size). */
#define EPX_FP8_GROUP 128
/* Largest finite E4M3 value. */
#define EPX_FP8_E4M3_MAX 448.0f
/* Smallest amax used for a scale, so all-zero groups get a finite scale. */
#define EPX_FP8_AMAX_FLOOR 1e-4f
/* UE8M0 scales pack this many exponent bytes into one int32 word. */
#define EPX_UE8M0_PER_WORD 4

EPX_HD uint32_t epx_f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union { float f; uint32_t u; } v;
  v.f = f;
  return v.u;
#endif
}

EPX_HD float epx_f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  union { float f; uint32_t u; } v;
  v.u = u;
  return v.f;
#endif
}

/* BF16 is the upper half of an IEEE float. */
EPX_HD float epx_bf16_to_f32(uint16_t h) { return epx_f32_from_bits((uint32_t)h << 16); }

/* Round to nearest, ties to even; NaN stays a quiet NaN. */
EPX_HD uint16_t epx_f32_to_bf16(float f) {
  uint32_t u = epx_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* "F24": an FP32 rounded to its upper 24 bits (sign, 8 exponent bits, 15
 * fraction bits: 16 significant bits), nearest-even; NaN stays a quiet NaN.
 * A candidate wire format for a rank's partial sum of a token in low-latency
 * combine (relative rounding error <= 2^-16, 1/256 of a BF16 output's; see
 * tools/study_combine_precision.c). The value is returned in the low 24 bits. */
EPX_HD uint32_t epx_f32_to_f24(float f) {
  uint32_t u = epx_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 8) | 0x4000u;
  u += 0x7fu + ((u >> 8) & 1u);
  return u >> 8;
}
EPX_HD float epx_f24_to_f32(uint32_t v) { return epx_f32_from_bits(v << 8); }

/* FP8 E4M3 ("fn": no infinities, 0x7f/0xff are NaN, largest finite 448).
 * Round to nearest even, saturating to +-448; NaN maps to NaN. */
EPX_HD uint8_t epx_f32_to_e4m3(float f) {
  uint32_t u = epx_f32_bits(f);
  uint32_t sign = (u >> 24) & 0x80u;
  uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return (uint8_t)(sign | 0x7fu);
  int exp = (int)(mag >> 23) - 127;
  uint32_t q;
  if (exp < -6) {
    /* E4M3 subnormals are k * 2^-9, k = 0..7: round mag * 2^9 to an integer.
     * Below 2^-10 that product is under one half and rounds to zero. */
    if (exp < -10) return (uint8_t)sign;
    uint32_t mant = (mag & 0x7fffffu) | 0x800000u;
    int shift = 14 - exp; /* 21..24 */
    q = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++; /* k = 8 is the smallest normal */
  } else {
    uint32_t mant = mag & 0x7fffffu;
    q = ((uint32_t)(exp + 7) << 3) | (mant >> 20);
    uint32_t rem = mant & 0xfffffu;
    if (rem > 0x80000u || (rem == 0x80000u && (q & 1u))) q++; /* carries into the exponent */
    if (q > 0x7eu) q = 0x7eu; /* saturate: 0x7f is NaN */
  }
  return (uint8_t)(sign | q);
}

EPX_HD float epx_e4m3_to_f32(uint8_t v) {
  uint32_t sign = (uint32_t)(v & 0x80u) << 24;
  uint32_t e = (v >> 3) & 0xfu, m = v & 7u;
  if (e == 15u && m == 7u) return epx_f32_from_bits(sign | 0x7fc00000u);
  if (e == 0u) {
    /* m * 2^-9, exact in float */
    float r = (float)m * (1.0f / 512.0f);
    return sign ? -r : r;
  }
  return epx_f32_from_bits(sign | ((e - 7u + 127u) << 23) | (m << 20));
}

/* Smallest power of two >= s, for positive finite s (exact, by bits). */
EPX_HD float epx_pow2_ceil(float s) {
  uint32_t u = epx_f32_bits(s);
  if (u & 0x7fffffu) u = (u & 0xff800000u) + 0x800000u;
  return epx_f32_from_bits(u & 0xff800000u);
}

/* Exponent byte of a power-of-two scale (UE8M0), and back. */
EPX_HD uint8_t epx_ue8m0_from_scale(float pow2_scale) {
  return (uint8_t)((epx_f32_bits(pow2_scale) >> 23) & 0xffu);
}
EPX_HD float epx_ue8m0_to_scale(uint8_t e) { return epx_f32_from_bits((uint32_t)e << 23); }

/* Scale of one 128-channel group from its amax (spec.md §4). `amax` is the
 * largest |x| of the group as float; NaNs never win the comparison. */
EPX_HD float epx_fp8_group_scale(float amax, int round_scale) {
  float a = amax > EPX_FP8_AMAX_FLOOR ? amax : EPX_FP8_AMAX_FLOOR;
  float scale = a / EPX_FP8_E4M3_MAX;
  return round_scale ? epx_pow2_ceil(scale) : scale;
}

/* One channel of the cast: x / scale (IEEE division) rounded to E4M3. */
EPX_HD uint8_t epx_fp8_quantize(float x, float scale) { return epx_f32_to_e4m3(x / scale); }

/* FP32 product and sum with one rounding each, never fused, so host and
 * device accumulate bit-identically. */
EPX_HD float epx_mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b; /* the build sets -ffp-contract=off, so this is never fused */
#endif
}
EPX_HD float epx_add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

/* Cast one token (H BF16 values) to FP8 with per-group scales: the one
 * definition the host backend and reference use; GPU kernels apply the same
 * per-group functions above lane by lane. scales_f32 gets H/128 floats (or is
 * NULL); ue8m0_words gets ceil(H/512) words (or is NULL). */
EPX_HD void epx_fp8_cast_token(const uint16_t *x, int hidden, int round_scale, uint8_t *out,
                               float *scales_f32, uint32_t *ue8m0_words) {
  int groups = hidden / EPX_FP8_GROUP;
  /* Words are cleared up front (not when their first group is reached), so
   * every word is written before it is read-modified. */
  if (ue8m0_words)
    for (int w = 0; w < (groups + EPX_UE8M0_PER_WORD - 1) / EPX_UE8M0_PER_WORD; ++w)
      ue8m0_words[w] = 0;
  for (int g = 0; g < groups; ++g) {
    const uint16_t *xg = x + g * EPX_FP8_GROUP;
    float amax = 0.0f;
    for (int i = 0; i < EPX_FP8_GROUP; ++i) {
      float a = epx_bf16_to_f32(xg[i]);
      a = a < 0.0f ? -a : a;
      if (a > amax) amax = a;
    }
    float scale = epx_fp8_group_scale(amax, round_scale);
    for (int i = 0; i < EPX_FP8_GROUP; ++i)
      out[g * EPX_FP8_GROUP + i] = epx_fp8_quantize(epx_bf16_to_f32(xg[i]), scale);
    if (scales_f32) scales_f32[g] = scale;
    if (ue8m0_words) {
      uint32_t shift = 8u * (uint32_t)(g % EPX_UE8M0_PER_WORD);
      ue8m0_words[g / EPX_UE8M0_PER_WORD] |= (uint32_t)epx_ue8m0_from_scale(scale) << shift;
    }
  }
}

#endif /* EPX_COMMON_NUMERICS_H */
