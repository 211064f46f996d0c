/*
 * test_bootstrap.c - the rendezvous layer: SHA-256/HMAC vectors, the wire
 * format, the frame MACs (known answers from Python's hmac module), the root's
 * state machine driven in-process (including forged, altered and replayed DATA
 * frames), a fake root that forges frames toward a real client, the callback
 * bootstrap, and the TCP bootstrap with real processes (fork): all-gathers on
 * 1-8 ranks, a rank that never arrives, a wrong secret, duplicate ranks and a
 * wrong rank count, a rank that dies or leaves, the root's own deadline, a
 * forged DATA frame at a real root, and hostile traffic at the root's port
 * while a good init runs.
 *
 * Prints "FAIL ..." lines and exits nonzero when anything fails. Forked ranks
 * exit through exit(), so under ASan each of them is leak-checked too.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bootstrap/bootstrap.h"
#include "bootstrap/root.h"
#include "bootstrap/socket.h"
#include "bootstrap/wire.h"
#include "common/harness.h"
#include "core/internal.h"

static int g_failures;
static const char *g_where = "main"; /* scenario and rank, for messages from children */

#define CHECK(cond, ...) EPX_TEST_CHECK(g_failures, g_where, cond, __VA_ARGS__)

static int64_t ms_now(void) { return epx_now_ns() / 1000000; }
static int64_t deadline_from_now(int ms) { return epx_now_ns() + (int64_t)ms * 1000000LL; }

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

static void hex(const uint8_t *p, size_t n, char *out) {
  for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", p[i]);
}

/* ================================================================ SHA-256 */

static void check_sha(const void *data, size_t len, const char *want, const char *what) {
  uint8_t d[32];
  char got[65];
  epx_sha256(data, len, d);
  hex(d, 32, got);
  CHECK(strcmp(got, want) == 0, "sha256(%s) = %s, want %s", what, got, want);
}

static void check_hmac(const uint8_t *key, size_t keylen, const void *data, size_t len,
                       const char *want, const char *what) {
  uint8_t d[32];
  char got[65];
  epx_hmac_sha256(key, keylen, data, len, d);
  hex(d, 32, got);
  /* RFC 4231 case 5 gives only the first 128 bits. */
  CHECK(strncmp(got, want, strlen(want)) == 0, "hmac(%s) = %s, want %s", what, got, want);
}

static void sha256_fips_vectors(void) {
  g_where = "sha256";
  check_sha("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "empty");
  check_sha("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "abc");
  const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  check_sha(m448, strlen(m448), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            "448 bits");
  const char *m896 =
      "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrl"
      "mnopqrsmnopqrstnopqrstu";
  check_sha(m896, strlen(m896), "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
            "896 bits");
  char *million = (char *)malloc(1000000);
  memset(million, 'a', 1000000);
  check_sha(million, 1000000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
            "1e6 x 'a'");
  free(million);
  /* Padding boundaries (55/56 bytes: one or two final blocks), values from
   * an independent implementation (Python hashlib). */
  uint8_t pat[200];
  for (int i = 0; i < 200; i++) pat[i] = (uint8_t)(i * 7 + 3);
  static const struct {
    size_t n;
    const char *want;
  } edges[] = {{55, "e7313d333c272e639f790978283f9eb392e843d0f29b7016828bb1daa4aac70b"},
               {56, "4324d65f3c103567f5589c710bc08f8523f929a9272e3af36fc968e52abc6c27"},
               {63, "81c80242132f230c3bd41b3e63bbcff16107339549214a99614ff26664625055"},
               {64, "39e3d7b6b5d075d37d053ad89b24b41bef4f3c29760c84447cab3f3be1882241"},
               {65, "aacca6ff74fdbb296d165a45cecfa04e5127bc008770fbbdd48006f2d2fae95e"},
               {119, "9ce7368e4daf32341631b492e80359dc9f594b48453cd0dd5bf0b19279cc177e"},
               {120, "7836b787757e95e58b3ca5aec90b1b004e8deba1e50e9675af9cabf1a13a04b5"},
               {128, "d2742f1f4ac6bb7ca2b239ee18402ba8b3f9f8e652d2a72973c2b9ba11c08cf6"}};
  for (size_t i = 0; i < sizeof(edges) / sizeof(edges[0]); i++) {
    char what[32];
    snprintf(what, sizeof(what), "%zu pattern bytes", edges[i].n);
    check_sha(pat, edges[i].n, edges[i].want, what);
  }
}

static void hmac_rfc4231_vectors(void) {
  g_where = "hmac";
  uint8_t k0b[20], kaa[131], k25[25], k0c[20], daa[50], dcd[50];
  memset(k0b, 0x0b, sizeof(k0b));
  memset(kaa, 0xaa, sizeof(kaa));
  memset(k0c, 0x0c, sizeof(k0c));
  memset(daa, 0xdd, sizeof(daa));
  memset(dcd, 0xcd, sizeof(dcd));
  for (int i = 0; i < 25; i++) k25[i] = (uint8_t)(i + 1);
  check_hmac(k0b, 20, "Hi There", 8,
             "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7", "case 1");
  check_hmac((const uint8_t *)"Jefe", 4, "what do ya want for nothing?", 28,
             "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843", "case 2");
  check_hmac(kaa, 20, daa, 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
             "case 3");
  check_hmac(k25, 25, dcd, 50, "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
             "case 4");
  check_hmac(k0c, 20, "Test With Truncation", 20, "a3b6167473100ee06e0c796c2955552b", "case 5");
  const char *d6 = "Test Using Larger Than Block-Size Key - Hash Key First";
  check_hmac(kaa, 131, d6, strlen(d6),
             "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54", "case 6");
  const char *d7 =
      "This is a test using a larger than block-size key and a larger than block-size data. The "
      "key needs to be hashed before being used by the HMAC algorithm.";
  check_hmac(kaa, 131, d7, strlen(d7),
             "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2", "case 7");
}

/* ================================================================== wire */

static void wire_format_checks(void) {
  g_where = "wire";
  uint8_t hdr[EPX_BS_HEADER_BYTES];
  epxBsHeader h;
  const uint32_t data = EPX_BS_TYPE_BIT(EPX_BS_DATA);

  epx_bs_header_encode(hdr, EPX_BS_DATA, 3, 100);
  CHECK(epx_bs_header_decode(hdr, data, 4, &h) == EPX_BS_HDR_OK, "valid DATA header refused");
  CHECK(h.rank == 3 && h.len == 100 && h.type == EPX_BS_DATA, "header fields lost");
  CHECK(hdr[0] == 'E' && hdr[1] == 'P' && hdr[2] == 'X' && hdr[3] == 'B', "magic bytes");
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_HELLO), 4, &h) == EPX_BS_HDR_BAD_TYPE,
        "DATA accepted where only HELLO is expected");

  /* Length bounds count the MAC trailer of authenticated frames. */
  epx_bs_header_encode(hdr, EPX_BS_DATA, 0, EPX_BOOTSTRAP_MAX_PAYLOAD + EPX_BS_MAC_BYTES);
  CHECK(epx_bs_header_decode(hdr, data, 4, &h) == EPX_BS_HDR_OK, "largest upload refused");
  epx_bs_header_encode(hdr, EPX_BS_DATA, 0, EPX_BOOTSTRAP_MAX_PAYLOAD + EPX_BS_MAC_BYTES + 1);
  CHECK(epx_bs_header_decode(hdr, data, 4, &h) == EPX_BS_HDR_BAD_LENGTH, "oversized upload");
  epx_bs_header_encode(hdr, EPX_BS_DATA, 0, EPX_BS_MAC_BYTES - 1);
  CHECK(epx_bs_header_decode(hdr, data, 4, &h) == EPX_BS_HDR_BAD_LENGTH,
        "DATA too short for its MAC");
  epx_bs_header_encode(hdr, EPX_BS_DATA, 0, 0x80000000u);
  CHECK(epx_bs_header_decode(hdr, data, 4, &h) == EPX_BS_HDR_BAD_LENGTH, "2 GB length");
  epx_bs_header_encode(hdr, EPX_BS_HELLO, 0, EPX_BS_HELLO_BYTES - 1);
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_HELLO), 0, &h) == EPX_BS_HDR_BAD_LENGTH,
        "short HELLO");
  epx_bs_header_encode(hdr, EPX_BS_RESULT, 0, 4 * EPX_BOOTSTRAP_MAX_PAYLOAD + EPX_BS_MAC_BYTES);
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_RESULT), 4, &h) == EPX_BS_HDR_OK,
        "RESULT of 4 full parts");
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_RESULT), 3, &h) == EPX_BS_HDR_BAD_LENGTH,
        "RESULT larger than nranks parts");
  epx_bs_header_encode(hdr, EPX_BS_RESULT, 0, 4 * EPX_BOOTSTRAP_MAX_PAYLOAD + EPX_BS_MAC_BYTES + 1);
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_RESULT), 4, &h) == EPX_BS_HDR_BAD_LENGTH,
        "RESULT over 4 parts and a MAC");
  epx_bs_header_encode(hdr, EPX_BS_READY, 0, 0);
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_READY), 4, &h) == EPX_BS_HDR_BAD_LENGTH,
        "READY without its MAC");
  epx_bs_header_encode(hdr, EPX_BS_READY, 0, EPX_BS_MAC_BYTES);
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_READY), 4, &h) == EPX_BS_HDR_OK,
        "READY with its MAC refused");
  epx_bs_header_encode(hdr, EPX_BS_ERROR, 0, EPX_BS_ERROR_MAX_LEN);
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_ERROR), 4, &h) == EPX_BS_HDR_OK,
        "longest authenticated ERROR refused");
  epx_bs_header_encode(hdr, EPX_BS_ERROR, 0, EPX_BS_ERROR_MAX_LEN + 1);
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_ERROR), 4, &h) == EPX_BS_HDR_BAD_LENGTH,
        "overlong ERROR");
  /* Mixed versions: a frame of protocol version 1 (no MACs) is refused at the header. */
  CHECK(EPX_BS_PROTOCOL_VERSION == 2, "bootstrap protocol version %d", EPX_BS_PROTOCOL_VERSION);
  epx_bs_header_encode(hdr, EPX_BS_CHALLENGE, EPX_BS_NO_RANK, EPX_BS_NONCE_BYTES);
  CHECK(hdr[4] == EPX_BS_PROTOCOL_VERSION && hdr[5] == 0, "version bytes %u %u", hdr[4], hdr[5]);
  hdr[4] = 1;
  CHECK(epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_CHALLENGE), 4, &h) ==
                EPX_BS_HDR_BAD_VERSION &&
            h.version == 1,
        "a version 1 CHALLENGE accepted");
  epx_bs_header_encode(hdr, EPX_BS_DATA, 0, 1);
  hdr[0] ^= 1;
  CHECK(epx_bs_header_decode(hdr, data, 4, &h) == EPX_BS_HDR_BAD_MAGIC, "bad magic");
  hdr[0] ^= 1;
  hdr[4] ^= 0x40;
  CHECK(epx_bs_header_decode(hdr, data, 4, &h) == EPX_BS_HDR_BAD_VERSION, "bad version");
  hdr[4] ^= 0x40;
  hdr[6] = 99;
  CHECK(epx_bs_header_decode(hdr, 0xffffffffu, 4, &h) == EPX_BS_HDR_BAD_TYPE, "unknown type");

  /* Unique id round trip and rejection of foreign bytes. */
  epxUniqueId id;
  epxBsAddr a = {4, 4242, 0, {10, 1, 2, 3}}, b;
  uint8_t secret[16], secret2[16];
  char err[256];
  for (int i = 0; i < 16; i++) secret[i] = (uint8_t)(0xa0 + i);
  epx_bs_id_encode(&id, &a, secret);
  CHECK(epx_bs_id_decode(&id, &b, secret2, err, sizeof(err)) == 0, "id decode: %s", err);
  CHECK(b.family == 4 && b.port == 4242 && memcmp(b.addr, a.addr, 16) == 0 &&
            memcmp(secret, secret2, 16) == 0,
        "id round trip");
  epxUniqueId zero;
  memset(&zero, 0, sizeof(zero));
  CHECK(epx_bs_id_decode(&zero, &b, secret2, err, sizeof(err)) != 0 && strstr(err, "not an epx"),
        "zero id accepted: %s", err);

  /* Error frames: unknown codes and control bytes do not pass through. */
  uint8_t payload[EPX_BS_ERROR_MAX_PAYLOAD];
  char msg[64];
  size_t n = epx_bs_error_encode(payload, sizeof(payload), epxTimeout, "late\x1b[2J rank");
  CHECK(epx_bs_error_decode(payload, n, msg, sizeof(msg)) == epxTimeout, "code lost");
  CHECK(strcmp(msg, "late?[2J rank") == 0, "text not sanitised: %s", msg);
  payload[0] = 77;
  CHECK(epx_bs_error_decode(payload, n, msg, sizeof(msg)) == epxBootstrapError,
        "foreign code accepted");
  CHECK(epx_bs_error_decode(payload, 2, msg, sizeof(msg)) == epxBootstrapError && msg[0] == 0,
        "short error payload");

  /* Rank lists: ranges, and a visible cut when long. */
  uint8_t flags[20] = {0};
  flags[3] = flags[5] = flags[6] = flags[7] = flags[19] = 1;
  char list[64];
  CHECK(
      epx_bs_format_ranks(list, sizeof(list), flags, 20, 1) == 5 && strcmp(list, "3, 5-7, 19") == 0,
      "rank list: '%s'", list);
  uint8_t many[1000];
  for (int i = 0; i < 1000; i++) many[i] = (uint8_t)(i % 2);
  CHECK(epx_bs_format_ranks(list, 40, many, 1000, 1) == 500 && strstr(list, "...") &&
            strlen(list) < 40,
        "long rank list: '%s'", list);
}

