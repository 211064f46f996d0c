/*
 * low_latency.c - low-latency dispatch, combine and their receive hook on
 * the host.
 *
 * Each op is a send phase and a receive phase:
 *   dispatch  send: header exchange; publish my T tokens (BF16, or FP8 cast
 *             by epx_fp8_cast_token) and top-k ids in my LL slot; arrive.
 *             receive: wait for every rank's arrival; build each local
 *             expert's packed rows from every source's slot.
 *   combine   send: header exchange; push each valid expert-output row into
 *             the source's LL slot at [token][k] for every top-k slot k that
 *             names the expert; arrive. receive: wait; reduce my tokens in k
 *             order from my own slot.
 * With return_recv_hook the call returns after the send phase and
 * epxLowLatencyRecv runs the receive phase; without it both run. The barrier
 * sequence is the same either way, so ranks may choose differently.
 *
 * LL op n uses slot n & 1. A rank refuses op n (epxInvalidUsage, on every
 * rank through its header) while op n - 2 in that slot still awaits its
 * receive. So when op n's header barrier passes, every rank has finished
 * reading slot n & 1 for op n - 2: it did so before publishing its header,
 * and the barrier's release/acquire orders those reads before our writes.
 */
#include <string.h>

#include "backends/host/host.h"
#include "common/layout_math.h"
#include "common/numerics.h"

/* Scale format of an LL dispatch: none, float32 or UE8M0 (epxScaleFormat_t values). */
static int ll_scale_format(int use_fp8, int use_ue8m0) {
  return !use_fp8 ? epxScalesNone : use_ue8m0 ? epxScalesUE8M0 : epxScalesFloat32;
}

/* A rank whose slot is still pending rejects the op; returns epxSuccess or that rejection. */
static epxResult_t check_slot_free(epxComm_t comm, hostComm *hc, const char *fn) {
  int slot = (int)((hc->ll_ops + 1) & 1u);
  if (!hc->ll_slot_pending[slot]) return epxSuccess;
  return epx_error(comm, epxInvalidUsage,
                   "%s: two send-only low-latency phases already await epxLowLatencyRecv; receive "
                   "the older one first",
                   fn);
}

/* The header this rank posts for a low-latency op: a rejection (the call is
 * invalid here - its arguments may then be NULL - or both slots await their
 * receive), or else zeros for the caller to fill (ll_header_shape and the op's
 * own fields). Returns 1 in the second case. */
static int ll_header_start(epxComm_t comm, hostComm *hc, const epxCall_t *call, const char *fn,
                           hostHeader *mine) {
  memset(mine, 0, sizeof *mine);
  epxResult_t res;
  if (call->local_invalid) {
    epx_host_header_reject(mine, call, epxInvalidArgument);
    return 0;
  }
  if ((res = check_slot_free(comm, hc, fn)) != epxSuccess) {
    epx_host_header_reject(mine, call, res);
    return 0;
  }
  return 1;
}

/* The shape both low-latency ops post. */
static void ll_header_shape(hostHeader *mine, int hidden, int num_topk, int num_tokens,
                            epxDataType_t topk_type) {
  mine->hidden = hidden;
  mine->num_topk = num_topk;
  mine->num_tokens = num_tokens;
  mine->topk_int64 = topk_type == epxInt64;
  mine->has_topk = 1;
}

static void record_peer_tokens(hostComm *hc, hostHandle *hh, uint64_t seq) {
  for (int s = 0; s < hc->nranks; ++s) hh->peer_tokens[s] = epx_host_header(hc, s, seq)->num_tokens;
}

/* ---- dispatch ---- */

static epxResult_t ll_dispatch_recv(epxComm_t comm, hostComm *hc, epxHandle_t h) {
  hostHandle *hh = (hostHandle *)h->backend_private;
  epxResult_t res = epx_host_wait(comm, hh->barrier, EPX_OP_LL_DISPATCH, hh->seq,
                                  "low-latency dispatch receive");
  if (res != epxSuccess) return res;
  const hostSegLayout *l = &hc->lay;
  int R = hc->nranks, me = hc->rank, el = comm->num_local_experts, K = hh->num_topk;
  int llT = comm->config.ll_max_tokens_per_rank;
  int fmt = ll_scale_format(hh->use_fp8, hh->use_ue8m0);
  size_t xrow = epx_payload_row_bytes(hh->hidden, hh->use_fp8);
  size_t srow = epx_scale_row_bytes(hh->hidden, fmt);
  const epxLowLatencyDispatchOutputs_t *o = &hh->dispatch_out;
  for (int e = 0; e < el; ++e) {
    int32_t expert = me * el + e;
    int row = 0;
    for (int s = 0; s < R; ++s) {
      const unsigned char *src = epx_host_ll_slot(hc, s, hh->slot);
      const int32_t *ids = (const int32_t *)(src + l->ll_topk_off);
      int first = row;
      for (int t = 0; t < hh->peer_tokens[s]; ++t) {
        uint32_t kmask = 0;
        for (int k = 0; k < K; ++k)
          if (ids[(size_t)t * K + k] == expert) kmask |= 1u << k;
        if (!kmask) continue;
        size_t at = (size_t)epx_ll_row_index(e, row, R, llT);
        memcpy((uint8_t *)o->recv_x + at * xrow, src + l->ll_payload_off + (size_t)t * xrow, xrow);
        if (srow)
          memcpy((uint8_t *)o->recv_x_scales + at * srow, src + l->ll_scales_off + (size_t)t * srow,
                 srow);
        if (o->recv_src_info) o->recv_src_info[at] = t;
        h->ll_row_src_rank[at] = s;
        h->ll_row_src_token[at] = t;
        h->ll_row_kmask[at] = kmask;
        ++row;
      }
      int64_t range = epx_ll_range_pack(first, row - first);
      h->ll_layout_range[(size_t)e * R + s] = range;
      if (o->recv_layout_range) o->recv_layout_range[(size_t)e * R + s] = range;
    }
    h->ll_recv_count[e] = row;
    o->recv_count[e] = row;
    if (hh->stats) hh->stats[e] += row;
  }
  hc->ll_slot_pending[hh->slot] = 0;
  h->recv_pending = 0;
  h->pending_op = EPX_OP_NONE;
  return epxSuccess;
}

