/*
 * ll_dispatch_send.cu - low-latency dispatch, send half: one message per
 * (token, destination rank), written straight from registers into the
 * destination's slot (NVLink writes, no staging copy on the sender).
 *
 * Every block first builds, in shared memory, one bitmask of tokens per
 * expert from topk_idx (a token counts once per expert even if it lists it
 * twice). From it come, without atomics on global memory or any exchange:
 *   - counts[e]: this rank's tokens naming expert e (sent in the header), and
 *   - pos(t, e): how many of this rank's tokens before t name e (sent in the
 *     message meta), so the receiver places the token at
 *     first_row(e, me) + pos(t, e): sources ascending, tokens ascending.
 * Block 0 of the send role writes the headers and posts them at once; the
 * other blocks b take tokens t = b - 1, + (blocks - 1), ...: BF16 rows are
 * copied 16 bytes a thread; FP8 rows are cast here, a half-warp per 128-channel
 * group, with the same per-group functions as the host (epx_fp8_group_scale,
 * epx_fp8_quantize, epx_ue8m0_from_scale), so the bytes are identical. After
 * each token, its flag goes to every destination. Ids outside [-1, E) fail
 * the call on every rank (header flag) and steer no write.
 */
#include "backends/cuda/ll_dispatch_recv.cuh"

/* Top-k ids a thread loads at once while building the bitmasks. */
#define EPX_LL_MASK_BATCH 4

/* Half-warp lanes covering one 128-channel group: 16 lanes x 8 BF16 values. */
#define EPX_LL_GROUP_LANES (EPX_FP8_GROUP / 8)

/* pos(t, e) from the bitmask row of expert e: set bits before bit t. */
static __device__ __forceinline__ int epx_ll_mask_rank(const unsigned int *row, int t) {
  int n = 0;
  for (int w = 0; w < t / 32; ++w) n += __popc(row[w]);
  unsigned int below = (t % 32) ? (row[t / 32] & ((1u << (t % 32)) - 1u)) : 0u;
  return n + __popc(below);
}

/* One FP8 token: cast 8 channels a thread and store them in every destination
 * of dmask. Each thread first loads all its vectors of a pass (up to
 * EPX_CUDA_COPY_UNROLL) so the loads are in flight together, then casts them
 * one round at a time. Every thread of the block runs the same rounds, so the
 * half-warp shuffles see their whole group. */
static __device__ void epx_ll_send_fp8(const EpxLLDispatchSendParams &p, unsigned long long epoch,
                                       const int4 *src, unsigned long long dmask, int t) {
  const EpxDevCtx &c = p.ctx;
  const int nvec = p.hidden / 8; /* a multiple of 16: hidden % 128 == 0 */
  const int groups = p.hidden / EPX_FP8_GROUP;
  const int step = (int)blockDim.x;
  for (int v0 = (int)threadIdx.x; v0 - (int)threadIdx.x < nvec; v0 += step * EPX_CUDA_COPY_UNROLL) {
    int4 raw[EPX_CUDA_COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < EPX_CUDA_COPY_UNROLL; ++u)
      if (v0 + u * step < nvec) raw[u] = epx_ld_nc_v4(src + v0 + u * step);
#pragma unroll
    for (int u = 0; u < EPX_CUDA_COPY_UNROLL; ++u) {
      const int v = v0 + u * step;
      /* blockDim.x and nvec are multiples of 16: a half-warp is all active or all not */
      const bool active = v < nvec;
      float f[8];
      float amax = 0.0f;
      if (active) {
        epx_ll_unpack_bf16x8(raw[u], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float a = f[i] < 0.0f ? -f[i] : f[i];
          if (a > amax) amax = a; /* NaN never wins, as in epx_fp8_cast_token */
        }
      }
#pragma unroll
      for (int d = EPX_LL_GROUP_LANES / 2; d >= 1; d /= 2) {
        float o = __shfl_xor_sync(0xffffffffu, amax, d);
        if (o > amax) amax = o;
      }
      if (!active) continue;
      const float scale = epx_fp8_group_scale(amax, p.round_scale);
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        lo |= (uint32_t)epx_fp8_quantize(f[i], scale) << (8 * i);
        hi |= (uint32_t)epx_fp8_quantize(f[4 + i], scale) << (8 * i);
      }
      const int g = v / EPX_LL_GROUP_LANES;
      const bool group_leader = (v % EPX_LL_GROUP_LANES) == 0;
      for (unsigned long long m = dmask; m; m &= m - 1) {
        const int r = __ffsll((long long)m) - 1;
        char *msg = epx_ll_msg(c, epx_ll_slot(c, c.ll_peers[r], epoch), c.rank, t);
        ((uint2 *)msg)[v] = make_uint2(lo, hi);
        if (!group_leader) continue;
        char *sc = msg + c.ll.msg_scales_off;
        if (p.ue8m0) {
          /* group g is byte g % 4 of word g / 4 (little-endian): byte g of the row */
          ((uint8_t *)sc)[g] = epx_ue8m0_from_scale(scale);
          if (g == groups - 1)
            for (int b = groups; b % EPX_UE8M0_PER_WORD; ++b) ((uint8_t *)sc)[b] = 0;
        } else {
          ((float *)sc)[g] = scale;
        }
      }
    }
  }
}

