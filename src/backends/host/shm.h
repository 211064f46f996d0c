/*
 * shm.h - the host backend's shared memory: one POSIX segment per rank, the
 * cross-process barrier and the waits that watch peers while they block.
 *
 * Segment of one rank (offsets identical on every rank, see hostSegLayout):
 *   control block  pid, protocol, arrival counter, dead word
 *   header slots   [2] call headers (slot = seq & 1) with their count arrays
 *   normal region  [2] round buffers (round & 1): a dispatch window published
 *                  by this rank, or a combine inbox written by every peer
 *   LL region      [2] slots (low-latency op number & 1): a dispatch send
 *                  buffer published by this rank, or a combine inbox
 *
 * Synchronisation is by monotonic counters only. A rank "arrives" by storing
 * its next barrier number in its own control block (release) and waits until
 * every peer's counter is at least that number (acquire). Everything written
 * before an arrival - into its own segment or into a peer's - is visible to a
 * peer that has seen the arrival. Nothing is ever reset, so a fast rank that is
 * already one barrier ahead never confuses a slow one.
 */
#ifndef EPX_HOST_SHM_H
#define EPX_HOST_SHM_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "core/internal.h"
#include "core/liveness.h"

/* Identifies a host segment (and its layout revision) to the peers that map it. */
#define EPX_HOST_SEG_MAGIC 0x4550584853454731ull /* "EPXHSEG1" */
/* Everything in a segment starts on its own cache line. */
#define EPX_HOST_ALIGN 64

/* Values of hostCtrl.dead: why a rank will not arrive any more (the values
 * every backend uses, core/liveness.h). */
enum {
  EPX_HOST_ALIVE = EPX_PEER_ALIVE,
  EPX_HOST_ABORTED = EPX_PEER_ABORTED,    /* epxCommAbort */
  EPX_HOST_FAILED = EPX_PEER_FAILED,      /* a fatal error (timeout, dead peer) */
  EPX_HOST_DESTROYED = EPX_PEER_DESTROYED /* epxCommDestroy */
};

typedef struct hostCtrl {
  /* Written once before the first bootstrap barrier, read-only afterwards. */
  uint64_t magic;
  int32_t protocol_version;
  int32_t rank, nranks;
  int32_t chunk_tokens;
  int32_t pid;
  uint64_t start_time; /* /proc/<pid>/stat field 22: tells pid reuse apart */
  uint64_t seg_bytes;
  /* Each word on its own line: peers poll them while their owner writes the rest. */
  _Alignas(EPX_HOST_ALIGN) _Atomic uint64_t arrive;
  _Alignas(EPX_HOST_ALIGN) _Atomic uint32_t dead;
  /* Why this rank gave up (EPX_HOST_FAILED): the peer it lost and the code it
   * returned, so ranks that fail in its wake name the original culprit.
   * Written before `dead` is released, read after it is acquired. */
  int32_t fail_peer;
  int32_t fail_code;
  /* Owner-process only: the thread that sets 0 -> 1 writes the two fields
   * above and then `dead` (an abort from another thread may race with a
   * failing wait; the first reason stays). */
  _Atomic uint32_t dead_claim;
} hostCtrl;

/* A call header as published in a header slot; count arrays follow it. */
typedef struct hostHeader {
  uint64_t seq;
  uint64_t handle_seq;       /* filled_seq of the handle the call reuses; 0 when none */
  int64_t num_worst_tokens;  /* dispatch: > 0 in worst-case mode */
  int32_t op;
  int32_t reject;            /* epxResult_t of a local rejection; 0 = none */
  int32_t hidden, num_topk, num_tokens;
  int32_t x_type, scale_format, topk_int64;
  int32_t has_topk, has_weights;
  int32_t use_fp8, round_scale, use_ue8m0;
  int32_t has_counts;        /* the count arrays below hold this call's routing */
} hostHeader;

/* Byte offsets inside a segment; computed once from the agreed config. */
typedef struct hostSegLayout {
  int nranks, num_experts, hidden, max_topk, chunk, ll_tokens;
  size_t hdr_off, hdr_slot_bytes;      /* slot i at hdr_off + i * hdr_slot_bytes */
  size_t hdr_counts_off, hdr_ecounts_off; /* inside a slot: int32 [R], int32 [E] */
  size_t norm_off, norm_buf_bytes;     /* buffer i at norm_off + i * norm_buf_bytes */
  /* dispatch window, inside a normal buffer: [C][R] bytes, then per-token sections */
  size_t win_bitmap_off, win_payload_off, win_scales_off, win_topk_off, win_weights_off;
  /* combine inbox, inside a normal buffer: rows [R][C][H] BF16, weights [R][C][K] */
  size_t inbox_x_off, inbox_w_off;
  size_t ll_off, ll_slot_bytes;        /* slot i at ll_off + i * ll_slot_bytes */
  /* LL dispatch inside a slot: payload [llT][row], scales [llT][...], topk [llT][K] int32 */
  size_t ll_payload_off, ll_scales_off, ll_topk_off;
  size_t total_bytes;
} hostSegLayout;

/* What a rank knows about one peer (itself included). */
typedef struct hostPeer {
  unsigned char *base; /* the peer's segment, mapped here */
  hostCtrl *ctrl;
  pid_t pid;
  uint64_t start_time;
  int watch_pid; /* 1 when the pid names the peer's process in our namespace */
} hostPeer;

/* Rounds `n` up to the segment alignment. */
size_t epx_host_align(size_t n);

/* Offsets for a config; the same on every rank (chunk and limits are agreed). */
void epx_host_seg_layout(hostSegLayout *l, int nranks, int num_experts, int hidden, int max_topk,
                         int chunk, int ll_tokens);

/* Creates, sizes (reserving the pages) and maps a fresh segment. */
epxResult_t epx_host_seg_create(epxComm_t comm, const char *name, size_t bytes, void **base);
/* Maps an existing segment of exactly `bytes`. */
epxResult_t epx_host_seg_open(epxComm_t comm, const char *name, size_t bytes, void **base);

#endif /* EPX_HOST_SHM_H */
