/*
 * ll_dispatch_recv.cuh - the receive half of low-latency dispatch as a device
 * function, shared by the receive kernel (ll_dispatch_recv.cu) and the fused
 * send+receive kernel (ll_dispatch_send.cu).
 *
 * Every block waits for the signal of every source (its headers, posted
 * before any message), checks the headers (op, seq, hidden, top-k, FP8,
 * UE8M0; a source's invalid arguments or bad expert id) and computes
 * first_row(e, s) = sum over sources s' < s of counts(s', e) for each local
 * expert e. Messages (source s, token t) are then spread over the warps of the
 * grid in row chunks (epx_ll_dispatch_place_chunked, so every warp has work):
 * a warp waits for the message's flag (so it starts as soon as that message
 * landed, while others are still in flight), reads the token's meta, loads its
 * chunk once, and for every local expert the token names (first slot naming
 * it) stores it into row first_row(e, s) + pos(t, e) of expert e's block. The
 * order is thus fixed (sources ascending, tokens ascending) with no atomics,
 * and the rows of one source are contiguous. Block 0 writes the per-expert
 * outputs (counts, ranges, cumulative statistics). A failed check writes no
 * caller output.
 */
#ifndef EPX_LL_DISPATCH_RECV_CUH
#define EPX_LL_DISPATCH_RECV_CUH

#include "backends/cuda/cuda_common.cuh"

/* Sources whose per-expert counts a thread loads together. */
#define EPX_LL_COUNTS_AT_ONCE 8
/* 16-byte vectors a lane keeps in flight in the chunked placement. */
#define EPX_LL_RECV_UNROLL 8

/* The placement: work items are (source, token, chunk of the row), so the
 * 256-odd messages of a small batch still spread over every warp of the grid;
 * each warp loads its chunk once (EPX_LL_RECV_UNROLL vectors a lane in flight)
 * and stores it into every local expert row the token names (the leaders of
 * __match_any_sync over the meta ids; lanes >= K get distinct non-expert
 * values, so a row's kmask bits are exactly the top-k slots naming it). */
