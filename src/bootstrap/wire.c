/*
 * wire.c - encoding and checking of the bootstrap's unique id, frames and
 * handshake messages (format described in wire.h).
 */
#include "bootstrap/wire.h"

#include <stdio.h>
#include <string.h>

#include "bootstrap/bootstrap.h"
#include "core/internal.h"

/* Unique id layout (128 bytes). Bytes past EPX_ID_END are zero and ignored,
 * so a later version can extend the id. */
#define EPX_ID_MAGIC_OFF 0
#define EPX_ID_VERSION_OFF 4
#define EPX_ID_FAMILY_OFF 6
#define EPX_ID_PORT_OFF 8
#define EPX_ID_SCOPE_OFF 12
#define EPX_ID_ADDR_OFF 16
#define EPX_ID_SECRET_OFF 32
#define EPX_ID_END (EPX_ID_SECRET_OFF + EPX_BS_SECRET_BYTES)

_Static_assert(EPX_ID_END <= EPX_UNIQUE_ID_BYTES, "the unique id layout must fit its 128 bytes");

static void put16(uint8_t *p, uint16_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
}
static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (unsigned)p[1] << 8); }
static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void epx_bs_header_encode(uint8_t out[EPX_BS_HEADER_BYTES], epxBsFrameType type, uint32_t rank,
                          uint32_t len) {
  put32(out, EPX_BS_FRAME_MAGIC);
  put16(out + 4, EPX_BS_PROTOCOL_VERSION);
  put16(out + 6, (uint16_t)type);
  put32(out + 8, rank);
  put32(out + 12, len);
}

uint32_t epx_bs_max_payload(epxBsFrameType type, uint32_t nranks) {
  switch (type) {
    case EPX_BS_CHALLENGE:
      return EPX_BS_NONCE_BYTES;
    case EPX_BS_HELLO:
      return EPX_BS_HELLO_BYTES;
    case EPX_BS_WELCOME:
      return EPX_BS_MAC_BYTES;
    case EPX_BS_READY:
      return EPX_BS_MAC_BYTES; /* no payload, the trailer only */
    case EPX_BS_DATA:
      return EPX_BOOTSTRAP_MAX_PAYLOAD + EPX_BS_MAC_BYTES;
    case EPX_BS_RESULT: {
      uint64_t m = (uint64_t)EPX_BOOTSTRAP_MAX_PAYLOAD * nranks + EPX_BS_MAC_BYTES;
      return m > UINT32_MAX ? UINT32_MAX : (uint32_t)m;
    }
    case EPX_BS_ERROR:
      return EPX_BS_ERROR_MAX_LEN;
  }
  return 0;
}

/* Handshake frames and READY have one exact size; anything else is not ours. */
static int fixed_size(unsigned type) {
  return type == EPX_BS_CHALLENGE || type == EPX_BS_HELLO || type == EPX_BS_WELCOME ||
         type == EPX_BS_READY;
}

/* DATA and RESULT are only ever sent authenticated: at least the trailer.
 * (ERROR may come before the WELCOME, without one: its reader checks.) */
static uint32_t min_len(unsigned type) {
  return type == EPX_BS_DATA || type == EPX_BS_RESULT ? EPX_BS_MAC_BYTES : 0;
}

epxBsHeaderStatus epx_bs_header_decode(const uint8_t in[EPX_BS_HEADER_BYTES], uint32_t allowed,
                                       uint32_t nranks, epxBsHeader *h) {
  h->magic = get32(in);
  h->version = get16(in + 4);
  h->type = get16(in + 6);
  h->rank = get32(in + 8);
  h->len = get32(in + 12);
  if (h->magic != EPX_BS_FRAME_MAGIC) return EPX_BS_HDR_BAD_MAGIC;
  if (h->version != EPX_BS_PROTOCOL_VERSION) return EPX_BS_HDR_BAD_VERSION;
  if (h->type < EPX_BS_CHALLENGE || h->type > EPX_BS_ERROR || !(allowed & EPX_BS_TYPE_BIT(h->type)))
    return EPX_BS_HDR_BAD_TYPE;
  uint32_t max = epx_bs_max_payload((epxBsFrameType)h->type, nranks);
  if (h->len > max || h->len < min_len(h->type) || (fixed_size(h->type) && h->len != max))
    return EPX_BS_HDR_BAD_LENGTH;
  return EPX_BS_HDR_OK;
}

