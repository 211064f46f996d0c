/*
 * kernels_dispatch.cu - normal-mode dispatch over NVLink, one launch: send
 * blocks and copy-out blocks run at once (see "chunk progress" in
 * cuda_common.cuh).
 *
 * Send (S blocks, epx_normal_role): one warp per token, tokens in chunks of
 * lay.chunk_tokens, each warp claiming its next token of the chunk (EpxWork).
 * The row is read once from x in rounds of 16-byte vectors and each round is
 * stored to every destination rank, straight into the token's final receive
 * row in that rank's region (the row comes from the handle's send_row, made
 * by the count exchange). One NVLink write per (token, destination rank); no
 * atomics on the data path but the one local claim per token. Metadata
 * (source token, local top-k ids, weights, FP8 scales) travel in parallel
 * arrays. After each chunk, send block 0 also writes into every destination
 * how many rows it has sent there so far (the chunk's row bound), before its
 * progress word.
 * Copy-out (the other blocks): as the chunks of each source arrive, their rows
 * (up to the bound) are copied from the region into the caller's outputs
 * (HBM to HBM) while later chunks are still in flight; padding rows are
 * marked in worst-case mode.
 */
#include "backends/cuda/bulk_copy.cuh"

/* Copy-out (HBM to HBM): more vectors per lane in flight than the NVLink send. */
#define EPX_RECV_UNROLL 8

/* Runs fn(r, row) for every destination of a token, in rank order; masks and
 * rows are per-lane values for ranks lane and lane + 32 (warp-uniform loop). */
template <typename Fn>
static __device__ __forceinline__ void epx_for_each_dest(unsigned mask_lo, unsigned mask_hi,
                                                         int row_lo, int row_hi, Fn fn) {
  while (mask_lo) {
    int b = __ffs(mask_lo) - 1;
    mask_lo &= mask_lo - 1;
    fn(b, __shfl_sync(0xffffffffu, row_lo, b));
  }
  while (mask_hi) {
    int b = __ffs(mask_hi) - 1;
    mask_hi &= mask_hi - 1;
    fn(b + 32, __shfl_sync(0xffffffffu, row_hi, b));
  }
}

/* Destination of rank r's copy: my own rows go to the caller's recv_x when
 * `direct`, every other row to its final row in r's region. */
static __device__ __forceinline__ int4 *epx_dispatch_dst(const EpxDispatchParams &p, int r, int row,
                                                         bool direct) {
  const EpxDevCtx &c = p.ctx;
  if (direct && r == c.rank) return (int4 *)((char *)p.recv_x + (size_t)row * p.payload_bytes);
  return (int4 *)(c.peers[r] + c.lay.payload_off + (size_t)row * c.lay.payload_stride);
}

