/*
 * ll_combine_send.cu - low-latency combine, send half: every valid row of my
 * local experts (the rows the dispatch placed, recorded in the handle) goes
 * back to its token's source, into slot [token][k] of the source's inbox for
 * every top-k slot k that named the expert (usually one). The source then
 * sums the K slots in k order, which keeps the result bit-identical to the
 * reference (a per-rank partial sum would change the FP32 rounding order).
 *
 * Rows are cut into EPX_CUDA_LL_PIECES pieces, and the (row, piece) items
 * are spread over the warps of the grid by a flat index over the valid rows of
 * all experts (a prefix of the per-expert counts in shared memory), so the work
 * is balanced whatever the routing. After each piece its warp release-stores
 * the piece's flag [token][k][piece] in the source, which starts reducing that
 * piece at once.
 */
#include "backends/cuda/ll_combine_recv.cuh"

/* 16-byte vectors a lane keeps in flight in the chunked send. */
#define EPX_LL_CSEND_UNROLL 8

/* The send half; returns the op number, or 0 when this block must stop. */
static __device__ unsigned long long epx_ll_combine_send_body(const EpxLLCombineSendParams &p,
                                                              EpxLLRole role) {
  extern __shared__ int s_prefix[]; /* [E_local + 1]: exclusive prefix of the valid rows */
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, El = c.num_local_experts, me = c.rank;
  const int llT = c.ll_max_tokens;
  const long long rpe = epx_ll_rows_per_expert(R, llT);
  __shared__ int s_fatal;
  __shared__ unsigned long long s_epoch;
  epx_ll_trace_send_begin(c);
  const unsigned long long ack_peek = epx_ll_peek_ack(c);
  if (threadIdx.x == 0) {
    s_fatal = epx_ll_fatal(c);
    if (role.block == 0) epx_trace_start(c, EPX_OP_LL_COMBINE);
    s_epoch = epx_ll_read_epoch(c);
  }
  /* the rows of the experts before each one (the whole block: one thread
   * summing El counts in turn was 5 us of the op at EP1, El = 256) */
  if (!p.invalid)
    epx_block_exclusive_scan(
        El, [&](int j) { return min(max(p.h_recv_count[j], 0), (int)rpe); }, s_prefix);
  __syncthreads();
  if (s_fatal) return 0;
  const unsigned long long epoch = s_epoch;
  if (role.block == 0 && threadIdx.x == 0 && p.handle_epoch) *p.handle_epoch = epoch;
  if (role.block == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_LL_COMBINE, EPX_TRACE_SEND_PREP);
  if (!epx_ll_wait_slot_free(c, epoch, EPX_OP_LL_COMBINE, p.seq, ack_peek)) return 0;
  if (role.block == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_LL_COMBINE, EPX_TRACE_SEND_SLOT);

  if (role.block == 0 && (int)threadIdx.x < R) {
    const int r = threadIdx.x;
    EpxLLHeader *h = epx_ll_hdr(c, epx_ll_slot(c, c.ll_peers[r], epoch), me);
    h->epoch = epoch;
    h->seq = p.seq;
    h->op = EPX_OP_LL_COMBINE;
    h->flags = p.invalid ? EPX_HELLO_INVALID : 0;
    h->hidden = p.hidden;
    h->topk = p.num_topk;
    h->fp8 = 0;
    h->ue8m0 = 0;
    h->num_tokens = 0;
    h->bad_id = 0;
    h->bad_token = -1;
  }
  if (role.block == 0) {
    epx_ll_post_headers(c, epoch);
    if (threadIdx.x == 0) epx_trace(c, EPX_OP_LL_COMBINE, EPX_TRACE_SEND_HEADER);
  }

  if (!p.invalid) {
    /* items (row, piece of the row): each warp loads its piece once
     * (EPX_LL_CSEND_UNROLL vectors a lane in flight), stores it into every
     * top-k slot of the source that names this expert, then flags it there */
    const int lane = threadIdx.x % 32, K = p.num_topk;
    const unsigned kvalid = K >= 32 ? 0xffffffffu : (1u << K) - 1u;
    const int nvec = p.hidden / 8;
    const size_t xrow = (size_t)p.hidden * 2;
    const int total = s_prefix[El];
    const int warps = role.blocks * EPX_LL_WARPS;
    const int per_round = 32 * EPX_LL_CSEND_UNROLL;
    const int pieces = c.ll_pieces;
    const int piece = epx_ll_combine_piece_vectors(nvec, pieces);
    for (int i = role.block * EPX_LL_WARPS + (int)threadIdx.x / 32; i < total * pieces; i += warps) {
      const int q = i % pieces, ri = i / pieces;
      const int v_lo = q * piece, v_hi = min(nvec, v_lo + piece);
      if (v_lo >= nvec) continue; /* an empty piece: no receiver waits for it */
      int lo = 0, hi = El - 1;
      while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (s_prefix[mid] <= ri) lo = mid;
        else hi = mid - 1;
      }
      const int e = lo, row = ri - s_prefix[e];
      const size_t at = (size_t)epx_ll_row_index(e, row, R, llT);
      const int s = p.row_src_rank[at], t = p.row_src_token[at];
      const unsigned kmask = p.row_kmask[at] & kvalid;
      if (s < 0 || s >= R || t < 0 || t >= llT) continue;
      char *slot = epx_ll_slot(c, c.ll_peers[s], epoch);
      const int4 *src = (const int4 *)((const char *)p.x + at * xrow);
      for (int v0 = v_lo; v0 < v_hi; v0 += per_round) {
        int4 buf[EPX_LL_CSEND_UNROLL];
#pragma unroll
        for (int u = 0; u < EPX_LL_CSEND_UNROLL; ++u) {
          int v = v0 + u * 32 + lane;
          if (v < v_hi) buf[u] = epx_ld_nc_v4(src + v);
        }
        for (unsigned m = kmask; m; m &= m - 1) {
          int4 *dst = (int4 *)epx_ll_inbox(c, slot, t, __ffs(m) - 1);
#pragma unroll
          for (int u = 0; u < EPX_LL_CSEND_UNROLL; ++u) {
            int v = v0 + u * 32 + lane;
            if (v < v_hi) dst[v] = buf[u];
          }
        }
      }
      /* the warp's stores of the piece, then lane k flags slot k of it */
      __syncwarp();
      if ((kmask >> lane) & 1u)
        epx_st_release_sys(epx_ll_flag(c, slot, epx_ll_combine_flag_index(c, t, lane, q)),
                           epx_ll_flag_value(epoch, 1));
    }
  }
  if (threadIdx.x == 0 && role.block == 0) epx_trace(c, EPX_OP_LL_COMBINE, EPX_TRACE_SEND_BLOCK0);
  if (threadIdx.x == 0 && role.block == role.blocks - 1 && role.blocks > 1)
    epx_trace(c, EPX_OP_LL_COMBINE, EPX_TRACE_SEND_BLOCKN);
  epx_ll_trace_send_done(c, EPX_OP_LL_COMBINE, role);
  return epoch;
}

