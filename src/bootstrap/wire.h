/*
 * wire.h - what the bootstrap puts on the wire: the unique id, the frame
 * header, the handshake messages, the per-frame MACs and error frames. Pure
 * functions with no I/O, so the unit test and the fuzzer can drive them directly.
 *
 * Every integer is little-endian on the wire. A frame is a 16-byte header
 *   {magic u32, protocol version u16, type u16, rank u32, length u32}
 * followed by `length` bytes: the payload, then, on an authenticated frame
 * (below), a 32-byte MAC trailer; `length` counts both. The length limit
 * depends on the type (epx_bs_header_decode checks it before any byte after
 * the header is read).
 *
 * Handshake (root R, client C of rank r in nranks n, shared secret S):
 *   R -> C  CHALLENGE  root_nonce[16]
 *   C -> R  HELLO      client_nonce[16] nranks timeout_ms
 *                      HMAC(S, "epx-client" root_nonce client_nonce r n timeout_ms)
 *   R -> C  WELCOME    HMAC(S, "epx-root" client_nonce root_nonce r)
 *   R -> C  READY      (once all n ranks are in)
 * then rounds of C -> R DATA, R -> C RESULT (the concatenation), and at any
 * time R -> C ERROR {code u32, text} when the rendezvous fails.
 *
 * Session (protocol version 2). Once the root has verified a HELLO and the
 * client a WELCOME, both ends derive the connection's key
 *   K = HMAC(S, "epx-session" root_nonce client_nonce r n)    (r, n: u32)
 * and every later frame is authenticated: on the root's side every frame it
 * sends on the connection after its WELCOME (READY, RESULT, ERROR), on the
 * client's side every frame it sends after its HELLO (DATA). Such a frame ends
 * with the trailer
 *   HMAC(K, dir seq header payload)
 * dir: one byte, EPX_BS_DIR_TO_CLIENT or EPX_BS_DIR_TO_ROOT, so a frame cannot
 * be reflected back to its sender; seq: u64, the number of authenticated frames
 * sent before it in that direction on this connection (0, 1, 2, ...), so a
 * replayed, dropped or reordered frame fails; header: the 16 bytes as sent
 * (type, rank and length are covered). The receiver checks the trailer, in
 * constant time, before it uses any byte of the payload. The full 32 bytes
 * are sent (no truncation: the bootstrap moves little data, so the 16 bytes
 * saved per frame do not matter).
 *
 * Not authenticated: CHALLENGE, HELLO and WELCOME (they carry their own
 * proofs), and an ERROR that the root sends in place of a WELCOME (a refused
 * handshake: wrong secret, duplicate rank, rank count differs, rendezvous
 * already failed): the client cannot tell at that point whether it shares K
 * with the root, so that ERROR can only be a report, never trusted data. An
 * ERROR after the WELCOME must carry a valid trailer like any other frame.
 *
 * A failed check is hostile traffic on an admitted connection: the client
 * fails its init (epxBootstrapError, "frame authentication failed ..."); the
 * root counts it with the refused connections and fails the rendezvous, as it
 * does for any other bad frame from an admitted rank (that rank's stream can
 * no longer be trusted, and the rendezvous cannot complete without it).
 * Protocol version 1 had no session key and no trailers: mixed versions are
 * refused at the header's version check.
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
#define EPX_BS_KEY_BYTES 32 /* the session key K */
#define EPX_BS_HELLO_BYTES (EPX_BS_NONCE_BYTES + 4 + 4 + EPX_BS_MAC_BYTES)
/* Longest error text a root sends (and a client accepts). */
#define EPX_BS_ERROR_TEXT_MAX 1024
#define EPX_BS_ERROR_MAX_PAYLOAD (4 + EPX_BS_ERROR_TEXT_MAX)
/* Largest length field of an ERROR frame: the payload and, after the WELCOME, the trailer. */
#define EPX_BS_ERROR_MAX_LEN (EPX_BS_ERROR_MAX_PAYLOAD + EPX_BS_MAC_BYTES)
/* Version of the frame protocol (the header's version field). 2: frames after
 * the handshake carry a MAC trailer. The unique id's layout is unchanged and
 * keeps its own version (EPX_PROTOCOL_VERSION). */
#define EPX_BS_PROTOCOL_VERSION 2
/* The direction byte of a frame MAC. */
#define EPX_BS_DIR_TO_CLIENT 1 /* root -> client: READY, RESULT, ERROR */
#define EPX_BS_DIR_TO_ROOT 2   /* client -> root: DATA */
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
  EPX_BS_HDR_BAD_LENGTH /* over the type's bound, under its minimum, or not its fixed size */
} epxBsHeaderStatus;

void epx_bs_header_encode(uint8_t out[EPX_BS_HEADER_BYTES], epxBsFrameType type, uint32_t rank,
                          uint32_t len);
/* Decodes and checks a header: magic, version, type within `allowed`
 * (EPX_BS_TYPE_BIT mask), length within the type's bounds (READY, DATA and
 * RESULT frames are always authenticated, so at least EPX_BS_MAC_BYTES long);
 * `nranks` bounds RESULT frames. *h is filled even on failure (for messages). */
epxBsHeaderStatus epx_bs_header_decode(const uint8_t in[EPX_BS_HEADER_BYTES], uint32_t allowed,
                                       uint32_t nranks, epxBsHeader *h);
const char *epx_bs_header_status_str(epxBsHeaderStatus s);
/* Largest length field of a frame type (payload plus, where the type can be
 * authenticated, the MAC trailer); RESULT frames scale with nranks. */
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

/* ---- session: frame authentication ---- */

/* K = HMAC(S, "epx-session" root_nonce client_nonce rank nranks). */
void epx_bs_session_key(const uint8_t secret[EPX_BS_SECRET_BYTES],
                        const uint8_t root_nonce[EPX_BS_NONCE_BYTES],
                        const uint8_t client_nonce[EPX_BS_NONCE_BYTES], uint32_t rank,
                        uint32_t nranks, uint8_t key[EPX_BS_KEY_BYTES]);
/* The trailer of a frame: HMAC(K, dir seq(u64) hdr payload). */
void epx_bs_frame_mac(const uint8_t key[EPX_BS_KEY_BYTES], uint8_t dir, uint64_t seq,
                      const uint8_t hdr[EPX_BS_HEADER_BYTES], const void *payload, size_t len,
                      uint8_t mac[EPX_BS_MAC_BYTES]);
/* Encodes the header of an authenticated frame with `len` payload bytes (its
 * length field is len + EPX_BS_MAC_BYTES; len <= UINT32_MAX - EPX_BS_MAC_BYTES)
 * and computes its trailer. */
void epx_bs_frame_seal(const uint8_t key[EPX_BS_KEY_BYTES], uint8_t dir, uint64_t seq,
                       epxBsFrameType type, uint32_t rank, const void *payload, uint32_t len,
                       uint8_t hdr[EPX_BS_HEADER_BYTES], uint8_t mac[EPX_BS_MAC_BYTES]);
/* 1 when `mac` is the trailer of the frame {hdr, payload[len]} with sequence
 * number seq in direction dir (constant-time compare), else 0. */
int epx_bs_frame_check(const uint8_t key[EPX_BS_KEY_BYTES], uint8_t dir, uint64_t seq,
                       const uint8_t hdr[EPX_BS_HEADER_BYTES], const void *payload, size_t len,
                       const uint8_t mac[EPX_BS_MAC_BYTES]);

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
