/*
 * normal.c - normal-mode dispatch_notify, dispatch and combine on the host.
 *
 * Every op opens with the header exchange (sync.c); a count exchange rides in
 * the header slot. Data then move in rounds over windows of C source tokens,
 * so shared memory grows with C, never with T:
 *   dispatch  (pull) round i: every source publishes its tokens [iC, iC+C) -
 *             the is_token_in_rank bytes, payload, scales, top-k ids (as
 *             int32) and weights - in its own segment; barrier; every
 *             receiver copies the rows routed to it to their final rows.
 *   combine   (push) round i: every rank writes each row it received from
 *             source s, for s's tokens in the window, into s's inbox slot
 *             [me][t - iC]; barrier; each source reduces its window in the
 *             canonical order and writes its outputs.
 * Round i uses buffer i & 1, so one barrier per round suffices: a rank
 * writing buffer i & 1 has passed barrier i - 1, which every peer reached only
 * after it finished reading round i - 2 from that buffer. A new op writes data
 * only after its header barrier, which every peer reaches only after finishing
 * the previous op.
 */
#include <string.h>

#include "backends/host/host.h"
#include "common/layout_math.h"
#include "common/numerics.h"

/* Tokens of a rank with T tokens that fall in the window starting at lo. */
static int window_tokens(int T, int lo, int C) {
  int n = T - lo;
  return n < 0 ? 0 : n > C ? C : n;
}

/* First row on rank r of the tokens of source s. */
static int first_row(const int *prm, int R, int s, int r) { return s == 0 ? 0 : prm[(s - 1) * R + r]; }

static int max_tokens_over_ranks(hostComm *hc, uint64_t seq) {
  int m = 0;
  for (int s = 0; s < hc->nranks; ++s) {
    hc->peer_tokens[s] = epx_host_header(hc, s, seq)->num_tokens;
    if (hc->peer_tokens[s] > m) m = hc->peer_tokens[s];
  }
  return m;
}

static void header_from_dispatch_args(hostHeader *h, const epxDispatchArgs_t *a) {
  h->hidden = a->hidden;
  h->num_topk = a->num_topk;
  h->num_tokens = a->num_tokens;
  h->x_type = (int32_t)a->x_type;
  h->scale_format = (int32_t)a->scale_format;
  h->topk_int64 = a->topk_idx_type == epxInt64;
  h->has_topk = a->topk_idx != NULL;
  h->has_weights = a->topk_weights != NULL;
}

/* Source side, before the exchange: how many of my tokens go to each rank and
 * to each expert (once per token), written into my header slot - shared
 * memory, not anything the caller owns. */
static void count_routing(hostComm *hc, int el, uint64_t seq, const epxDispatchArgs_t *a) {
  int R = hc->nranks, K = a->num_topk, is64 = a->topk_idx_type == epxInt64;
  int32_t *counts = epx_host_hdr_counts(hc, hc->rank, seq);
  int32_t *ecounts = epx_host_hdr_ecounts(hc, hc->rank, seq);
  int *stamp = hc->cursor; /* token + 1 once counted for a rank */
  memset(counts, 0, sizeof(int32_t) * (size_t)R);
  memset(ecounts, 0, sizeof(int32_t) * (size_t)hc->lay.num_experts);
  memset(stamp, 0, sizeof(int) * (size_t)R);
  for (int t = 0; t < a->num_tokens; ++t)
    for (int k = 0; k < K; ++k) {
      int64_t id = epx_topk_get(a->topk_idx, is64, t, K, k);
      if (!epx_topk_valid(id)) continue;
      if (!epx_host_repeats_earlier_slot(a->topk_idx, is64, t, K, k, id)) ecounts[id]++;
      int r = epx_expert_rank(id, el);
      if (stamp[r] != t + 1) {
        stamp[r] = t + 1;
        counts[r]++;
      }
    }
}

/* After the exchange: the routing of a notify or worst-case dispatch, from
 * every rank's counts. The handle's state is set once the rounds are done. */