__global__ void __launch_bounds__(EPX_LL_THREADS, 1)
    epx_ll_combine_send_kernel(EpxLLCombineSendParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  const unsigned long long epoch = epx_ll_combine_send_body(p, epx_ll_whole_grid());
  if (epoch) epx_ll_advance_epoch(p.ctx, epoch);
}

/* Send and receive in one launch (variant 2, no hook): the first half of the
 * grid sends, the second half reduces rows as their flags land (see the
 * dispatch's fused kernel). Launched cooperatively: every block is resident. */
__global__ void __launch_bounds__(EPX_LL_THREADS, 2)
    epx_ll_combine_fused_kernel(EpxLLCombineSendParams sp, EpxLLCombineRecvParams rp) {
  epx_ll_fused_roles<EpxLLCombineSendParams, EpxLLCombineRecvParams, epx_ll_combine_send_body,
                     epx_ll_combine_recv_body>(sp.ctx, sp, rp);
}

cudaError_t epx_cuda_preload_ll_combine_send(void) {
  cudaError_t e = epx_preload(epx_ll_combine_send_kernel);
  return e != cudaSuccess ? e : epx_preload(epx_ll_combine_fused_kernel);
}

cudaError_t epx_cuda_ll_combine_fused_occupancy(size_t smem, int *per_sm) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(epx_ll_combine_fused_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, epx_ll_combine_fused_kernel,
                                                       EPX_LL_THREADS, smem);
}

cudaError_t epx_cuda_launch_ll_combine_fused(const EpxLLCombineSendParams *sp,
                                             const EpxLLCombineRecvParams *rp, int blocks,
                                             cudaStream_t stream) {
  size_t smem = sizeof(int) * ((size_t)sp->ctx.num_local_experts + 1);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(epx_ll_combine_fused_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  return epx_launch_ex(epx_ll_combine_fused_kernel, 0, 1, blocks, EPX_LL_THREADS, smem, stream, *sp, *rp);
}

cudaError_t epx_cuda_launch_ll_combine_send(const EpxLLCombineSendParams *p, int blocks,
                                            cudaStream_t stream) {
  size_t smem = sizeof(int) * ((size_t)p->ctx.num_local_experts + 1);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(epx_ll_combine_send_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  return epx_launch(epx_ll_combine_send_kernel, p->ctx.pdl, blocks, EPX_LL_THREADS, smem, stream, *p);
}
