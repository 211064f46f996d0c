/*
 * kernels_dispatch.cu - normal-mode dispatch over NVLink: send, then receive.
 *
 * Send: one warp per token. The row is read once from x in rounds of 16-byte
 * vectors and each round is stored to every destination rank, straight into
 * the token's final receive row in that rank's region (the row comes from the
 * handle's send_row, made by the count exchange). One NVLink write per
 * (token, destination rank); no atomics on the data path. Metadata (source
 * token, local top-k ids, weights, FP8 scales) travel in parallel arrays.
 * Receive: once every source's arrival flag shows this op's epoch, rows
 * [0, N_recv) of the region are copied into the caller's outputs (HBM to HBM),
 * and padding rows are marked in worst-case mode.
 */
#include "backends/cuda/cuda_common.cuh"

#define EPX_WARPS_PER_BLOCK (EPX_CUDA_DATA_THREADS / 32)
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
static __device__ __forceinline__ int4 *epx_dispatch_dst(const EpxDispatchSendParams &p, int r, int row,
                                                         bool direct) {
  const EpxDevCtx &c = p.ctx;
  if (direct && r == c.rank) return (int4 *)((char *)p.recv_x + (size_t)row * p.payload_bytes);
  return (int4 *)(c.peers[r] + c.lay.payload_off + (size_t)row * c.lay.payload_stride);
}

static __device__ void epx_dispatch_send_token(const EpxDispatchSendParams &p, int t, bool direct) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const int R = c.nranks, lane = threadIdx.x % 32;
  const int *rows = p.send_row + (size_t)t * R;
  int row_lo = lane < R ? rows[lane] : -1;
  int row_hi = lane + 32 < R ? rows[lane + 32] : -1;
  unsigned mask_lo = __ballot_sync(0xffffffffu, row_lo >= 0);
  unsigned mask_hi = __ballot_sync(0xffffffffu, row_hi >= 0);
  if (!(mask_lo | mask_hi)) return;

  /* Payload: read each round of vectors once, store it to every destination. */
  const int4 *src = (const int4 *)((const char *)p.x + (size_t)t * p.payload_bytes);
  const int nvec = p.payload_bytes / 16;
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

__global__ void __launch_bounds__(EPX_CUDA_DATA_THREADS) epx_dispatch_send_kernel(EpxDispatchSendParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  const EpxDevCtx &c = p.ctx;
  const EpxOpStart op = epx_op_start(c, p.invalid);
  /* After a fatal failure peers are not waited on and nothing more is posted. */
  if (op.fatal) return;
  if (threadIdx.x == 0 && blockIdx.x == 0) epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_SEND_SLOT);
  if (!op.skip) {
    const int warps = gridDim.x * EPX_WARPS_PER_BLOCK;
    /* Same test as the receive kernel's capacity check, on the same matrix. */
    const bool direct = p.rank_prefix_matrix[(c.nranks - 1) * c.nranks + c.rank] <= p.capacity_rows;
    for (int t = blockIdx.x * EPX_WARPS_PER_BLOCK + threadIdx.x / 32; t < p.num_tokens; t += warps)
      epx_dispatch_send_token(p, t, direct);
  }
  /* A failed call still posts its arrival, so every rank's op ends together. */
  if (threadIdx.x == 0 && blockIdx.x == 0) epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_SEND_BLOCK0);
  if (threadIdx.x == 0 && blockIdx.x == gridDim.x - 1 && gridDim.x > 1)
    epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_SEND_BLOCKN);
  epx_post_arrival(c, op.epoch, EPX_OP_DISPATCH);
}

static __device__ void epx_dispatch_recv_row(const EpxDispatchRecvParams &p, int row) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const char *region = c.peers[c.rank];
  const int lane = threadIdx.x % 32;
  /* Region rows were written by peers before their arrival release, which this
   * block acquired (epx_wait_arrivals) before any read here. */
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