static void fill_routing(epxComm_t comm, hostComm *hc, const epxCall_t *call,
                         const epxDispatchArgs_t *a, epxHandle_t h) {
  int R = hc->nranks, me = hc->rank, el = comm->num_local_experts, K = a->num_topk;
  int is64 = a->topk_idx_type == epxInt64;
  hostHandle *hh = (hostHandle *)h->backend_private;
  int *prm = h->rank_prefix_matrix;
  for (int r = 0; r < R; ++r) {
    int64_t sum = 0;
    for (int s = 0; s < R; ++s) {
      sum += epx_host_hdr_counts(hc, s, call->seq)[r];
      prm[s * R + r] = (int)sum;
    }
  }
  int *next = hc->cursor; /* next row of my tokens on each rank */
  for (int r = 0; r < R; ++r) next[r] = first_row(prm, R, me, r);
  for (int t = 0; t < a->num_tokens; ++t) {
    uint8_t *in_rank = h->is_token_in_rank + (size_t)t * R;
    memset(in_rank, 0, (size_t)R);
    for (int k = 0; k < K; ++k) {
      int64_t id = epx_topk_get(a->topk_idx, is64, t, K, k);
      if (epx_topk_valid(id)) in_rank[epx_expert_rank(id, el)] = 1;
    }
    for (int r = 0; r < R; ++r) h->send_row[(size_t)t * R + r] = in_rank[r] ? next[r]++ : -1;
  }
  for (int e = 0; e < el; ++e) {
    int64_t sum = 0;
    for (int s = 0; s < R; ++s) sum += epx_host_hdr_ecounts(hc, s, call->seq)[me * el + e];
    hh->raw_expert_counts[e] = (int)sum;
    h->num_recv_per_expert[e] = (int)epx_align_up(sum, a->expert_alignment);
  }
  h->num_tokens = a->num_tokens;
  h->num_topk = K;
  h->hidden = a->hidden;
  h->topk_is_int64 = is64;
  h->num_recv_tokens = prm[(R - 1) * R + me];
  h->expert_alignment = a->expert_alignment;
  h->filled_seq = call->seq;
  h->recv_pending = 0;
  h->pending_op = EPX_OP_NONE;
}

/* Publishes my tokens of one window into my round buffer. */
static void publish_window(hostComm *hc, const epxDispatchArgs_t *a, epxHandle_t h, int with_data,
                           unsigned char *buf, int lo, int n) {
  const hostSegLayout *l = &hc->lay;
  int R = hc->nranks, K = a->num_topk;
  memcpy(buf + l->win_bitmap_off, h->is_token_in_rank + (size_t)lo * R, (size_t)n * R);
  if (!with_data) return;
  int fp8 = a->x_type == epxFloat8E4M3;
  size_t xrow = epx_payload_row_bytes(a->hidden, fp8);
  size_t srow = fp8 ? epx_scale_row_bytes(a->hidden, a->scale_format) : 0;
  memcpy(buf + l->win_payload_off, (const uint8_t *)a->x + (size_t)lo * xrow, (size_t)n * xrow);
  if (srow)
    memcpy(buf + l->win_scales_off, (const uint8_t *)a->x_scales + (size_t)lo * srow,
           (size_t)n * srow);
  if (a->topk_idx) {
    int32_t *ids = (int32_t *)(buf + l->win_topk_off);
    int is64 = a->topk_idx_type == epxInt64;
    /* Validated ids are in [-1, E), so int32 holds them whatever the caller's type. */
    for (int t = 0; t < n; ++t)
      for (int k = 0; k < K; ++k)
        ids[t * K + k] = (int32_t)epx_topk_get(a->topk_idx, is64, lo + t, K, k);
  }
  if (a->topk_weights)
    memcpy(buf + l->win_weights_off, a->topk_weights + (size_t)lo * K,
           (size_t)n * K * sizeof(float));
}

