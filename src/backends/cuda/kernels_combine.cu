/*
 * kernels_combine.cu - normal-mode combine over NVLink, one launch: send
 * blocks and reduce blocks run at once (see "chunk progress" in
 * cuda_common.cuh).
 *
 * Send (S blocks, epx_normal_role): the expert-side rank writes each
 * received row of a remote source (one warp per row, claimed: EpxWork) into
 * the source's region at slot (source token * R + me): writes, not reads,
 * cross NVLink. Rows go in chunks
 * of source tokens; inside a chunk the rows of the R - 1 remote sources are
 * interleaved, starting with rank me + 1, so every rank writes to every peer
 * at once: taking the rows in receive order (source 0 first) made all ranks
 * write into one peer at a time, capped by that peer's NVLink ingress.
 * Reduce (the other blocks): once every peer's send blocks have passed a chunk,
 * the source rank sums, per token of that chunk, the slots of the ranks that
 * received it, in the canonical order (nodes ascending, ranks ascending inside
 * a node; FP32 with one rounding per add), adds the biases and rounds to BF16
 * once, exactly as the host reference does. The reduce of chunk c overlaps
 * the send of chunk c + 1.
 */
#include "backends/cuda/bulk_copy.cuh"

/* BF16 values in one 16-byte vector. */
#define EPX_BF16_PER_VEC 8

/* First row in [lo, hi) whose source token is >= token (rows of one source
 * are in ascending token order). */