/* ============================================================= frame MACs */

static void unhex(const char *h, uint8_t *out, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned v = 0;
    sscanf(h + 2 * i, "%2x", &v);
    out[i] = (uint8_t)v;
  }
}

/* Expected values computed with Python's hmac/hashlib/struct (an independent
 * implementation of HMAC-SHA256 and of the byte layout in wire.h):
 *   sec = bytes(range(16)); rn = bytes(range(16, 32)); cn = bytes(range(32, 48))
 *   K = hmac.new(sec, b"epx-session" + rn + cn + struct.pack("<II", 3, 8), sha256)
 *   hdr(t, rank, n) = struct.pack("<IHHII", 0x42585045, 2, t, rank, n)
 *   mac(d, seq, h, p) = hmac.new(K, bytes([d]) + struct.pack("<Q", seq) + h + p, sha256) */
static void frame_mac_checks(void) {
  g_where = "frame-mac";
  uint8_t secret[16], rn[16], cn[16], key[32], want[32], hdr[EPX_BS_HEADER_BYTES], mac[32];
  char got[65];
  for (int i = 0; i < 16; i++) {
    secret[i] = (uint8_t)i;
    rn[i] = (uint8_t)(16 + i);
    cn[i] = (uint8_t)(32 + i);
  }
  epx_bs_session_key(secret, rn, cn, 3, 8, key);
  hex(key, 32, got);
  CHECK(strcmp(got, "7b86ecc8b9e260e3718f85451ea561303656879b470b48d8e64a42953089ddff") == 0,
        "session key %s", got);

  /* RESULT, root -> client, seq 5, payload "abcd": header bytes and trailer. */
  epx_bs_frame_seal(key, EPX_BS_DIR_TO_CLIENT, 5, EPX_BS_RESULT, 3, "abcd", 4, hdr, mac);
  hex(hdr, EPX_BS_HEADER_BYTES, got);
  CHECK(strcmp(got, "45505842020006000300000024000000") == 0, "sealed RESULT header %s", got);
  hex(mac, 32, got);
  CHECK(strcmp(got, "965d827e2b387f72ebae95a4e08061a51785dc3a18662768ab91fb8e877247d2") == 0,
        "RESULT trailer %s", got);
  /* DATA, client -> root, a sequence number that shows the u64 byte order. */
  uint8_t pay[100];
  for (int i = 0; i < 100; i++) pay[i] = (uint8_t)(i * 13 + 1);
  epx_bs_frame_seal(key, EPX_BS_DIR_TO_ROOT, 0x0102030405060708ull, EPX_BS_DATA, 3, pay, 100, hdr,
                    mac);
  unhex("2e44df9285ba4effc369dc619799bf4e1b8cdf0f9d44a96da9ceb5fc4ac028b6", want, 32);
  CHECK(memcmp(mac, want, 32) == 0, "DATA trailer");
  CHECK(epx_bs_frame_check(key, EPX_BS_DIR_TO_ROOT, 0x0102030405060708ull, hdr, pay, 100, want),
        "the known DATA trailer does not verify");
  /* READY: no payload, the trailer only. */
  epx_bs_frame_seal(key, EPX_BS_DIR_TO_CLIENT, 0, EPX_BS_READY, 3, NULL, 0, hdr, mac);
  hex(mac, 32, got);
  CHECK(strcmp(got, "dbec129db32d45d0572ba89531396227d1471b1abff210d25fbc6fc5c3669624") == 0,
        "READY trailer %s", got);

  /* The multi-part HMAC equals the one-shot HMAC of the concatenation, at
   * every split point (block boundaries included). */
  uint8_t buf[200], one[32], parts_mac[32];
  for (int i = 0; i < 200; i++) buf[i] = (uint8_t)(i * 31 + 7);
  epx_hmac_sha256(key, 32, buf, sizeof(buf), one);
  int bad_split = -1;
  for (size_t a = 0; a <= sizeof(buf); a += 9) {
    for (size_t b = a; b <= sizeof(buf); b += 23) {
      const void *parts[3] = {buf, buf + a, buf + b};
      size_t lens[3] = {a, b - a, sizeof(buf) - b};
      epx_hmac_sha256_parts(key, 32, parts, lens, 3, parts_mac);
      if (memcmp(one, parts_mac, 32) != 0) bad_split = (int)(a * 1000 + b);
    }
  }
  CHECK(bad_split < 0, "multi-part HMAC differs at split %d", bad_split);

  /* Any change to what the trailer covers makes the check fail. */
  epx_bs_frame_seal(key, EPX_BS_DIR_TO_ROOT, 7, EPX_BS_DATA, 3, pay, 100, hdr, mac);
  CHECK(epx_bs_frame_check(key, EPX_BS_DIR_TO_ROOT, 7, hdr, pay, 100, mac), "sealed frame refused");
  CHECK(!epx_bs_frame_check(key, EPX_BS_DIR_TO_CLIENT, 7, hdr, pay, 100, mac),
        "accepted in the other direction (reflection)");
  CHECK(!epx_bs_frame_check(key, EPX_BS_DIR_TO_ROOT, 6, hdr, pay, 100, mac) &&
            !epx_bs_frame_check(key, EPX_BS_DIR_TO_ROOT, 8, hdr, pay, 100, mac),
        "accepted under another sequence number (replay)");
  int missed = 0;
  for (int i = 0; i < EPX_BS_HEADER_BYTES; i++) {
    hdr[i] ^= 0x01;
    missed += epx_bs_frame_check(key, EPX_BS_DIR_TO_ROOT, 7, hdr, pay, 100, mac);
    hdr[i] ^= 0x01;
  }
  for (int i = 0; i < 100; i++) {
    pay[i] ^= 0x80;
    missed += epx_bs_frame_check(key, EPX_BS_DIR_TO_ROOT, 7, hdr, pay, 100, mac);
    pay[i] ^= 0x80;
  }
  for (int i = 0; i < 32; i++) {
    mac[i] ^= 0x10;
    missed += epx_bs_frame_check(key, EPX_BS_DIR_TO_ROOT, 7, hdr, pay, 100, mac);
    mac[i] ^= 0x10;
  }
  CHECK(missed == 0, "%d one-bit changes of header, payload or trailer went unnoticed", missed);
  CHECK(!epx_bs_frame_check(key, EPX_BS_DIR_TO_ROOT, 7, hdr, pay, 99, mac), "truncated payload");
  uint8_t key2[32];
  epx_bs_session_key(secret, rn, cn, 4, 8, key2); /* another rank's connection */
  CHECK(memcmp(key, key2, 32) != 0 &&
            !epx_bs_frame_check(key2, EPX_BS_DIR_TO_ROOT, 7, hdr, pay, 100, mac),
        "a frame of one connection verifies on another");
  epx_bs_session_key(secret, rn, cn, 3, 9, key2);
  CHECK(memcmp(key, key2, 32) != 0, "the session key ignores nranks");
  cn[15] ^= 1;
  epx_bs_session_key(secret, rn, cn, 3, 8, key2);
  CHECK(memcmp(key, key2, 32) != 0, "the session key ignores the client nonce");
}

/* ======================================================= root, in-process */

/* The client's side of one connection to an in-process root: the session
 * key the client derives on its own (from the secret and both nonces, as
 * tcp.c does), and its sequence numbers. */
typedef struct Peer {
  uint8_t key[EPX_BS_KEY_BYTES];
  uint64_t tx, rx;
} Peer;

/* Feeds a valid HELLO for `rank` of `nranks`, answering c's challenge; fills
 * *p (if given) with the client's session. */
static void feed_hello(epxRoot *r, epxRootConn *c, const uint8_t *secret, uint32_t rank,
                       uint32_t nranks, int64_t now, Peer *p) {
  epxBsHello hello;
  memset(&hello, 0, sizeof(hello));
  hello.client_nonce[0] = (uint8_t)rank;
  hello.client_nonce[1] = 0x5a;
  hello.nranks = nranks;
  hello.timeout_ms = 10000;
  epx_bs_client_mac(secret, c->nonce, rank, &hello, hello.mac);
  uint8_t frame[EPX_BS_HEADER_BYTES + EPX_BS_HELLO_BYTES];
  epx_bs_header_encode(frame, EPX_BS_HELLO, rank, EPX_BS_HELLO_BYTES);
  epx_bs_hello_encode(&hello, frame + EPX_BS_HEADER_BYTES);
  if (p) {
    epx_bs_session_key(secret, c->nonce, hello.client_nonce, rank, nranks, p->key);
    p->tx = p->rx = 0;
  }
  /* In two pieces, as a socket may deliver it. */
  epx_root_input(r, c, frame, 7, now);
  epx_root_input(r, c, frame + 7, sizeof(frame) - 7, now);
}

