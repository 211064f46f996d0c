/*
 * host_backend.c - the host backend's ops table: init (segments of every rank
 * mapped by every rank), destroy, abort, handles and size hints.
 *
 * The host backend runs the ranks as processes on one machine and moves data
 * through POSIX shared memory. It is the CPU fallback, what CI runs end to
 * end, and the behaviour the GPU backends must match bit for bit.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backends/host/host.h"
#include "bootstrap/bootstrap.h"
#include "common/layout_math.h"
#include "core/log.h"
#include "core/params.h"

/* Source tokens per shared-memory round when EPX_HOST_CHUNK_TOKENS is 0. */
#define EPX_HOST_DEFAULT_CHUNK 256

/* Tokens per round: memory grows with this, not with T. Clamped to the
 * largest T, since a bigger window could never fill. */
static int host_chunk_tokens(const epxConfig_t *c) {
  int64_t v = epx_param_int(EPX_PARAM_HOST_CHUNK_TOKENS);
  if (v <= 0) v = EPX_HOST_DEFAULT_CHUNK;
  if (v > c->max_tokens_per_rank) v = c->max_tokens_per_rank;
  return (int)v;
}

static void host_seg_layout_for(hostSegLayout *l, const epxConfig_t *c, int nranks) {
  epx_host_seg_layout(l, nranks, c->num_experts, c->hidden, c->max_topk, host_chunk_tokens(c),
                      c->ll_max_tokens_per_rank);
}

static size_t ll_combine_buffer_bytes(const epxConfig_t *c, int nranks) {
  return (size_t)(c->num_experts / nranks) * (size_t)nranks *
         (size_t)c->ll_max_tokens_per_rank * epx_payload_row_bytes(c->hidden, 0);
}

/* ---- handles ---- */

/* Reserves `bytes` at *off (aligned) and returns where they start. */
static size_t take(size_t *off, size_t bytes) {
  size_t at = *off;
  *off += epx_host_align(bytes);
  return at;
}

/* Lays out one handle's block: the hostHandle, then every array, sized for
 * the config limits. With base NULL it only measures. */
static size_t handle_block(const epxConfig_t *c, int R, unsigned char *base, epxHandle_t h) {
  size_t maxT = (size_t)c->max_tokens_per_rank, llT = (size_t)c->ll_max_tokens_per_rank;
  size_t el = (size_t)(c->num_experts / R), ll_rows = el * (size_t)R * llT, r = (size_t)R;
  size_t off = 0;
  size_t o_hh = take(&off, sizeof(hostHandle));
  size_t o_raw = take(&off, el * sizeof(int));
  size_t o_ptok = take(&off, r * sizeof(int));
  size_t o_in_rank = take(&off, maxT * r);
  size_t o_send_row = take(&off, maxT * r * sizeof(int));
  size_t o_prm = take(&off, r * r * sizeof(int));
  size_t o_src_idx = take(&off, r * maxT * sizeof(int));
  size_t o_per_expert = take(&off, el * sizeof(int));
  size_t o_ll_rank = take(&off, ll_rows * sizeof(int));
  size_t o_ll_token = take(&off, ll_rows * sizeof(int));
  size_t o_ll_kmask = take(&off, ll_rows * sizeof(uint32_t));
  size_t o_ll_count = take(&off, llT ? el * sizeof(int) : 0);
  size_t o_ll_range = take(&off, llT ? el * r * sizeof(int64_t) : 0);
  if (base && h) {
    hostHandle *hh = (hostHandle *)(base + o_hh);
    hh->owner = h;
    hh->raw_expert_counts = (int *)(base + o_raw);
    hh->peer_tokens = (int *)(base + o_ptok);
    h->is_token_in_rank = base + o_in_rank;
    h->send_row = (int *)(base + o_send_row);
    h->rank_prefix_matrix = (int *)(base + o_prm);
    h->recv_src_idx = (int *)(base + o_src_idx);
    h->num_recv_per_expert = (int *)(base + o_per_expert);
    if (llT > 0) {
      h->ll_row_src_rank = (int *)(base + o_ll_rank);
      h->ll_row_src_token = (int *)(base + o_ll_token);
      h->ll_row_kmask = (uint32_t *)(base + o_ll_kmask);
      h->ll_recv_count = (int *)(base + o_ll_count);
      h->ll_layout_range = (int64_t *)(base + o_ll_range);
    }
    h->backend_private = hh;
  }
  return off;
}