/* BF16: each thread loads all its vectors of the row (up to
 * EPX_CUDA_COPY_UNROLL) before storing them, so they are in flight together. */
static __device__ void epx_ll_send_bf16_batched(const EpxLLDispatchSendParams &p,
                                                unsigned long long epoch, const int4 *src,
                                                unsigned long long dmask, int t) {
  const EpxDevCtx &c = p.ctx;
  const int nvec = p.hidden / 8;
  const int step = (int)blockDim.x;
  for (int v0 = threadIdx.x; v0 < nvec; v0 += step * EPX_CUDA_COPY_UNROLL) {
    int4 buf[EPX_CUDA_COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < EPX_CUDA_COPY_UNROLL; ++u)
      if (v0 + u * step < nvec) buf[u] = epx_ld_nc_v4(src + v0 + u * step);
    for (unsigned long long m = dmask; m; m &= m - 1) {
      const int r = __ffsll((long long)m) - 1;
      int4 *dst = (int4 *)epx_ll_msg(c, epx_ll_slot(c, c.ll_peers[r], epoch), c.rank, t);
#pragma unroll
      for (int u = 0; u < EPX_CUDA_COPY_UNROLL; ++u)
        if (v0 + u * step < nvec) dst[v0 + u * step] = buf[u];
    }
  }
}

/* Pulls row t of x towards L2 (one prefetch per 128-byte line) while the
 * block builds its bitmasks: the cast then loads from L2, not HBM. */