/* Builds an authenticated DATA frame (header, payload, trailer) into out;
 * returns its size. */
static size_t seal_data(Peer *p, uint32_t rank, const void *data, uint32_t len, uint8_t *out) {
  uint8_t mac[EPX_BS_MAC_BYTES];
  epx_bs_frame_seal(p->key, EPX_BS_DIR_TO_ROOT, p->tx++, EPX_BS_DATA, rank, data, len, out, mac);
  if (len) memcpy(out + EPX_BS_HEADER_BYTES, data, len);
  memcpy(out + EPX_BS_HEADER_BYTES + len, mac, EPX_BS_MAC_BYTES);
  return EPX_BS_HEADER_BYTES + len + EPX_BS_MAC_BYTES;
}

static void feed_data(epxRoot *r, epxRootConn *c, Peer *p, uint32_t rank, const void *data,
                      uint32_t len, int64_t now) {
  uint8_t frame[EPX_BS_HEADER_BYTES + 64 + EPX_BS_MAC_BYTES];
  if (len > 64) return;
  size_t n = seal_data(p, rank, data, len, frame);
  /* Header, payload and trailer in separate reads. */
  epx_root_input(r, c, frame, EPX_BS_HEADER_BYTES, now);
  if (len) epx_root_input(r, c, frame + EPX_BS_HEADER_BYTES, len, now);
  epx_root_input(r, c, frame + EPX_BS_HEADER_BYTES + len, n - EPX_BS_HEADER_BYTES - len, now);
}

static int last_type(const epxRootConn *c) {
  if (!c->out_tail) return -1;
  return c->out_tail->hdr[6] | c->out_tail->hdr[7] << 8;
}

/* Whether the last frame queued on c is authenticated for client p (with
 * p's next receive sequence number, which it then advances). */
static int last_authentic(const epxRootConn *c, Peer *p) {
  const epxBsOut *o = c->out_tail;
  if (!o || !o->has_mac) return 0;
  uint32_t len = o->payload ? o->payload->len : 0;
  if ((uint32_t)(o->hdr[12] | o->hdr[13] << 8 | o->hdr[14] << 16 | (uint32_t)o->hdr[15] << 24) !=
      len + EPX_BS_MAC_BYTES)
    return 0;
  return epx_bs_frame_check(p->key, EPX_BS_DIR_TO_CLIENT, p->rx++, o->hdr,
                            o->payload ? o->payload->data : NULL, len, o->mac);
}

static void root_state_machine(void) {
  g_where = "root-state";
  uint8_t secret[16];
  memset(secret, 7, sizeof(secret));
  int64_t t = 1000000000LL;
  epxRoot *r = epx_root_new(secret, -1, t + 60000000000LL);
  CHECK(r != NULL, "root_new");
  if (!r) return;
  epxRootConn *c0 = epx_root_add_conn(r, -1, "c0", t);
  epxRootConn *c1 = epx_root_add_conn(r, -1, "c1", t);
  epxRootConn *bad = epx_root_add_conn(r, -1, "bad", t);
  epxRootConn *huge = epx_root_add_conn(r, -1, "huge", t);
  CHECK(last_type(c0) == EPX_BS_CHALLENGE && !c0->out_tail->has_mac, "no plain challenge queued");

  uint8_t wrong[16];
  memset(wrong, 8, sizeof(wrong));
  feed_hello(r, bad, wrong, 0, 2, t, NULL);
  CHECK(bad->state == EPX_RC_CLOSING && last_type(bad) == EPX_BS_ERROR, "wrong MAC admitted");
  CHECK(!bad->out_tail->has_mac, "a refusal before the WELCOME carries a MAC");
  uint8_t hdr[EPX_BS_HEADER_BYTES];
  epx_bs_header_encode(hdr, EPX_BS_HELLO, 0, 0x7fffffffu);
  epx_root_input(r, huge, hdr, sizeof(hdr), t);
  CHECK(huge->state == EPX_RC_CLOSING && huge->payload == NULL, "2 GB HELLO not refused");
  CHECK(r->refused == 2, "refusals counted: %llu", (unsigned long long)r->refused);

  Peer p0, p1;
  feed_hello(r, c0, secret, 0, 2, t, &p0);
  CHECK(c0->state == EPX_RC_RANK && r->phase == EPX_ROOT_GATHER, "rank 0 not admitted");
  CHECK(last_type(c0) == EPX_BS_WELCOME && !c0->out_tail->has_mac, "WELCOME missing or MACed");
  epxRootConn *dup = epx_root_add_conn(r, -1, "dup", t);
  feed_hello(r, dup, secret, 0, 2, t, NULL);
  CHECK(dup->state == EPX_RC_CLOSING, "duplicate rank 0 admitted");
  epxRootConn *mis = epx_root_add_conn(r, -1, "mis", t);
  feed_hello(r, mis, secret, 1, 3, t, NULL);
  CHECK(mis->state == EPX_RC_CLOSING, "nranks 3 admitted into a 2-rank rendezvous");
  feed_hello(r, c1, secret, 1, 2, t, &p1);
  CHECK(r->phase == EPX_ROOT_RUNNING && last_type(c0) == EPX_BS_READY &&
            last_type(c1) == EPX_BS_READY,
        "READY not sent to both ranks");
  CHECK(last_authentic(c0, &p0) && last_authentic(c1, &p1),
        "READY not authenticated under the keys the clients derive");

  for (size_t i = 0; i < r->nconns; i++) epx_root_flush(r, r->conns[i], t);
  epx_root_sweep(r);
  feed_data(r, c0, &p0, 0, "ab", 2, t);
  CHECK(r->round_count == 1 && c0->out_head == NULL, "round completed early");
  feed_data(r, c1, &p1, 1, "cd", 2, t);
  CHECK(r->round == 1 && last_type(c0) == EPX_BS_RESULT && last_type(c1) == EPX_BS_RESULT,
        "round 1 not relayed");
  CHECK(c0->out_tail && c0->out_tail->payload && c0->out_tail->payload == c1->out_tail->payload &&
            memcmp(c0->out_tail->payload->data, "abcd", 4) == 0,
        "round 1 result wrong");
  CHECK(last_authentic(c0, &p0) && last_authentic(c1, &p1), "RESULT not authenticated (seq 1)");
  epx_root_flush(r, c0, t);
  epx_root_flush(r, c1, t);

  /* A rank's deadline passing while it waits fails the session for everyone. */
  feed_data(r, c0, &p0, 0, "x", 1, t);
  epx_root_tick(r, t + 10001000000LL); /* HELLO said timeout_ms = 10000 */
  CHECK(r->phase == EPX_ROOT_FAILED && c0->state == EPX_RC_CLOSING && c1->state == EPX_RC_CLOSING,
        "deadline did not fail the round (phase %d)", (int)r->phase);
  CHECK(strstr(r->fail_msg, "missing ranks: 1") != NULL, "message: %s", r->fail_msg);
  CHECK(last_type(c1) == EPX_BS_ERROR && last_authentic(c1, &p1),
        "the ERROR after the WELCOME is not authenticated");
  epx_root_free(r);
}

/* ---- frames altered or replayed on the way to the root ---- */

/* A root with ranks 0 and 1 of 2 admitted and their READY written. */
static epxRoot *two_rank_root(const uint8_t *secret, int64_t t, epxRootConn **c, Peer *p) {
  epxRoot *r = epx_root_new(secret, -1, t + 60000000000LL);
  if (!r) return NULL;
  for (int i = 0; i < 2; i++) {
    c[i] = epx_root_add_conn(r, -1, i ? "rank1" : "rank0", t);
    feed_hello(r, c[i], secret, (uint32_t)i, 2, t, &p[i]);
  }
  for (int i = 0; i < 2; i++) {
    last_authentic(c[i], &p[i]); /* READY: seq 0 */
    epx_root_flush(r, c[i], t);
  }
  if (r->phase != EPX_ROOT_RUNNING) {
    epx_root_free(r);
    return NULL;
  }
  return r;
}

/* The root refused a frame on rank 0's connection: counted, nothing of it
 * used, the session failed with the reason, and rank 1 told in an
 * authenticated ERROR. */
static void expect_auth_refusal(epxRoot *r, epxRootConn **c, Peer *p, uint64_t refused_before,
                                uint64_t rounds, const char *what) {
  CHECK(r->phase == EPX_ROOT_FAILED, "%s: accepted (phase %d)", what, (int)r->phase);
  CHECK(strstr(r->fail_msg, "frame authentication failed") && strstr(r->fail_msg, "rank 0"),
        "%s: message: %s", what, r->fail_msg);
  CHECK(r->refused == refused_before + 1, "%s: not counted (%llu refused)", what,
        (unsigned long long)r->refused);
  CHECK(r->round == rounds && r->round_count == 0 && r->round_buf == NULL,
        "%s: the frame's data was used (round %llu, %d parts)", what, (unsigned long long)r->round,
        r->round_count);
  CHECK(c[1]->state == EPX_RC_CLOSING && last_type(c[1]) == EPX_BS_ERROR &&
            last_authentic(c[1], &p[1]),
        "%s: rank 1 not told in an authenticated ERROR", what);
}

/* Rank 0's first DATA frame ("abcd") with byte `at` of the sealed frame
 * (header, payload, trailer; negative: from its end) XORed with `bits`. */
static void flipped_data_refused(const uint8_t *secret, int64_t t, long at, uint8_t bits,
                                 const char *what) {
  uint8_t frame[EPX_BS_HEADER_BYTES + 64 + EPX_BS_MAC_BYTES];
  epxRootConn *c[2];
  Peer p[2];
  epxRoot *r = two_rank_root(secret, t, c, p);
  CHECK(r != NULL, "setup (%s)", what);
  if (!r) return;
  size_t n = seal_data(&p[0], 0, "abcd", 4, frame);
  frame[at >= 0 ? (size_t)at : n - (size_t)(-at)] ^= bits;
  epx_root_input(r, c[0], frame, n, t);
  expect_auth_refusal(r, c, p, 0, 0, what);
  epx_root_free(r);
}