/* Copies token tt of source s's window (published in sbuf) to output row `row`. */
static void receive_row(epxComm_t comm, hostComm *hc, const epxDispatchArgs_t *a,
                        const epxDispatchOutputs_t *o, const hostHeader *src_hdr,
                        const unsigned char *sbuf, int tt, int token, int64_t row) {
  const hostSegLayout *l = &hc->lay;
  int K = a->num_topk, el = comm->num_local_experts;
  int64_t e_lo = (int64_t)hc->rank * el, e_hi = e_lo + el;
  int fp8 = a->x_type == epxFloat8E4M3;
  size_t xrow = epx_payload_row_bytes(a->hidden, fp8);
  size_t srow = fp8 ? epx_scale_row_bytes(a->hidden, a->scale_format) : 0;
  memcpy((uint8_t *)o->recv_x + (size_t)row * xrow, sbuf + l->win_payload_off + (size_t)tt * xrow,
         xrow);
  if (srow && o->recv_x_scales)
    memcpy((uint8_t *)o->recv_x_scales + (size_t)row * srow,
           sbuf + l->win_scales_off + (size_t)tt * srow, srow);
  if (o->recv_topk_idx || o->recv_topk_weights) {
    const int32_t *ids = (const int32_t *)(sbuf + l->win_topk_off) + (size_t)tt * K;
    const float *w = (const float *)(sbuf + l->win_weights_off) + (size_t)tt * K;
    int is64 = a->topk_idx_type == epxInt64;
    for (int k = 0; k < K; ++k) {
      int64_t local = -1;
      if (src_hdr->has_topk && ids[k] >= e_lo && ids[k] < e_hi) local = ids[k] - e_lo;
      if (o->recv_topk_idx) epx_topk_set(o->recv_topk_idx, is64, row, K, k, local);
      if (o->recv_topk_weights)
        o->recv_topk_weights[row * K + k] = (local >= 0 && src_hdr->has_weights) ? w[k] : 0.0f;
    }
  }
  if (o->recv_src_idx) o->recv_src_idx[row] = token;
}

/* The rounds of a dispatch (o != NULL) or of a notify (o == NULL: routing
 * bytes only, to learn recv_src_idx). Rows are placed by this rank's
 * rank_prefix_matrix and each source's is_token_in_rank bytes, so the receive
 * order is source ascending, token ascending. */
static epxResult_t dispatch_rounds(epxComm_t comm, hostComm *hc, const epxCall_t *call,
                                   const epxDispatchArgs_t *a, epxHandle_t h,
                                   const epxDispatchOutputs_t *o, int fill_src_idx) {
  int R = hc->nranks, me = hc->rank, C = hc->chunk;
  const int *prm = h->rank_prefix_matrix;
  int rounds = (max_tokens_over_ranks(hc, call->seq) + C - 1) / C;
  int *cur = hc->cursor;
  int bad_source = -1;
  for (int s = 0; s < R; ++s) cur[s] = first_row(prm, R, s, me);
  for (int i = 0; i < rounds; ++i) {
    int lo = i * C;
    publish_window(hc, a, h, o != NULL, epx_host_norm_buf(hc, me, i), lo,
                   window_tokens(hc->peer_tokens[me], lo, C));
    epxResult_t res = epx_host_barrier(comm, call->op, call->seq, "dispatch round");
    if (res != epxSuccess) return res;
    for (int s = 0; s < R; ++s) {
      const unsigned char *sbuf = epx_host_norm_buf(hc, s, i);
      const uint8_t *bitmap = sbuf + hc->lay.win_bitmap_off;
      const hostHeader *src_hdr = epx_host_header(hc, s, call->seq);
      int n = window_tokens(hc->peer_tokens[s], lo, C), end = prm[s * R + me];
      for (int tt = 0; tt < n; ++tt) {
        if (!bitmap[(size_t)tt * R + me]) continue;
        if (cur[s] >= end) { /* never with agreeing handles; never write past them */
          bad_source = s;
          continue;
        }
        int row = cur[s]++;
        if (fill_src_idx) h->recv_src_idx[row] = lo + tt;
        if (o) receive_row(comm, hc, a, o, src_hdr, sbuf, tt, lo + tt, row);
      }
    }
  }
  for (int s = 0; s < R && bad_source < 0; ++s)
    if (cur[s] != prm[s * R + me]) bad_source = s;
  if (bad_source >= 0)
    return epx_error(comm, epxInternalError,
                     "%s seq %llu: the tokens rank %d sent disagree with this rank's routing "
                     "(rank_prefix_matrix); outputs are incomplete",
                     epx_op_name(call->op), (unsigned long long)call->seq, bad_source);
  return epxSuccess;
}