static epxResult_t host_handle_alloc(epxComm_t comm, epxHandle_t h) {
  hostComm *hc = epx_host_of(comm);
  size_t bytes = handle_block(&comm->config, comm->nranks, NULL, NULL);
  unsigned char *base = aligned_alloc(EPX_HOST_ALIGN, epx_host_align(bytes));
  if (!base)
    return epx_error(comm, epxOutOfMemory, "epxHandleCreate: cannot allocate %zu bytes of handle "
                     "arrays", bytes);
  memset(base, 0, bytes);
  handle_block(&comm->config, comm->nranks, base, h);
  hostHandle *hh = (hostHandle *)base;
  hh->next = hc->handles;
  if (hc->handles) hc->handles->prev = hh;
  hc->handles = hh;
  return epxSuccess;
}

static void host_handle_free(epxComm_t comm, epxHandle_t h) {
  hostComm *hc = epx_host_of(comm);
  hostHandle *hh = (hostHandle *)h->backend_private;
  if (!hh) return;
  if (hh->prev)
    hh->prev->next = hh->next;
  else if (hc)
    hc->handles = hh->next;
  if (hh->next) hh->next->prev = hh->prev;
  epx_handle_forget_arrays(h);
  free(hh);
}

/* ---- size hints ---- */

static void host_size_hints(const epxConfig_t *c, int nranks, epxSizeHints_t *hints) {
  hostSegLayout l;
  host_seg_layout_for(&l, c, nranks);
  hints->comm_buffer_bytes = l.ll_off; /* control block, headers, normal rounds */
  /* The zero-copy combine buffer is left out: it is allocated only when
   * epxLowLatencyGetCombineBuffer asks for it. */
  hints->ll_buffer_bytes = l.total_bytes - l.ll_off;
  hints->handle_bytes = handle_block(c, nranks, NULL, NULL);
}

/* ---- init / destroy ---- */

static void seg_name(char *out, size_t len, uint64_t uid, int rank) {
  snprintf(out, len, "/epx-%016llx-%d", (unsigned long long)uid, rank);
}

/* Unmaps everything and frees the state; never touches a peer. */
static void host_release(epxComm_t comm, hostComm *hc) {
  if (hc->peers) {
    for (int r = 0; r < hc->nranks; ++r)
      if (hc->peers[r].base) munmap(hc->peers[r].base, hc->lay.total_bytes);
  }
  if (hc->shm_name[0] && !hc->own_unlinked) shm_unlink(hc->shm_name);
  while (hc->handles) {
    hostHandle *hh = hc->handles;
    hc->handles = hh->next;
    epx_handle_forget_arrays(hh->owner);
    free(hh);
  }
  free(hc->peers);
  free(hc->cursor);
  free(hc->peer_tokens);
  free(hc->acc);
  free(hc->part);
  free(hc);
  comm->backend = NULL;
}

/* What each rank tells the others after a set-up step. */
typedef struct initStatus {
  int32_t code;  /* epxResult_t of this rank's step */
  int32_t chunk; /* its EPX_HOST_CHUNK_TOKENS, which must agree */
} initStatus;

/* Exchanges step results: every rank fails the same way when any rank failed. */
static epxResult_t init_agree(epxComm_t comm, struct epxBootstrap *boot, epxResult_t local,
                              int chunk, const char *step) {
  int R = comm->nranks;
  char err[EPX_ERROR_MSG_BYTES] = "";
  initStatus mine = {(int32_t)local, chunk};
  initStatus *all = calloc((size_t)R, sizeof *all);
  if (!all) return epx_error(comm, epxOutOfMemory, "host backend: cannot allocate %d statuses", R);
  epxResult_t res = epx_bootstrap_allgather(boot, &mine, all, sizeof mine, err, sizeof err);
  if (res != epxSuccess) {
    free(all);
    return epx_error(comm, res, "host backend, %s: status exchange failed: %s", step, err);
  }
  res = local; /* this rank's own message is already recorded */
  for (int r = 0; r < R && res == epxSuccess; ++r) {
    if (all[r].code != epxSuccess)
      res = epx_error(comm, (epxResult_t)all[r].code,
                      "host backend, %s: rank %d failed (%s); see that rank's message", step, r,
                      epxGetErrorString((epxResult_t)all[r].code));
    else if (all[r].chunk != all[0].chunk)
      res = epx_error(comm, epxMismatch,
                      "host backend: EPX_HOST_CHUNK_TOKENS differs between ranks (after clamping "
                      "to max_tokens_per_rank): rank 0 uses %d, rank %d uses %d",
                      all[0].chunk, r, all[r].chunk);
  }
  free(all);
  return res;
}

