/*
 * kernels_layout.cu - epxGetDispatchLayout on the GPU, with no host sync.
 *
 * One warp per EPX_LAYOUT_TOKENS_PER_WARP tokens (lane k holds slot k; the
 * ids of all its tokens are loaded at once, so their latencies overlap).
 * Duplicates are collapsed so a token counts once per rank, node and expert:
 * up to 32 ranks, a token's ranks (and nodes) come as one bit mask and lane r
 * counts the warp's tokens reaching rank r in a register (the few rank bins
 * are not hammered by every token's atomics); experts, and more ranks, go
 * through __match_any_sync leaders. Counts gather in shared-memory histograms
 * per block; each block adds its non-zero bins into an accumulator in the
 * communicator's scratch (global atomics), and the last block to finish moves
 * the accumulator into the outputs, clearing it for the next call in the same
 * atomic exchange. So the call is one launch (zeroing the outputs first took
 * three more) and no block sums a column of per-block histograms (a cluster
 * of 8 blocks reducing through distributed shared memory instead measured
 * 24 us against 11 on 2xH200: too few SMs for 4096 tokens; 17 clusters of
 * 8 blocks by role - one per 16-expert span, one for the ranks - with no
 * global atomics at all measured 9.6 us against this kernel's 8.0-8.3 at EP1 on
 * one H200, branch wip/layout-cluster). With more bins
 * than shared memory holds, the host zeroes the outputs and blocks add into
 * them directly. Integer sums: the result does not depend on the order of the
 * blocks.
 */
#include "backends/cuda/cuda_common.cuh"

#define EPX_LAYOUT_THREADS 512
#define EPX_LAYOUT_WARPS (EPX_LAYOUT_THREADS / 32)
/* Tokens one warp handles, so a block amortises its histogram flush. */
#define EPX_LAYOUT_TOKENS_PER_WARP 4
/* Shared histograms up to this many bins; past it the kernel counts in global memory. */
#define EPX_LAYOUT_MAX_SMEM_BINS 12288

static __host__ __device__ int epx_layout_bins(const EpxDevCtx &c) {
  return c.num_experts + c.nranks + c.nranks / c.ranks_per_node;
}