static __device__ __forceinline__ void epx_ll_prefetch_row(const void *row, size_t bytes) {
  for (size_t off = (size_t)threadIdx.x * 128; off < bytes; off += (size_t)blockDim.x * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"((const char *)row + off));
}

/* The send half; returns the op number, or 0 when this block must stop
 * (sticky fatal error, failed wait). Role block 0 writes the headers and
 * posts them; the tokens go to the other blocks (all when there is one). */
static __device__ unsigned long long epx_ll_dispatch_send_body(const EpxLLDispatchSendParams &p,
                                                               EpxLLRole role) {
  extern __shared__ unsigned int s_mask[]; /* [E][W]: bit t of row e = token t names expert e */
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, El = c.num_local_experts, E = c.num_experts, me = c.rank;
  __shared__ int s_fatal, s_bad, s_bad_token;
  __shared__ long long s_bad_id;
  __shared__ unsigned long long s_epoch, s_dmask;
  __shared__ int s_id[EPX_MAX_TOPK], s_pos[EPX_MAX_TOPK];

  const int T = p.invalid ? 0 : p.num_tokens;
  const int K = p.invalid ? 0 : p.num_topk;
  const int W = (T + 31) / 32;
  const int token_block0 = role.blocks > 1 ? 1 : 0;
  const int token_blocks = role.blocks - token_block0;
  const int first_token = role.block - token_block0; /* -1: the header block */
  if (first_token >= 0 && first_token < T)
    epx_ll_prefetch_row((const char *)p.x + (size_t)first_token * p.hidden * 2, (size_t)p.hidden * 2);
  epx_ll_trace_send_begin(c);
  const unsigned long long ack_peek = epx_ll_peek_ack(c);
  if (threadIdx.x == 0) {
    s_fatal = epx_ll_fatal(c);
    if (role.block == 0) epx_trace_start(c, EPX_OP_LL_DISPATCH);
    s_epoch = epx_ll_read_epoch(c);
    s_bad = 0;
    s_bad_id = 0;
    s_bad_token = -1;
  }
  for (int i = threadIdx.x; i < E * W; i += blockDim.x) s_mask[i] = 0u;
  __syncthreads();
  if (s_fatal) return 0;
  const unsigned long long epoch = s_epoch;
  if (role.block == 0 && threadIdx.x == 0 && p.handle_epoch) *p.handle_epoch = epoch;

  /* ---- token bitmasks per expert; id range check (each thread loads a
   * batch of ids before its shared-memory atomics, so the loads overlap) ---- */
  for (int i0 = threadIdx.x; i0 < T * K; i0 += blockDim.x * EPX_LL_MASK_BATCH) {
    long long ids[EPX_LL_MASK_BATCH];
#pragma unroll
    for (int u = 0; u < EPX_LL_MASK_BATCH; ++u) {
      const int i = i0 + u * (int)blockDim.x;
      ids[u] = i < T * K ? epx_topk_get(p.topk_idx, p.topk_is_int64, i / K, K, i % K) : -1;
    }
#pragma unroll
    for (int u = 0; u < EPX_LL_MASK_BATCH; ++u) {
      const int i = i0 + u * (int)blockDim.x, t = i / K;
      const long long id = ids[u];
      if (id < -1 || id >= E) {
        if (atomicExch(&s_bad, 1) == 0) {
          s_bad_id = id;
          s_bad_token = t;
        }
      } else if (id >= 0) {
        atomicOr(&s_mask[(size_t)id * W + t / 32], 1u << (t % 32));
      }
    }
  }
  __syncthreads();
  const int sending = !p.invalid && !s_bad;
  if (role.block == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_LL_DISPATCH, EPX_TRACE_SEND_PREP);

  /* ---- slot e % 2 of every destination must be free (op e - 2 read) ---- */
  if (!epx_ll_wait_slot_free(c, epoch, EPX_OP_LL_DISPATCH, p.seq, ack_peek)) return 0;
  if (role.block == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_LL_DISPATCH, EPX_TRACE_SEND_SLOT);

  /* ---- headers: block 0; thread r writes destination r's fields, and the
   * R x E_local counts are spread over the whole block (one thread writing a
   * destination's 128-odd counts one after another took ~20 us on H200);
   * then sig[me] = e in every destination, ahead of the messages ---- */
  if (role.block == 0) {
    if ((int)threadIdx.x < R) {
      const int r = threadIdx.x;
      EpxLLHeader *h = epx_ll_hdr(c, epx_ll_slot(c, c.ll_peers[r], epoch), me);
      h->epoch = epoch;
      h->seq = p.seq;
      h->op = EPX_OP_LL_DISPATCH;
      h->flags = p.invalid ? EPX_HELLO_INVALID : (s_bad ? EPX_HELLO_BAD_ID : 0);
      h->hidden = p.hidden;
      h->topk = p.num_topk;
      h->fp8 = p.fp8;
      h->ue8m0 = p.ue8m0;
      h->num_tokens = sending ? T : 0;
      h->bad_id = s_bad_id;
      h->bad_token = s_bad_token;
    }
    for (int i = threadIdx.x; i < R * El; i += blockDim.x) {
      const int r = i / El, j = i % El;
      int n = 0;
      if (sending) {
        const unsigned int *row = s_mask + (size_t)i * W; /* expert r * El + j */
        for (int w = 0; w < W; ++w) n += __popc(row[w]);
      }
      ((int *)(epx_ll_hdr(c, epx_ll_slot(c, c.ll_peers[r], epoch), me) + 1))[j] = n;
    }
    epx_ll_post_headers(c, epoch);
    if (threadIdx.x == 0) epx_trace(c, EPX_OP_LL_DISPATCH, EPX_TRACE_SEND_HEADER);
  }

  /* ---- messages, each followed by its flag in every destination ---- */
  if (sending && first_token >= 0) {
    for (int t = first_token; t < T; t += token_blocks) {
      if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        long long id = -1;
        if (lane < K) id = epx_topk_get(p.topk_idx, p.topk_is_int64, t, K, lane);
        int dst = id >= 0 ? epx_expert_rank(id, El) : -1;
        if (lane < K) {
          s_id[lane] = (int)id;
          s_pos[lane] = id >= 0 ? epx_ll_mask_rank(s_mask + (size_t)id * W, t) : -1;
        }
        /* destinations: lanes cover ranks lane and lane + 32 */
        unsigned long long m = 0;
        for (int k = 0; k < K; ++k) {
          int d = __shfl_sync(0xffffffffu, dst, k);
          if (d >= 0) m |= 1ull << d;
        }
        if (lane == 0) s_dmask = m;
      }
      __syncthreads();
      const unsigned long long dmask = s_dmask;
      /* meta to every destination of the token */
      for (int i = threadIdx.x; i < R * K; i += blockDim.x) {
        const int r = i / K, k = i % K;
        if (!((dmask >> r) & 1ull)) continue;
        int *meta = (int *)(epx_ll_msg(c, epx_ll_slot(c, c.ll_peers[r], epoch), me, t) +
                            c.ll.msg_meta_off);
        meta[k] = s_id[k];
        meta[K + k] = s_pos[k];
      }
      const int4 *src = (const int4 *)((const char *)p.x + (size_t)t * p.hidden * 2);
      if (p.fp8)
        epx_ll_send_fp8(p, epoch, src, dmask, t);
      else
        epx_ll_send_bf16_batched(p, epoch, src, dmask, t);
      /* every thread's writes of the message, then its flag (2e + 1 where
       * it went, 2e elsewhere); also frees s_id / s_pos / s_dmask */
      __syncthreads();
      if ((int)threadIdx.x < R) {
        const int r = threadIdx.x;
        epx_st_release_sys(epx_ll_flag(c, epx_ll_slot(c, c.ll_peers[r], epoch),
                                       epx_ll_dispatch_flag_index(c, me, t)),
                           epx_ll_flag_value(epoch, (int)((dmask >> r) & 1ull)));
      }
    }
  }
  if (threadIdx.x == 0 && role.block == token_block0)
    epx_trace(c, EPX_OP_LL_DISPATCH, EPX_TRACE_SEND_BLOCK0);
  if (threadIdx.x == 0 && role.block == role.blocks - 1 && role.blocks > 1)
    epx_trace(c, EPX_OP_LL_DISPATCH, EPX_TRACE_SEND_BLOCKN);
  epx_ll_trace_send_done(c, EPX_OP_LL_DISPATCH, role);
  return epoch;
}