epxResult_t epx_host_dispatch_notify(epxComm_t comm, const epxCall_t *call,
                                     const epxDispatchArgs_t *args, epxHandle_t handle,
                                     int64_t *num_recv_tokens, int *num_recv_tokens_per_expert,
                                     epxStream_t stream) {
  hostComm *hc = epx_host_of(comm);
  hostHeader mine;
  memset(&mine, 0, sizeof mine);
  if (call->local_invalid) {
    epx_host_header_reject(&mine, call, epxInvalidArgument);
  } else {
    header_from_dispatch_args(&mine, args);
    count_routing(hc, comm->num_local_experts, call->seq, args);
    mine.has_counts = 1;
  }
  epxResult_t res = epx_host_exchange(comm, call, &mine);
  if (res != epxSuccess) return res;
  fill_routing(comm, hc, call, args, handle);
  res = dispatch_rounds(comm, hc, call, args, handle, NULL, 1);
  if (res != epxSuccess) return res;
  handle->state = epxHandleNormal;
  *num_recv_tokens = handle->num_recv_tokens;
  if (num_recv_tokens_per_expert)
    memcpy(num_recv_tokens_per_expert, handle->num_recv_per_expert,
           sizeof(int) * (size_t)comm->num_local_experts);
  return epxSuccess;
}

/* Worst-case mode: every rank knows every count after the exchange, so every
 * rank reaches the same verdict on whether some rank's rows overflow. */
static epxResult_t check_worst_case(epxComm_t comm, hostComm *hc, const epxCall_t *call) {
  int R = hc->nranks;
  for (int r = 0; r < R; ++r) {
    int64_t n = 0;
    for (int s = 0; s < R; ++s) n += epx_host_hdr_counts(hc, s, call->seq)[r];
    int64_t worst = epx_host_header(hc, r, call->seq)->num_worst_tokens;
    if (n <= worst) continue;
    if (r == hc->rank)
      return epx_error(comm, epxInvalidArgument,
                       "epxDispatch seq %llu: this rank receives %lld rows but num_worst_tokens "
                       "is %lld; nothing was written on any rank",
                       (unsigned long long)call->seq, (long long)n, (long long)worst);
    return epx_error(comm, epxRemoteError,
                     "epxDispatch seq %llu: rank %d receives %lld rows, more than its "
                     "num_worst_tokens (%lld); the call did nothing on any rank",
                     (unsigned long long)call->seq, r, (long long)n, (long long)worst);
  }
  return epxSuccess;
}