static void root_frame_auth(void) {
  g_where = "root-auth";
  uint8_t secret[16];
  uint8_t frame[EPX_BS_HEADER_BYTES + 64 + EPX_BS_MAC_BYTES];
  memset(secret, 9, sizeof(secret));
  int64_t t = 1000000000LL;
  epxRootConn *c[2];
  Peer p[2];

  flipped_data_refused(secret, t, EPX_BS_HEADER_BYTES + 2, 0x04, "flipped payload byte");
  flipped_data_refused(secret, t, -1, 0x01, "flipped trailer byte");

  /* Replay: round 1 completes, then rank 0's DATA frame of round 1 comes
   * again, byte for byte (it would start round 2 if sequence numbers were
   * not checked). */
  epxRoot *r = two_rank_root(secret, t, c, p);
  CHECK(r != NULL, "setup");
  if (!r) return;
  size_t n = seal_data(&p[0], 0, "ab", 2, frame);
  epx_root_input(r, c[0], frame, n, t);
  feed_data(r, c[1], &p[1], 1, "cd", 2, t);
  CHECK(r->round == 1 && r->phase == EPX_ROOT_RUNNING, "round 1 failed: %s", r->fail_msg);
  CHECK(last_authentic(c[1], &p[1]), "RESULT of round 1");
  epx_root_flush(r, c[0], t);
  epx_root_flush(r, c[1], t);
  epx_root_input(r, c[0], frame, n, t);
  expect_auth_refusal(r, c, p, 0, 1, "replayed DATA frame");
  epx_root_free(r);

  /* Reflection: a frame sealed for the other direction. */
  r = two_rank_root(secret, t, c, p);
  if (!r) return;
  uint8_t mac[EPX_BS_MAC_BYTES];
  epx_bs_frame_seal(p[0].key, EPX_BS_DIR_TO_CLIENT, 0, EPX_BS_DATA, 0, "ab", 2, frame, mac);
  memcpy(frame + EPX_BS_HEADER_BYTES, "ab", 2);
  memcpy(frame + EPX_BS_HEADER_BYTES + 2, mac, EPX_BS_MAC_BYTES);
  epx_root_input(r, c[0], frame, EPX_BS_HEADER_BYTES + 2 + EPX_BS_MAC_BYTES, t);
  expect_auth_refusal(r, c, p, 0, 0, "DATA sealed root -> client");
  epx_root_free(r);

  /* A DATA frame without a trailer (protocol version 1 layout, new version
   * number) is refused at the header: too short for its MAC. */
  r = two_rank_root(secret, t, c, p);
  if (!r) return;
  epx_bs_header_encode(frame, EPX_BS_DATA, 0, 0);
  epx_root_input(r, c[0], frame, EPX_BS_HEADER_BYTES, t);
  CHECK(r->phase == EPX_ROOT_FAILED && strstr(r->fail_msg, "length"),
        "DATA without a trailer: %s", r->fail_msg);
  epx_root_free(r);
}

/* ============================================== a fake root, in a thread */

/* Reads exactly n bytes within ms (blocking socket or not); 0, or -1. */
static int recv_exact(int fd, void *p, size_t n, int ms) {
  size_t got = 0;
  int64_t end = ms_now() + ms;
  while (got < n) {
    int64_t left = end - ms_now();
    if (left <= 0) return -1;
    struct pollfd pf = {fd, POLLIN, 0};
    int rc = poll(&pf, 1, (int)left);
    if (rc < 0 && errno == EINTR) continue;
    if (rc <= 0) return -1;
    ssize_t r = recv(fd, (char *)p + got, n - got, MSG_DONTWAIT);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (r <= 0) return -1;
    got += (size_t)r;
  }
  return 0;
}

static void send_exact(int fd, const void *p, size_t n) {
  if (n && send(fd, p, n, MSG_NOSIGNAL) != (ssize_t)n) { /* the client may have gone */
  }
}

/* Sends an authenticated frame: header, payload, trailer (the trailer or a
 * payload byte spoiled on request). */
static void send_sealed(int fd, const Peer *p, uint8_t dir, uint64_t seq, epxBsFrameType type,
                        uint32_t rank, const void *data, uint32_t len, int spoil_payload,
                        int spoil_mac) {
  uint8_t hdr[EPX_BS_HEADER_BYTES], mac[EPX_BS_MAC_BYTES], buf[EPX_BS_ERROR_MAX_PAYLOAD];
  epx_bs_frame_seal(p->key, dir, seq, type, rank, data, len, hdr, mac);
  if (len > sizeof(buf)) return;
  if (len) memcpy(buf, data, len);
  if (spoil_payload && len) buf[len / 2] ^= 0x20;
  if (spoil_mac) mac[0] ^= 0x01;
  send_exact(fd, hdr, sizeof(hdr));
  send_exact(fd, buf, len);
  send_exact(fd, mac, sizeof(mac));
}

/* What the fake root does once the client's HELLO checked out. */
enum {
  FR_GOOD = 0,             /* READY, then 2 correct all-gather rounds */
  FR_READY_BAD_MAC,        /* READY with one trailer bit flipped */
  FR_READY_WRONG_SEQ,      /* READY sealed as sequence 1 (a frame went missing) */
  FR_ERROR_UNAUTH,         /* after the WELCOME, an ERROR without a trailer */
  FR_ERROR_AUTH,           /* after the WELCOME, a genuine (authenticated) ERROR */
  FR_ERROR_BEFORE_WELCOME, /* a refusal in place of the WELCOME (no trailer: as before) */
  FR_RESULT_FLIPPED,       /* round 1's RESULT with one payload byte flipped */
  FR_RESULT_REPLAYED       /* round 2's RESULT is round 1's frame again, byte for byte */
};

typedef struct FakeRoot {
  int lfd;
  uint8_t secret[EPX_BS_SECRET_BYTES];
  int mode;
  int data_ok, data_bad; /* the client's DATA frames that did / did not verify */
  char fail[160];        /* a setup problem on the fake root's side */
} FakeRoot;

static void *fake_root_main(void *arg) {
  FakeRoot *f = (FakeRoot *)arg;
  uint8_t hdr[EPX_BS_HEADER_BYTES], nonce[EPX_BS_NONCE_BYTES], msg[EPX_BS_HELLO_BYTES];
  uint8_t mac[EPX_BS_MAC_BYTES], err[EPX_BS_ERROR_MAX_PAYLOAD];
  epxBsHeader h;
  epxBsHello hello;
  Peer p;
  struct pollfd pf = {f->lfd, POLLIN, 0};
  if (poll(&pf, 1, 3000) != 1) {
    snprintf(f->fail, sizeof(f->fail), "no connection");
    return NULL;
  }
  int fd = accept(f->lfd, NULL, NULL);
  if (fd < 0) {
    snprintf(f->fail, sizeof(f->fail), "accept: %s", strerror(errno));
    return NULL;
  }
  int one = 1; /* frames go out in pieces: no Nagle delay */
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  for (int i = 0; i < EPX_BS_NONCE_BYTES; i++) nonce[i] = (uint8_t)(0xc0 + i);
  epx_bs_header_encode(hdr, EPX_BS_CHALLENGE, EPX_BS_NO_RANK, EPX_BS_NONCE_BYTES);
  send_exact(fd, hdr, sizeof(hdr));
  send_exact(fd, nonce, sizeof(nonce));
  if (recv_exact(fd, hdr, sizeof(hdr), 3000) != 0 ||
      epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_HELLO), 0, &h) != EPX_BS_HDR_OK ||
      recv_exact(fd, msg, sizeof(msg), 3000) != 0) {
    snprintf(f->fail, sizeof(f->fail), "no HELLO");
    close(fd);
    return NULL;
  }
  epx_bs_hello_decode(msg, &hello);
  epx_bs_client_mac(f->secret, nonce, h.rank, &hello, mac);
  if (!epx_bs_mac_equal(mac, hello.mac)) snprintf(f->fail, sizeof(f->fail), "HELLO MAC wrong");
  uint32_t rank = h.rank;
  if (f->mode == FR_ERROR_BEFORE_WELCOME) {
    size_t n = epx_bs_error_encode(err, sizeof(err), epxMismatch, "refused before the welcome");
    epx_bs_header_encode(hdr, EPX_BS_ERROR, EPX_BS_NO_RANK, (uint32_t)n);
    send_exact(fd, hdr, sizeof(hdr));
    send_exact(fd, err, n);
    goto linger;
  }
  epx_bs_root_mac(f->secret, hello.client_nonce, nonce, rank, mac);
  epx_bs_header_encode(hdr, EPX_BS_WELCOME, rank, EPX_BS_MAC_BYTES);
  send_exact(fd, hdr, sizeof(hdr));
  send_exact(fd, mac, sizeof(mac));
  epx_bs_session_key(f->secret, nonce, hello.client_nonce, rank, hello.nranks, p.key);
  p.tx = p.rx = 0;

  switch (f->mode) {
    case FR_READY_BAD_MAC:
      send_sealed(fd, &p, EPX_BS_DIR_TO_CLIENT, 0, EPX_BS_READY, rank, NULL, 0, 0, 1);
      goto linger;
    case FR_READY_WRONG_SEQ:
      send_sealed(fd, &p, EPX_BS_DIR_TO_CLIENT, 1, EPX_BS_READY, rank, NULL, 0, 0, 0);
      goto linger;
    case FR_ERROR_UNAUTH: {
      size_t n = epx_bs_error_encode(err, sizeof(err), epxTimeout, "forged failure report");
      epx_bs_header_encode(hdr, EPX_BS_ERROR, rank, (uint32_t)n);
      send_exact(fd, hdr, sizeof(hdr));
      send_exact(fd, err, n);
      goto linger;
    }
    case FR_ERROR_AUTH: {
      size_t n = epx_bs_error_encode(err, sizeof(err), epxMismatch, "genuine failure report");
      send_sealed(fd, &p, EPX_BS_DIR_TO_CLIENT, 0, EPX_BS_ERROR, rank, err, (uint32_t)n, 0, 0);
      goto linger;
    }
    default:
      break;
  }
  send_sealed(fd, &p, EPX_BS_DIR_TO_CLIENT, p.tx++, EPX_BS_READY, rank, NULL, 0, 0, 0);
  /* All-gather rounds of a 1-rank rendezvous: the RESULT is the DATA. */
  uint8_t round1[EPX_BS_HEADER_BYTES + 64 + EPX_BS_MAC_BYTES];
  size_t round1_len = 0;
  for (int round = 0; round < 2; round++) {
    uint8_t data[64];
    if (recv_exact(fd, hdr, sizeof(hdr), 3000) != 0) break;
    if (epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_DATA), 1, &h) != EPX_BS_HDR_OK ||
        h.len > sizeof(data) + EPX_BS_MAC_BYTES || recv_exact(fd, data, h.len, 3000) != 0) {
      snprintf(f->fail, sizeof(f->fail), "bad DATA frame");
      break;
    }
    uint32_t len = h.len - EPX_BS_MAC_BYTES;
    if (epx_bs_frame_check(p.key, EPX_BS_DIR_TO_ROOT, p.rx++, hdr, data, len, data + len))
      f->data_ok++;
    else
      f->data_bad++;
    if (f->mode == FR_RESULT_REPLAYED && round == 1) {
      send_exact(fd, round1, round1_len);
      break;
    }
    epx_bs_frame_seal(p.key, EPX_BS_DIR_TO_CLIENT, p.tx++, EPX_BS_RESULT, rank, data, len, hdr,
                      mac);
    memcpy(round1, hdr, sizeof(hdr));
    memcpy(round1 + sizeof(hdr), data, len);
    if (f->mode == FR_RESULT_FLIPPED) round1[sizeof(hdr) + 1] ^= 0x01;
    memcpy(round1 + sizeof(hdr) + len, mac, sizeof(mac));
    round1_len = sizeof(hdr) + len + sizeof(mac);
    send_exact(fd, round1, round1_len);
    if (f->mode == FR_RESULT_FLIPPED) break;
  }