const char *epx_bs_header_status_str(epxBsHeaderStatus s) {
  switch (s) {
    case EPX_BS_HDR_OK:
      return "ok";
    case EPX_BS_HDR_BAD_MAGIC:
      return "not an epx bootstrap frame (bad magic)";
    case EPX_BS_HDR_BAD_VERSION:
      return "protocol version differs";
    case EPX_BS_HDR_BAD_TYPE:
      return "unexpected frame type";
    case EPX_BS_HDR_BAD_LENGTH:
      return "payload length out of bounds";
  }
  return "unknown header status";
}

void epx_bs_id_encode(epxUniqueId *id, const epxBsAddr *addr,
                      const uint8_t secret[EPX_BS_SECRET_BYTES]) {
  uint8_t *p = (uint8_t *)id->internal;
  memset(p, 0, EPX_UNIQUE_ID_BYTES);
  put32(p + EPX_ID_MAGIC_OFF, EPX_BS_ID_MAGIC);
  put16(p + EPX_ID_VERSION_OFF, EPX_PROTOCOL_VERSION);
  put16(p + EPX_ID_FAMILY_OFF, addr->family);
  put16(p + EPX_ID_PORT_OFF, addr->port);
  put32(p + EPX_ID_SCOPE_OFF, addr->scope_id);
  memcpy(p + EPX_ID_ADDR_OFF, addr->addr, 16);
  memcpy(p + EPX_ID_SECRET_OFF, secret, EPX_BS_SECRET_BYTES);
}

int epx_bs_id_decode(const epxUniqueId *id, epxBsAddr *addr, uint8_t secret[EPX_BS_SECRET_BYTES],
                     char *err, size_t errlen) {
  const uint8_t *p = (const uint8_t *)id->internal;
  uint32_t magic = get32(p + EPX_ID_MAGIC_OFF);
  uint16_t version = get16(p + EPX_ID_VERSION_OFF);
  if (magic != EPX_BS_ID_MAGIC) {
    snprintf(err, errlen,
             "the unique id is not an epx id (magic 0x%08x): pass the bytes epxGetUniqueId made, "
             "unchanged",
             magic);
    return -1;
  }
  if (version != EPX_PROTOCOL_VERSION) {
    snprintf(err, errlen,
             "the unique id was made by epx protocol version %u, this library speaks %u: every "
             "rank must load the same epx",
             version, EPX_PROTOCOL_VERSION);
    return -1;
  }
  memset(addr, 0, sizeof(*addr));
  addr->family = get16(p + EPX_ID_FAMILY_OFF);
  addr->port = get16(p + EPX_ID_PORT_OFF);
  addr->scope_id = get32(p + EPX_ID_SCOPE_OFF);
  memcpy(addr->addr, p + EPX_ID_ADDR_OFF, 16);
  if ((addr->family != 4 && addr->family != 6) || addr->port == 0) {
    snprintf(err, errlen, "the unique id is corrupt (address family %u, port %u)", addr->family,
             addr->port);
    return -1;
  }
  memcpy(secret, p + EPX_ID_SECRET_OFF, EPX_BS_SECRET_BYTES);
  return 0;
}

void epx_bs_hello_encode(const epxBsHello *h, uint8_t out[EPX_BS_HELLO_BYTES]) {
  memcpy(out, h->client_nonce, EPX_BS_NONCE_BYTES);
  put32(out + EPX_BS_NONCE_BYTES, h->nranks);
  put32(out + EPX_BS_NONCE_BYTES + 4, h->timeout_ms);
  memcpy(out + EPX_BS_NONCE_BYTES + 8, h->mac, EPX_BS_MAC_BYTES);
}

