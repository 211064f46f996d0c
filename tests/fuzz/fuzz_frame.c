/*
 * fuzz_frame.c - libFuzzer target for the bootstrap's decoders and the root's
 * connection state machine (reliability.md R9). Not part of the default build.
 *
 * Build and run (from the repository root, clang with libFuzzer):
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *     -D_GNU_SOURCE -Iinclude -Isrc tests/fuzz/fuzz_frame.c \
 *     src/bootstrap/wire.c src/bootstrap/sha256.c src/bootstrap/root.c \
 *     src/bootstrap/socket.c src/core/error.c src/core/log.c src/core/params.c \
 *     -pthread -o build/fuzz_frame
 *   mkdir -p build/fuzz_corpus
 *   build/fuzz_frame -max_total_time=60 build/fuzz_corpus tests/fuzz/corpus
 *
 * New inputs go to build/fuzz_corpus; the seeds in tests/fuzz/corpus stay
 * as committed (tests/fuzz/make_seeds.py regenerates them).
 *
 * Input layout: the whole input is first thrown at the pure decoders (frame
 * header, error frame, unique id, HELLO, rank lists, frame MACs). Then it is
 * read as a script of operations on an in-process root with fd = -1
 * connections:
 *   0 open a connection         1 feed it raw bytes     2 feed a valid HELLO
 *   3 feed a DATA frame         4 peer closes           5 flush its output
 *   6 advance time and tick     7 sweep dead connections
 * Valid HELLOs (op 2) are computed with the root's secret, and DATA frames
 * (op 3) are sealed with the connection's session key and next sequence
 * number, so the script reaches the admitted-rank and all-gather paths, not
 * only the refusals. Op 3's mode byte spoils the frame on request (a flipped
 * bit, a replayed sequence number, the wrong direction): the root must then
 * refuse it and fail the rendezvous.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bootstrap/bootstrap.h"
#include "bootstrap/root.h"
#include "bootstrap/wire.h"

#define MAX_CONNS 12

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Fuzzer harness invariants: a violation is a crash the fuzzer reports. */
#define INVARIANT(c)            \
  do {                          \
    if (!(c)) __builtin_trap(); \
  } while (0)

typedef struct Script {
  const uint8_t *p;
  size_t left;
} Script;

static int next(Script *s) {
  if (s->left == 0) return -1;
  s->left--;
  return *s->p++;
}

