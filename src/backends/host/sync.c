/*
 * sync.c - the host backend's barrier, its watched waits and the call-header
 * exchange that opens every collective op.
 */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "backends/host/host.h"
#include "core/log.h"

/* Busy polls before a waiting rank starts giving its CPU away: covers the
 * common case of peers arriving within microseconds without a syscall. */
#define HOST_SPIN_ITERS 2000
/* Then sched_yield() for this long, so oversubscribed ranks (more processes
 * than cores, as in CI) let the peer they wait for run. */
#define HOST_YIELD_NS 200000
/* Then sleep between polls, so a long wait costs no CPU. */
#define HOST_SLEEP_NS 20000
/* How often the abort flag, the peers' dead words, their pids and the
 * deadlines are looked at. */
#define HOST_CHECK_NS 1000000
/* How often /proc is read to catch zombies and reused pids (kill(pid, 0)
 * succeeds on both). */
#define HOST_PROC_CHECK_NS 10000000

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static _Atomic uint64_t *counter_of(const hostPeer *p) { return &p->ctrl->arrive; }

uint64_t epx_host_arrive(hostComm *hc) {
  uint64_t n = ++hc->arrivals;
  /* Release: every write this rank made before arriving (its header, its
   * published tokens, rows pushed into peers' inboxes) happens-before the
   * acquire load in a peer's epx_host_wait that sees n. */
  atomic_store_explicit(&hc->peers[hc->rank].ctrl->arrive, n, memory_order_release);
  return n;
}

/* Records why this rank stops: peers waiting on it then fail at once instead
 * of timing out. The first reason stays. */
void epx_host_mark_dead(hostComm *hc, uint32_t why, int fail_peer, epxResult_t fail_code) {
  hostCtrl *c = hc->peers[hc->rank].ctrl;
  if (atomic_load_explicit(&c->dead, memory_order_relaxed) != EPX_HOST_ALIVE) return;
  /* Threads of this process (an abort, a failing wait) may get here at once:
   * only the one that claims the word writes the fields (TSan saw two). */
  uint32_t unclaimed = 0;
  if (!atomic_compare_exchange_strong_explicit(&c->dead_claim, &unclaimed, 1u, memory_order_acq_rel,
                                               memory_order_relaxed))
    return;
  c->fail_peer = fail_peer;
  c->fail_code = (int32_t)fail_code;
  /* Release pairs with the acquire load of `dead` in the peers' waits, which
   * then read fail_peer / fail_code. */
  atomic_store_explicit(&c->dead, why, memory_order_release);
}

/* 0 when the peer's process has certainly exited (or its pid was reused). */
static int peer_process_alive(const hostPeer *p, int read_proc) {
  return !p->watch_pid || epx_proc_alive(p->pid, p->start_time, read_proc);
}

/* Why peer q will not arrive, from its dead word (and, for a rank that gave
 * up, the peer it lost). */
static void describe_dead(char *out, size_t len, const hostPeer *peer, int q, uint32_t dead) {
  epx_describe_dead(out, len, q, (int)peer->pid, dead, peer->ctrl->fail_peer,
                    peer->ctrl->fail_code);
}