void epx_bs_hello_decode(const uint8_t in[EPX_BS_HELLO_BYTES], epxBsHello *h) {
  memcpy(h->client_nonce, in, EPX_BS_NONCE_BYTES);
  h->nranks = get32(in + EPX_BS_NONCE_BYTES);
  h->timeout_ms = get32(in + EPX_BS_NONCE_BYTES + 4);
  memcpy(h->mac, in + EPX_BS_NONCE_BYTES + 8, EPX_BS_MAC_BYTES);
}

/* Distinct labels keep a client's proof from ever being accepted as a root's. */
static const char k_client_label[] = "epx-client";
static const char k_root_label[] = "epx-root";

void epx_bs_client_mac(const uint8_t secret[EPX_BS_SECRET_BYTES],
                       const uint8_t root_nonce[EPX_BS_NONCE_BYTES], uint32_t rank,
                       const epxBsHello *h, uint8_t out[EPX_BS_MAC_BYTES]) {
  uint8_t msg[sizeof(k_client_label) - 1 + 2 * EPX_BS_NONCE_BYTES + 12];
  size_t n = 0;
  memcpy(msg + n, k_client_label, sizeof(k_client_label) - 1);
  n += sizeof(k_client_label) - 1;
  memcpy(msg + n, root_nonce, EPX_BS_NONCE_BYTES);
  n += EPX_BS_NONCE_BYTES;
  memcpy(msg + n, h->client_nonce, EPX_BS_NONCE_BYTES);
  n += EPX_BS_NONCE_BYTES;
  put32(msg + n, rank);
  put32(msg + n + 4, h->nranks);
  put32(msg + n + 8, h->timeout_ms);
  n += 12;
  epx_hmac_sha256(secret, EPX_BS_SECRET_BYTES, msg, n, out);
}

void epx_bs_root_mac(const uint8_t secret[EPX_BS_SECRET_BYTES],
                     const uint8_t client_nonce[EPX_BS_NONCE_BYTES],
                     const uint8_t root_nonce[EPX_BS_NONCE_BYTES], uint32_t rank,
                     uint8_t out[EPX_BS_MAC_BYTES]) {
  uint8_t msg[sizeof(k_root_label) - 1 + 2 * EPX_BS_NONCE_BYTES + 4];
  size_t n = 0;
  memcpy(msg + n, k_root_label, sizeof(k_root_label) - 1);
  n += sizeof(k_root_label) - 1;
  memcpy(msg + n, client_nonce, EPX_BS_NONCE_BYTES);
  n += EPX_BS_NONCE_BYTES;
  memcpy(msg + n, root_nonce, EPX_BS_NONCE_BYTES);
  n += EPX_BS_NONCE_BYTES;
  put32(msg + n, rank);
  n += 4;
  epx_hmac_sha256(secret, EPX_BS_SECRET_BYTES, msg, n, out);
}

int epx_bs_mac_equal(const uint8_t a[EPX_BS_MAC_BYTES], const uint8_t b[EPX_BS_MAC_BYTES]) {
  volatile uint8_t diff = 0;
  for (int i = 0; i < EPX_BS_MAC_BYTES; i++) diff |= (uint8_t)(a[i] ^ b[i]);
  return diff == 0;
}

static const char k_session_label[] = "epx-session";

void epx_bs_session_key(const uint8_t secret[EPX_BS_SECRET_BYTES],
                        const uint8_t root_nonce[EPX_BS_NONCE_BYTES],
                        const uint8_t client_nonce[EPX_BS_NONCE_BYTES], uint32_t rank,
                        uint32_t nranks, uint8_t key[EPX_BS_KEY_BYTES]) {
  uint8_t ids[8];
  put32(ids, rank);
  put32(ids + 4, nranks);
  const void *parts[4] = {k_session_label, root_nonce, client_nonce, ids};
  const size_t lens[4] = {sizeof(k_session_label) - 1, EPX_BS_NONCE_BYTES, EPX_BS_NONCE_BYTES,
                          sizeof ids};
  epx_hmac_sha256_parts(secret, EPX_BS_SECRET_BYTES, parts, lens, 4, key);
}