static void decoders(const uint8_t *data, size_t size) {
  epxBsHeader h;
  if (size >= EPX_BS_HEADER_BYTES + 8) {
    uint32_t allowed, nranks;
    memcpy(&allowed, data + EPX_BS_HEADER_BYTES, 4);
    memcpy(&nranks, data + EPX_BS_HEADER_BYTES + 4, 4);
    nranks %= EPX_BOOTSTRAP_MAX_RANKS + 1;
    if (epx_bs_header_decode(data, allowed, nranks, &h) == EPX_BS_HDR_OK) {
      INVARIANT(h.len <= epx_bs_max_payload((epxBsFrameType)h.type, nranks));
      INVARIANT(allowed & EPX_BS_TYPE_BIT(h.type));
      INVARIANT(h.version == EPX_BS_PROTOCOL_VERSION);
      /* Frames that are always authenticated have room for the trailer. */
      if (h.type == EPX_BS_DATA || h.type == EPX_BS_RESULT || h.type == EPX_BS_READY)
        INVARIANT(h.len >= EPX_BS_MAC_BYTES);
    }
  }
  /* Frame MACs: a sealed frame verifies; with one bit changed (header,
   * payload or trailer), another sequence number or direction, it does not. */
  if (size >= EPX_BS_KEY_BYTES + 12) {
    const uint8_t *key = data;
    uint64_t seq;
    memcpy(&seq, data + EPX_BS_KEY_BYTES, 8);
    const uint8_t *pay = data + EPX_BS_KEY_BYTES + 12;
    size_t plen = size - EPX_BS_KEY_BYTES - 12;
    if (plen > 4096) plen = 4096;
    uint8_t hdr[EPX_BS_HEADER_BYTES], mac[EPX_BS_MAC_BYTES], copy[4096];
    uint8_t dir = (data[EPX_BS_KEY_BYTES + 8] & 1) ? EPX_BS_DIR_TO_ROOT : EPX_BS_DIR_TO_CLIENT;
    epx_bs_frame_seal(key, dir, seq, EPX_BS_DATA, 1, pay, (uint32_t)plen, hdr, mac);
    INVARIANT(epx_bs_frame_check(key, dir, seq, hdr, pay, plen, mac));
    INVARIANT(!epx_bs_frame_check(key, dir, seq + 1, hdr, pay, plen, mac));
    INVARIANT(!epx_bs_frame_check(key, (uint8_t)(3 - dir), seq, hdr, pay, plen, mac));
    uint32_t at;
    memcpy(&at, data + EPX_BS_KEY_BYTES + 8, 4);
    at >>= 1;
    size_t total = EPX_BS_HEADER_BYTES + plen + EPX_BS_MAC_BYTES;
    size_t pos = at % total;
    uint8_t bit = (uint8_t)(1u << (at / (uint32_t)total % 8));
    memcpy(copy, pay, plen);
    if (pos < EPX_BS_HEADER_BYTES)
      hdr[pos] ^= bit;
    else if (pos < EPX_BS_HEADER_BYTES + plen)
      copy[pos - EPX_BS_HEADER_BYTES] ^= bit;
    else
      mac[pos - EPX_BS_HEADER_BYTES - plen] ^= bit;
    INVARIANT(!epx_bs_frame_check(key, dir, seq, hdr, copy, plen, mac));
  }
  char msg[EPX_BS_ERROR_TEXT_MAX + 1];
  size_t elen = size < EPX_BS_ERROR_MAX_PAYLOAD ? size : EPX_BS_ERROR_MAX_PAYLOAD;
  epx_bs_error_decode(data, elen, msg, sizeof(msg));
  INVARIANT(strlen(msg) <= elen);
  for (size_t i = 0; msg[i]; i++) INVARIANT(msg[i] >= 0x20 && msg[i] < 0x7f);
  if (size >= EPX_UNIQUE_ID_BYTES) {
    epxUniqueId id;
    epxBsAddr a;
    uint8_t secret[EPX_BS_SECRET_BYTES];
    char err[256];
    memcpy(id.internal, data, EPX_UNIQUE_ID_BYTES);
    if (epx_bs_id_decode(&id, &a, secret, err, sizeof(err)) == 0)
      INVARIANT((a.family == 4 || a.family == 6) && a.port != 0);
  }
  if (size >= EPX_BS_HELLO_BYTES) {
    epxBsHello hello;
    uint8_t back[EPX_BS_HELLO_BYTES];
    epx_bs_hello_decode(data, &hello);
    epx_bs_hello_encode(&hello, back);
    INVARIANT(memcmp(back, data, EPX_BS_HELLO_BYTES) == 0);
  }
  char list[128];
  int n = size < 3000 ? (int)size : 3000;
  epx_bs_format_ranks(list, sizeof(list), data, n, data[0]);
  INVARIANT(strlen(list) < sizeof(list));
}

static void check_root(const epxRoot *r) {
  int pending = 0, ranks = 0;
  for (size_t i = 0; i < r->nconns; i++) {
    pending += r->conns[i]->state == EPX_RC_PENDING;
    ranks += r->conns[i]->state == EPX_RC_RANK;
  }
  INVARIANT(pending == r->npending);
  INVARIANT(pending <= EPX_ROOT_MAX_PENDING);
  INVARIANT(ranks <= r->nconnected - r->nleft);
  INVARIANT(r->nranks >= 0 && r->nranks <= EPX_BOOTSTRAP_MAX_RANKS);
  INVARIANT(r->round_count >= 0 && r->round_count <= r->nranks);
  INVARIANT(epx_bootstrap_root_undelivered() >= 0);
}

