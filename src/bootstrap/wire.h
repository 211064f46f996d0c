/*
 * wire.h - what the bootstrap puts on the wire: the unique id, the frame
 * header, the handshake messages and error frames. Pure functions with no I/O,
 * so the unit test and the fuzzer can drive them directly.
 *
 * Every integer is little-endian on the wire. A frame is a 16-byte header
 *   {magic u32, protocol version u16, type u16, rank u32, payload length u32}
 * followed by `length` payload bytes. The length limit depends on the type
 * (epx_bs_header_decode checks it before any payload is read).
 *
 * Handshake (root R, client C of rank r in nranks n, shared secret S):
 *   R -> C  CHALLENGE  root_nonce[16]
 *   C -> R  HELLO      client_nonce[16] nranks timeout_ms
 *                      HMAC(S, "epx-client" root_nonce client_nonce r n timeout_ms)
 *   R -> C  WELCOME    HMAC(S, "epx-root" client_nonce root_nonce r)
 *   R -> C  READY      (once all n ranks are in)
 * then rounds of C -> R DATA, R -> C RESULT (the concatenation), and at any
 * time R -> C ERROR {code u32, text} when the rendezvous fails.
 */
#ifndef EPX_BOOTSTRAP_WIRE_H
#define EPX_BOOTSTRAP_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "epx.h"

#define EPX_BS_ID_MAGIC 0x49585045u    /* "EPXI" as little-endian bytes */
#define EPX_BS_FRAME_MAGIC 0x42585045u /* "EPXB" */
#define EPX_BS_HEADER_BYTES 16
#define EPX_BS_SECRET_BYTES 16 /* 128-bit secret: the brute-force bar of reliability.md item 7 */
#define EPX_BS_NONCE_BYTES 16
#define EPX_BS_MAC_BYTES 32
#define EPX_BS_HELLO_BYTES (EPX_BS_NONCE_BYTES + 4 + 4 + EPX_BS_MAC_BYTES)
/* Longest error text a root sends (and a client accepts). */
#define EPX_BS_ERROR_TEXT_MAX 1024
#define EPX_BS_ERROR_MAX_PAYLOAD (4 + EPX_BS_ERROR_TEXT_MAX)
/* Rank field of frames sent before the peer's rank is known. */
#define EPX_BS_NO_RANK 0xffffffffu

typedef enum epxBsFrameType {
  EPX_BS_CHALLENGE = 1,
  EPX_BS_HELLO = 2,
  EPX_BS_WELCOME = 3,
  EPX_BS_READY = 4,
  EPX_BS_DATA = 5,
  EPX_BS_RESULT = 6,
  EPX_BS_ERROR = 7
} epxBsFrameType;
#define EPX_BS_TYPE_BIT(t) (1u << (unsigned)(t))

typedef struct epxBsHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t rank;
  uint32_t len;
} epxBsHeader;

typedef enum epxBsHeaderStatus {
  EPX_BS_HDR_OK = 0,
  EPX_BS_HDR_BAD_MAGIC,
  EPX_BS_HDR_BAD_VERSION,
  EPX_BS_HDR_BAD_TYPE,  /* unknown, or not expected at this point */
  EPX_BS_HDR_BAD_LENGTH /* over the type's bound, or not its fixed size */
} epxBsHeaderStatus;

void epx_bs_header_encode(uint8_t out[EPX_BS_HEADER_BYTES], epxBsFrameType type, uint32_t rank,
                          uint32_t len);
/* Decodes and checks a header: magic, version, type within `allowed`
 * (EPX_BS_TYPE_BIT mask), length within the type's bound; `nranks` bounds
 * RESULT frames. *h is filled even on failure (for messages). */
epxBsHeaderStatus epx_bs_header_decode(const uint8_t in[EPX_BS_HEADER_BYTES], uint32_t allowed,
                                       uint32_t nranks, epxBsHeader *h);
const char *epx_bs_header_status_str(epxBsHeaderStatus s);
/* Largest payload of a frame type; RESULT frames scale with nranks. */
uint32_t epx_bs_max_payload(epxBsFrameType type, uint32_t nranks);

/* ---- unique id ---- */

typedef struct epxBsAddr {
  uint16_t family;   /* 4 or 6 (not AF_*: the id must mean the same on every platform) */
  uint16_t port;     /* host order */
  uint32_t scope_id; /* IPv6 link-local scope; 0 otherwise */
  uint8_t addr[16];  /* IPv4 in the first 4 bytes */
} epxBsAddr;

void epx_bs_id_encode(epxUniqueId *id, const epxBsAddr *addr,
                      const uint8_t secret[EPX_BS_SECRET_BYTES]);
/* 0 on success; -1 with a message when the bytes are not a usable id. */
int epx_bs_id_decode(const epxUniqueId *id, epxBsAddr *addr, uint8_t secret[EPX_BS_SECRET_BYTES],
                     char *err, size_t errlen);

/* ---- handshake ---- */

typedef struct epxBsHello {
  uint8_t client_nonce[EPX_BS_NONCE_BYTES];
  uint32_t nranks;
  uint32_t timeout_ms; /* time the client will wait, so the root can explain a timeout first */
  uint8_t mac[EPX_BS_MAC_BYTES];
} epxBsHello;

void epx_bs_hello_encode(const epxBsHello *h, uint8_t out[EPX_BS_HELLO_BYTES]);
void epx_bs_hello_decode(const uint8_t in[EPX_BS_HELLO_BYTES], epxBsHello *h);
/* The client's proof: binds the root's nonce and every field of the HELLO. */
void epx_bs_client_mac(const uint8_t secret[EPX_BS_SECRET_BYTES],
                       const uint8_t root_nonce[EPX_BS_NONCE_BYTES], uint32_t rank,
                       const epxBsHello *h, uint8_t out[EPX_BS_MAC_BYTES]);
/* The root's proof, checked by the client: a fake root cannot feed it data. */
void epx_bs_root_mac(const uint8_t secret[EPX_BS_SECRET_BYTES],
                     const uint8_t client_nonce[EPX_BS_NONCE_BYTES],
                     const uint8_t root_nonce[EPX_BS_NONCE_BYTES], uint32_t rank,
                     uint8_t out[EPX_BS_MAC_BYTES]);
/* Constant-time comparison, so timing does not reveal how much of a MAC matched. */
int epx_bs_mac_equal(const uint8_t a[EPX_BS_MAC_BYTES], const uint8_t b[EPX_BS_MAC_BYTES]);

/* ---- error frames ---- */

/* Writes {code, msg (truncated)} into out (cap >= 4); returns the payload length. */
size_t epx_bs_error_encode(uint8_t *out, size_t cap, epxResult_t code, const char *msg);
/* Parses an error payload: a code outside the ones a root may send becomes
 * epxBootstrapError; the text is cut to msglen and non-printable bytes become '?'. */
epxResult_t epx_bs_error_decode(const uint8_t *in, size_t len, char *msg, size_t msglen);

/* Writes the ranks i < n with flags[i] == want as "0, 3-5, 9", cut short with
 * "..." when it would not fit. Returns how many ranks matched. */
int epx_bs_format_ranks(char *out, size_t cap, const uint8_t *flags, int n, uint8_t want);

#endif /* EPX_BOOTSTRAP_WIRE_H */
