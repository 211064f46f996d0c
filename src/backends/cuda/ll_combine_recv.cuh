/*
 * ll_combine_recv.cuh - the receive half of low-latency combine as a device
 * function, shared by the receive kernel (ll_combine_recv.cu) and the fused
 * send+receive kernel (ll_combine_send.cu).
 *
 * Low-latency combine, receive half: for each of my
 * tokens t, acc = 0; for k = 0..K-1 with topk_idx[t][k] >= 0:
 * acc = epx_add_rn(acc, epx_mul_rn(w[t][k], bf16(inbox[t][k]))); out = bf16(acc),
 * exactly the contract's order. Work items are (token, 256-channel chunk),
 * a short contiguous run per warp, so a few tokens still spread over many SMs;
 * a warp waits for the flags of its chunks' pieces (one lane per top-k slot),
 * so it reduces as soon as those landed while others are still in flight. Ids outside
 * [-1, E) (checked here on the device) fail the call and leave combined_x
 * untouched.
 */
#ifndef EPX_LL_COMBINE_RECV_CUH
#define EPX_LL_COMBINE_RECV_CUH

#include "backends/cuda/cuda_common.cuh"

/* Top-k slots whose inbox vectors a lane loads together. */
#define EPX_LL_COMBINE_BATCH 8