__global__ void __launch_bounds__(EPX_LAYOUT_THREADS) epx_layout_kernel(EpxLayoutParams p, int use_smem) {
  extern __shared__ int s_hist[];
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, nodes = R / c.ranks_per_node, lane = threadIdx.x % 32;
  const int bins = epx_layout_bins(c);
  int *h_expert = use_smem ? s_hist : p.num_tokens_per_expert;
  int *h_rank = use_smem ? s_hist + c.num_experts : p.num_tokens_per_rank;
  int *h_node = use_smem ? s_hist + c.num_experts + R : p.num_tokens_per_node;
  if (use_smem)
    for (int i = threadIdx.x; i < bins; i += blockDim.x) s_hist[i] = 0;
  __syncthreads();

  const int first = (blockIdx.x * EPX_LAYOUT_WARPS + threadIdx.x / 32) * EPX_LAYOUT_TOKENS_PER_WARP;
  long long ids[EPX_LAYOUT_TOKENS_PER_WARP];
#pragma unroll
  for (int u = 0; u < EPX_LAYOUT_TOKENS_PER_WARP; ++u) {
    const int t = first + u;
    ids[u] = t < p.num_tokens && lane < p.num_topk
                 ? epx_topk_get(p.topk_idx, p.topk_is_int64, t, p.num_topk, lane)
                 : -1;
  }
  const bool lane_counts = R <= 32;
  int rank_count = 0, node_count = 0;
#pragma unroll
  for (int u = 0; u < EPX_LAYOUT_TOKENS_PER_WARP; ++u) {
    const int t = first + u;
    if (t >= p.num_tokens) break;
    long long id = ids[u];
    if (id < -1 || id >= c.num_experts) {
      /* Never index with a bad id: count it as "no expert" and report it. */
      epx_record_error(c, epxInvalidArgument, EPX_OP_NONE, EPX_PHASE_CHECK, c.rank,
                       EPX_FIELD_EXPERT_ID, t, id, 0);
      id = -1;
    }
    /* -1 <= id < num_experts here: 32-bit arithmetic (a 64-bit division or
     * match is a long instruction sequence; together with the done count
     * below, 0.7-0.8 us of the kernel's 8.8-9.0 at EP1 on one H200) */
    const int eid = (int)id;
    const int dst = eid >= 0 ? (int)((unsigned)eid / (unsigned)c.num_local_experts) : -1;
    const int node = dst >= 0 ? (int)((unsigned)dst / (unsigned)c.ranks_per_node) : -1;
    if (lane_counts) {
      const unsigned ranks = __reduce_or_sync(0xffffffffu, dst >= 0 ? 1u << dst : 0u);
      const unsigned in_rank = (ranks >> lane) & 1u;
      if (lane < R) {
        p.is_token_in_rank[(size_t)t * R + lane] = (uint8_t)in_rank;
        rank_count += (int)in_rank;
      }
      const unsigned in_nodes = __reduce_or_sync(0xffffffffu, node >= 0 ? 1u << node : 0u);
      node_count += (int)((in_nodes >> lane) & 1u);
    } else {
      for (int r = lane; r < R; r += 32) p.is_token_in_rank[(size_t)t * R + r] = 0;
      __syncwarp(); /* the clears above land before the leaders' sets below */
      const unsigned same_rank = __match_any_sync(0xffffffffu, dst);
      if (dst >= 0 && __ffs(same_rank) - 1 == lane) {
        p.is_token_in_rank[(size_t)t * R + dst] = 1;
        atomicAdd(&h_rank[dst], 1);
      }
      const unsigned same_node = __match_any_sync(0xffffffffu, node);
      if (node >= 0 && h_node && __ffs(same_node) - 1 == lane) atomicAdd(&h_node[node], 1);
    }
    const unsigned same_expert = __match_any_sync(0xffffffffu, eid);
    if (eid >= 0 && __ffs(same_expert) - 1 == lane) atomicAdd(&h_expert[eid], 1);
  }
  if (lane_counts) {
    if (lane < R && rank_count) atomicAdd(&h_rank[lane], rank_count);
    if (lane < nodes && h_node && node_count) atomicAdd(&h_node[lane], node_count);
  }
  if (!use_smem) return;
  __syncthreads();
  if (p.scratch) {
    /* p.scratch[0, bins): the accumulator, all zero between calls */
    for (int i = threadIdx.x; i < bins; i += blockDim.x)
      if (s_hist[i]) atomicAdd(&p.scratch[i], s_hist[i]);
    /* Last-block pattern: the block's additions (ordered before thread 0's
     * count by the barrier) are released by the count, an acq_rel atomic, and
     * the block that completes the count acquires them all there. One atomic
     * instead of two sequentially consistent fences around a relaxed one. */
    __shared__ int s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned done_before;
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                   : "=r"(done_before)
                   : "l"(&c.state->layout_done)
                   : "memory");
      s_last = done_before == gridDim.x - 1;
      if (s_last) c.state->layout_done = 0; /* ready for the next call (stream order) */
    }
    __syncthreads();
    if (!s_last) return;
    for (int i = threadIdx.x; i < bins; i += blockDim.x) {
      const int v = atomicExch(&p.scratch[i], 0); /* read, and clear for the next call */
      if (i < c.num_experts)
        p.num_tokens_per_expert[i] = v;
      else if (i < c.num_experts + R)
        p.num_tokens_per_rank[i - c.num_experts] = v;
      else if (p.num_tokens_per_node && i - c.num_experts - R < nodes)
        p.num_tokens_per_node[i - c.num_experts - R] = v;
    }
    return;
  }
  for (int i = threadIdx.x; i < bins; i += blockDim.x) {
    int v = s_hist[i];
    if (v == 0) continue;
    if (i < c.num_experts)
      atomicAdd(&p.num_tokens_per_expert[i], v);
    else if (i < c.num_experts + R)
      atomicAdd(&p.num_tokens_per_rank[i - c.num_experts], v);
    else if (p.num_tokens_per_node && i - c.num_experts - R < nodes)
      atomicAdd(&p.num_tokens_per_node[i - c.num_experts - R], v);
  }
}

static int epx_layout_blocks(int num_tokens) {
  const int per_block = EPX_LAYOUT_WARPS * EPX_LAYOUT_TOKENS_PER_WARP;
  const int blocks = (num_tokens + per_block - 1) / per_block;
  return blocks > 0 ? blocks : 1; /* T = 0: one block writes the zero counts */
}

/* The accumulator: one int per bin, zeroed at allocation and by every call's
 * last block. */
size_t epx_cuda_layout_scratch_ints(int num_experts, int nranks, int ranks_per_node) {
  const int bins = num_experts + nranks + nranks / ranks_per_node;
  if (bins > EPX_LAYOUT_MAX_SMEM_BINS) return 0;
  return (size_t)bins;
}

cudaError_t epx_cuda_preload_layout(void) { return epx_preload(epx_layout_kernel); }

cudaError_t epx_cuda_launch_layout(const EpxLayoutParams *p, cudaStream_t stream) {
  const EpxDevCtx &c = p->ctx;
  const int bins = epx_layout_bins(c);
  const int use_smem = bins <= EPX_LAYOUT_MAX_SMEM_BINS;
  const int blocks = epx_layout_blocks(p->num_tokens);
  if (!(use_smem && p->scratch)) {
    int nodes = c.nranks / c.ranks_per_node;
    cudaError_t err = cudaMemsetAsync(p->num_tokens_per_rank, 0, sizeof(int) * (size_t)c.nranks, stream);
    if (err == cudaSuccess)
      err = cudaMemsetAsync(p->num_tokens_per_expert, 0, sizeof(int) * (size_t)c.num_experts, stream);
    if (err == cudaSuccess && p->num_tokens_per_node)
      err = cudaMemsetAsync(p->num_tokens_per_node, 0, sizeof(int) * (size_t)nodes, stream);
    if (err != cudaSuccess || p->num_tokens == 0) return err;
  }
  epx_layout_kernel<<<blocks, EPX_LAYOUT_THREADS, use_smem ? sizeof(int) * (size_t)bins : 0, stream>>>(
      *p, use_smem);
  return cudaGetLastError();
}