epxResult_t epx_host_wait(epxComm_t comm, uint64_t target, epxOp_t op, uint64_t seq,
                          const char *phase) {
  hostComm *hc = epx_host_of(comm);
  int R = hc->nranks, p = 0;
  uint64_t spins = 0;
  int64_t start = 0, next_check = 0, next_proc = 0;
  int warned = -1; /* the peer named by the soft-timeout warning, once given */
  epxResult_t code = epxSuccess;
  char why[160] = "";

  for (;;) {
    /* Acquire pairs with the release store in the peer's epx_host_arrive:
     * what the peer wrote before arriving is visible once this is seen. */
    while (p < R &&
           atomic_load_explicit(counter_of(&hc->peers[p]), memory_order_acquire) >= target)
      ++p;
    if (p == R) {
      if (warned >= 0) epx_note_slow_wait(comm, warned, seq, epx_now_ns() - start, 0);
      return epxSuccess;
    }
    if (++spins <= HOST_SPIN_ITERS) {
      cpu_relax();
      continue;
    }
    int64_t now = epx_now_ns();
    if (start == 0) {
      start = now;
      next_check = now;
      next_proc = now + HOST_PROC_CHECK_NS;
    }
    if (atomic_load_explicit(&comm->abort_flag, memory_order_relaxed)) {
      code = epxAborted;
      snprintf(why, sizeof why, "aborted by epxCommAbort while waiting for rank %d", p);
      break;
    }
    if (now >= next_check) {
      next_check = now + HOST_CHECK_NS;
      int read_proc = now >= next_proc;
      if (read_proc) next_proc = now + HOST_PROC_CHECK_NS;
      /* A rank that is missing and aborted, destroyed or gone is a root
       * cause. A rank that gave up (FAILED) - or aborted after arriving -
       * dooms the call too, but may only be reacting to a root cause we
       * have not seen yet, so it is reported only when no root cause is. */
      int cascade = -1;
      for (int q = 0; q < R && code == epxSuccess; ++q) {
        if (q == hc->rank) continue; /* our own abort is comm->abort_flag */
        const hostPeer *peer = &hc->peers[q];
        uint32_t dead = atomic_load_explicit(&peer->ctrl->dead, memory_order_acquire);
        int arrived = atomic_load_explicit(counter_of(peer), memory_order_acquire) >= target;
        if (dead == EPX_HOST_FAILED || (arrived && dead == EPX_HOST_ABORTED)) {
          if (cascade < 0) cascade = q;
        } else if (!arrived && dead != EPX_HOST_ALIVE) {
          code = epxPeerFailed;
          p = q;
          describe_dead(why, sizeof why, peer, q, dead);
        } else if (!arrived && !peer_process_alive(peer, read_proc)) {
          code = epxPeerFailed;
          p = q;
          epx_describe_dead(why, sizeof why, q, (int)peer->pid, EPX_PEER_EXITED, -1, 0);
        }
      }
      if (code == epxSuccess && cascade >= 0) {
        code = epxPeerFailed;
        p = cascade;
        describe_dead(why, sizeof why, &hc->peers[cascade], cascade,
                      atomic_load_explicit(&hc->peers[cascade].ctrl->dead, memory_order_acquire));
      }
      if (code != epxSuccess) break;
      if (comm->soft_timeout_ns > 0 && warned < 0 && now - start >= comm->soft_timeout_ns) {
        warned = p;
        epx_note_slow_wait(comm, p, seq, now - start, 1);
        EPX_WARN(hc->rank, "%s seq %llu, %s: waiting %.0f ms for rank %d (barrier counter %llu, "
                 "want %llu)",
                 epx_op_name(op), (unsigned long long)seq, phase, (double)(now - start) / 1e6, p,
                 (unsigned long long)atomic_load_explicit(counter_of(&hc->peers[p]),
                                                          memory_order_relaxed),
                 (unsigned long long)target);
      }
      if (comm->timeout_ns > 0 && now - start >= comm->timeout_ns) {
        code = epxTimeout;
        snprintf(why, sizeof why, "timed out waiting for rank %d", p);
        break;
      }
    }
    if (now - start < HOST_YIELD_NS) {
      sched_yield();
    } else {
      struct timespec ts = {0, HOST_SLEEP_NS};
      nanosleep(&ts, NULL);
    }
  }

  uint64_t seen = atomic_load_explicit(counter_of(&hc->peers[p]), memory_order_relaxed);
  const int64_t waited_ns = epx_now_ns() - start;
  double waited_ms = (double)waited_ns / 1e6;
  if (warned >= 0) epx_note_slow_wait(comm, warned, seq, waited_ns, 0);
  /* Name the root cause onwards: the rank we lost, or the one it lost. */
  int culprit = p;
  if (code == epxPeerFailed &&
      atomic_load_explicit(&hc->peers[p].ctrl->dead, memory_order_acquire) == EPX_HOST_FAILED &&
      hc->peers[p].ctrl->fail_peer >= 0)
    culprit = hc->peers[p].ctrl->fail_peer;
  epx_host_mark_dead(hc, code == epxAborted ? EPX_HOST_ABORTED : EPX_HOST_FAILED,
                     code == epxAborted ? -1 : culprit, code);
  epx_set_async_error(comm, code);
  return epx_error(comm, code,
                   "%s seq %llu, %s: %s after %.1f ms (barrier counter of rank %d: expected >= "
                   "%llu, seen %llu)",
                   epx_op_name(op), (unsigned long long)seq, phase, why, waited_ms, p,
                   (unsigned long long)target, (unsigned long long)seen);
}