linger:
  /* Until the client hangs up (it must not wait for us: that is the test). */
  for (int64_t end = ms_now() + 3000; ms_now() < end;) {
    uint8_t sink[256];
    struct pollfd q = {fd, POLLIN, 0};
    if (poll(&q, 1, 100) == 1 && recv(fd, sink, sizeof(sink), 0) <= 0) break;
  }
  close(fd);
  return NULL;
}

typedef struct ForgedCase {
  const char *name;
  int mode;
  int create_ok;        /* init succeeds; the all-gathers are checked */
  epxResult_t want;     /* result of the failing call */
  const char *needle;   /* in its message */
  const char *unwanted; /* never in its message (a forged text passed through) */
} ForgedCase;

/* A real client (epx_bootstrap_tcp_create, 1 rank) against the fake root:
 * every forged or altered frame after the WELCOME fails the init or the
 * all-gather with the authentication error, at once, never by the deadline. */
static void forged_frames_to_client(void) {
  static const ForgedCase cases[] = {
      {"good", FR_GOOD, 1, epxSuccess, NULL, NULL},
      {"ready_bad_mac", FR_READY_BAD_MAC, 0, epxBootstrapError, "frame authentication failed",
       NULL},
      {"ready_wrong_seq", FR_READY_WRONG_SEQ, 0, epxBootstrapError, "frame authentication failed",
       NULL},
      {"error_unauthenticated", FR_ERROR_UNAUTH, 0, epxBootstrapError,
       "frame authentication failed", "forged failure report"},
      {"error_authenticated", FR_ERROR_AUTH, 0, epxMismatch, "genuine failure report", NULL},
      {"error_before_welcome", FR_ERROR_BEFORE_WELCOME, 0, epxMismatch,
       "refused before the welcome", NULL},
      {"result_flipped", FR_RESULT_FLIPPED, 1, epxBootstrapError, "frame authentication failed",
       NULL},
      {"result_replayed", FR_RESULT_REPLAYED, 1, epxBootstrapError, "frame authentication failed",
       NULL},
  };
  char where[64];
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    const ForgedCase *fc = &cases[i];
    snprintf(where, sizeof(where), "forged/%s", fc->name);
    g_where = where;
    FakeRoot f;
    memset(&f, 0, sizeof(f));
    f.mode = fc->mode;
    for (int k = 0; k < EPX_BS_SECRET_BYTES; k++) f.secret[k] = (uint8_t)(0x31 * k + 5);
    epxBsAddr a;
    char err[1024];
    memset(&a, 0, sizeof(a));
    a.family = 4;
    a.addr[0] = 127;
    a.addr[3] = 1;
    f.lfd = -1;
    if (epx_bs_listen(&a, &f.lfd, err, sizeof(err)) != epxSuccess) {
      CHECK(0, "listen: %s", err);
      return;
    }
    epxUniqueId id;
    epx_bs_id_encode(&id, &a, f.secret);
    pthread_t th;
    pthread_create(&th, NULL, fake_root_main, &f);

    epxBootstrap *b = NULL;
    int64_t t0 = ms_now();
    err[0] = '\0';
    epxResult_t res =
        epx_bootstrap_tcp_create(&id, 0, 1, deadline_from_now(5000), &b, err, sizeof(err));
    uint32_t x[2] = {0x11223344u, 0x55667788u}, y[2] = {0, 0};
    if (fc->create_ok) {
      CHECK(res == epxSuccess, "create: %d %s", (int)res, err);
      for (int round = 0; round < 2 && res == epxSuccess; round++) {
        memset(y, 0xee, sizeof(y));
        res = epx_bootstrap_allgather(b, x, y, sizeof(x), err, sizeof(err));
        if (res == epxSuccess)
          CHECK(y[0] == x[0] && y[1] == x[1], "round %d: got %08x %08x", round, y[0], y[1]);
        else
          CHECK(y[0] == 0 && y[1] == 0, "unauthenticated bytes left in the result: %08x %08x",
                y[0], y[1]);
      }
    }
    int64_t took = ms_now() - t0;
    if (fc->want == epxSuccess) {
      CHECK(res == epxSuccess, "%d %s", (int)res, err);
    } else {
      CHECK(res == fc->want, "got %d, want %d: %s", (int)res, (int)fc->want, err);
      CHECK(strstr(err, fc->needle) != NULL, "message lacks \"%s\": %s", fc->needle, err);
      CHECK(!fc->unwanted || !strstr(err, fc->unwanted), "forged text reported: %s", err);
      CHECK(took < 1000, "took %lld ms (the deadline was 5000)", (long long)took);
      if (b) /* the failure sticks */
        CHECK(epx_bootstrap_barrier(b, err, sizeof(err)) == fc->want, "not sticky: %s", err);
    }
    epx_bootstrap_destroy(b);
    pthread_join(th, NULL);
    close(f.lfd);
    CHECK(f.fail[0] == 0, "fake root: %s", f.fail);
    CHECK(f.data_bad == 0, "%d of the client's DATA frames did not verify", f.data_bad);
    if (fc->mode == FR_GOOD || fc->mode == FR_RESULT_REPLAYED)
      CHECK(f.data_ok == 2, "%d DATA frames verified, want 2", f.data_ok);
  }
}

/* ============================================================== callback */

typedef struct {
  pthread_barrier_t bar;
  uint8_t shared[3 * 64];
  int fail_rank; /* this rank's callback reports failure, -1 none */
} CbShared;
typedef struct {
  CbShared *s;
  int rank;
  int errors;
} CbRank;

static int cb_allgather(void *user, const void *send, void *recv, size_t bytes) {
  CbRank *me = (CbRank *)user;
  if (me->rank == me->s->fail_rank) return 5;
  memcpy(me->s->shared + (size_t)me->rank * bytes, send, bytes);
  pthread_barrier_wait(&me->s->bar);
  memcpy(recv, me->s->shared, 3 * bytes);
  pthread_barrier_wait(&me->s->bar);
  return 0;
}

static void *cb_rank_main(void *arg) {
  CbRank *me = (CbRank *)arg;
  epxBootstrap *b = NULL;
  char err[256];
  uint8_t send[16], recv[48];
  if (epx_bootstrap_callback_create(cb_allgather, me, me->rank, 3, &b, err, sizeof(err)) != 0) {
    me->errors++;
    return NULL;
  }
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < 16; i++) send[i] = (uint8_t)(me->rank * 16 + i + round);
    if (epx_bootstrap_allgather(b, send, recv, 16, err, sizeof(err)) != 0) me->errors++;
    for (int s = 0; s < 3; s++)
      for (int i = 0; i < 16; i++)
        if (recv[s * 16 + i] != (uint8_t)(s * 16 + i + round)) me->errors++;
    if (epx_bootstrap_barrier(b, err, sizeof(err)) != 0) me->errors++;
  }
  if (epx_bootstrap_rank(b) != me->rank || epx_bootstrap_nranks(b) != 3) me->errors++;
  epx_bootstrap_destroy(b);
  return NULL;
}

static void callback_bootstrap(void) {
  g_where = "callback";
  CbShared s;
  CbRank ranks[3];
  pthread_t th[3];
  memset(&s, 0, sizeof(s));
  s.fail_rank = -1;
  pthread_barrier_init(&s.bar, NULL, 3);
  for (int i = 0; i < 3; i++) {
    ranks[i].s = &s;
    ranks[i].rank = i;
    ranks[i].errors = 0;
    pthread_create(&th[i], NULL, cb_rank_main, &ranks[i]);
  }
  for (int i = 0; i < 3; i++) {
    pthread_join(th[i], NULL);
    CHECK(ranks[i].errors == 0, "callback rank %d: %d errors", i, ranks[i].errors);
  }
  pthread_barrier_destroy(&s.bar);

  /* A failing callback is reported, and sticks. */
  CbRank one = {&s, 0, 0};
  s.fail_rank = 0;
  epxBootstrap *b = NULL;
  char err[256];
  uint8_t x = 1, y[3];
  CHECK(epx_bootstrap_callback_create(cb_allgather, &one, 0, 3, &b, err, sizeof(err)) == 0,
        "create: %s", err);
  CHECK(epx_bootstrap_allgather(b, &x, y, 1, err, sizeof(err)) == epxBootstrapError &&
            strstr(err, "returned 5"),
        "failing callback: %s", err);
  CHECK(epx_bootstrap_barrier(b, err, sizeof(err)) == epxBootstrapError, "error not sticky");
  CHECK(epx_bootstrap_allgather(b, &x, y, EPX_BOOTSTRAP_MAX_PAYLOAD + 1, err, sizeof(err)) != 0,
        "oversized all-gather accepted");
  epx_bootstrap_destroy(b);
  epx_bootstrap_destroy(NULL);
  CHECK(
      epx_bootstrap_callback_create(NULL, NULL, 0, 1, &b, err, sizeof(err)) == epxInvalidArgument &&
          b == NULL,
      "NULL callback accepted");
  CHECK(epx_bootstrap_callback_create(cb_allgather, NULL, 3, 3, &b, err, sizeof(err)) ==
            epxInvalidArgument,
        "rank 3 of 3 accepted");
}

/* ================================================== multi-process harness */

#define MAX_PROCS 10

typedef struct Scenario Scenario;
typedef int (*BodyFn)(int proc, const Scenario *s, epxUniqueId id, int go_fd);

struct Scenario {
  const char *name;
  int nprocs; /* processes forked; proc 0 makes the id and is rank 0 */
  int nranks;
  int deadline_ms; /* each rank's bootstrap deadline */
  int root_ms;     /* the root's lifetime */
  BodyFn body;
  int kill_proc; /* proc SIGKILLed by the parent at kill_at_ms (when > 0) */
  int kill_at_ms;
  int hostile; /* the parent attacks the root before releasing the ranks */
  int ipv6;    /* the root listens on ::1 (built by hand: the default is IPv4) */
};


/* ---- bodies ---- */

static uint8_t pattern(int rank, int round, size_t j) {
  return (uint8_t)(rank * 131 + round * 29 + (int)j * 7 + (int)(j >> 8));
}

/* Several all-gathers of different sizes (0 bytes and the maximum included),
 * each rank's data naming its rank, round and offset; then barriers. */