epxResult_t epx_host_ll_dispatch(epxComm_t comm, const epxCall_t *call,
                                 const epxLowLatencyDispatchArgs_t *args, epxHandle_t handle,
                                 const epxLowLatencyDispatchOutputs_t *outputs,
                                 epxStream_t stream) {
  hostComm *hc = epx_host_of(comm);
  hostHeader mine;
  if (ll_header_start(comm, hc, call, "epxLowLatencyDispatch", &mine)) {
    ll_header_shape(&mine, args->hidden, args->num_topk, args->num_tokens, args->topk_idx_type);
    mine.use_fp8 = args->use_fp8 != 0;
    mine.round_scale = args->round_scale != 0;
    mine.use_ue8m0 = args->use_ue8m0 != 0;
  }
  epxResult_t res = epx_host_exchange(comm, call, &mine);
  if (res != epxSuccess) return res;

  uint64_t op_number = ++hc->ll_ops;
  int slot = (int)(op_number & 1u);
  const hostSegLayout *l = &hc->lay;
  int H = args->hidden, K = args->num_topk, fp8 = args->use_fp8 != 0;
  int fmt = ll_scale_format(fp8, args->use_ue8m0);
  int is64 = args->topk_idx_type == epxInt64;
  size_t xrow = epx_payload_row_bytes(H, fp8), srow = epx_scale_row_bytes(H, fmt);
  unsigned char *dst = epx_host_ll_slot(hc, hc->rank, slot);
  int32_t *ids = (int32_t *)(dst + l->ll_topk_off);
  for (int t = 0; t < args->num_tokens; ++t) {
    const uint16_t *x = (const uint16_t *)args->x + (size_t)t * H;
    uint8_t *payload = dst + l->ll_payload_off + (size_t)t * xrow;
    if (fp8) {
      unsigned char *scales = dst + l->ll_scales_off + (size_t)t * srow;
      epx_fp8_cast_token(x, H, args->round_scale, payload,
                         fmt == epxScalesFloat32 ? (float *)scales : NULL,
                         fmt == epxScalesUE8M0 ? (uint32_t *)scales : NULL);
    } else {
      memcpy(payload, x, xrow);
    }
    /* Validated ids are in [-1, E): int32 holds them. */
    for (int k = 0; k < K; ++k)
      ids[(size_t)t * K + k] = (int32_t)epx_topk_get(args->topk_idx, is64, t, K, k);
  }

  hostHandle *hh = (hostHandle *)handle->backend_private;
  record_peer_tokens(hc, hh, call->seq);
  hh->seq = call->seq;
  hh->slot = slot;
  hh->hidden = H;
  hh->num_topk = K;
  hh->num_tokens = args->num_tokens;
  hh->topk_int64 = is64;
  hh->use_fp8 = fp8;
  hh->use_ue8m0 = args->use_ue8m0 != 0;
  hh->dispatch_out = *outputs;
  hh->stats = args->cumulative_local_expert_recv_stats;
  hh->barrier = epx_host_arrive(hc);

  handle->state = epxHandleLowLatency;
  handle->num_tokens = args->num_tokens;
  handle->num_topk = K;
  handle->hidden = H;
  handle->topk_is_int64 = is64;
  handle->num_recv_tokens = 0;
  handle->filled_seq = call->seq;
  handle->pending_op = EPX_OP_LL_DISPATCH;
  handle->recv_pending = 1;
  hc->ll_slot_pending[slot] = 1;
  if (args->return_recv_hook) return epxSuccess;
  return ll_dispatch_recv(comm, hc, handle);
}

/* ---- combine ---- */