epxResult_t epx_host_barrier(epxComm_t comm, epxOp_t op, uint64_t seq, const char *phase) {
  uint64_t n = epx_host_arrive(epx_host_of(comm));
  return epx_host_wait(comm, n, op, seq, phase);
}

/* ---- call-header exchange ---- */

void epx_host_header_reject(hostHeader *h, const epxCall_t *call, epxResult_t code) {
  memset(h, 0, sizeof *h);
  h->op = (int32_t)call->op;
  h->seq = call->seq;
  h->reject = (int32_t)code;
}

#define OPBIT(op) (1u << (op))
#define ALL_OPS                                                                         \
  (OPBIT(EPX_OP_DISPATCH_NOTIFY) | OPBIT(EPX_OP_DISPATCH) | OPBIT(EPX_OP_COMBINE) |     \
   OPBIT(EPX_OP_LL_DISPATCH) | OPBIT(EPX_OP_LL_COMBINE))

/* Only ranks for which the field means something are compared. */
enum { WHEN_ALWAYS = 0, WHEN_HAS_TOPK = 1, WHEN_HAS_WEIGHTS = 2 };

typedef struct agreedField {
  const char *name;
  size_t offset;
  int is64;
  unsigned ops; /* OPBIT mask of the ops that must agree on it */
  int when;
} agreedField;

/* What every rank of one call must agree on (token counts may differ). */
static const agreedField agreed_fields[] = {
    {"hidden", offsetof(hostHeader, hidden), 0, ALL_OPS, WHEN_ALWAYS},
    {"num_topk", offsetof(hostHeader, num_topk), 0, ALL_OPS & ~OPBIT(EPX_OP_COMBINE),
     WHEN_ALWAYS},
    /* combine reads K only with topk_weights (a rank that received nothing may pass none) */
    {"num_topk", offsetof(hostHeader, num_topk), 0, OPBIT(EPX_OP_COMBINE), WHEN_HAS_WEIGHTS},
    {"topk_idx_type (1 = int64)", offsetof(hostHeader, topk_int64), 0,
     OPBIT(EPX_OP_DISPATCH_NOTIFY) | OPBIT(EPX_OP_DISPATCH) | OPBIT(EPX_OP_LL_DISPATCH) |
         OPBIT(EPX_OP_LL_COMBINE),
     WHEN_HAS_TOPK},
    {"x_type", offsetof(hostHeader, x_type), 0, OPBIT(EPX_OP_DISPATCH), WHEN_ALWAYS},
    {"scale_format", offsetof(hostHeader, scale_format), 0, OPBIT(EPX_OP_DISPATCH), WHEN_ALWAYS},
    {"use_fp8", offsetof(hostHeader, use_fp8), 0, OPBIT(EPX_OP_LL_DISPATCH), WHEN_ALWAYS},
    {"round_scale", offsetof(hostHeader, round_scale), 0, OPBIT(EPX_OP_LL_DISPATCH), WHEN_ALWAYS},
    {"use_ue8m0", offsetof(hostHeader, use_ue8m0), 0, OPBIT(EPX_OP_LL_DISPATCH), WHEN_ALWAYS},
    /* Ranks reusing routing must reuse the same call's: the rows line up only then. */
    {"the call that filled the handle (seq; 0 = empty handle)", offsetof(hostHeader, handle_seq),
     1, OPBIT(EPX_OP_DISPATCH) | OPBIT(EPX_OP_COMBINE) | OPBIT(EPX_OP_LL_COMBINE), WHEN_ALWAYS},
};