static int run_allgathers(epxBootstrap *b, int rank, int nranks, int rounds, int pause_ms) {
  static const size_t sizes[] = {8, 0, 1, 1000, EPX_BOOTSTRAP_MAX_PAYLOAD, 37};
  const int nsizes = (int)(sizeof(sizes) / sizeof(sizes[0]));
  uint8_t *send = (uint8_t *)malloc(EPX_BOOTSTRAP_MAX_PAYLOAD);
  uint8_t *recv = (uint8_t *)malloc((size_t)EPX_BOOTSTRAP_MAX_PAYLOAD * (size_t)nranks);
  char err[1024];
  int before = g_failures;
  for (int k = 0; k < rounds && g_failures == before; k++) {
    size_t bytes = sizes[k % nsizes];
    if (pause_ms) sleep_ms(pause_ms);
    for (size_t j = 0; j < bytes; j++) send[j] = pattern(rank, k, j);
    memset(recv, 0xee, (size_t)EPX_BOOTSTRAP_MAX_PAYLOAD * (size_t)nranks);
    epxResult_t res = epx_bootstrap_allgather(b, send, recv, bytes, err, sizeof(err));
    CHECK(res == epxSuccess, "round %d (%zu bytes): %d %s", k, bytes, (int)res, err);
    if (res != epxSuccess) break;
    for (int s = 0; s < nranks; s++)
      for (size_t j = 0; j < bytes; j++)
        if (recv[(size_t)s * bytes + j] != pattern(s, k, j)) {
          CHECK(0, "round %d: byte %zu from rank %d is %u, want %u", k, j, s,
                recv[(size_t)s * bytes + j], pattern(s, k, j));
          s = nranks;
          break;
        }
  }
  if (g_failures == before) {
    CHECK(epx_bootstrap_barrier(b, err, sizeof(err)) == epxSuccess, "barrier: %s", err);
    CHECK(epx_bootstrap_barrier(b, err, sizeof(err)) == epxSuccess, "barrier 2: %s", err);
  }
  free(send);
  free(recv);
  return g_failures == before ? 0 : 1;
}

/* Rank 0 holds the root: once every rank has closed, its thread must exit. */
static void expect_root_exit(int within_ms) {
  int64_t end = ms_now() + within_ms;
  while (epx_bootstrap_live_roots() > 0 && ms_now() < end) sleep_ms(10);
  CHECK(epx_bootstrap_live_roots() == 0, "the root thread still runs %d ms after the last close",
        within_ms);
}

/* Joins rank `proc` of the scenario's world by its deadline; on failure
 * counts it (with the reason) and returns NULL. */
static epxBootstrap *join_or_fail(const epxUniqueId *id, int proc, const Scenario *s, char *err,
                                  size_t err_len) {
  epxBootstrap *b = NULL;
  epxResult_t res = epx_bootstrap_tcp_create(id, proc, s->nranks, deadline_from_now(s->deadline_ms),
                                             &b, err, err_len);
  CHECK(res == epxSuccess, "create: %d %s", (int)res, err);
  return res == epxSuccess ? b : NULL;
}

static int body_allgather(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  epxBootstrap *b = NULL;
  char err[1024];
  int rank = proc;
  if (go_fd >= 0) {
    char go;
    if (read(go_fd, &go, 1) != 1) return 1;
  }
  b = join_or_fail(&id, rank, s, err, sizeof(err));
  if (!b) return 1;
  CHECK(epx_bootstrap_rank(b) == rank && epx_bootstrap_nranks(b) == s->nranks, "accessors");
  if (s->hostile && rank == 0) {
    /* The parent's hostile connections were all closed by the root before
     * the ranks started: each must have been counted. */
    CHECK(epx_bootstrap_refused_total() >= 6, "only %llu hostile connections counted",
          (unsigned long long)epx_bootstrap_refused_total());
  }
  /* Under attack, slow down so the parent's traffic overlaps the rounds. */
  run_allgathers(b, rank, s->nranks, 7, s->hostile ? 20 : 0);
  epx_bootstrap_destroy(b);
  if (rank == 0) expect_root_exit(3000);
  return g_failures ? 1 : 0;
}

/* Checks a failed create: code, time (deadline + 1 s at most), message. */
static void expect_failure(epxResult_t res, epxResult_t want, int64_t t0, int max_ms,
                           const char *err, const char *needle) {
  int64_t took = ms_now() - t0;
  CHECK(res == want, "got %s (%d), want %d: %s", res == epxSuccess ? "success" : "error", (int)res,
        (int)want, err);
  CHECK(took <= max_ms, "failure took %lld ms, limit %d ms", (long long)took, max_ms);
  CHECK(strstr(err, needle) != NULL, "message lacks \"%s\": %s", needle, err);
}

/* Ranks 0..nprocs-1 of nranks arrive; the last rank never does. */
static int body_missing_rank(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  epxBootstrap *b = NULL;
  char err[1024], needle[64];
  int64_t t0 = ms_now();
  epxResult_t res = epx_bootstrap_tcp_create(
      &id, proc, s->nranks, deadline_from_now(s->deadline_ms), &b, err, sizeof(err));
  snprintf(needle, sizeof(needle), "missing ranks: %d", s->nranks - 1);
  expect_failure(res, epxTimeout, t0, s->deadline_ms + 1000, err, needle);
  CHECK(ms_now() - t0 >= s->deadline_ms - 100, "gave up %lld ms before the deadline",
        (long long)(s->deadline_ms - (ms_now() - t0)));
  epx_bootstrap_destroy(b);
  return g_failures ? 1 : 0;
}

/* The last rank flips a bit of the secret: it is refused at once, the others
 * time out naming it. */
static int body_wrong_secret(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  epxBootstrap *b = NULL;
  char err[1024], needle[64];
  int64_t t0 = ms_now();
  int bad = proc == s->nranks - 1;
  if (bad) id.internal[40] ^= 0x10; /* byte 8 of the secret (offset 32 in the id) */
  epxResult_t res = epx_bootstrap_tcp_create(
      &id, proc, s->nranks, deadline_from_now(s->deadline_ms), &b, err, sizeof(err));
  if (bad) {
    expect_failure(res, epxBootstrapError, t0, 1000, err, "authentication failed");
  } else {
    snprintf(needle, sizeof(needle), "missing ranks: %d", s->nranks - 1);
    expect_failure(res, epxTimeout, t0, s->deadline_ms + 1000, err, needle);
  }
  epx_bootstrap_destroy(b);
  return g_failures ? 1 : 0;
}

/* procs 0-2 are the real ranks 0-2 of 3 (rank 2 comes late); proc 3 claims
 * rank 1 again and proc 4 claims rank 0 of 5 ranks while rank 2 is awaited. */
static int body_duplicates(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  epxBootstrap *b = NULL;
  char err[1024];
  int64_t t0;
  epxResult_t res;
  switch (proc) {
    case 3:
      sleep_ms(400); /* after ranks 0 and 1 are in, before rank 2 */
      t0 = ms_now();
      res = epx_bootstrap_tcp_create(&id, 1, 3, deadline_from_now(s->deadline_ms), &b, err,
                                     sizeof(err));
      expect_failure(res, epxBootstrapError, t0, 1000, err, "duplicate rank");
      break;
    case 4:
      sleep_ms(400);
      t0 = ms_now();
      res = epx_bootstrap_tcp_create(&id, 0, 5, deadline_from_now(s->deadline_ms), &b, err,
                                     sizeof(err));
      expect_failure(res, epxMismatch, t0, 1000, err, "nranks=5");
      break;
    default:
      if (proc == 2) sleep_ms(900);
      res = epx_bootstrap_tcp_create(&id, proc, 3, deadline_from_now(s->deadline_ms), &b, err,
                                     sizeof(err));
      CHECK(res == epxSuccess, "rank %d create: %s", proc, err);
      if (res == epxSuccess) run_allgathers(b, proc, 3, 3, 0);
      break;
  }
  epx_bootstrap_destroy(b);
  return g_failures ? 1 : 0;
}

/* Rank 2 finishes after one all-gather while the others start a second: they
 * fail fast with epxPeerFailed naming it, and the failure sticks. */
static int body_rank_leaves(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  char err[1024];
  epxBootstrap *b = join_or_fail(&id, proc, s, err, sizeof(err));
  if (!b) return 1;
  epxResult_t res;
  uint32_t mine = (uint32_t)proc, all[3];
  res = epx_bootstrap_allgather(b, &mine, all, 4, err, sizeof(err));
  CHECK(res == epxSuccess && all[0] == 0 && all[1] == 1 && all[2] == 2, "round 1: %s", err);
  if (proc != 2) {
    int64_t t0 = ms_now();
    res = epx_bootstrap_allgather(b, &mine, all, 4, err, sizeof(err));
    CHECK(res == epxPeerFailed, "round 2 after rank 2 left: %d %s", (int)res, err);
    CHECK(strstr(err, "rank 2") || strstr(err, "ranks 2"), "rank 2 not named: %s", err);
    CHECK(ms_now() - t0 < 1000, "took %lld ms", (long long)(ms_now() - t0));
    CHECK(epx_bootstrap_barrier(b, err, sizeof(err)) == epxPeerFailed, "failure not sticky");
  }
  epx_bootstrap_destroy(b);
  return g_failures ? 1 : 0;
}

/* Rank 2 is killed while waiting for rank 3: the others learn at once. */
static int body_rank_killed(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  epxBootstrap *b = NULL;
  char err[1024];
  int64_t t0 = ms_now();
  epxResult_t res = epx_bootstrap_tcp_create(
      &id, proc, s->nranks, deadline_from_now(s->deadline_ms), &b, err, sizeof(err));
  if (proc == 2) return 0; /* not reached: killed */
  expect_failure(res, epxPeerFailed, t0, s->kill_at_ms + 1000, err, "rank 2 closed");
  epx_bootstrap_destroy(b);
  return g_failures ? 1 : 0;
}

/* Nobody comes: the root thread ends at its deadline, and a late rank fails
 * by its own deadline instead of hanging. */
static int body_root_deadline(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  int64_t t0 = ms_now();
  while (epx_bootstrap_live_roots() > 0 && ms_now() - t0 < s->root_ms + 2000) sleep_ms(10);
  CHECK(epx_bootstrap_live_roots() == 0, "root alive %lld ms after its %d ms deadline",
        (long long)(ms_now() - t0 - s->root_ms), s->root_ms);
  epxBootstrap *b = NULL;
  char err[1024];
  t0 = ms_now();
  epxResult_t res =
      epx_bootstrap_tcp_create(&id, 0, 1, deadline_from_now(400), &b, err, sizeof(err));
  CHECK(res != epxSuccess && b == NULL, "create against a dead root succeeded");
  CHECK(ms_now() - t0 <= 1400, "took %lld ms", (long long)(ms_now() - t0));
  return g_failures ? 1 : 0;
}

/* The root's deadline passes during an all-gather: every rank gets the root's
 * reason, whether it was waiting then or calls after the root has closed. */
static int body_root_expires_idle(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  char err[1024];
  epxBootstrap *b = join_or_fail(&id, proc, s, err, sizeof(err));
  if (!b) return 1;
  epxResult_t res;
  /* Rank 0 is waiting in an all-gather when the deadline passes; rank 1 comes
   * after the root has gone and finds the reason in its socket. */
  sleep_ms(proc == 0 ? s->root_ms - 300 : s->root_ms + 500);
  uint8_t x = 1, all[2];
  int64_t t0 = ms_now();
  res = epx_bootstrap_allgather(b, &x, all, 1, err, sizeof(err));
  expect_failure(res, epxTimeout, t0, 1000, err, "root's deadline passed");
  epx_bootstrap_destroy(b);
  return g_failures ? 1 : 0;
}