__global__ void __launch_bounds__(EPX_LL_THREADS, 1)
    epx_ll_dispatch_send_kernel(EpxLLDispatchSendParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  const unsigned long long epoch = epx_ll_dispatch_send_body(p, epx_ll_whole_grid());
  if (epoch) epx_ll_advance_epoch(p.ctx, epoch);
}

/* Send and receive in one launch (variant 2, no hook): the first half of the
 * grid sends, the second half receives at the same time (one block of each
 * on an SM), taking each message as its flag lands, without a kernel
 * boundary. Launched cooperatively: every block is resident. */
__global__ void __launch_bounds__(EPX_LL_THREADS, 2)
    epx_ll_dispatch_fused_kernel(EpxLLDispatchSendParams sp, EpxLLDispatchRecvParams rp) {
  epx_ll_fused_roles<EpxLLDispatchSendParams, EpxLLDispatchRecvParams, epx_ll_dispatch_send_body,
                     epx_ll_dispatch_recv_body>(sp.ctx, sp, rp);
}

cudaError_t epx_cuda_preload_ll_dispatch_send(void) {
  cudaError_t e = epx_preload(epx_ll_dispatch_send_kernel);
  return e != cudaSuccess ? e : epx_preload(epx_ll_dispatch_fused_kernel);
}

/* Dynamic shared memory of the fused dispatch kernel: the send blocks' bitmasks
 * or the receive blocks' first rows, whichever is larger. */
static size_t epx_ll_dispatch_fused_smem(const EpxDevCtx &c, int num_tokens) {
  size_t smem = epx_cuda_ll_mask_bytes(c.num_experts, num_tokens);
  size_t rsmem = sizeof(int) * (size_t)c.num_local_experts * (size_t)c.nranks;
  return rsmem > smem ? rsmem : smem;
}

static cudaError_t epx_ll_allow_smem(void (*kernel)(EpxLLDispatchSendParams, EpxLLDispatchRecvParams),
                                     size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

cudaError_t epx_cuda_ll_fused_blocks_per_sm(size_t dispatch_smem, size_t combine_smem, int *per_sm) {
  int d = 0, c = 0;
  cudaError_t e = epx_ll_allow_smem(epx_ll_dispatch_fused_kernel, dispatch_smem);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&d, epx_ll_dispatch_fused_kernel, EPX_LL_THREADS,
                                                      dispatch_smem);
  if (e == cudaSuccess) e = epx_cuda_ll_combine_fused_occupancy(combine_smem, &c);
  if (e != cudaSuccess) return e;
  *per_sm = d < c ? d : c;
  return cudaSuccess;
}

cudaError_t epx_cuda_launch_ll_dispatch_fused(const EpxLLDispatchSendParams *sp,
                                              const EpxLLDispatchRecvParams *rp, int blocks,
                                              cudaStream_t stream) {
  const size_t smem = epx_ll_dispatch_fused_smem(sp->ctx, sp->invalid ? 0 : sp->num_tokens);
  cudaError_t err = epx_ll_allow_smem(epx_ll_dispatch_fused_kernel, smem);
  if (err != cudaSuccess) return err;
  return epx_launch_ex(epx_ll_dispatch_fused_kernel, 0, 1, blocks, EPX_LL_THREADS, smem, stream, *sp, *rp);
}

cudaError_t epx_cuda_launch_ll_dispatch_send(const EpxLLDispatchSendParams *p, int blocks,
                                             cudaStream_t stream) {
  int T = p->invalid ? 0 : p->num_tokens;
  size_t smem = epx_cuda_ll_mask_bytes(p->ctx.num_experts, T);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(epx_ll_dispatch_send_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  return epx_launch(epx_ll_dispatch_send_kernel, p->ctx.pdl, blocks, EPX_LL_THREADS, smem, stream, *p);
}