static __device__ int epx_ll_dispatch_place_chunked(const EpxLLDispatchRecvParams &p,
                                                    unsigned long long epoch, EpxLLRole role,
                                                    char *slot, const int *s_first, const int *s_T,
                                                    size_t xrow, size_t srow) {
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, El = c.num_local_experts, me = c.rank;
  const int llT = c.ll_max_tokens;
  const long long rpe = epx_ll_rows_per_expert(R, llT);
  const int lane = threadIdx.x % 32, K = p.num_topk;
  const int lo = me * El, hi = lo + El;
  const int warps = role.blocks * EPX_LL_WARPS;
  const int nvec = (int)(xrow / 16);
  const int per_round = 32 * EPX_LL_RECV_UNROLL;
  /* chunks per message: enough items for every warp, each chunk at least one round */
  int Q = warps / (R * llT);
  const int max_q = (nvec + per_round - 1) / per_round;
  if (Q > max_q) Q = max_q;
  if (Q < 1) Q = 1;
  const int chunk = ((nvec + Q - 1) / Q + 31) / 32 * 32;
  const int items = R * llT * Q;
  for (int i = role.block * EPX_LL_WARPS + (int)threadIdx.x / 32; i < items; i += warps) {
    const int q = i % Q, m = i / Q;
    const int s = m / llT, t = m % llT;
    if (t >= s_T[s]) continue;
    int present = 0;
    if (lane == 0)
      present = epx_ll_wait_flag(c, epx_ll_flag(c, slot, epx_ll_dispatch_flag_index(c, s, t)),
                                 epoch, EPX_OP_LL_DISPATCH, s, p.seq);
    present = __shfl_sync(0xffffffffu, present, 0);
    if (present < 0) return 0; /* recorded; the sticky flag stops the other waits */
    if (present == 0) continue;
    __syncwarp(); /* lane 0's acquire covers the warp's reads of the message */
    const char *msg = epx_ll_msg(c, slot, s, t);
    const int v_lo = q * chunk, v_hi = min(nvec, v_lo + chunk);
    const int4 *src = (const int4 *)msg;
    /* the first round of the payload is loaded before the meta is read, so
     * both are in flight together (the usual chunk is one round) */
    int4 buf[EPX_LL_RECV_UNROLL];
#pragma unroll
    for (int u = 0; u < EPX_LL_RECV_UNROLL; ++u) {
      const int v = v_lo + u * 32 + lane;
      if (v < v_hi) buf[u] = src[v];
    }
    const int *meta = (const int *)(msg + c.ll.msg_meta_off);
    const int id = lane < K ? meta[lane] : -2 - lane;
    const int pos = lane < K ? meta[K + lane] : 0;
    const unsigned same = __match_any_sync(0xffffffffu, id);
    const bool mine = id >= lo && id < hi;
    const bool leader = mine && __ffs(same) - 1 == lane;
    /* each leader lane holds its row index (or -1 when out of range) */
    long long my_at = -1;
    if (leader) {
      const int e = id - lo;
      const int row = s_first[e * R + s] + pos;
      if (row >= 0 && row < rpe) my_at = epx_ll_row_index(e, row, R, llT);
    }
    const unsigned leaders = __ballot_sync(0xffffffffu, my_at >= 0);
    if (!leaders) continue;
    for (int v0 = v_lo; v0 < v_hi; v0 += per_round) {
      if (v0 != v_lo) {
#pragma unroll
        for (int u = 0; u < EPX_LL_RECV_UNROLL; ++u) {
          const int v = v0 + u * 32 + lane;
          if (v < v_hi) buf[u] = src[v];
        }
      }
      for (unsigned l = leaders; l; l &= l - 1) {
        const long long at = __shfl_sync(0xffffffffu, my_at, __ffs(l) - 1);
        int4 *dst = (int4 *)((char *)p.recv_x + (size_t)at * xrow);
#pragma unroll
        for (int u = 0; u < EPX_LL_RECV_UNROLL; ++u) {
          const int v = v0 + u * 32 + lane;
          if (v < v_hi) dst[v] = buf[u];
        }
      }
    }
    if (q != 0) continue;
    const unsigned kmask_all = same; /* per leader lane: the top-k slots naming its expert */
    for (unsigned l = leaders; l; l &= l - 1) {
      const int L = __ffs(l) - 1;
      const size_t at = (size_t)__shfl_sync(0xffffffffu, my_at, L);
      const unsigned kmask = __shfl_sync(0xffffffffu, kmask_all, L);
      if (srow) {
        const int words = (int)(srow / 4);
        for (int w = lane; w < words; w += 32)
          ((int *)p.recv_x_scales)[at * words + w] = ((const int *)(msg + c.ll.msg_scales_off))[w];
      }
      if (lane == 0) {
        if (p.recv_src_info) p.recv_src_info[at] = t;
        p.row_src_rank[at] = s;
        p.row_src_token[at] = t;
        p.row_kmask[at] = kmask;
      }
    }
  }
  return 1;
}

