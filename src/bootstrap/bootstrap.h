/*
 * bootstrap.h - rendezvous of the ranks at init: all-gather and barrier.
 *
 * Two implementations behind one interface:
 *  - TCP (tcp.c): epx_bootstrap_get_unique_id() binds a listening socket and
 *    starts a root service thread in the calling process; the id carries the
 *    address and a random 128-bit secret. Each rank connects to the root,
 *    proves knowledge of the secret by challenge-response (HMAC-SHA256, never
 *    sending the secret), and exchanges length-prefixed, versioned frames with
 *    strict bounds and a deadline on every read and write; every frame after
 *    the handshake carries an HMAC under a per-connection session key and a
 *    per-direction sequence number (forged, altered or replayed frames fail). The root relays
 *    all-gathers (star topology); it accepts without blocking, so a stalled or
 *    hostile connection cannot hold up the others, and it rejects duplicate ranks.
 *  - callback (callback.c): the caller's epxAllGatherFn.
 * Used only during epxCommInitRank*; the data path never touches it.
 */
#ifndef EPX_BOOTSTRAP_H
#define EPX_BOOTSTRAP_H

#include <stddef.h>
#include <stdint.h>

#include "epx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest per-rank payload of one all-gather (bounds every frame). */
#define EPX_BOOTSTRAP_MAX_PAYLOAD (64u * 1024u)
/* Largest rank count the bootstrap accepts. */
#define EPX_BOOTSTRAP_MAX_RANKS 65536

typedef struct epxBootstrap epxBootstrap;

/* Fills *id and starts the root service (TCP). `err` receives a message on failure. */
epxResult_t epx_bootstrap_get_unique_id(epxUniqueId *id, int64_t deadline_ms, char *err,
                                        size_t errlen);

/* Connects rank `rank` of `nranks` to the root named in *id. Returns when
 * every rank has connected (epxTimeout naming the missing ranks otherwise).
 * deadline_ns is an absolute epx_now_ns() time. */
epxResult_t epx_bootstrap_tcp_create(const epxUniqueId *id, int rank, int nranks,
                                     int64_t deadline_ns, epxBootstrap **out, char *err,
                                     size_t errlen);

/* Wraps a caller all-gather. */
epxResult_t epx_bootstrap_callback_create(epxAllGatherFn fn, void *user, int rank, int nranks,
                                          epxBootstrap **out, char *err, size_t errlen);

/* recv gets nranks * bytes: rank i's `send` at offset i * bytes.
 * bytes <= EPX_BOOTSTRAP_MAX_PAYLOAD. Collective. */
epxResult_t epx_bootstrap_allgather(epxBootstrap *b, const void *send, void *recv, size_t bytes,
                                    char *err, size_t errlen);
epxResult_t epx_bootstrap_barrier(epxBootstrap *b, char *err, size_t errlen);
int epx_bootstrap_rank(const epxBootstrap *b);
int epx_bootstrap_nranks(const epxBootstrap *b);
/* Closes connections; local. NULL is a no-op. */
void epx_bootstrap_destroy(epxBootstrap *b);

/* The challenge-response and framing pieces, exposed for the unit tests and the fuzzer. */
void epx_sha256(const void *data, size_t len, uint8_t out[32]);
void epx_hmac_sha256(const uint8_t *key, size_t keylen, const void *data, size_t len,
                     uint8_t out[32]);
/* HMAC-SHA256 of the concatenation parts[0] .. parts[nparts-1] (lens[i] bytes
 * each; a NULL part must have length 0), without copying them together. */
void epx_hmac_sha256_parts(const uint8_t *key, size_t keylen, const void *const *parts,
                           const size_t *lens, size_t nparts, uint8_t out[32]);

#ifdef __cplusplus
}
#endif

#endif /* EPX_BOOTSTRAP_H */