/* Opens and checks the segment of peer r. */
static epxResult_t open_peer(epxComm_t comm, hostComm *hc, int r) {
  char name[64];
  void *base = NULL;
  seg_name(name, sizeof name, comm->uid, r);
  epxResult_t res = epx_host_seg_open(comm, name, hc->lay.total_bytes, &base);
  if (res != epxSuccess) return res;
  hostPeer *p = &hc->peers[r];
  p->base = base;
  p->ctrl = (hostCtrl *)base;
  const hostCtrl *c = p->ctrl;
  if (c->magic != EPX_HOST_SEG_MAGIC || c->protocol_version != EPX_PROTOCOL_VERSION ||
      c->rank != r || c->nranks != hc->nranks || c->seg_bytes != hc->lay.total_bytes)
    return epx_error(comm, epxMismatch,
                     "segment %s of rank %d does not match (magic %llx, protocol %d, rank %d of "
                     "%d, %llu bytes; expected protocol %d, rank %d of %d, %zu bytes)",
                     name, r, (unsigned long long)c->magic, c->protocol_version, c->rank,
                     c->nranks, (unsigned long long)c->seg_bytes, EPX_PROTOCOL_VERSION, r,
                     hc->nranks, hc->lay.total_bytes);
  p->pid = (pid_t)c->pid;
  p->start_time = c->start_time;
  /* Watch the pid only if it names the peer's process here: in another pid
   * namespace (containers sharing /dev/shm) it could name anything. */
  p->watch_pid = epx_proc_visible(p->pid, c->start_time);
  if (!p->watch_pid)
    EPX_INFO(hc->rank, "host backend: rank %d (pid %d) is not visible in /proc here; its death "
             "will be seen only through its dead word or the timeout", r, (int)p->pid);
  return epxSuccess;
}

