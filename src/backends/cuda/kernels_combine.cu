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
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const EpxOpStart op = epx_op_start(c, p.invalid);
  if (op.fatal) return;
  if (threadIdx.x == 0 && blockIdx.x == 0) epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_SEND_SLOT);
  if (!op.skip) {
    const int R = c.nranks, me = c.rank, lane = threadIdx.x % 32;
    const int n_recv = p.rank_prefix_matrix[(R - 1) * R + me];
    /* My own rows [lo, hi) stay in x: the reduce reads them there. */
    const int lo = me > 0 ? p.rank_prefix_matrix[(me - 1) * R + me] : 0;
    const int own = p.rank_prefix_matrix[me * R + me] - lo;
    const int n_remote = n_recv - own;
    const int nvec = p.hidden * 2 / 16;
    const int warps = gridDim.x * EPX_WARPS_PER_BLOCK;
    for (int i = blockIdx.x * EPX_WARPS_PER_BLOCK + threadIdx.x / 32; i < n_remote; i += warps) {
      const int row = i < lo ? i : i + own;
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
  if (threadIdx.x == 0 && blockIdx.x == 0) epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_SEND_BLOCK0);
  if (threadIdx.x == 0 && blockIdx.x == gridDim.x - 1 && gridDim.x > 1)
    epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_SEND_BLOCKN);
  epx_post_arrival(c, op.epoch, EPX_OP_COMBINE);
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

/* 16-byte vectors per lane per round of the reduce, for every rank read. */
#define EPX_REDUCE_UNROLL 4

/* Next rank in ascending order from the two 32-bit masks, or -1. */
static __device__ __forceinline__ int epx_next_rank(unsigned &m_lo, unsigned &m_hi) {
  if (m_lo) {
    int b = __ffs(m_lo) - 1;
    m_lo &= m_lo - 1;
    return b;
  }
  if (m_hi) {
    int b = __ffs(m_hi) - 1;
    m_hi &= m_hi - 1;
    return b + 32;
  }
  return -1;
}

/* Row of token t from rank r: my own row straight from x (read-only input),
 * a peer's row from its slot t * R + r in my region. */
static __device__ __forceinline__ const int4 *epx_reduce_row(const EpxCombineReduceParams &p, int t,
                                                             int r, int my_row) {
  const EpxDevCtx &c = p.ctx;
  if (r == c.rank) return (const int4 *)((const char *)p.x + (size_t)my_row * p.hidden * 2);
  size_t slot = (size_t)t * c.nranks + r;
  return (const int4 *)(c.peers[c.rank] + c.lay.payload_off + slot * c.lay.payload_stride);
}

static __device__ __forceinline__ void epx_reduce_load(const int4 *row, int r, int me, int v0,
                                                       int nvec, int4 buf[EPX_REDUCE_UNROLL]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int u = 0; u < EPX_REDUCE_UNROLL; ++u) {
    int v = v0 + u * 32 + lane;
    if (v < nvec) buf[u] = r == me ? epx_ld_nc_v4(row + v) : row[v];
  }
}

/* Adds rank r's vectors into part, first folding part into acc when r starts
 * a new node: the canonical order (nodes ascending, ranks ascending inside a
 * node). Nodes with no rank are skipped: adding their +0 part is exact. */
static __device__ __forceinline__ void epx_reduce_add(int r, int rpn, int &node,
                                                      const int4 buf[EPX_REDUCE_UNROLL],
                                                      float acc[EPX_REDUCE_UNROLL][EPX_BF16_PER_VEC],
                                                      float part[EPX_REDUCE_UNROLL][EPX_BF16_PER_VEC]) {
  if (r / rpn != node) {
#pragma unroll
    for (int u = 0; u < EPX_REDUCE_UNROLL; ++u)
#pragma unroll
      for (int i = 0; i < EPX_BF16_PER_VEC; ++i) {
        acc[u][i] = epx_add_rn(acc[u][i], part[u][i]);
        part[u][i] = 0.0f;
      }
    node = r / rpn;
  }
#pragma unroll
  for (int u = 0; u < EPX_REDUCE_UNROLL; ++u) {
    float f[EPX_BF16_PER_VEC];
    epx_unpack_bf16x8(buf[u], f);
#pragma unroll
    for (int i = 0; i < EPX_BF16_PER_VEC; ++i) part[u][i] = epx_add_rn(part[u][i], f[i]);
  }
}

/* One token: each lane keeps EPX_REDUCE_UNROLL vectors of two ranks in flight
 * per step (one warp per token, so the loads must overlap to fill HBM). */