static long long field_value(const hostHeader *h, const agreedField *f) {
  if (f->is64) {
    uint64_t v;
    memcpy(&v, (const char *)h + f->offset, sizeof v);
    return (long long)v;
  }
  int32_t v;
  memcpy(&v, (const char *)h + f->offset, sizeof v);
  return v;
}

static int field_applies(const hostHeader *h, const agreedField *f) {
  if (f->when == WHEN_HAS_TOPK) return h->has_topk;
  if (f->when == WHEN_HAS_WEIGHTS) return h->has_weights;
  return 1;
}

epxResult_t epx_host_exchange(epxComm_t comm, const epxCall_t *call, hostHeader *mine) {
  hostComm *hc = epx_host_of(comm);
  int R = hc->nranks, me = hc->rank;
  const char *opn = epx_op_name(call->op);
  unsigned long long seq = (unsigned long long)call->seq;
  mine->op = (int32_t)call->op;
  mine->seq = call->seq;
  if (call->local_invalid) mine->reject = epxInvalidArgument;
  /* The count arrays were written into the slot by the caller; the header
   * goes last. Both are published by the barrier's release. */
  memcpy(epx_host_header(hc, me, call->seq), mine, sizeof *mine);
  epxResult_t res = epx_host_barrier(comm, call->op, call->seq, "header exchange");
  if (res != epxSuccess) return res;

  /* 1. Same call everywhere? (A peer in another call has a header of another
   *    seq in this slot, or of another op.) */
  for (int r = 0; r < R; ++r) {
    const hostHeader *h = epx_host_header(hc, r, call->seq);
    if (h->seq != call->seq || h->op != (int32_t)call->op)
      return epx_error(comm, epxMismatch,
                       "%s seq %llu: ranks are making different calls: rank %d is in %s seq %llu "
                       "while rank %d is in %s seq %llu (every rank must make the same sequence of "
                       "collective calls)",
                       opn, seq, me, opn, seq, r, epx_op_name((epxOp_t)h->op),
                       (unsigned long long)h->seq);
  }
  /* 2. Did a rank reject its own arguments? Then the call does nothing anywhere. */
  if (mine->reject != epxSuccess) return (epxResult_t)mine->reject;
  for (int r = 0; r < R; ++r) {
    const hostHeader *h = epx_host_header(hc, r, call->seq);
    if (h->reject != epxSuccess)
      return epx_error(comm, epxRemoteError,
                       "%s seq %llu: rank %d rejected its arguments (%s); the call did nothing on "
                       "any rank, see that rank's epxCommGetLastError",
                       opn, seq, r, epxGetErrorString((epxResult_t)h->reject));
  }
  /* 3. Do the ranks agree on shapes and types? Every rank scans the same
   *    table in the same order, so all name the same field and ranks. */
  for (size_t f = 0; f < sizeof agreed_fields / sizeof agreed_fields[0]; ++f) {
    const agreedField *fd = &agreed_fields[f];
    if (!(fd->ops & OPBIT(call->op))) continue;
    int first = -1;
    long long v0 = 0;
    for (int r = 0; r < R; ++r) {
      const hostHeader *h = epx_host_header(hc, r, call->seq);
      if (!field_applies(h, fd)) continue;
      long long v = field_value(h, fd);
      if (first < 0) {
        first = r;
        v0 = v;
      } else if (v != v0) {
        return epx_error(comm, epxMismatch,
                         "%s seq %llu: ranks disagree on %s: rank %d has %lld, rank %d has %lld",
                         opn, seq, fd->name, first, v0, r, v);
      }
    }
  }
  return epxSuccess;
}