epxResult_t epx_host_dispatch(epxComm_t comm, const epxCall_t *call, const epxDispatchArgs_t *args,
                              epxHandle_t handle, const epxDispatchOutputs_t *outputs,
                              epxStream_t stream) {
  hostComm *hc = epx_host_of(comm);
  hostHeader mine;
  memset(&mine, 0, sizeof mine);
  int cached = 0;
  if (call->local_invalid) {
    epx_host_header_reject(&mine, call, epxInvalidArgument);
  } else {
    cached = handle->state == epxHandleNormal;
    header_from_dispatch_args(&mine, args);
    if (cached) {
      mine.handle_seq = handle->filled_seq;
    } else {
      mine.num_worst_tokens = args->num_worst_tokens;
      count_routing(hc, comm->num_local_experts, call->seq, args);
      mine.has_counts = 1;
    }
  }
  /* handle_seq is agreed: either every rank reuses one call's routing, or
   * every rank has an empty handle (worst-case mode). */
  epxResult_t res = epx_host_exchange(comm, call, &mine);
  if (res != epxSuccess) return res;
  if (!cached) {
    res = check_worst_case(comm, hc, call);
    if (res != epxSuccess) return res;
    fill_routing(comm, hc, call, args, handle);
  }
  res = dispatch_rounds(comm, hc, call, args, handle, outputs, !cached);
  if (res != epxSuccess) return res;
  if (!cached) handle->state = epxHandleNormal;

  int R = hc->nranks, me = hc->rank, el = comm->num_local_experts, K = args->num_topk;
  const hostHandle *hh = (const hostHandle *)handle->backend_private;
  int64_t n_recv = handle->num_recv_tokens;
  if (outputs->recv_rank_prefix)
    for (int s = 0; s < R; ++s) outputs->recv_rank_prefix[s] = handle->rank_prefix_matrix[s * R + me];
  if (outputs->num_recv_tokens_per_expert)
    for (int e = 0; e < el; ++e)
      outputs->num_recv_tokens_per_expert[e] =
          (int)epx_align_up(hh->raw_expert_counts[e], args->expert_alignment);
  if (outputs->num_recv_tokens) *outputs->num_recv_tokens = (int)n_recv;
  /* Padding rows of the worst-case layout: no expert, no weight, no source. */
  int is64 = args->topk_idx_type == epxInt64;
  for (int64_t row = n_recv; row < args->num_worst_tokens; ++row) {
    for (int k = 0; k < K; ++k) {
      if (outputs->recv_topk_idx) epx_topk_set(outputs->recv_topk_idx, is64, row, K, k, -1);
      if (outputs->recv_topk_weights) outputs->recv_topk_weights[row * K + k] = 0.0f;
    }
    if (outputs->recv_src_idx) outputs->recv_src_idx[row] = -1;
  }
  return epxSuccess;
}

/* Canonical sum of one window token (docs/semantics.md): node partials
 * in rank order, nodes ascending, then the biases; one rounding to BF16. */
static void reduce_token(epxComm_t comm, hostComm *hc, const epxCall_t *call,
                         const epxCombineArgs_t *a, const epxCombineOutputs_t *o,
                         const unsigned char *inbox, const uint8_t *in_rank, int tt, int t) {
  const hostSegLayout *l = &hc->lay;
  int rpn = comm->ranks_per_node, nodes = comm->num_nodes, C = hc->chunk;
  int H = a->hidden, K = a->num_topk;
  float *acc = hc->acc, *part = hc->part;
  memset(acc, 0, sizeof(float) * (size_t)H);
  for (int n = 0; n < nodes; ++n) {
    memset(part, 0, sizeof(float) * (size_t)H);
    for (int r = n * rpn; r < (n + 1) * rpn; ++r) {
      if (!in_rank[r]) continue;
      const uint16_t *src =
          (const uint16_t *)(inbox + l->inbox_x_off) + ((size_t)r * C + (size_t)tt) * (size_t)H;
      epx_host_row_add_bf16(part, src, H);
    }
    epx_host_row_add_f32(acc, part, H);
  }
  for (int b = 0; b < 2; ++b)
    if (a->bias[b]) epx_host_row_add_bf16(acc, (const uint16_t *)a->bias[b] + (size_t)t * H, H);
  uint16_t *out = (uint16_t *)o->combined_x + (size_t)t * H;
  for (int c = 0; c < H; ++c) out[c] = epx_f32_to_bf16(acc[c]);

  if (!o->combined_topk_weights) return;
  for (int k = 0; k < K; ++k) acc[k] = 0.0f;
  for (int n = 0; n < nodes; ++n) {
    for (int k = 0; k < K; ++k) part[k] = 0.0f;
    for (int r = n * rpn; r < (n + 1) * rpn; ++r) {
      if (!in_rank[r]) continue;
      /* A rank that passed no weights contributes zeros. */
      int has = epx_host_header(hc, r, call->seq)->has_weights;
      const float *w =
          (const float *)(inbox + l->inbox_w_off) + ((size_t)r * C + (size_t)tt) * (size_t)K;
      for (int k = 0; k < K; ++k) part[k] = epx_add_rn(part[k], has ? w[k] : 0.0f);
    }
    for (int k = 0; k < K; ++k) acc[k] = epx_add_rn(acc[k], part[k]);
  }
  for (int k = 0; k < K; ++k) o->combined_topk_weights[(size_t)t * K + k] = acc[k];
}