static __device__ void epx_combine_reduce_token(const EpxCombineReduceParams &p, int t,
                                                unsigned in_lo, unsigned in_hi) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const char *region = c.peers[c.rank];
  const int R = c.nranks, me = c.rank, rpn = c.ranks_per_node, lane = threadIdx.x % 32;
  const int nvec = p.hidden / EPX_BF16_PER_VEC;
  const int my_row = p.send_row[(size_t)t * R + me];
  for (int v0 = 0; v0 < nvec; v0 += 32 * EPX_REDUCE_UNROLL) {
    float acc[EPX_REDUCE_UNROLL][EPX_BF16_PER_VEC], part[EPX_REDUCE_UNROLL][EPX_BF16_PER_VEC];
#pragma unroll
    for (int u = 0; u < EPX_REDUCE_UNROLL; ++u)
#pragma unroll
      for (int i = 0; i < EPX_BF16_PER_VEC; ++i) acc[u][i] = part[u][i] = 0.0f;
    int node = -1;
    unsigned m_lo = in_lo, m_hi = in_hi;
    for (;;) {
      const int ra = epx_next_rank(m_lo, m_hi);
      if (ra < 0) break;
      const int rb = epx_next_rank(m_lo, m_hi);
      int4 a[EPX_REDUCE_UNROLL], b[EPX_REDUCE_UNROLL];
      epx_reduce_load(epx_reduce_row(p, t, ra, my_row), ra, me, v0, nvec, a);
      if (rb >= 0) epx_reduce_load(epx_reduce_row(p, t, rb, my_row), rb, me, v0, nvec, b);
      epx_reduce_add(ra, rpn, node, a, acc, part);
      if (rb < 0) break;
      epx_reduce_add(rb, rpn, node, b, acc, part);
    }
#pragma unroll
    for (int u = 0; u < EPX_REDUCE_UNROLL; ++u)
#pragma unroll
      for (int i = 0; i < EPX_BF16_PER_VEC; ++i)
        if (node >= 0) acc[u][i] = epx_add_rn(acc[u][i], part[u][i]);
    const void *bias[2] = {p.bias0, p.bias1};
#pragma unroll
    for (int bi = 0; bi < 2; ++bi) {
      if (!bias[bi]) continue;
      const int4 *brow = (const int4 *)((const char *)bias[bi] + (size_t)t * p.hidden * 2);
#pragma unroll
      for (int u = 0; u < EPX_REDUCE_UNROLL; ++u) {
        int v = v0 + u * 32 + lane;
        if (v >= nvec) continue;
        float f[EPX_BF16_PER_VEC];
        epx_unpack_bf16x8(epx_ld_nc_v4(brow + v), f);
#pragma unroll
        for (int i = 0; i < EPX_BF16_PER_VEC; ++i) acc[u][i] = epx_add_rn(acc[u][i], f[i]);
      }
    }
    int4 *out = (int4 *)((char *)p.combined_x + (size_t)t * p.hidden * 2);
#pragma unroll
    for (int u = 0; u < EPX_REDUCE_UNROLL; ++u) {
      int v = v0 + u * 32 + lane;
      if (v < nvec) out[v] = epx_pack_bf16x8(acc[u]);
    }
  }
  if (p.combined_topk_weights && p.has_weights && lane < p.num_topk) {
    const float *w = (const float *)(region + L.weights_off);
    float acc = 0.0f;
    for (int n0 = 0; n0 < R; n0 += rpn) {
      float part = 0.0f;
      for (int r = n0; r < n0 + rpn; ++r) {
        bool in = r < 32 ? (in_lo >> r) & 1u : (in_hi >> (r - 32)) & 1u;
        if (!in) continue;
        float x = r == me ? p.topk_weights[(size_t)my_row * p.num_topk + lane]
                          : w[((size_t)t * R + r) * c.max_topk + lane];
        part = epx_add_rn(part, x);
      }
      acc = epx_add_rn(acc, part);
    }
    p.combined_topk_weights[(size_t)t * p.num_topk + lane] = acc;
  }
}

__global__ void __launch_bounds__(EPX_CUDA_DATA_THREADS) epx_combine_reduce_kernel(EpxCombineReduceParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  const EpxDevCtx &c = p.ctx;
  const EpxOpStart op = epx_op_start(c, p.invalid);
  if (op.fatal) return;
  if (threadIdx.x == 0 && blockIdx.x == 0) epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_RECV_START);
  /* The slots were written by every peer before its arrival release; this
   * block's acquire of each arrival orders the reads below after them. */
  if (!epx_wait_arrivals(c, op.epoch, EPX_OP_COMBINE, p.seq)) return;
  if (op.skip) return;
  const int R = c.nranks, lane = threadIdx.x % 32;
  const int warps = gridDim.x * EPX_WARPS_PER_BLOCK;
  for (int t = blockIdx.x * EPX_WARPS_PER_BLOCK + threadIdx.x / 32; t < p.num_tokens; t += warps) {
    const uint8_t *itr = p.is_token_in_rank + (size_t)t * R;
    unsigned in_lo = __ballot_sync(0xffffffffu, lane < R && itr[lane]);
    unsigned in_hi = __ballot_sync(0xffffffffu, lane + 32 < R && itr[lane + 32]);
    epx_combine_reduce_token(p, t, in_lo, in_hi);
  }
  if (blockIdx.x == 0) {
    __syncthreads();
    if (threadIdx.x == 0) epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_RECV_BLOCK0);
  }
}

cudaError_t epx_cuda_preload_combine(void) {
  cudaError_t e = epx_preload(epx_combine_send_kernel);
  return e != cudaSuccess ? e : epx_preload(epx_combine_reduce_kernel);
}

cudaError_t epx_cuda_launch_combine_send(const EpxCombineSendParams *p, int blocks,
                                         cudaStream_t stream) {
  return epx_launch(epx_combine_send_kernel, p->ctx.pdl, blocks, EPX_CUDA_DATA_THREADS, 0, stream, *p);
}

cudaError_t epx_cuda_launch_combine_reduce(const EpxCombineReduceParams *p, int blocks,
                                           cudaStream_t stream) {
  return epx_launch(epx_combine_reduce_kernel, p->ctx.pdl, blocks, EPX_CUDA_DATA_THREADS, 0, stream,
                    *p);
}