__global__ void __launch_bounds__(EPX_CUDA_DATA_THREADS) epx_dispatch_recv_kernel(EpxDispatchRecvParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  const EpxDevCtx &c = p.ctx;
  const EpxOpStart op = epx_op_start(c, p.invalid);
  if (op.fatal) return;
  if (threadIdx.x == 0 && blockIdx.x == 0) epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_RECV_START);
  if (!epx_wait_arrivals(c, op.epoch, EPX_OP_DISPATCH, p.seq)) return;
  /* A failed call (invalid arguments somewhere, mismatch) writes no output. */
  if (op.skip) return;
  const int R = c.nranks, me = c.rank, lane = threadIdx.x % 32;
  const int n_recv = p.rank_prefix_matrix[(R - 1) * R + me];
  if (n_recv > p.capacity_rows) {
    /* Only the device knows N_recv in the no-host-sync path: never write past
     * the caller's rows; report instead. */
    if (blockIdx.x == 0 && threadIdx.x == 0)
      epx_record_error(c, epxInvalidArgument, EPX_OP_DISPATCH, EPX_PHASE_CHECK, me,
                       EPX_FIELD_CAPACITY, p.capacity_rows, n_recv, p.seq);
    return;
  }
  const int warps = gridDim.x * EPX_WARPS_PER_BLOCK;
  const int gwarp = blockIdx.x * EPX_WARPS_PER_BLOCK + threadIdx.x / 32;
  /* My own rows [lo, lo + own) were written into the outputs by the send kernel. */
  const int lo = me > 0 ? p.rank_prefix_matrix[(me - 1) * R + me] : 0;
  const int own = p.rank_prefix_matrix[me * R + me] - lo;
  for (int i = gwarp; i < n_recv - own; i += warps) epx_dispatch_recv_row(p, i < lo ? i : i + own);
  /* Worst-case mode: rows past N_recv say "no expert" (recv_x stays untouched). */
  for (long long row = n_recv + gwarp; row < p.num_worst_tokens; row += warps) {
    if (lane < p.num_topk) {
      if (p.recv_topk_idx) epx_topk_set(p.recv_topk_idx, p.topk_is_int64, row, p.num_topk, lane, -1);
      if (p.recv_topk_weights) p.recv_topk_weights[row * p.num_topk + lane] = 0.0f;
    }
    if (lane == 0 && p.recv_src_idx) p.recv_src_idx[row] = -1;
  }
  if (blockIdx.x == 0) {
    if (p.recv_rank_prefix)
      for (int r = threadIdx.x; r < R; r += blockDim.x) p.recv_rank_prefix[r] = p.rank_prefix_matrix[r * R + me];
    if (p.num_recv_tokens_per_expert)
      for (int j = threadIdx.x; j < c.num_local_experts; j += blockDim.x)
        p.num_recv_tokens_per_expert[j] = p.handle_per_expert[j];
    if (threadIdx.x == 0 && p.num_recv_tokens) p.num_recv_tokens[0] = n_recv;
  }
  if (blockIdx.x == 0) {
    __syncthreads();
    if (threadIdx.x == 0) epx_trace(c, EPX_OP_DISPATCH, EPX_TRACE_RECV_BLOCK0);
  }
}

cudaError_t epx_cuda_preload_dispatch(void) {
  cudaError_t e = epx_preload(epx_dispatch_send_kernel);
  return e != cudaSuccess ? e : epx_preload(epx_dispatch_recv_kernel);
}

cudaError_t epx_cuda_launch_dispatch_send(const EpxDispatchSendParams *p, int blocks,
                                          cudaStream_t stream) {
  return epx_launch(epx_dispatch_send_kernel, p->ctx.pdl, blocks, EPX_CUDA_DATA_THREADS, 0, stream, *p);
}

cudaError_t epx_cuda_launch_dispatch_recv(const EpxDispatchRecvParams *p, int blocks,
                                          cudaStream_t stream) {
  return epx_launch(epx_dispatch_recv_kernel, p->ctx.pdl, blocks, EPX_CUDA_DATA_THREADS, 0, stream, *p);
}