void epx_bs_frame_mac(const uint8_t key[EPX_BS_KEY_BYTES], uint8_t dir, uint64_t seq,
                      const uint8_t hdr[EPX_BS_HEADER_BYTES], const void *payload, size_t len,
                      uint8_t mac[EPX_BS_MAC_BYTES]) {
  uint8_t prefix[1 + 8];
  prefix[0] = dir;
  put64(prefix + 1, seq);
  const void *parts[3] = {prefix, hdr, payload};
  size_t lens[3] = {sizeof(prefix), EPX_BS_HEADER_BYTES, payload ? len : 0};
  epx_hmac_sha256_parts(key, EPX_BS_KEY_BYTES, parts, lens, 3, mac);
}

void epx_bs_frame_seal(const uint8_t key[EPX_BS_KEY_BYTES], uint8_t dir, uint64_t seq,
                       epxBsFrameType type, uint32_t rank, const void *payload, uint32_t len,
                       uint8_t hdr[EPX_BS_HEADER_BYTES], uint8_t mac[EPX_BS_MAC_BYTES]) {
  epx_bs_header_encode(hdr, type, rank, len + EPX_BS_MAC_BYTES);
  epx_bs_frame_mac(key, dir, seq, hdr, payload, len, mac);
}

int epx_bs_frame_check(const uint8_t key[EPX_BS_KEY_BYTES], uint8_t dir, uint64_t seq,
                       const uint8_t hdr[EPX_BS_HEADER_BYTES], const void *payload, size_t len,
                       const uint8_t mac[EPX_BS_MAC_BYTES]) {
  uint8_t want[EPX_BS_MAC_BYTES];
  epx_bs_frame_mac(key, dir, seq, hdr, payload, len, want);
  int ok = epx_bs_mac_equal(want, mac);
  explicit_bzero(want, sizeof(want));
  return ok;
}

size_t epx_bs_error_encode(uint8_t *out, size_t cap, epxResult_t code, const char *msg) {
  size_t n = msg ? strlen(msg) : 0;
  if (n > EPX_BS_ERROR_TEXT_MAX) n = EPX_BS_ERROR_TEXT_MAX;
  if (n > cap - 4) n = cap - 4;
  put32(out, (uint32_t)code);
  if (n > 0) memcpy(out + 4, msg, n);
  return 4 + n;
}

epxResult_t epx_bs_error_decode(const uint8_t *in, size_t len, char *msg, size_t msglen) {
  epxResult_t code = epxBootstrapError;
  size_t n = 0;
  if (len >= 4) {
    uint32_t c = get32(in);
    /* Only the codes a root sends; anything else would make a peer's bytes
     * choose our error class. */
    if (c == epxTimeout || c == epxPeerFailed || c == epxMismatch || c == epxBootstrapError ||
        c == epxOutOfMemory || c == epxInvalidArgument)
      code = (epxResult_t)c;
    for (size_t i = 4; i < len && n + 1 < msglen; i++) {
      uint8_t ch = in[i];
      msg[n++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
  }
  if (msglen > 0) msg[n] = '\0';
  return code;
}

int epx_bs_format_ranks(char *out, size_t cap, const uint8_t *flags, int n, uint8_t want) {
  int count = 0;
  size_t used = 0;
  int truncated = 0;
  if (cap == 0) return 0;
  out[0] = '\0';
  for (int i = 0; i < n; i++) {
    if (flags[i] != want) continue;
    int j = i;
    while (j + 1 < n && flags[j + 1] == want) j++;
    count += j - i + 1;
    if (!truncated) {
      char item[32];
      int len = (i == j) ? snprintf(item, sizeof(item), "%s%d", used ? ", " : "", i)
                         : snprintf(item, sizeof(item), "%s%d-%d", used ? ", " : "", i, j);
      /* Keep room for ", ..." so a cut list says it was cut. */
      if (used + (size_t)len + 6 < cap) {
        memcpy(out + used, item, (size_t)len + 1);
        used += (size_t)len;
      } else {
        truncated = 1;
        if (used + 6 <= cap) {
          memcpy(out + used, used ? ", ..." : "...", used ? 6 : 4);
          used += used ? 5 : 3;
        }
      }
    }
    i = j;
  }
  return count;
}