epxResult_t epx_host_combine(epxComm_t comm, const epxCall_t *call, const epxCombineArgs_t *args,
                             epxHandle_t handle, const epxCombineOutputs_t *outputs,
                             epxStream_t stream) {
  hostComm *hc = epx_host_of(comm);
  hostHeader mine;
  memset(&mine, 0, sizeof mine);
  if (call->local_invalid) {
    epx_host_header_reject(&mine, call, epxInvalidArgument);
  } else {
    mine.hidden = args->hidden;
    mine.num_topk = args->num_topk;
    mine.has_weights = args->topk_weights != NULL;
    mine.num_tokens = handle->num_tokens;
    mine.handle_seq = handle->filled_seq;
  }
  epxResult_t res = epx_host_exchange(comm, call, &mine);
  if (res != epxSuccess) return res;

  const hostSegLayout *l = &hc->lay;
  int R = hc->nranks, me = hc->rank, C = hc->chunk, H = args->hidden, K = args->num_topk;
  size_t xrow = epx_payload_row_bytes(H, 0);
  const int *prm = handle->rank_prefix_matrix;
  int rounds = (max_tokens_over_ranks(hc, call->seq) + C - 1) / C;
  int *cur = hc->cursor;
  int bad_source = -1;
  for (int s = 0; s < R; ++s) cur[s] = first_row(prm, R, s, me);
  for (int i = 0; i < rounds; ++i) {
    int lo = i * C, hi = lo + C;
    /* Push: rows received from s are in s's token order, so the rows of this
     * window are the next ones of each source's block. */
    for (int s = 0; s < R; ++s) {
      unsigned char *inbox = epx_host_norm_buf(hc, s, i);
      int end = prm[s * R + me];
      while (cur[s] < end) {
        int row = cur[s], t = handle->recv_src_idx[row];
        if (t >= hi) break;
        cur[s]++;
        if (t < lo) { /* out of order: never with a consistent handle */
          bad_source = s;
          continue;
        }
        size_t slot = (size_t)me * C + (size_t)(t - lo);
        memcpy(inbox + l->inbox_x_off + slot * xrow, (const uint8_t *)args->x + (size_t)row * xrow,
               xrow);
        if (args->topk_weights)
          memcpy(inbox + l->inbox_w_off + slot * K * sizeof(float),
                 args->topk_weights + (size_t)row * K, (size_t)K * sizeof(float));
      }
    }
    res = epx_host_barrier(comm, call->op, call->seq, "combine round");
    if (res != epxSuccess) return res;
    /* Reduce my own window from my inbox. */
    const unsigned char *inbox = epx_host_norm_buf(hc, me, i);
    int n = window_tokens(hc->peer_tokens[me], lo, C);
    for (int tt = 0; tt < n; ++tt)
      reduce_token(comm, hc, call, args, outputs, inbox,
                   handle->is_token_in_rank + (size_t)(lo + tt) * R, tt, lo + tt);
  }
  for (int s = 0; s < R && bad_source < 0; ++s)
    if (cur[s] != prm[s * R + me]) bad_source = s;
  if (bad_source >= 0)
    return epx_error(comm, epxInternalError,
                     "combine seq %llu: the rows this rank received from rank %d are not in "
                     "token order (handle corrupted?); outputs are incomplete",
                     (unsigned long long)call->seq, bad_source);
  return epxSuccess;
}