/* bw: the warp's bulk-copy state, or NULL for register copies. */
static __device__ void epx_dispatch_send_token(const EpxDispatchParams &p, int t, bool direct,
                                               EpxBulkWarp *bw) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const int R = c.nranks, lane = threadIdx.x % 32;
  const int *rows = p.send_row + (size_t)t * R;
  int row_lo = lane < R ? rows[lane] : -1;
  int row_hi = lane + 32 < R ? rows[lane + 32] : -1;
  unsigned mask_lo = __ballot_sync(0xffffffffu, row_lo >= 0);
  unsigned mask_hi = __ballot_sync(0xffffffffu, row_hi >= 0);
  if (!(mask_lo | mask_hi)) return;

  /* Payload: read each round of vectors (or each bulk piece) once, store it
   * to every destination. */
  const int4 *src = (const int4 *)((const char *)p.x + (size_t)t * p.payload_bytes);
  const int nvec = bw ? 0 : p.payload_bytes / 16;
  if (bw && lane == 0) {
    for (int off = 0; off < p.payload_bytes; off += EPX_BULK_PIECE_BYTES) {
      const int n = min(EPX_BULK_PIECE_BYTES, p.payload_bytes - off);
      if (!epx_bulk_load(c, EPX_OP_DISPATCH, *bw, (const char *)src + off, n)) break;
      for (int r = 0; r < R; ++r) {
        const bool to_r = r < 32 ? (mask_lo >> r) & 1u : (mask_hi >> (r - 32)) & 1u;
        if (to_r) epx_bulk_store(*bw, (char *)epx_dispatch_dst(p, r, rows[r], direct) + off, n);
      }
      epx_bulk_commit();
    }
  }
  for (int v0 = 0; v0 < nvec; v0 += 32 * EPX_CUDA_COPY_UNROLL) {
    int4 buf[EPX_CUDA_COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < EPX_CUDA_COPY_UNROLL; ++u) {
      int v = v0 + u * 32 + lane;
      if (v < nvec) buf[u] = epx_ld_nc_v4(src + v);
    }
    epx_for_each_dest(mask_lo, mask_hi, row_lo, row_hi, [&](int r, int row) {
      int4 *dst = epx_dispatch_dst(p, r, row, direct);
#pragma unroll
      for (int u = 0; u < EPX_CUDA_COPY_UNROLL; ++u) {
        int v = v0 + u * 32 + lane;
        if (v < nvec) dst[v] = buf[u];
      }
    });
  }

  /* Scales (FP8): 4-byte words. */
  const int swords = p.scale_bytes / 4;
  if (swords > 0) {
    const uint32_t *ssrc = (const uint32_t *)((const char *)p.x_scales + (size_t)t * p.scale_bytes);
    for (int w0 = 0; w0 < swords; w0 += 32) {
      uint32_t val = w0 + lane < swords ? ssrc[w0 + lane] : 0u;
      epx_for_each_dest(mask_lo, mask_hi, row_lo, row_hi, [&](int r, int row) {
        uint32_t *dst;
        if (direct && r == c.rank) {
          if (!p.recv_x_scales) return;
          dst = (uint32_t *)((char *)p.recv_x_scales + (size_t)row * p.scale_bytes);
        } else {
          dst = (uint32_t *)(c.peers[r] + L.scales_off + (size_t)row * L.scales_stride);
        }
        if (w0 + lane < swords) dst[w0 + lane] = val;
      });
    }
  }

  /* Metadata: source token, top-k rewritten to the destination's local ids. */
  long long id = -1;
  float wt = 0.0f;
  if (lane < p.num_topk) {
    if (p.topk_idx) id = epx_topk_get(p.topk_idx, p.topk_is_int64, t, p.num_topk, lane);
    if (p.topk_weights) wt = p.topk_weights[(size_t)t * p.num_topk + lane];
  }
  epx_for_each_dest(mask_lo, mask_hi, row_lo, row_hi, [&](int r, int row) {
    char *base = c.peers[r];
    long long first = (long long)r * c.num_local_experts;
    int local = (id >= first && id < first + c.num_local_experts) ? (int)(id - first) : -1;
    if (direct && r == c.rank) {
      /* The receive kernel's metadata outputs, written here for my own rows. */
      if (lane == 0) {
        p.handle_recv_src_idx[row] = t;
        if (p.recv_src_idx) p.recv_src_idx[row] = t;
      }
      if (lane < p.num_topk) {
        if (p.recv_topk_idx) epx_topk_set(p.recv_topk_idx, p.topk_is_int64, row, p.num_topk, lane, local);
        if (p.recv_topk_weights)
          p.recv_topk_weights[(size_t)row * p.num_topk + lane] = local >= 0 ? wt : 0.0f;
      }
      return;
    }
    if (lane == 0) ((int *)(base + L.src_off))[row] = t;
    if (lane < p.num_topk) {
      size_t k = (size_t)row * c.max_topk + lane;
      ((int *)(base + L.topk_off))[k] = local;
      ((float *)(base + L.weights_off))[k] = local >= 0 ? wt : 0.0f;
    }
  });
}

