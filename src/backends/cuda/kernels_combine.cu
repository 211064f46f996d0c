/*
 * kernels_combine.cu - normal-mode combine over NVLink: send, then reduce.
 *
 * Send: the expert-side rank writes each received row (one warp per row) into
 * the source rank's region at slot (source token * R + me): writes, not reads,
 * cross NVLink. Reduce: the source rank sums, per token, the slots of the
 * ranks that received it, in the canonical order (nodes ascending, ranks
 * ascending inside a node; FP32 with one rounding per add), adds the biases
 * and rounds to BF16 once, exactly as the host reference does.
 */
#include "backends/cuda/cuda_common.cuh"

#define EPX_WARPS_PER_BLOCK (EPX_CUDA_DATA_THREADS / 32)
/* BF16 values in one 16-byte vector. */
#define EPX_BF16_PER_VEC 8

/* The source rank of receive row `row`: the first s whose inclusive prefix
 * (column me of the matrix) passes the row. R <= 64: two lanes' worth per lane. */
static __device__ __forceinline__ int epx_row_source(const int *matrix, int R, int me, int row) {
  const int lane = threadIdx.x % 32;
  bool lo = lane < R && row < matrix[lane * R + me];
  bool hi = lane + 32 < R && row < matrix[(lane + 32) * R + me];
  unsigned m_lo = __ballot_sync(0xffffffffu, lo), m_hi = __ballot_sync(0xffffffffu, hi);
  return m_lo ? __ffs(m_lo) - 1 : __ffs(m_hi) - 1 + 32;
}

__global__ void __launch_bounds__(EPX_CUDA_DATA_THREADS) epx_combine_send_kernel(EpxCombineSendParams p) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  __shared__ int s_fatal, s_skip;
  __shared__ unsigned long long s_epoch;
  if (threadIdx.x == 0) {
    s_fatal = epx_ld_volatile_i32((volatile int *)&c.state->fatal);
    s_skip = p.invalid || c.state->call_status != 0;
    s_epoch = c.state->epoch;
  }
  __syncthreads();
  if (s_fatal) return;
  if (!s_skip) {
    const int R = c.nranks, me = c.rank, lane = threadIdx.x % 32;
    const int n_recv = p.rank_prefix_matrix[(R - 1) * R + me];
    const int nvec = p.hidden * 2 / 16;
    const int warps = gridDim.x * EPX_WARPS_PER_BLOCK;
    for (int row = blockIdx.x * EPX_WARPS_PER_BLOCK + threadIdx.x / 32; row < n_recv; row += warps) {
      int s = epx_row_source(p.rank_prefix_matrix, R, me, row);
      size_t slot = (size_t)p.recv_src_idx[row] * R + me;
      const int4 *src = (const int4 *)((const char *)p.x + (size_t)row * p.hidden * 2);
      int4 *dst = (int4 *)(c.peers[s] + L.payload_off + slot * L.payload_stride);
      for (int v0 = 0; v0 < nvec; v0 += 32 * EPX_CUDA_COPY_UNROLL) {
        int4 buf[EPX_CUDA_COPY_UNROLL];
#pragma unroll
        for (int u = 0; u < EPX_CUDA_COPY_UNROLL; ++u) {
          int v = v0 + u * 32 + lane;
          if (v < nvec) buf[u] = epx_ld_nc_v4(src + v);
        }
#pragma unroll
        for (int u = 0; u < EPX_CUDA_COPY_UNROLL; ++u) {
          int v = v0 + u * 32 + lane;
          if (v < nvec) dst[v] = buf[u];
        }
      }
      if (p.topk_weights && lane < p.num_topk)
        ((float *)(c.peers[s] + L.weights_off))[slot * c.max_topk + lane] =
            p.topk_weights[(size_t)row * p.num_topk + lane];
    }
  }
  epx_post_arrival(c, s_epoch);
}

static __device__ __forceinline__ void epx_unpack_bf16x8(int4 v, float f[EPX_BF16_PER_VEC]) {
  uint32_t w[4] = {(uint32_t)v.x, (uint32_t)v.y, (uint32_t)v.z, (uint32_t)v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = epx_bf16_to_f32((uint16_t)(w[i] & 0xffffu));
    f[2 * i + 1] = epx_bf16_to_f32((uint16_t)(w[i] >> 16));
  }
}

static __device__ __forceinline__ int4 epx_pack_bf16x8(const float f[EPX_BF16_PER_VEC]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = (uint32_t)epx_f32_to_bf16(f[2 * i]) | ((uint32_t)epx_f32_to_bf16(f[2 * i + 1]) << 16);
  return make_int4((int)w[0], (int)w[1], (int)w[2], (int)w[3]);
}