/* The whole protocol over IPv6 loopback. */
static epxResult_t make_ipv6_id(epxUniqueId *id, int root_ms, char *err, size_t errlen) {
  epxBsAddr a;
  memset(&a, 0, sizeof(a));
  a.family = 6;
  a.addr[15] = 1;
  int fd = -1;
  uint8_t secret[16];
  epxResult_t res = epx_bs_listen(&a, &fd, err, errlen);
  if (res != epxSuccess) return res;
  if (epx_bs_random(secret, sizeof(secret)) != 0) return epxSystemError;
  epxRoot *r = epx_root_new(secret, fd, epx_now_ns() + (int64_t)root_ms * 1000000LL);
  if (!r) return epxOutOfMemory;
  epx_bs_addr_str(&a, r->where, sizeof(r->where));
  res = epx_root_start(r, err, errlen);
  if (res != epxSuccess) {
    epx_root_free(r);
    return res;
  }
  epx_bs_id_encode(id, &a, secret);
  return epxSuccess;
}

static int have_ipv6_loopback(void) {
  struct sockaddr_in6 in6;
  memset(&in6, 0, sizeof(in6));
  in6.sin6_family = AF_INET6;
  in6.sin6_addr = in6addr_loopback;
  int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  int ok = bind(fd, (struct sockaddr *)&in6, sizeof(in6)) == 0;
  close(fd);
  return ok;
}

/* ---- hostile traffic from the parent ---- */

static int connect_to(const epxBsAddr *a) {
  struct sockaddr_in in;
  memset(&in, 0, sizeof(in));
  in.sin_family = AF_INET;
  in.sin_port = htons(a->port);
  memcpy(&in.sin_addr, a->addr, 4);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, (struct sockaddr *)&in, sizeof(in)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* True when the root closes fd within ms (after whatever it had to say). */
static int closed_by_root(int fd, int ms) {
  int64_t end = ms_now() + ms;
  char buf[512];
  while (ms_now() < end) {
    struct pollfd p = {fd, POLLIN, 0};
    int64_t left = end - ms_now();
    int rc = poll(&p, 1, left > 0 ? (int)left : 0);
    if (rc <= 0) continue;
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) return 1;
  }
  return 0;
}

/* reliability.md R8 asks for 1000 connections; fewer when the descriptor
 * limit would not leave room for the test's own sockets. */
#define EPX_TEST_FLOOD 1000

static int flood_count(void) {
  struct rlimit rl;
  int n = EPX_TEST_FLOOD;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
      rl.rlim_cur < (rlim_t)EPX_TEST_FLOOD + 128)
    n = rl.rlim_cur > 256 ? (int)rl.rlim_cur - 128 : 128;
  return n;
}

typedef struct Hostile {
  epxBsAddr addr;
  int slow; /* trickles a header, one byte per 100 ms */
  int slow_sent;
  int flood[EPX_TEST_FLOOD]; /* idle connections, far more than the root keeps pending */
  int nflood;
} Hostile;

static void send_str(int fd, const void *p, size_t n) {
  if (send(fd, p, n, MSG_NOSIGNAL) < 0) { /* the root may already have dropped us */
  }
}

static void hostile_trickle(Hostile *h);

static void hostile_attack(const epxUniqueId *id, Hostile *h) {
  epxBsAddr a;
  uint8_t secret[16];
  char err[256];
  g_where = "hostile";
  h->slow = -1;
  h->nflood = 0;
  CHECK(epx_bs_id_decode(id, &a, secret, err, sizeof(err)) == 0 && a.family == 4, "id: %s", err);
  int fds[6];
  /* connect and close at once */
  int fd = connect_to(&a);
  CHECK(fd >= 0, "connect");
  if (fd >= 0) close(fd);
  /* random bytes */
  fds[0] = connect_to(&a);
  uint8_t junk[256];
  for (int i = 0; i < 256; i++) junk[i] = (uint8_t)(rand() & 0xff);
  send_str(fds[0], junk, sizeof(junk));
  /* an HTTP request */
  fds[1] = connect_to(&a);
  const char *http = "GET / HTTP/1.1\r\nHost: epx\r\n\r\n";
  send_str(fds[1], http, strlen(http));
  /* a HELLO header announcing 2 GB */
  fds[2] = connect_to(&a);
  uint8_t hdr[EPX_BS_HEADER_BYTES];
  epx_bs_header_encode(hdr, EPX_BS_HELLO, 0, 0x80000000u);
  send_str(fds[2], hdr, sizeof(hdr));
  /* a replayed handshake: right secret, but a MAC over a stale challenge */
  fds[3] = connect_to(&a);
  epxBsHello hello;
  uint8_t stale[EPX_BS_NONCE_BYTES] = {0};
  uint8_t msg[EPX_BS_HELLO_BYTES];
  memset(&hello, 0, sizeof(hello));
  hello.nranks = 4;
  hello.timeout_ms = 5000;
  epx_bs_client_mac(secret, stale, 0, &hello, hello.mac);
  epx_bs_hello_encode(&hello, msg);
  epx_bs_header_encode(hdr, EPX_BS_HELLO, 0, sizeof(msg));
  send_str(fds[3], hdr, sizeof(hdr));
  send_str(fds[3], msg, sizeof(msg));
  /* an authenticated HELLO for a rank out of range */
  fds[4] = connect_to(&a);
  uint8_t chal[EPX_BS_HEADER_BYTES + EPX_BS_NONCE_BYTES];
  size_t got = 0;
  while (got < sizeof(chal)) {
    ssize_t n = recv(fds[4], chal + got, sizeof(chal) - got, 0);
    if (n <= 0) break;
    got += (size_t)n;
  }
  CHECK(got == sizeof(chal), "no challenge from the root");
  hello.nranks = 4;
  epx_bs_client_mac(secret, chal + EPX_BS_HEADER_BYTES, 7, &hello, hello.mac);
  epx_bs_hello_encode(&hello, msg);
  epx_bs_header_encode(hdr, EPX_BS_HELLO, 7, sizeof(msg));
  send_str(fds[4], hdr, sizeof(hdr));
  send_str(fds[4], msg, sizeof(msg));
  fds[5] = -1;
  for (int i = 0; i < 5; i++) {
    CHECK(fds[i] >= 0 && closed_by_root(fds[i], 2000), "hostile connection %d not closed", i);
    if (fds[i] >= 0) close(fds[i]);
  }
  /* Held through the good init: a slow sender and a flood. */
  h->slow = connect_to(&a);
  h->slow_sent = 0;
  h->addr = a;
  for (int i = 0; i < 5; i++) hostile_trickle(h); /* mid-header when the ranks start */
  int nflood = flood_count();
  for (int i = 0; i < nflood; i++) {
    int f = connect_to(&a);
    if (f < 0) break;
    h->flood[h->nflood++] = f;
  }
  CHECK(h->nflood == nflood, "only %d of %d flood connections opened", h->nflood, nflood);
  explicit_bzero(secret, sizeof(secret));
}

static void hostile_trickle(Hostile *h) {
  static uint8_t hdr[EPX_BS_HEADER_BYTES];
  if (h->slow < 0) return;
  if (h->slow_sent == 0) epx_bs_header_encode(hdr, EPX_BS_HELLO, 0, EPX_BS_HELLO_BYTES);
  send_str(h->slow, hdr + (h->slow_sent % EPX_BS_HEADER_BYTES), 1);
  h->slow_sent++;
}

/* During the good init: a connect-and-close and a burst of junk, each turn. */
static void hostile_more(Hostile *h) {
  int fd = connect_to(&h->addr);
  if (fd >= 0) close(fd);
  fd = connect_to(&h->addr);
  if (fd >= 0) {
    uint8_t junk[64];
    for (int i = 0; i < 64; i++) junk[i] = (uint8_t)(rand() & 0xff);
    send_str(fd, junk, sizeof(junk));
    close(fd);
  }
}

static void hostile_release(Hostile *h) {
  if (h->slow >= 0) close(h->slow);
  for (int i = 0; i < h->nflood; i++) close(h->flood[i]);
  h->nflood = 0;
  h->slow = -1;
}

/* ---- a forged DATA frame at a real root ---- */

/* Proc 2 plays rank 2 by hand: a correct handshake, then a DATA frame whose
 * payload was changed after sealing, as an on-path attacker injecting into
 * the connection would. */
static int forged_rank(const Scenario *s, const epxUniqueId *id) {
  epxBsAddr a;
  uint8_t secret[16], hdr[EPX_BS_HEADER_BYTES], nonce[EPX_BS_NONCE_BYTES], mac[EPX_BS_MAC_BYTES];
  uint8_t msg[EPX_BS_HELLO_BYTES], body[EPX_BS_ERROR_MAX_LEN];
  char err[256], text[EPX_BS_ERROR_TEXT_MAX + 1];
  epxBsHeader h;
  CHECK(epx_bs_id_decode(id, &a, secret, err, sizeof(err)) == 0, "id: %s", err);
  int fd = connect_to(&a);
  CHECK(fd >= 0, "connect");
  if (fd < 0) return 1;
  CHECK(recv_exact(fd, hdr, sizeof(hdr), 3000) == 0 &&
            epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_CHALLENGE), 3, &h) == EPX_BS_HDR_OK &&
            recv_exact(fd, nonce, sizeof(nonce), 3000) == 0,
        "no challenge");
  epxBsHello hello;
  memset(&hello, 0, sizeof(hello));
  hello.client_nonce[0] = 0x77;
  hello.nranks = (uint32_t)s->nranks;
  hello.timeout_ms = (uint32_t)s->deadline_ms;
  epx_bs_client_mac(secret, nonce, 2, &hello, hello.mac);
  epx_bs_hello_encode(&hello, msg);
  epx_bs_header_encode(hdr, EPX_BS_HELLO, 2, sizeof(msg));
  send_str(fd, hdr, sizeof(hdr));
  send_str(fd, msg, sizeof(msg));
  uint8_t expect[EPX_BS_MAC_BYTES];
  epx_bs_root_mac(secret, hello.client_nonce, nonce, 2, expect);
  CHECK(recv_exact(fd, hdr, sizeof(hdr), 3000) == 0 &&
            epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_WELCOME), 3, &h) == EPX_BS_HDR_OK &&
            recv_exact(fd, mac, sizeof(mac), 3000) == 0 && epx_bs_mac_equal(mac, expect),
        "no valid WELCOME");
  Peer p;
  epx_bs_session_key(secret, nonce, hello.client_nonce, 2, (uint32_t)s->nranks, p.key);
  p.tx = p.rx = 0;
  CHECK(recv_exact(fd, hdr, sizeof(hdr), 3000) == 0 &&
            epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_READY), 3, &h) == EPX_BS_HDR_OK &&
            recv_exact(fd, mac, sizeof(mac), 3000) == 0 &&
            epx_bs_frame_check(p.key, EPX_BS_DIR_TO_CLIENT, p.rx++, hdr, NULL, 0, mac),
        "no authenticated READY");
  uint8_t frame[EPX_BS_HEADER_BYTES + 4 + EPX_BS_MAC_BYTES];
  uint32_t mine = 2;
  size_t n = seal_data(&p, 2, &mine, 4, frame);
  frame[EPX_BS_HEADER_BYTES] ^= 0x40; /* rank 2's part now claims to be 66 */
  send_str(fd, frame, n);
  /* The root's reason comes back authenticated, and names the failure. */
  int ok = recv_exact(fd, hdr, sizeof(hdr), 3000) == 0 &&
           epx_bs_header_decode(hdr, EPX_BS_TYPE_BIT(EPX_BS_ERROR), 3, &h) == EPX_BS_HDR_OK &&
           h.len >= EPX_BS_MAC_BYTES && recv_exact(fd, body, h.len, 3000) == 0;
  CHECK(ok, "no ERROR from the root");
  if (ok) {
    uint32_t plen = h.len - EPX_BS_MAC_BYTES;
    CHECK(epx_bs_frame_check(p.key, EPX_BS_DIR_TO_CLIENT, p.rx++, hdr, body, plen, body + plen),
          "the root's ERROR is not authenticated");
    epx_bs_error_decode(body, plen, text, sizeof(text));
    CHECK(strstr(text, "frame authentication failed"), "root's reason: %s", text);
  }
  close(fd);
  explicit_bzero(secret, sizeof(secret));
  return g_failures ? 1 : 0;
}