/* Send block: my tokens chunk by chunk; after each chunk block 0 publishes
 * the row bounds, then every block its progress. A skipped op posts "all
 * sent" at once, so every rank's op ends together. */
static __device__ void epx_dispatch_send(const EpxDispatchParams &p, const EpxOpStart &op) {
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, me = c.rank, Tc = c.lay.chunk_tokens;
  __shared__ int s_rows[EPX_CUDA_MAX_RANKS]; /* block 0: rows sent to each rank so far */
  const int chunks = op.skip ? 0 : (p.num_tokens + Tc - 1) / Tc;
  /* Same test as the copy-out's capacity check, on the same matrix. */
  const bool direct =
      !op.skip && p.rank_prefix_matrix[(R - 1) * R + me] <= p.capacity_rows;
  const int sb = epx_normal_role(c).index;
  if (sb == 0 && !op.skip && (int)threadIdx.x < R)
    s_rows[threadIdx.x] = me > 0 ? p.rank_prefix_matrix[(me - 1) * R + threadIdx.x] : 0;
  const int warps = c.send_blocks * EPX_CUDA_DATA_WARPS;
  const int gwarp = sb * EPX_CUDA_DATA_WARPS + threadIdx.x / 32;
  extern __shared__ __align__(128) char s_bulk[];
  __shared__ unsigned long long s_bars[EPX_CUDA_DATA_WARPS];
  EpxBulkWarp bw;
  if (p.bulk) bw = epx_bulk_warp_init(s_bars, s_bulk);
  for (int ch = 0; ch < chunks; ++ch) {
    const int end = min(p.num_tokens, (ch + 1) * Tc);
    for (EpxWork w = epx_work_begin(c, ch, end - ch * Tc, gwarp, warps); w.cur < w.n; epx_work_next(w))
      epx_dispatch_send_token(p, ch * Tc + w.cur, direct, p.bulk ? &bw : NULL);
    if (p.bulk && threadIdx.x % 32 == 0) epx_bulk_drain();
    if (sb == 0) {
      /* Rows of this chunk per destination: the bound follows in token order. */
      __syncthreads();
      for (int i = ch * Tc * R + (int)threadIdx.x; i < end * R; i += blockDim.x)
        if (p.send_row[i] >= 0) atomicAdd(&s_rows[i % R], 1);
      __syncthreads();
      if ((int)threadIdx.x < R && (int)threadIdx.x != me)
        *epx_bound(c, c.peers[threadIdx.x], me, ch) = s_rows[threadIdx.x];
    }
    epx_post_progress(c, epx_progress_value(op.epoch, ch + 1 == chunks ? EPX_PROGRESS_ALL : ch + 1));
  }
  if (chunks == 0) epx_post_progress(c, epx_progress_value(op.epoch, EPX_PROGRESS_ALL));
  if (threadIdx.x == 0 && sb == 0) epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_SEND_BLOCK0);
  if (threadIdx.x == 0 && sb == c.send_blocks - 1 && c.send_blocks > 1)
    epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_SEND_BLOCKN);
}

