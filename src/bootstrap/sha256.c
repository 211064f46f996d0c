/*
 * sha256.c - SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), for the
 * bootstrap's challenge-response and frame MACs. Written out here so the
 * library needs no crypto dependency; speed matters little (the handshake MACs
 * plus one MAC per frame, over at most an all-gather result).
 */
#include <string.h>

#include "bootstrap/bootstrap.h"

typedef struct epxSha256 {
  uint32_t h[8];
  uint64_t total; /* bytes hashed so far */
  uint8_t block[64];
  size_t fill; /* bytes waiting in block */
} epxSha256;

static const uint32_t k_round[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u,
    0xab1c5ed5u, 0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu,
    0x9bdc06a7u, 0xc19bf174u, 0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu,
    0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau, 0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u,
    0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u, 0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu,
    0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u, 0xa2bfe8a1u, 0xa81a664bu,
    0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u, 0x19a4c116u,
    0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u,
    0xc67178f2u};

static uint32_t rotr(uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }

static void sha256_init(epxSha256 *s) {
  static const uint32_t iv[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                                 0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
  memcpy(s->h, iv, sizeof(iv));
  s->total = 0;
  s->fill = 0;
}

static void sha256_block(epxSha256 *s, const uint8_t *p) {
  uint32_t w[64];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 |
           (uint32_t)p[4 * i + 3];
  for (int i = 16; i < 64; i++) {
    uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
  uint32_t e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
  for (int i = 0; i < 64; i++) {
    uint32_t t1 =
        h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k_round[i] + w[i];
    uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  s->h[0] += a;
  s->h[1] += b;
  s->h[2] += c;
  s->h[3] += d;
  s->h[4] += e;
  s->h[5] += f;
  s->h[6] += g;
  s->h[7] += h;
}

static void sha256_update(epxSha256 *s, const void *data, size_t len) {
  const uint8_t *p = (const uint8_t *)data;
  s->total += len;
  while (len > 0) {
    if (s->fill == 0 && len >= 64) { /* whole blocks straight from the input */
      sha256_block(s, p);
      p += 64;
      len -= 64;
      continue;
    }
    size_t take = 64 - s->fill < len ? 64 - s->fill : len;
    memcpy(s->block + s->fill, p, take);
    s->fill += take;
    p += take;
    len -= take;
    if (s->fill == 64) {
      sha256_block(s, s->block);
      s->fill = 0;
    }
  }
}

static void sha256_final(epxSha256 *s, uint8_t out[32]) {
  uint64_t bits = s->total * 8;
  /* Padding: 0x80, zeros up to 56 mod 64, then the bit length big-endian. */
  uint8_t pad[72];
  size_t padlen = (s->fill < 56 ? 56 : 120) - s->fill;
  memset(pad, 0, sizeof(pad));
  pad[0] = 0x80;
  for (int i = 0; i < 8; i++) pad[padlen + (size_t)i] = (uint8_t)(bits >> (56 - 8 * i));
  sha256_update(s, pad, padlen + 8);
  for (int i = 0; i < 8; i++) {
    out[4 * i] = (uint8_t)(s->h[i] >> 24);
    out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
    out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
    out[4 * i + 3] = (uint8_t)s->h[i];
  }
}

void epx_sha256(const void *data, size_t len, uint8_t out[32]) {
  epxSha256 s;
  sha256_init(&s);
  sha256_update(&s, data, len);
  sha256_final(&s, out);
}

void epx_hmac_sha256_parts(const uint8_t *key, size_t keylen, const void *const *parts,
                           const size_t *lens, size_t nparts, uint8_t out[32]) {
  uint8_t k[64], pad[64], inner[32];
  memset(k, 0, sizeof(k));
  if (keylen > 64)
    epx_sha256(key, keylen, k); /* RFC 2104: long keys are hashed first */
  else if (keylen > 0)
    memcpy(k, key, keylen);

  epxSha256 s;
  for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
  sha256_init(&s);
  sha256_update(&s, pad, 64);
  for (size_t i = 0; i < nparts; i++)
    if (lens[i] > 0) sha256_update(&s, parts[i], lens[i]);
  sha256_final(&s, inner);

  for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
  sha256_init(&s);
  sha256_update(&s, pad, 64);
  sha256_update(&s, inner, 32);
  sha256_final(&s, out);

  /* The key material must not linger on the stack. */
  explicit_bzero(k, sizeof(k));
  explicit_bzero(pad, sizeof(pad));
  explicit_bzero(inner, sizeof(inner));
  explicit_bzero(&s, sizeof(s));
}

void epx_hmac_sha256(const uint8_t *key, size_t keylen, const void *data, size_t len,
                     uint8_t out[32]) {
  const void *parts[1] = {data};
  size_t lens[1] = {len};
  epx_hmac_sha256_parts(key, keylen, parts, lens, 1, out);
}