static void root_script(const uint8_t *data, size_t size) {
  static const uint8_t secret[EPX_BS_SECRET_BYTES] = {1, 2,  3,  4,  5,  6,  7,  8,
                                                      9, 10, 11, 12, 13, 14, 15, 16};
  int64_t now = 1000000000LL;
  epxRoot *r = epx_root_new(secret, -1, now + 100000000000LL);
  if (!r) return;
  epxRootConn *conns[MAX_CONNS];
  int nconns = 0;
  Script s = {data, size};
  int op;
  while ((op = next(&s)) >= 0) {
    op %= 8;
    if (op == 0) {
      if (nconns < MAX_CONNS) {
        epxRootConn *c = epx_root_add_conn(r, -1, "fuzz", now);
        if (c) conns[nconns++] = c;
      }
      check_root(r);
      continue;
    }
    if (op == 6) {
      int dt = next(&s);
      now += (int64_t)(dt < 0 ? 0 : dt) * 50000000LL;
      epx_root_tick(r, now);
      check_root(r);
      continue;
    }
    if (op == 7) {
      int w = 0;
      for (int i = 0; i < nconns; i++)
        if (conns[i]->state != EPX_RC_DEAD) conns[w++] = conns[i];
      nconns = w;
      epx_root_sweep(r);
      check_root(r);
      continue;
    }
    int idx = next(&s);
    if (idx < 0 || nconns == 0) break;
    epxRootConn *c = conns[idx % nconns];
    switch (op) {
      case 1: { /* raw bytes */
        int len = next(&s);
        if (len < 0) break;
        size_t n = (size_t)len < s.left ? (size_t)len : s.left;
        epx_root_input(r, c, s.p, n, now);
        s.p += n;
        s.left -= n;
        break;
      }
      case 2: { /* a HELLO with a valid MAC */
        int rank = next(&s), nranks = next(&s), tmo = next(&s);
        if (tmo < 0) break;
        epxBsHello hello;
        memset(&hello, 0, sizeof(hello));
        hello.client_nonce[0] = (uint8_t)rank;
        hello.nranks = (uint32_t)(nranks % 9);
        hello.timeout_ms = (uint32_t)tmo * 20;
        epx_bs_client_mac(secret, c->nonce, (uint32_t)rank % 9, &hello, hello.mac);
        uint8_t frame[EPX_BS_HEADER_BYTES + EPX_BS_HELLO_BYTES];
        epx_bs_header_encode(frame, EPX_BS_HELLO, (uint32_t)rank % 9, EPX_BS_HELLO_BYTES);
        epx_bs_hello_encode(&hello, frame + EPX_BS_HEADER_BYTES);
        epx_root_input(r, c, frame, sizeof(frame), now);
        break;
      }
      case 3: { /* a DATA frame marked with the connection's rank, sealed */
        int mode = next(&s), len = next(&s);
        if (len < 0) break;
        size_t n = (size_t)len < s.left ? (size_t)len : s.left;
        uint8_t hdr[EPX_BS_HEADER_BYTES], mac[EPX_BS_MAC_BYTES], copy[256];
        uint64_t seq = c->rx_seq;
        uint8_t dir = EPX_BS_DIR_TO_ROOT;
        mode %= 4; /* 0 valid, 1 one bit flipped, 2 replayed sequence number, 3 wrong direction */
        if (mode == 2) seq = seq > 0 ? seq - 1 : seq + 1;
        if (mode == 3) dir = EPX_BS_DIR_TO_CLIENT;
        epx_bs_frame_seal(c->key, dir, seq, EPX_BS_DATA, c->rank < 0 ? 0u : (uint32_t)c->rank, s.p,
                          (uint32_t)n, hdr, mac);
        memcpy(copy, s.p, n);
        if (mode == 1) {
          if (n > 0)
            copy[(size_t)len % n] ^= 0x10;
          else
            mac[len % EPX_BS_MAC_BYTES] ^= 0x10;
        }
        /* A clean start on an admitted connection of a running rendezvous:
         * the verdict is known in advance. */
        int judged = c->state == EPX_RC_RANK && c->authed && c->hdr_got == 0 && !c->in_payload &&
                     r->phase == EPX_ROOT_RUNNING;
        uint64_t refused = r->refused;
        epx_root_input(r, c, hdr, sizeof(hdr), now);
        epx_root_input(r, c, copy, n, now);
        epx_root_input(r, c, mac, sizeof(mac), now);
        if (judged && mode != 0)
          INVARIANT(r->refused == refused + 1 && r->phase == EPX_ROOT_FAILED);
        if (judged && mode == 0) INVARIANT(r->refused == refused);
        s.p += n;
        s.left -= n;
        break;
      }
      case 4:
        epx_root_peer_closed(r, c, now);
        break;
      case 5:
        epx_root_flush(r, c, now);
        break;
    }
    check_root(r);
    (void)epx_root_next_event(r, now);
    (void)epx_root_finished(r, now);
  }
  epx_root_free(r);
  INVARIANT(epx_bootstrap_root_undelivered() == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0) return 0;
  decoders(data, size);
  root_script(data, size);
  return 0;
}