static __device__ void epx_dispatch_recv_row(const EpxDispatchParams &p, int row) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const char *region = c.peers[c.rank];
  const int lane = threadIdx.x % 32;
  /* Region rows were written by peers before their progress release, which
   * this block acquired (epx_wait_progress) before any read here. */
  const int4 *src = (const int4 *)(region + L.payload_off + (size_t)row * L.payload_stride);
  int4 *dst = (int4 *)((char *)p.recv_x + (size_t)row * p.payload_bytes);
  const int nvec = p.payload_bytes / 16;
  for (int v0 = 0; v0 < nvec; v0 += 32 * EPX_RECV_UNROLL) {
    int4 buf[EPX_RECV_UNROLL];
#pragma unroll
    for (int u = 0; u < EPX_RECV_UNROLL; ++u) {
      int v = v0 + u * 32 + lane;
      if (v < nvec) buf[u] = src[v];
    }
#pragma unroll
    for (int u = 0; u < EPX_RECV_UNROLL; ++u) {
      int v = v0 + u * 32 + lane;
      if (v < nvec) dst[v] = buf[u];
    }
  }
  const int swords = p.scale_bytes / 4;
  if (swords > 0 && p.recv_x_scales) {
    const uint32_t *ss = (const uint32_t *)(region + L.scales_off + (size_t)row * L.scales_stride);
    uint32_t *sd = (uint32_t *)((char *)p.recv_x_scales + (size_t)row * p.scale_bytes);
    for (int w = lane; w < swords; w += 32) sd[w] = ss[w];
  }
  int src_tok = ((const int *)(region + L.src_off))[row];
  if (lane == 0) {
    p.handle_recv_src_idx[row] = src_tok;
    if (p.recv_src_idx) p.recv_src_idx[row] = src_tok;
  }
  if (lane < p.num_topk) {
    size_t k = (size_t)row * c.max_topk + lane;
    int local = ((const int *)(region + L.topk_off))[k];
    if (p.recv_topk_idx)
      epx_topk_set(p.recv_topk_idx, p.topk_is_int64, row, p.num_topk, lane, local);
    if (p.recv_topk_weights)
      p.recv_topk_weights[(size_t)row * p.num_topk + lane] = ((const float *)(region + L.weights_off))[k];
  }
}

/* Copy-out block: the peers' rows chunk by chunk, as each source's bound
 * grows, then the worst-case padding and the small outputs. */
static __device__ void epx_dispatch_copy_out(const EpxDispatchParams &p, const EpxOpStart &op) {
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, me = c.rank, lane = threadIdx.x % 32;
  const int cb = epx_normal_role(c).index;
  if (cb == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_RECV_START);
  const unsigned long long all_sent = epx_progress_value(op.epoch, EPX_PROGRESS_ALL);
  /* A failed call (invalid arguments somewhere, mismatch) writes no output. */
  if (op.skip) {
    (void)epx_wait_progress(c, ~0ull, all_sent, EPX_OP_DISPATCH, p.seq);
    return;
  }
  const int n_recv = p.rank_prefix_matrix[(R - 1) * R + me];
  if (n_recv > p.capacity_rows) {
    /* Only the device knows N_recv in the no-host-sync path: never write past
     * the caller's rows; report instead. */
    if (cb == 0 && threadIdx.x == 0)
      epx_record_error(c, epxInvalidArgument, EPX_OP_DISPATCH, EPX_PHASE_CHECK, me,
                       EPX_FIELD_CAPACITY, p.capacity_rows, n_recv, p.seq);
    (void)epx_wait_progress(c, ~0ull, all_sent, EPX_OP_DISPATCH, p.seq);
    return;
  }
  const int warps = (gridDim.x - c.send_blocks) * EPX_CUDA_DATA_WARPS;
  const int gwarp = cb * EPX_CUDA_DATA_WARPS + threadIdx.x / 32;
  /* Rows of source s: [s_done[s], s_end[s]) still to copy; my own rows were
   * written into the outputs by the send blocks. */
  __shared__ int s_done[EPX_CUDA_MAX_RANKS], s_end[EPX_CUDA_MAX_RANKS], s_new[EPX_CUDA_MAX_RANKS];
  __shared__ unsigned long long s_pending;
  if ((int)threadIdx.x < R) {
    const int s = threadIdx.x;
    const int lo = s > 0 ? p.rank_prefix_matrix[(s - 1) * R + me] : 0;
    s_done[s] = lo;
    s_end[s] = s == me ? lo : p.rank_prefix_matrix[s * R + me];
  }
  __syncthreads();
  for (int ch = 0; ch < c.lay.max_chunks; ++ch) {
    if (threadIdx.x == 0) {
      unsigned long long m = 0;
      for (int s = 0; s < R; ++s)
        if (s_done[s] < s_end[s]) m |= 1ull << s;
      s_pending = m;
    }
    __syncthreads();
    const unsigned long long pending = s_pending;
    if (!pending) break;
    /* Region rows and the bound were written by the source before its
     * progress release, which this block acquired before any read here. */
    if (!epx_wait_progress(c, pending, epx_progress_value(op.epoch, ch + 1), EPX_OP_DISPATCH, p.seq))
      return;
    if (cb == 0 && ch == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_RECV_SIGNALS);
    if ((int)threadIdx.x < R) {
      const int s = threadIdx.x;
      s_new[s] = (pending >> s) & 1ull ? min(max(*epx_bound(c, c.peers[me], s, ch), s_done[s]), s_end[s])
                                       : s_done[s];
    }
    __syncthreads();
    int total = 0;
    for (int s = 0; s < R; ++s) total += s_new[s] - s_done[s];
    for (int i = gwarp; i < total; i += warps) {
      int s = 0, k = i;
      while (k >= s_new[s] - s_done[s]) {
        k -= s_new[s] - s_done[s];
        ++s;
      }
      epx_dispatch_recv_row(p, s_done[s] + k);
    }
    __syncthreads();
    if ((int)threadIdx.x < R) s_done[threadIdx.x] = s_new[threadIdx.x];
    __syncthreads();
  }
  /* Worst-case mode: rows past N_recv say "no expert" (recv_x stays untouched). */
  for (long long row = n_recv + gwarp; row < p.num_worst_tokens; row += warps) {
    if (lane < p.num_topk) {
      if (p.recv_topk_idx) epx_topk_set(p.recv_topk_idx, p.topk_is_int64, row, p.num_topk, lane, -1);
      if (p.recv_topk_weights) p.recv_topk_weights[row * p.num_topk + lane] = 0.0f;
    }
    if (lane == 0 && p.recv_src_idx) p.recv_src_idx[row] = -1;
  }
  if (cb == 0) {
    if (p.recv_rank_prefix)
      for (int r = threadIdx.x; r < R; r += blockDim.x) p.recv_rank_prefix[r] = p.rank_prefix_matrix[r * R + me];
    if (p.num_recv_tokens_per_expert)
      for (int j = threadIdx.x; j < c.num_local_experts; j += blockDim.x)
        p.num_recv_tokens_per_expert[j] = p.handle_per_expert[j];
    if (threadIdx.x == 0 && p.num_recv_tokens) p.num_recv_tokens[0] = n_recv;
    __syncthreads();
    if (threadIdx.x == 0) epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_RECV_BLOCK0);
  }
}