/* One token: lanes stride over 16-byte vectors of the row. */
static __device__ void epx_combine_reduce_token(const EpxCombineReduceParams &p, int t,
                                                unsigned in_lo, unsigned in_hi) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const char *region = c.peers[c.rank];
  const int R = c.nranks, rpn = c.ranks_per_node, lane = threadIdx.x % 32;
  const int nvec = p.hidden / EPX_BF16_PER_VEC;
  for (int v = lane; v < nvec; v += 32) {
    float acc[EPX_BF16_PER_VEC];
#pragma unroll
    for (int i = 0; i < EPX_BF16_PER_VEC; ++i) acc[i] = 0.0f;
    for (int n0 = 0; n0 < R; n0 += rpn) {
      float part[EPX_BF16_PER_VEC];
#pragma unroll
      for (int i = 0; i < EPX_BF16_PER_VEC; ++i) part[i] = 0.0f;
      for (int r = n0; r < n0 + rpn; ++r) {
        bool in = r < 32 ? (in_lo >> r) & 1u : (in_hi >> (r - 32)) & 1u;
        if (!in) continue;
        size_t slot = (size_t)t * R + r;
        int4 raw = ((const int4 *)(region + L.payload_off + slot * L.payload_stride))[v];
        float f[EPX_BF16_PER_VEC];
        epx_unpack_bf16x8(raw, f);
#pragma unroll
        for (int i = 0; i < EPX_BF16_PER_VEC; ++i) part[i] = epx_add_rn(part[i], f[i]);
      }
#pragma unroll
      for (int i = 0; i < EPX_BF16_PER_VEC; ++i) acc[i] = epx_add_rn(acc[i], part[i]);
    }
    const void *bias[2] = {p.bias0, p.bias1};
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      if (!bias[b]) continue;
      int4 raw = epx_ld_nc_v4((const int4 *)((const char *)bias[b] + (size_t)t * p.hidden * 2) + v);
      float f[EPX_BF16_PER_VEC];
      epx_unpack_bf16x8(raw, f);
#pragma unroll
      for (int i = 0; i < EPX_BF16_PER_VEC; ++i) acc[i] = epx_add_rn(acc[i], f[i]);
    }
    ((int4 *)((char *)p.combined_x + (size_t)t * p.hidden * 2))[v] = epx_pack_bf16x8(acc);
  }
  if (p.combined_topk_weights && p.has_weights && lane < p.num_topk) {
    const float *w = (const float *)(region + L.weights_off);
    float acc = 0.0f;
    for (int n0 = 0; n0 < R; n0 += rpn) {
      float part = 0.0f;
      for (int r = n0; r < n0 + rpn; ++r) {
        bool in = r < 32 ? (in_lo >> r) & 1u : (in_hi >> (r - 32)) & 1u;
        if (in) part = epx_add_rn(part, w[((size_t)t * R + r) * c.max_topk + lane]);
      }
      acc = epx_add_rn(acc, part);
    }
    p.combined_topk_weights[(size_t)t * p.num_topk + lane] = acc;
  }
}

__global__ void __launch_bounds__(EPX_CUDA_DATA_THREADS) epx_combine_reduce_kernel(EpxCombineReduceParams p) {
  const EpxDevCtx &c = p.ctx;
  __shared__ int s_fatal, s_skip;
  __shared__ unsigned long long s_epoch;
  if (threadIdx.x == 0) {
    s_fatal = epx_ld_volatile_i32((volatile int *)&c.state->fatal);
    s_skip = p.invalid || c.state->call_status != 0;
    s_epoch = c.state->epoch;
  }
  __syncthreads();
  if (s_fatal) return;
  /* The slots were written by every peer before its arrival release; this
   * block's acquire of each arrival orders the reads below after them. */
  if (!epx_wait_arrivals(c, s_epoch, EPX_OP_COMBINE, p.seq)) return;
  if (s_skip) return;
  const int R = c.nranks, lane = threadIdx.x % 32;
  const int warps = gridDim.x * EPX_WARPS_PER_BLOCK;
  for (int t = blockIdx.x * EPX_WARPS_PER_BLOCK + threadIdx.x / 32; t < p.num_tokens; t += warps) {
    const uint8_t *itr = p.is_token_in_rank + (size_t)t * R;
    unsigned in_lo = __ballot_sync(0xffffffffu, lane < R && itr[lane]);
    unsigned in_hi = __ballot_sync(0xffffffffu, lane + 32 < R && itr[lane + 32]);
    epx_combine_reduce_token(p, t, in_lo, in_hi);
  }
}

cudaError_t epx_cuda_launch_combine_send(const EpxCombineSendParams *p, int blocks,
                                         cudaStream_t stream) {
  epx_combine_send_kernel<<<blocks, EPX_CUDA_DATA_THREADS, 0, stream>>>(*p);
  return cudaGetLastError();
}

cudaError_t epx_cuda_launch_combine_reduce(const EpxCombineReduceParams *p, int blocks,
                                           cudaStream_t stream) {
  epx_combine_reduce_kernel<<<blocks, EPX_CUDA_DATA_THREADS, 0, stream>>>(*p);
  return cudaGetLastError();
}