static __device__ void epx_ll_dispatch_recv_body(const EpxLLDispatchRecvParams &p,
                                                 unsigned long long epoch, EpxLLRole role) {
  extern __shared__ int s_first[]; /* [E_local][R]: first row of (expert, source) */
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, El = c.num_local_experts, me = c.rank;
  const int llT = c.ll_max_tokens;
  const long long rpe = epx_ll_rows_per_expert(R, llT);
  __shared__ int s_status;
  __shared__ int s_T[EPX_CUDA_MAX_RANKS];
  __shared__ int s_code[EPX_CUDA_MAX_RANKS], s_field[EPX_CUDA_MAX_RANKS];
  __shared__ long long s_mine[EPX_CUDA_MAX_RANKS], s_theirs[EPX_CUDA_MAX_RANKS];

  if (!epx_ll_wait_signals(c, epoch, EPX_OP_LL_DISPATCH, p.seq, role)) return;
  char *slot = epx_ll_slot(c, c.ll_peers[me], epoch);

  /* ---- headers (thread s <- source s) ---- */
  if ((int)threadIdx.x < R) {
    const int s = threadIdx.x;
    const EpxLLHeader h = *epx_ll_hdr(c, slot, s); /* after the acquire of sig[s] */
    int code = 0, field = EPX_FIELD_NONE;
    long long mine = 0, theirs = 0;
    if (h.flags & (EPX_HELLO_INVALID | EPX_HELLO_BAD_ID)) {
      code = s == me ? epxInvalidArgument : epxRemoteError;
      if (h.flags & EPX_HELLO_BAD_ID) {
        field = EPX_FIELD_EXPERT_ID;
        mine = h.bad_token;
        theirs = h.bad_id;
      }
    } else if (!p.invalid) {
#define EPX_LL_CMP(a, b, fld)                 \
  if (code == 0 && (long long)(a) != (long long)(b)) { \
    code = epxMismatch;                       \
    field = fld;                              \
    mine = (long long)(a);                    \
    theirs = (long long)(b);                  \
  }
      EPX_LL_CMP(EPX_OP_LL_DISPATCH, h.op, EPX_FIELD_OP)
      EPX_LL_CMP(p.seq, h.seq, EPX_FIELD_SEQ)
      EPX_LL_CMP(p.hidden, h.hidden, EPX_FIELD_HIDDEN)
      EPX_LL_CMP(p.num_topk, h.topk, EPX_FIELD_TOPK)
      EPX_LL_CMP(p.fp8, h.fp8, EPX_FIELD_X_TYPE)
      EPX_LL_CMP(p.ue8m0, h.ue8m0, EPX_FIELD_SCALES)
#undef EPX_LL_CMP
    }
    s_code[s] = code;
    s_field[s] = field;
    s_mine[s] = mine;
    s_theirs[s] = theirs;
    s_T[s] = min(max(h.num_tokens, 0), llT);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int best = me, best_prio = epx_ll_code_priority(s_code[me]);
    for (int s = 0; s < R; ++s) {
      int prio = epx_ll_code_priority(s_code[s]);
      if (prio > best_prio) best = s, best_prio = prio;
    }
    s_status = p.invalid ? epxInvalidArgument : s_code[best];
    /* The invalid rank's host call already returned epxInvalidArgument. */
    if (!p.invalid && s_status != 0 && role.block == 0)
      epx_record_error(c, s_status, EPX_OP_LL_DISPATCH, EPX_PHASE_CHECK, best, s_field[best],
                       s_mine[best], s_theirs[best], p.seq);
  }
  __syncthreads();

  int placed = 1;
  if (s_status == 0) {
    /* ---- first rows; per-expert outputs (block 0) ---- */
    for (int j = threadIdx.x; j < El; j += blockDim.x) {
      int acc = 0;
      /* the counts of a few sources loaded together: block 0's stores below
       * would otherwise order each load after the previous source's stores */
      for (int s0 = 0; s0 < R; s0 += EPX_LL_COUNTS_AT_ONCE) {
        int n[EPX_LL_COUNTS_AT_ONCE];
#pragma unroll
        for (int u = 0; u < EPX_LL_COUNTS_AT_ONCE; ++u)
          n[u] = s0 + u < R ? ((const int *)(epx_ll_hdr(c, slot, s0 + u) + 1))[j] : 0;
#pragma unroll
        for (int u = 0; u < EPX_LL_COUNTS_AT_ONCE; ++u) {
          const int s = s0 + u;
          if (s >= R) break;
          s_first[j * R + s] = acc;
          if (role.block == 0) {
            const long long range = epx_ll_range_pack(acc, n[u]);
            p.h_layout_range[(size_t)j * R + s] = range;
            if (p.recv_layout_range) p.recv_layout_range[(size_t)j * R + s] = range;
          }
          acc += n[u];
        }
      }
      if (role.block == 0) {
        p.recv_count[j] = acc;
        p.h_recv_count[j] = acc;
        if (p.stats) p.stats[j] += acc;
      }
    }
    __syncthreads();

    /* ---- messages: (source, token, row chunk) per warp ---- */
    const size_t xrow = epx_payload_row_bytes(p.hidden, p.fp8);
    const size_t srow = p.fp8 ? epx_scale_row_bytes(p.hidden, p.ue8m0 ? 2 : 1) : 0;
    placed = epx_ll_dispatch_place_chunked(p, epoch, role, slot, s_first, s_T, xrow, srow);
  }
  if (__syncthreads_or(!placed)) return; /* a wait failed: no ack, the op is over */
  if (role.block == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_LL_DISPATCH, EPX_TRACE_RECV_BLOCK0);
  epx_ll_post_acks(c, epoch, EPX_OP_LL_DISPATCH, role);
}


#endif /* EPX_LL_DISPATCH_RECV_CUH */