static __device__ __forceinline__ int4 epx_ll_pack_bf16x8(const float f[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = (uint32_t)epx_f32_to_bf16(f[2 * i]) | ((uint32_t)epx_f32_to_bf16(f[2 * i + 1]) << 16);
  return make_int4((int)w[0], (int)w[1], (int)w[2], (int)w[3]);
}

static __device__ void epx_ll_combine_recv_body(const EpxLLCombineRecvParams &p,
                                                unsigned long long epoch, EpxLLRole role) {
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, me = c.rank;
  __shared__ int s_status, s_bad, s_bad_token;
  __shared__ long long s_bad_id;
  __shared__ int s_code[EPX_CUDA_MAX_RANKS], s_field[EPX_CUDA_MAX_RANKS];
  __shared__ long long s_mine[EPX_CUDA_MAX_RANKS], s_theirs[EPX_CUDA_MAX_RANKS];
  if (threadIdx.x == 0) {
    s_bad = 0;
    s_bad_token = -1;
    s_bad_id = 0;
  }
  __syncthreads();
  const int K = p.invalid ? 0 : p.num_topk, T = p.invalid ? 0 : p.num_tokens;

  /* Range check of my own ids (no peer involved: read before the wait). */
  for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
    long long id = epx_topk_get(p.topk_idx, p.topk_is_int64, i / K, K, i % K);
    if ((id < -1 || id >= c.num_experts) && atomicExch(&s_bad, 1) == 0) {
      s_bad_id = id;
      s_bad_token = i / K;
    }
  }
  if (!epx_ll_wait_signals(c, epoch, EPX_OP_LL_COMBINE, p.seq, role)) return;
  char *slot = epx_ll_slot(c, c.ll_peers[me], epoch);

  if ((int)threadIdx.x < R) {
    const int s = threadIdx.x;
    const EpxLLHeader h = *epx_ll_hdr(c, slot, s); /* after the acquire of sig[s] */
    int code = 0, field = EPX_FIELD_NONE;
    long long mine = 0, theirs = 0;
    if (h.flags & EPX_HELLO_INVALID) {
      code = s == me ? epxInvalidArgument : epxRemoteError;
    } else if (!p.invalid) {
      if (h.op != EPX_OP_LL_COMBINE) code = epxMismatch, field = EPX_FIELD_OP, mine = EPX_OP_LL_COMBINE, theirs = h.op;
      else if (h.seq != p.seq) code = epxMismatch, field = EPX_FIELD_SEQ, mine = (long long)p.seq, theirs = (long long)h.seq;
      else if (h.hidden != p.hidden) code = epxMismatch, field = EPX_FIELD_HIDDEN, mine = p.hidden, theirs = h.hidden;
      else if (h.topk != p.num_topk) code = epxMismatch, field = EPX_FIELD_TOPK, mine = p.num_topk, theirs = h.topk;
    }
    s_code[s] = code;
    s_field[s] = field;
    s_mine[s] = mine;
    s_theirs[s] = theirs;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int best = me, best_prio = epx_ll_code_priority(s_code[me]);
    for (int s = 0; s < R; ++s) {
      int prio = epx_ll_code_priority(s_code[s]);
      if (prio > best_prio) best = s, best_prio = prio;
    }
    int status = p.invalid ? epxInvalidArgument : s_code[best];
    if (!p.invalid && role.block == 0) {
      if (status != 0)
        epx_record_error(c, status, EPX_OP_LL_COMBINE, EPX_PHASE_CHECK, best, s_field[best],
                         s_mine[best], s_theirs[best], p.seq);
      else if (s_bad)
        epx_record_error(c, epxInvalidArgument, EPX_OP_LL_COMBINE, EPX_PHASE_CHECK, me,
                         EPX_FIELD_EXPERT_ID, s_bad_token, s_bad_id, p.seq);
    }
    s_status = status != 0 ? status : (s_bad ? epxInvalidArgument : 0);
  }
  __syncthreads();

  int reduced = 1;
  if (s_status == 0) {
    /* Each warp takes a contiguous run of (token, 32-vector chunk) items, so
     * it loads a token's ids and weights (lane k: slot k) and waits for its
     * pieces' flags (lane k: slot k's flag, from the expert's rank) once. */
    const int lane = threadIdx.x % 32;
    const int nvec = p.hidden / 8;
    const int chunks = (nvec + 31) / 32;
    const int warps = role.blocks * EPX_LL_WARPS;
    const int warp = role.block * EPX_LL_WARPS + (int)threadIdx.x / 32;
    const int piece = epx_ll_combine_piece_vectors(nvec, c.ll_pieces);
    const int items = T * chunks, per_warp = (items + warps - 1) / warps;
    const int i_end = min(items, (warp + 1) * per_warp);
    int cur_t = -1, cur_q = -1;
    long long my_id = -1;
    float my_w = 0.0f;
    for (int i = warp * per_warp; i < i_end; ++i) {
      const int t = i / chunks, ch = i % chunks, q = ch * 32 / piece;
      if (t != cur_t) {
        my_id = lane < K ? epx_topk_get(p.topk_idx, p.topk_is_int64, t, K, lane) : -1;
        my_w = lane < K ? p.topk_weights[(size_t)t * K + lane] : 0.0f;
        cur_t = t;
        cur_q = -1;
      }
      if (q != cur_q) {
        int failed = 0;
        if (epx_topk_valid(my_id))
          failed = epx_ll_wait_flag(c, epx_ll_flag(c, slot, epx_ll_combine_flag_index(c, t, lane, q)),
                                    epoch, EPX_OP_LL_COMBINE,
                                    epx_expert_rank(my_id, c.num_local_experts), p.seq) < 0;
        if (__any_sync(0xffffffffu, failed)) {
          reduced = 0;
          break;
        }
        __syncwarp(); /* each lane's acquire covers the warp's reads of the piece */
        cur_q = q;
      }
      const int v = ch * 32 + lane;
      const bool active = v < nvec;
      float acc[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
      /* all loads of a batch of slots first, then the sums in k order */
      for (int k0 = 0; k0 < K; k0 += EPX_LL_COMBINE_BATCH) {
        int4 vin[EPX_LL_COMBINE_BATCH];
        float wk[EPX_LL_COMBINE_BATCH];
        bool ok[EPX_LL_COMBINE_BATCH];
#pragma unroll
        for (int u = 0; u < EPX_LL_COMBINE_BATCH; ++u) {
          const int k = k0 + u;
          const long long id = __shfl_sync(0xffffffffu, my_id, k & 31);
          wk[u] = __shfl_sync(0xffffffffu, my_w, k & 31);
          ok[u] = k < K && epx_topk_valid(id) && active;
          if (ok[u]) vin[u] = ((const int4 *)epx_ll_inbox(c, slot, t, k))[v];
        }
#pragma unroll
        for (int u = 0; u < EPX_LL_COMBINE_BATCH; ++u) {
          if (!ok[u]) continue;
          float f[8];
          epx_ll_unpack_bf16x8(vin[u], f);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] = epx_add_rn(acc[j], epx_mul_rn(wk[u], f[j]));
        }
      }
      if (active)
        ((int4 *)((char *)p.combined_x + (size_t)t * p.hidden * 2))[v] = epx_ll_pack_bf16x8(acc);
    }
  }
  if (__syncthreads_or(!reduced)) return; /* a wait failed: no ack, the op is over */
  if (role.block == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_LL_COMBINE, EPX_TRACE_RECV_BLOCK0);
  epx_ll_post_acks(c, epoch, EPX_OP_LL_COMBINE, role);
}


#endif /* EPX_LL_COMBINE_RECV_CUH */