/* Ranks 0 and 1 are real and all-gather; rank 2's DATA frame was altered on
 * the way. The root must refuse it (counted with the refused traffic), use
 * nothing of it, and fail the rendezvous at once with the reason. */
static int body_forged_data(int proc, const Scenario *s, epxUniqueId id, int go_fd) {
  if (proc == 2) return forged_rank(s, &id);
  char err[1024];
  epxBootstrap *b = join_or_fail(&id, proc, s, err, sizeof(err));
  if (!b) return 1;
  epxResult_t res;
  uint32_t mine = (uint32_t)proc, all[3];
  int64_t t0 = ms_now();
  err[0] = '\0';
  res = epx_bootstrap_allgather(b, &mine, all, 4, err, sizeof(err));
  expect_failure(res, epxBootstrapError, t0, 1000, err, "frame authentication failed");
  CHECK(strstr(err, "rank 2's connection") != NULL, "rank 2 not named: %s", err);
  if (proc == 0) /* the root runs in this process */
    CHECK(epx_bootstrap_refused_total() >= 1, "the forged frame was not counted");
  epx_bootstrap_destroy(b);
  return g_failures ? 1 : 0;
}

/* ---- the harness ---- */

static int read_full(int fd, void *p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, (char *)p + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    got += (size_t)r;
  }
  return 0;
}

static void run_scenario(const Scenario *s) {
  if (s->ipv6 && !have_ipv6_loopback()) {
    printf("  %-28s skipped (no IPv6 loopback)\n", s->name);
    return;
  }
  int idp[MAX_PROCS + 1][2]; /* [0..nprocs-1]: id to proc i; [nprocs]: id to the parent */
  int gop[MAX_PROCS][2];     /* "go" from the parent (hostile runs) */
  pid_t pids[MAX_PROCS];
  char where[96];
  int64_t t0 = ms_now();
  for (int i = 0; i <= s->nprocs; i++) CHECK(pipe(idp[i]) == 0, "pipe");
  for (int i = 0; i < s->nprocs; i++) CHECK(pipe(gop[i]) == 0, "pipe");
  fflush(NULL);
  for (int p = 0; p < s->nprocs; p++) {
    pids[p] = fork();
    if (pids[p] == 0) {
      g_failures = 0; /* the parent's count is not ours */
      /* Keep only our ends, so a dead writer shows up as EOF. */
      for (int i = 0; i <= s->nprocs; i++) {
        if (i != p) close(idp[i][0]);
        if (p != 0) close(idp[i][1]);
      }
      for (int i = 0; i < s->nprocs; i++) {
        close(gop[i][1]);
        if (i != p) close(gop[i][0]);
      }
      snprintf(where, sizeof(where), "%s proc %d", s->name, p);
      g_where = where;
      epxUniqueId id;
      if (p == 0) {
        char err[512];
        epxResult_t res = s->ipv6 ? make_ipv6_id(&id, s->root_ms, err, sizeof(err))
                                  : epx_bootstrap_get_unique_id(&id, s->root_ms, err, sizeof(err));
        CHECK(res == epxSuccess, "get_unique_id: %s", err);
        if (res != epxSuccess) exit(1);
        int last = s->hostile ? s->nprocs : s->nprocs - 1; /* the parent needs it to attack */
        for (int i = 1; i <= last; i++)
          if (write(idp[i][1], &id, sizeof(id)) != (ssize_t)sizeof(id)) exit(1);
        for (int i = 1; i <= s->nprocs; i++) close(idp[i][1]);
        close(idp[0][0]);
        close(idp[0][1]);
      } else if (read_full(idp[p][0], &id, sizeof(id)) != 0) {
        CHECK(0, "no id from proc 0");
        exit(1);
      } else {
        close(idp[p][0]);
      }
      int rc = s->body(p, s, id, s->hostile ? gop[p][0] : -1);
      exit(rc);
    }
  }
  for (int i = 0; i <= s->nprocs; i++) {
    if (i != s->nprocs) close(idp[i][0]);
    close(idp[i][1]);
  }
  for (int i = 0; i < s->nprocs; i++) close(gop[i][0]);

  Hostile h;
  h.slow = -1;
  h.nflood = 0;
  if (s->hostile) {
    epxUniqueId id;
    if (read_full(idp[s->nprocs][0], &id, sizeof(id)) == 0)
      hostile_attack(&id, &h);
    else
      CHECK(0, "no id for the parent");
    for (int i = 0; i < s->nprocs; i++) CHECK(write(gop[i][1], "g", 1) == 1, "go");
  }
  close(idp[s->nprocs][0]);
  for (int i = 0; i < s->nprocs; i++) close(gop[i][1]);

  /* Wait, with a hard limit: a hang is a failure, never a stuck test. */
  int limit_ms = s->deadline_ms + s->root_ms / 4 + 6000;
  int left = s->nprocs, killed = 0, turns = 0;
  int status[MAX_PROCS];
  int done[MAX_PROCS] = {0};
  while (left > 0) {
    int64_t el = ms_now() - t0;
    if (s->kill_at_ms > 0 && !killed && el >= s->kill_at_ms) {
      kill(pids[s->kill_proc], SIGKILL);
      killed = 1;
    }
    if (el > limit_ms) {
      for (int p = 0; p < s->nprocs; p++)
        if (!done[p]) {
          kill(pids[p], SIGKILL);
          fprintf(stderr, "FAIL [%s] proc %d hung (> %d ms); killed\n", s->name, p, limit_ms);
          g_failures++;
        }
    }
    for (int p = 0; p < s->nprocs; p++) {
      if (done[p]) continue;
      if (waitpid(pids[p], &status[p], WNOHANG) == pids[p]) {
        done[p] = 1;
        left--;
      }
    }
    if (s->hostile && left > 0) {
      hostile_more(&h);
      if (++turns % 20 == 0) hostile_trickle(&h);
    }
    if (left > 0) sleep_ms(5);
  }
  hostile_release(&h);
  for (int p = 0; p < s->nprocs; p++) {
    int ok = WIFEXITED(status[p]) && WEXITSTATUS(status[p]) == 0;
    if (s->kill_at_ms > 0 && p == s->kill_proc)
      ok = WIFSIGNALED(status[p]) && WTERMSIG(status[p]) == SIGKILL;
    if (!ok) {
      fprintf(stderr, "FAIL [%s] proc %d ended with status 0x%x\n", s->name, p, status[p]);
      g_failures++;
    }
  }
  printf("  %-28s %5lld ms\n", s->name, (long long)(ms_now() - t0));
}

/* A hang anywhere (a lock, a wait without a deadline) must fail the test, not stall CI. */
#define TEST_WATCHDOG_S 90
static void on_watchdog(int sig) {
  static const char msg[] = "FAIL test_bootstrap: still running after the watchdog limit (hang)\n";
  (void)sig;
  if (write(2, msg, sizeof(msg) - 1) < 0) {
  }
  _exit(2);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0); /* progress shows even when the watchdog fires */
  signal(SIGALRM, on_watchdog);
  alarm(TEST_WATCHDOG_S);
  /* Loopback: the test must not depend on the machine's network. */
  setenv("EPX_SOCKET_LOOPBACK", "1", 1);
  unsetenv("EPX_SOCKET_IFNAME");
  signal(SIGPIPE, SIG_IGN);
  int64_t t0 = ms_now();

  sha256_fips_vectors();
  hmac_rfc4231_vectors();
  wire_format_checks();
  frame_mac_checks();
  root_state_machine();
  root_frame_auth();
  forged_frames_to_client();
  callback_bootstrap();
  g_where = "main";
  printf("  unit checks                  %5lld ms\n", (long long)(ms_now() - t0));

  /* name, processes, ranks, rank deadline ms, root lifetime ms, body, extras */
#define SCEN(n, p, r, dl, root, fn) \
  .name = n, .nprocs = p, .nranks = r, .deadline_ms = dl, .root_ms = root, .body = fn
  static const Scenario scenarios[] = {
      {SCEN("allgather_1_rank", 1, 1, 5000, 20000, body_allgather)},
      {SCEN("allgather_2_ranks", 2, 2, 5000, 20000, body_allgather)},
      {SCEN("allgather_4_ranks", 4, 4, 5000, 20000, body_allgather)},
      {SCEN("allgather_8_ranks", 8, 8, 5000, 20000, body_allgather)},
      {SCEN("allgather_3_ranks_ipv6", 3, 3, 5000, 20000, body_allgather), .ipv6 = 1},
      {SCEN("rank_never_arrives", 3, 4, 1500, 4000, body_missing_rank)},
      {SCEN("wrong_secret_refused", 3, 3, 1500, 4000, body_wrong_secret)},
      {SCEN("duplicate_rank_refused", 5, 3, 5000, 20000, body_duplicates)},
      {SCEN("rank_leaves_mid_gather", 3, 3, 5000, 20000, body_rank_leaves)},
      {SCEN("rank_killed_during_init", 3, 4, 5000, 8000, body_rank_killed), .kill_proc = 2,
       .kill_at_ms = 600},
      {SCEN("root_deadline_ends_root", 1, 1, 400, 600, body_root_deadline)},
      {SCEN("root_expires_while_idle", 2, 2, 5000, 800, body_root_expires_idle)},
      {SCEN("forged_data_fails_session", 3, 3, 5000, 20000, body_forged_data)},
      {SCEN("hostile_traffic", 4, 4, 5000, 20000, body_allgather), .hostile = 1},
  };
#undef SCEN

  for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) run_scenario(&scenarios[i]);

  printf("test_bootstrap: %s (%d failures, %lld ms)\n", g_failures ? "FAILED" : "ok", g_failures,
         (long long)(ms_now() - t0));
  return g_failures ? 1 : 0;
}