__global__ void __launch_bounds__(EPX_CUDA_DATA_THREADS) epx_dispatch_kernel(EpxDispatchParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  const EpxOpStart op = epx_op_start(p.ctx, p.invalid);
  /* After a fatal failure peers are not waited on and nothing more is posted. */
  if (op.fatal) return;
  const EpxNormalRole role = epx_normal_role(p.ctx);
  if (threadIdx.x == 0 && role.send && role.index == 0) epx_trace(p.ctx, EPX_OP_DISPATCH, EPX_TRACE_SEND_SLOT);
  if (role.send) epx_dispatch_send(p, op);
  else epx_dispatch_copy_out(p, op);
  epx_trace_block_done(p.ctx, EPX_OP_DISPATCH);
}

cudaError_t epx_cuda_preload_dispatch(void) {
  cudaError_t e = epx_preload(epx_dispatch_kernel);
  return e != cudaSuccess ? e
                          : cudaFuncSetAttribute(epx_dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 (int)EPX_BULK_SMEM_BYTES);
}

/* blocks >= 2: at least one send and one copy-out block (ctx.send_blocks < blocks). */
cudaError_t epx_cuda_launch_dispatch(const EpxDispatchParams *p, int blocks, cudaStream_t stream) {
  return epx_launch(epx_dispatch_kernel, p->ctx.pdl, blocks, EPX_CUDA_DATA_THREADS,
                    p->bulk ? EPX_BULK_SMEM_BYTES : 0, stream, *p);
}