static epxResult_t host_init(epxComm_t comm, struct epxBootstrap *boot) {
  int R = comm->nranks, me = comm->rank;
  const epxConfig_t *cfg = &comm->config;
  hostCtrl probe;
  if (!atomic_is_lock_free(&probe.arrive) || !atomic_is_lock_free(&probe.dead))
    return epx_error(comm, epxNotSupported,
                     "host backend: 64-bit atomics are not lock-free on this platform, so they "
                     "cannot synchronise processes");
  hostComm *hc = calloc(1, sizeof *hc);
  if (!hc) return epx_error(comm, epxOutOfMemory, "host backend: cannot allocate its state");
  comm->backend = hc;
  hc->rank = me;
  hc->nranks = R;
  hc->chunk = host_chunk_tokens(cfg);
  host_seg_layout_for(&hc->lay, cfg, R);
  int scratch = cfg->hidden > cfg->max_topk ? cfg->hidden : cfg->max_topk;

  /* Step 1: every rank creates its own segment. */
  epxResult_t res = epxSuccess;
  hc->peers = calloc((size_t)R, sizeof *hc->peers);
  hc->cursor = calloc((size_t)R, sizeof(int));
  hc->peer_tokens = calloc((size_t)R, sizeof(int));
  hc->acc = calloc((size_t)scratch, sizeof(float));
  hc->part = calloc((size_t)scratch, sizeof(float));
  if (!hc->peers || !hc->cursor || !hc->peer_tokens || !hc->acc || !hc->part)
    res = epx_error(comm, epxOutOfMemory, "host backend: cannot allocate per-rank scratch");
  if (res == epxSuccess) {
    void *base = NULL;
    seg_name(hc->shm_name, sizeof hc->shm_name, comm->uid, me);
    res = epx_host_seg_create(comm, hc->shm_name, hc->lay.total_bytes, &base);
    if (res != epxSuccess) hc->shm_name[0] = '\0'; /* nothing left to unlink */
    if (res == epxSuccess) {
      hostPeer *self = &hc->peers[me];
      self->base = base;
      self->ctrl = (hostCtrl *)base;
      self->pid = getpid();
      epx_proc_stat(0, &self->start_time, NULL);
      hostCtrl *c = self->ctrl;
      c->magic = EPX_HOST_SEG_MAGIC;
      c->protocol_version = EPX_PROTOCOL_VERSION;
      c->rank = me;
      c->nranks = R;
      c->chunk_tokens = hc->chunk;
      c->pid = (int32_t)self->pid;
      c->start_time = self->start_time;
      c->seg_bytes = hc->lay.total_bytes;
      c->fail_peer = -1;
      /* The fresh segment is zero; these say so explicitly. The bootstrap
       * barrier below orders them before any peer's read. */
      atomic_store_explicit(&c->arrive, 0, memory_order_relaxed);
      atomic_store_explicit(&c->dead, EPX_HOST_ALIVE, memory_order_relaxed);
      atomic_store_explicit(&c->dead_claim, 0u, memory_order_relaxed);
    }
  }
  res = init_agree(comm, boot, res, hc->chunk, "creating the shared-memory segments");
  if (res != epxSuccess) goto fail;

  /* Step 2: every rank maps every peer's segment. */
  for (int r = 0; r < R && res == epxSuccess; ++r)
    if (r != me) res = open_peer(comm, hc, r);
  res = init_agree(comm, boot, res, hc->chunk, "mapping the peers' segments");
  /* Step 3: every peer has mapped this segment (or given up): drop the name,
   * so nothing is left in /dev/shm whatever happens to the processes. */
  if (hc->shm_name[0]) shm_unlink(hc->shm_name);
  hc->own_unlinked = 1;
  if (res != epxSuccess) goto fail;

  EPX_INFO(me, "host backend ready: %zu-byte segment per rank (%d-token rounds, %zu normal, %zu "
           "low-latency)",
           hc->lay.total_bytes, hc->chunk, hc->lay.ll_off, hc->lay.total_bytes - hc->lay.ll_off);
  return epxSuccess;
fail:
  host_release(comm, hc);
  return res;
}

static void host_destroy(epxComm_t comm) {
  hostComm *hc = epx_host_of(comm);
  if (!hc) return;
  /* A peer still waiting for this rank then fails at once, naming it. */
  epx_host_mark_dead(hc, EPX_HOST_DESTROYED, -1, epxSuccess);
  free(comm->ll_combine_buffer);
  comm->ll_combine_buffer = NULL;
  host_release(comm, hc);
}

static void host_abort(epxComm_t comm) {
  hostComm *hc = epx_host_of(comm);
  /* Our own waits see comm->abort_flag; peers see this word. */
  if (hc) epx_host_mark_dead(hc, EPX_HOST_ABORTED, -1, epxAborted);
}

static epxResult_t host_ll_combine_buffer(epxComm_t comm, void **buffer) {
  if (!comm->ll_combine_buffer) {
    size_t bytes = ll_combine_buffer_bytes(&comm->config, comm->nranks);
    void *p = aligned_alloc(EPX_HOST_ALIGN, epx_host_align(bytes));
    if (!p)
      return epx_error(comm, epxOutOfMemory,
                       "epxLowLatencyGetCombineBuffer: cannot allocate %zu bytes", bytes);
    memset(p, 0, bytes);
    comm->ll_combine_buffer = p;
  }
  *buffer = comm->ll_combine_buffer;
  return epxSuccess;
}

const epxBackendOps epx_host_backend_ops = {
    .name = "host",
    .size_hints = host_size_hints,
    .init = host_init,
    .destroy = host_destroy,
    .abort = host_abort,
    .handle_alloc = host_handle_alloc,
    .handle_free = host_handle_free,
    .layout = epx_host_layout,
    .dispatch_notify = epx_host_dispatch_notify,
    .dispatch = epx_host_dispatch,
    .combine = epx_host_combine,
    .ll_dispatch = epx_host_ll_dispatch,
    .ll_combine = epx_host_ll_combine,
    .ll_recv = epx_host_ll_recv,
    .ll_combine_buffer = host_ll_combine_buffer,
};