static epxResult_t ll_combine_recv(epxComm_t comm, hostComm *hc, epxHandle_t h) {
  hostHandle *hh = (hostHandle *)h->backend_private;
  epxResult_t res = epx_host_wait(comm, hh->barrier, EPX_OP_LL_COMBINE, hh->seq,
                                  "low-latency combine receive");
  if (res != epxSuccess) return res;
  int H = hh->hidden, K = hh->num_topk;
  size_t xrow = epx_payload_row_bytes(H, 0);
  const unsigned char *inbox = epx_host_ll_slot(hc, hc->rank, hh->slot);
  float *acc = hc->acc;
  for (int t = 0; t < hh->num_tokens; ++t) {
    memset(acc, 0, sizeof(float) * (size_t)H);
    for (int k = 0; k < K; ++k) {
      if (!epx_topk_valid(epx_topk_get(hh->topk_idx, hh->topk_int64, t, K, k))) continue;
      float w = hh->topk_weights[(size_t)t * K + k];
      const uint16_t *row = (const uint16_t *)(inbox + ((size_t)t * K + (size_t)k) * xrow);
      epx_host_row_add_scaled_bf16(acc, row, w, H);
    }
    uint16_t *out = (uint16_t *)hh->combined_x + (size_t)t * H;
    for (int c = 0; c < H; ++c) out[c] = epx_f32_to_bf16(acc[c]);
  }
  hc->ll_slot_pending[hh->slot] = 0;
  h->recv_pending = 0;
  h->pending_op = EPX_OP_NONE;
  return epxSuccess;
}

epxResult_t epx_host_ll_combine(epxComm_t comm, const epxCall_t *call,
                                const epxLowLatencyCombineArgs_t *args, epxHandle_t handle,
                                void *combined_x, epxStream_t stream) {
  hostComm *hc = epx_host_of(comm);
  hostHeader mine;
  if (ll_header_start(comm, hc, call, "epxLowLatencyCombine", &mine)) {
    ll_header_shape(&mine, args->hidden, args->num_topk, args->num_tokens, args->topk_idx_type);
    mine.handle_seq = handle->filled_seq;
  }
  epxResult_t res = epx_host_exchange(comm, call, &mine);
  if (res != epxSuccess) return res;

  uint64_t op_number = ++hc->ll_ops;
  int slot = (int)(op_number & 1u);
  int R = hc->nranks, el = comm->num_local_experts, llT = comm->config.ll_max_tokens_per_rank;
  int H = args->hidden, K = args->num_topk;
  size_t xrow = epx_payload_row_bytes(H, 0);
  const uint8_t *x = args->zero_copy ? (const uint8_t *)comm->ll_combine_buffer
                                     : (const uint8_t *)args->x;
  uint32_t kmask_limit = K >= 32 ? 0xffffffffu : (1u << K) - 1u;
  int bad_row = 0;
  /* Push every row this rank's experts produced to its token's source. */
  for (int e = 0; e < el; ++e) {
    for (int row = 0; row < handle->ll_recv_count[e]; ++row) {
      size_t at = (size_t)epx_ll_row_index(e, row, R, llT);
      int s = handle->ll_row_src_rank[at], t = handle->ll_row_src_token[at];
      uint32_t kmask = handle->ll_row_kmask[at];
      if (s < 0 || s >= R || t < 0 || t >= llT || (kmask & ~kmask_limit)) { /* corrupted handle */
        bad_row = 1;
        continue;
      }
      unsigned char *inbox = epx_host_ll_slot(hc, s, slot);
      for (int k = 0; k < K; ++k)
        if (kmask & (1u << k))
          memcpy(inbox + ((size_t)t * K + (size_t)k) * xrow, x + at * xrow, xrow);
    }
  }

  hostHandle *hh = (hostHandle *)handle->backend_private;
  hh->seq = call->seq;
  hh->slot = slot;
  hh->hidden = H;
  hh->num_topk = K;
  hh->num_tokens = args->num_tokens;
  hh->topk_int64 = args->topk_idx_type == epxInt64;
  hh->topk_idx = args->topk_idx;
  hh->topk_weights = args->topk_weights;
  hh->combined_x = combined_x;
  /* Release: the rows pushed above are visible to each source once it sees
   * this arrival (its acquire in ll_combine_recv's wait). */
  hh->barrier = epx_host_arrive(hc);
  handle->pending_op = EPX_OP_LL_COMBINE;
  handle->recv_pending = 1;
  hc->ll_slot_pending[slot] = 1;
  if (args->return_recv_hook) return epxSuccess;
  res = ll_combine_recv(comm, hc, handle);
  if (res == epxSuccess && bad_row)
    return epx_error(comm, epxInternalError,
                     "ll_combine seq %llu: the handle's row table is corrupted; some rows were not "
                     "sent",
                     (unsigned long long)call->seq);
  return res;
}

epxResult_t epx_host_ll_recv(epxComm_t comm, epxHandle_t handle, epxStream_t stream) {
  hostComm *hc = epx_host_of(comm);
  if (handle->pending_op == EPX_OP_LL_DISPATCH) return ll_dispatch_recv(comm, hc, handle);
  if (handle->pending_op == EPX_OP_LL_COMBINE) return ll_combine_recv(comm, hc, handle);
  return epx_error(comm, epxInvalidUsage,
                   "epxLowLatencyRecv: the handle's pending phase is %s, not a low-latency send",
                   epx_op_name(handle->pending_op));
}