static __device__ __forceinline__ int epx_rows_lower_bound(const int *src_idx, int lo, int hi, int token) {
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (src_idx[mid] < token) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/* One row to its source's slot, with its top-k weights; bw: the warp's
 * bulk-copy state, or NULL for register copies. */
static __device__ __forceinline__ void epx_combine_send_row(const EpxCombineParams &p, int row, int s,
                                                            EpxBulkWarp *bw) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const int lane = threadIdx.x % 32;
  const int nvec = p.hidden * 2 / 16;
  const size_t slot = (size_t)p.recv_src_idx[row] * c.nranks + c.rank;
  const int4 *src = (const int4 *)((const char *)p.x + (size_t)row * p.hidden * 2);
  int4 *dst = (int4 *)(c.peers[s] + L.payload_off + slot * L.payload_stride);
  if (bw && lane == 0) {
    const int bytes = p.hidden * 2;
    for (int off = 0; off < bytes; off += EPX_BULK_PIECE_BYTES) {
      const int n = min(EPX_BULK_PIECE_BYTES, bytes - off);
      if (!epx_bulk_load(c, EPX_OP_COMBINE, *bw, (const char *)src + off, n)) break;
      epx_bulk_store(*bw, (char *)dst + off, n);
      epx_bulk_commit();
    }
  }
  for (int v0 = 0; !bw && v0 < nvec; v0 += 32 * EPX_CUDA_COPY_UNROLL) {
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

/* Ints of shared memory a send block keeps for the row bounds of its coming
 * chunks, [chunk - first chunk of the window][source]: at least 16 chunks
 * (EPX_CUDA_MAX_RANKS = 64), all of them for the usual T / chunk <= 1024 / R. */
#ifndef EPX_COMBINE_BOUND_INTS /* overridable to test the window refill */
#define EPX_COMBINE_BOUND_INTS 1024
#endif

/* Send block: the rows of every remote source, chunk by chunk, then a
 * progress word per chunk into every peer. A skipped op posts "all sent" at
 * once, so every rank's op ends together.
 *
 * The rows of source s in chunk c are [bound(c - 1), bound(c)) of s's rows in
 * recv_src_idx (ascending tokens). Those bounds are binary searches (~12
 * dependent loads each), so they are found for a whole window of chunks at
 * once, one thread per (chunk, source), instead of by R threads at every
 * chunk while the block waited: that wait cost the EP4 combine ~4-5 us per
 * chunk (622 -> 548 us with 16 chunks, 594 -> 563 with 8; the "before" and
 * "after" figures from two sittings). With the bounds in shared memory nothing is
 * written per chunk, and no warp waits for the others at a chunk's end: the
 * last one to finish releases it (epx_chunk_done). */
static __device__ void epx_combine_send(const EpxCombineParams &p, const EpxOpStart &op) {
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, me = c.rank, Tc = p.chunk_tokens;
  __shared__ int s_base[EPX_CUDA_MAX_RANKS], s_end[EPX_CUDA_MAX_RANKS];
  __shared__ int s_bound[EPX_COMBINE_BOUND_INTS];
  __shared__ int s_chunks;
  __shared__ EpxChunkRelease s_release;
  if (threadIdx.x == 0) {
    s_chunks = 0;
    epx_chunk_release_init(s_release);
  }
  __syncthreads();
  if (!op.skip && (int)threadIdx.x < R) {
    const int s = threadIdx.x;
    const int lo = s > 0 ? p.rank_prefix_matrix[(s - 1) * R + me] : 0;
    const int hi = s == me ? lo : p.rank_prefix_matrix[s * R + me];
    s_base[s] = lo;
    s_end[s] = hi;
    if (hi > lo) atomicMax(&s_chunks, p.recv_src_idx[hi - 1] / Tc + 1);
  }
  __syncthreads();
  const int chunks = s_chunks;
  const int window = EPX_COMBINE_BOUND_INTS / R;
  const int warps = c.send_blocks * EPX_CUDA_DATA_WARPS;
  const int sb = epx_normal_role(c).index;
  const int gwarp = sb * EPX_CUDA_DATA_WARPS + threadIdx.x / 32;
  extern __shared__ __align__(128) char s_bulk[];
  __shared__ unsigned long long s_bars[EPX_CUDA_DATA_WARPS];
  EpxBulkWarp bw;
  if (p.bulk) bw = epx_bulk_warp_init(s_bars, s_bulk);
  for (int ch = 0; ch < chunks; ++ch) {
    const int wc = ch % window; /* this chunk's row in s_bound */
    if (wc == 0) {
      /* (Re)fill the window with chunks ch .. ch + window - 1, once every
       * thread is past its reads of the previous window. */
      if (ch > 0) {
        __syncthreads();
        if ((int)threadIdx.x < R) s_base[threadIdx.x] = s_bound[(window - 1) * R + threadIdx.x];
        __syncthreads();
      }
      for (int i = threadIdx.x; i < window * R; i += blockDim.x) {
        const int s = i % R, cc = ch + i / R;
        if (cc < chunks) s_bound[i] = epx_rows_lower_bound(p.recv_src_idx, s_base[s], s_end[s], (cc + 1) * Tc);
      }
      __syncthreads();
    }
    const int *lo = wc == 0 ? s_base : s_bound + (wc - 1) * R, *hi = s_bound + wc * R;
    /* Interleave: item i is row i / (R - 1) of source me + 1 + i % (R - 1). */
    int most = 0;
    for (int s = 0; s < R; ++s) most = max(most, hi[s] - lo[s]);
    const int items = (R - 1) * most;
    for (EpxWork w = epx_work_begin(c, ch, items, gwarp, warps); w.cur < w.n; epx_work_next(w)) {
      const int i = w.cur, s = (me + 1 + i % (R - 1)) % R, k = i / (R - 1);
      if (k < hi[s] - lo[s]) epx_combine_send_row(p, lo[s] + k, s, p.bulk ? &bw : NULL);
    }
    if (p.bulk && threadIdx.x % 32 == 0) epx_bulk_drain();
    /* (A failed wait is recorded as fatal; the loop still runs to its end,
     * so that every warp meets the window refill's barriers.) */
    (void)epx_chunk_done(c, s_release, ch,
                         epx_progress_value(op.epoch, ch + 1 == chunks ? EPX_PROGRESS_ALL : ch + 1),
                         EPX_OP_COMBINE, p.seq);
  }
  if (chunks == 0) epx_post_progress(c, epx_progress_value(op.epoch, EPX_PROGRESS_ALL));
  if (threadIdx.x == 0 && sb == 0) epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_SEND_BLOCK0);
  if (threadIdx.x == 0 && sb == c.send_blocks - 1 && c.send_blocks > 1)
    epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_SEND_BLOCKN);
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
static __device__ __forceinline__ const int4 *epx_reduce_row(const EpxCombineParams &p, int t,
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

/* Ranks whose rows a lane loads at once in the one-node reduce. */
#define EPX_REDUCE_FLAT_RANKS 4

/* One step of vectors [v0, v0 + 32 * EPX_REDUCE_UNROLL) of a token, over
 * several nodes: two ranks' loads in flight, node partial sums folded in
 * order (epx_reduce_add). */
static __device__ __forceinline__ void epx_reduce_step_nodes(const EpxCombineParams &p, int t, int my_row,
                                                             unsigned m_lo, unsigned m_hi, int v0, int nvec,
                                                             float acc[EPX_REDUCE_UNROLL][EPX_BF16_PER_VEC]) {
  const int me = p.ctx.rank, rpn = p.ctx.ranks_per_node;
  float part[EPX_REDUCE_UNROLL][EPX_BF16_PER_VEC];
#pragma unroll
  for (int u = 0; u < EPX_REDUCE_UNROLL; ++u)
#pragma unroll
    for (int i = 0; i < EPX_BF16_PER_VEC; ++i) acc[u][i] = part[u][i] = 0.0f;
  int node = -1;
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
}

/* Bytes of dynamic shared memory per warp for the one-node reduce's loads. */
#define EPX_REDUCE_STAGE_BYTES (EPX_REDUCE_FLAT_RANKS * EPX_REDUCE_UNROLL * 32 * 16)
static_assert(EPX_REDUCE_STAGE_BYTES <= EPX_BULK_PIECE_BYTES,
              "the reduce's staging fits the dynamic shared memory the launch gives the send's bulk copies");

/* 16 bytes from global memory into shared memory, asynchronously (cp.async,
 * L2 only: the slots were written by peers). */
static __device__ __forceinline__ void epx_cp_async16(int4 *smem, const int4 *gmem) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

/* Waits for this thread's cp.async copies; they are then visible to it. */
static __device__ __forceinline__ void epx_cp_async_wait_all(void) {
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
}

/* The same step when every rank is in one node (the usual NVLink case): the
 * loads of EPX_REDUCE_FLAT_RANKS ranks go at once into shared memory (the
 * warp's stage), twice the bytes in flight of the register version, which the
 * register file cannot hold. The reduce is bound by those bytes (HBM
 * latency): at EP4 one warp took ~30 us per token of 7168 channels with two
 * ranks in flight. Same adds in the same order as the node version (the one
 * node's sum, then 0 + it), so the bits are the same. Each lane reads back
 * only the vectors it copied. */
static __device__ __forceinline__ void epx_reduce_step_flat(const EpxCombineParams &p, int t, int my_row,
                                                            unsigned m_lo, unsigned m_hi, int v0, int nvec,
                                                            int4 *stage,
                                                            float acc[EPX_REDUCE_UNROLL][EPX_BF16_PER_VEC]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int u = 0; u < EPX_REDUCE_UNROLL; ++u)
#pragma unroll
    for (int i = 0; i < EPX_BF16_PER_VEC; ++i) acc[u][i] = 0.0f;
  bool any = false;
  for (;;) {
    int r[EPX_REDUCE_FLAT_RANKS];
#pragma unroll
    for (int j = 0; j < EPX_REDUCE_FLAT_RANKS; ++j) {
      r[j] = epx_next_rank(m_lo, m_hi);
      if (r[j] < 0) continue;
      const int4 *row = epx_reduce_row(p, t, r[j], my_row);
#pragma unroll
      for (int u = 0; u < EPX_REDUCE_UNROLL; ++u) {
        const int v = v0 + u * 32 + lane;
        if (v < nvec) epx_cp_async16(stage + (j * EPX_REDUCE_UNROLL + u) * 32 + lane, row + v);
      }
    }
    epx_cp_async_wait_all();
#pragma unroll
    for (int j = 0; j < EPX_REDUCE_FLAT_RANKS; ++j) {
      if (r[j] < 0) continue;
      any = true;
#pragma unroll
      for (int u = 0; u < EPX_REDUCE_UNROLL; ++u) {
        if (v0 + u * 32 + lane >= nvec) continue;
        float f[EPX_BF16_PER_VEC];
        epx_unpack_bf16x8(stage[(j * EPX_REDUCE_UNROLL + u) * 32 + lane], f);
#pragma unroll
        for (int i = 0; i < EPX_BF16_PER_VEC; ++i) acc[u][i] = epx_add_rn(acc[u][i], f[i]);
      }
    }
    if (r[EPX_REDUCE_FLAT_RANKS - 1] < 0) break;
  }
#pragma unroll
  for (int u = 0; u < EPX_REDUCE_UNROLL; ++u)
#pragma unroll
    for (int i = 0; i < EPX_BF16_PER_VEC; ++i)
      if (any) acc[u][i] = epx_add_rn(0.0f, acc[u][i]);
}

/* One token, one warp, EPX_REDUCE_UNROLL vectors a lane per step; stage:
 * the warp's EPX_REDUCE_STAGE_BYTES of shared memory. */
static __device__ void epx_combine_reduce_token(const EpxCombineParams &p, int t,
                                                unsigned in_lo, unsigned in_hi, int4 *stage) {
  const EpxDevCtx &c = p.ctx;
  const EpxRegionLayout &L = c.lay;
  const char *region = c.peers[c.rank];
  const int R = c.nranks, me = c.rank, rpn = c.ranks_per_node, lane = threadIdx.x % 32;
  const int nvec = p.hidden / EPX_BF16_PER_VEC;
  const int my_row = p.send_row[(size_t)t * R + me];
  const bool one_node = rpn >= R;
  for (int v0 = 0; v0 < nvec; v0 += 32 * EPX_REDUCE_UNROLL) {
    float acc[EPX_REDUCE_UNROLL][EPX_BF16_PER_VEC];
    if (one_node) epx_reduce_step_flat(p, t, my_row, in_lo, in_hi, v0, nvec, stage, acc);
    else epx_reduce_step_nodes(p, t, my_row, in_lo, in_hi, v0, nvec, acc);
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

/* Reduce block: the tokens of each chunk, once every peer has sent it. */
static __device__ void epx_combine_reduce(const EpxCombineParams &p, const EpxOpStart &op) {
  const EpxDevCtx &c = p.ctx;
  const int rb = epx_normal_role(c).index;
  if (rb == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_RECV_START);
  if (op.skip) {
    (void)epx_wait_progress(c, ~0ull, epx_progress_value(op.epoch, EPX_PROGRESS_ALL), EPX_OP_COMBINE, p.seq);
    return;
  }
  const int R = c.nranks, lane = threadIdx.x % 32, Tc = p.chunk_tokens;
  const int warps = (gridDim.x - c.send_blocks) * EPX_CUDA_DATA_WARPS;
  const int gwarp = rb * EPX_CUDA_DATA_WARPS + threadIdx.x / 32;
  const int chunks = (p.num_tokens + Tc - 1) / Tc;
  extern __shared__ __align__(128) char s_stage[]; /* the launch's dynamic shared memory */
  int4 *stage = (int4 *)(s_stage + (size_t)(threadIdx.x / 32) * EPX_REDUCE_STAGE_BYTES);
  for (int ch = 0; ch < chunks; ++ch) {
    /* The slots were written by every peer before its progress release; this
     * block's acquire of each progress word orders the reads below after them. */
    if (!epx_wait_progress(c, ~0ull, epx_progress_value(op.epoch, ch + 1), EPX_OP_COMBINE, p.seq)) return;
    if (rb == 0 && ch == 0 && threadIdx.x == 0) epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_RECV_SIGNALS);
    const int end = min(p.num_tokens, (ch + 1) * Tc);
    for (int t = ch * Tc + gwarp; t < end; t += warps) {
      const uint8_t *itr = p.is_token_in_rank + (size_t)t * R;
      unsigned in_lo = __ballot_sync(0xffffffffu, lane < R && itr[lane]);
      unsigned in_hi = __ballot_sync(0xffffffffu, lane + 32 < R && itr[lane + 32]);
      epx_combine_reduce_token(p, t, in_lo, in_hi, stage);
    }
  }
  if (rb == 0) {
    __syncthreads();
    if (threadIdx.x == 0) epx_trace(c, EPX_OP_COMBINE, EPX_TRACE_RECV_BLOCK0);
  }
}

__global__ void __launch_bounds__(EPX_CUDA_DATA_THREADS) epx_combine_kernel(EpxCombineParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  const EpxOpStart op = epx_op_start(p.ctx, p.invalid);
  /* After a fatal failure peers are not waited on and nothing more is posted. */
  if (op.fatal) return;
  const EpxNormalRole role = epx_normal_role(p.ctx);
  if (threadIdx.x == 0 && role.send && role.index == 0) epx_trace(p.ctx, EPX_OP_COMBINE, EPX_TRACE_SEND_SLOT);
  if (role.send) epx_combine_send(p, op);
  else epx_combine_reduce(p, op);
  epx_trace_block_done(p.ctx, EPX_OP_COMBINE);
}

cudaError_t epx_cuda_preload_combine(void) {
  cudaError_t e = epx_preload(epx_combine_kernel);
  return e != cudaSuccess ? e
                          : cudaFuncSetAttribute(epx_combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 (int)EPX_BULK_SMEM_BYTES);
}

/* blocks >= 2: at least one send and one reduce block (ctx.send_blocks < blocks).
 * The dynamic shared memory serves the send warps' bulk copies and the reduce
 * warps' stages (EPX_REDUCE_STAGE_BYTES each): other blocks, the same size. */
cudaError_t epx_cuda_launch_combine(const EpxCombineParams *p, int blocks, cudaStream_t stream) {
  return epx_launch(epx_combine_kernel, p->ctx.pdl, blocks, EPX_CUDA_DATA_THREADS, EPX_BULK_SMEM_BYTES,
                    stream, *p);
}
