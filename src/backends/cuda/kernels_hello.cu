/*
 * kernels_hello.cu - the first phase of every collective op: the call-header
 * check and, in the counted path (epxDispatchNotify, or epxDispatch with
 * num_worst_tokens), the count exchange that fills the handle.
 *
 * One block. Pass 1 reads topk_idx once: it checks every id against [-1, E)
 * (the cached path does only that, with every thread over the flat array),
 * and (counted) marks is_token_in_rank, gives each (token, rank) its position
 * among this rank's tokens for that rank, and counts tokens per expert (once
 * per token). Warps own contiguous token ranges so positions keep token
 * order. The kernel also zeroes the data kernel's chunk claim counters.
 * Then every rank posts its hello to every peer and waits for all of them;
 * the gathered counts give the R x R rank-prefix matrix, so each sender knows
 * the final receive row of each of its tokens with no further exchange.
 */
#include "backends/cuda/cuda_common.cuh"

#define EPX_HELLO_WARPS EPX_CUDA_HELLO_WARPS

/* Priority of per-call errors when several peers report one: the local
 * rank's own fault first, then a peer's fault, then a disagreement. */
static __device__ int epx_code_priority(int code) {
  if (code == epxInvalidArgument) return 3;
  if (code == epxRemoteError) return 2;
  if (code == epxMismatch) return 1;
  return 0;
}

/* Compares one peer's header with ours; returns the error it implies (0 if none). */
static __device__ int epx_hello_compare(const EpxHelloParams &p, const EpxHello &h, int *field,
                                        long long *mine, long long *theirs) {
#define EPX_CMP(name, fld)             \
  if ((long long)p.name != (long long)h.name) { \
    *field = fld;                      \
    *mine = (long long)p.name;         \
    *theirs = (long long)h.name;       \
    return epxMismatch;                \
  }
  EPX_CMP(op, EPX_FIELD_OP)
  EPX_CMP(seq, EPX_FIELD_SEQ)
  EPX_CMP(hidden, EPX_FIELD_HIDDEN)
  EPX_CMP(topk, EPX_FIELD_TOPK)
  EPX_CMP(x_type, EPX_FIELD_X_TYPE)
  EPX_CMP(idx_type, EPX_FIELD_IDX_TYPE)
  EPX_CMP(scale_format, EPX_FIELD_SCALES)
  EPX_CMP(path, EPX_FIELD_PATH)
#undef EPX_CMP
  return 0;
}

/* Ids loaded at once per lane before they are used: the loads of a batch
 * overlap instead of each token waiting for its own. */
#define EPX_HELLO_ID_BATCH 8

/* A bad id (outside [-1, E)) is recorded once and fails the call. */
static __device__ __forceinline__ bool epx_hello_id_ok(long long id, int num_experts, int t, int *s_bad,
                                                       long long *s_bad_id, int *s_bad_token) {
  if (id >= -1 && id < num_experts) return true;
  if (atomicExch(s_bad, 1) == 0) {
    *s_bad_id = id;
    *s_bad_token = t;
  }
  return false;
}

/* Pass 1 over this warp's tokens (counted path). */
static __device__ void epx_hello_scan_tokens(const EpxHelloParams &p, int t0, int t1, int *s_wcnt_row,
                                             int *s_expert, int *s_bad, long long *s_bad_id,
                                             int *s_bad_token) {
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, lane = threadIdx.x % 32;
  for (int tb = t0; tb < t1; tb += EPX_HELLO_ID_BATCH) {
    long long ids[EPX_HELLO_ID_BATCH];
#pragma unroll
    for (int u = 0; u < EPX_HELLO_ID_BATCH; ++u)
      ids[u] = lane < p.topk && tb + u < t1 ? epx_topk_get(p.topk_idx, p.topk_is_int64, tb + u, p.topk, lane) : -1;
#pragma unroll
    for (int u = 0; u < EPX_HELLO_ID_BATCH; ++u) {
      const int t = tb + u;
      if (t >= t1) break; /* warp-uniform */
      long long id = ids[u];
      /* Never let a bad id steer a write: count it as "no expert" and fail the call. */
      if (!epx_hello_id_ok(id, c.num_experts, t, s_bad, s_bad_id, s_bad_token)) id = -1;
      int dst = id >= 0 ? epx_expert_rank(id, c.num_local_experts) : -1;
      for (int r = lane; r < R; r += 32) p.scratch_pos[(size_t)t * R + r] = -1;
      __syncwarp(); /* orders the clears above before the leaders' writes below */
      unsigned same_rank = __match_any_sync(0xffffffffu, dst);
      if (dst >= 0 && __ffs(same_rank) - 1 == lane) {
        /* One leader per destination rank: a token goes to a rank once. The
         * position is this warp's running count (warp-private row, distinct dst). */
        p.scratch_pos[(size_t)t * R + dst] = s_wcnt_row[dst]++;
      }
      unsigned same_expert = __match_any_sync(0xffffffffu, id);
      if (id >= 0 && __ffs(same_expert) - 1 == lane) atomicAdd(&s_expert[id], 1);
      __syncwarp();
    }
  }
}

/* Pass 1 of the cached path: only the id check, over the flat [T, K] array
 * with every thread of the block (a cached re-dispatch spent ~19 us of its
 * time here at T=4096 with the per-warp token walk). */
static __device__ void epx_hello_check_ids(const EpxHelloParams &p, int T, int *s_bad, long long *s_bad_id,
                                           int *s_bad_token) {
  const long long n = (long long)T * p.topk;
  const int K = p.topk;
  for (long long i0 = threadIdx.x; i0 < n; i0 += (long long)blockDim.x * EPX_HELLO_ID_BATCH) {
    long long ids[EPX_HELLO_ID_BATCH];
#pragma unroll
    for (int u = 0; u < EPX_HELLO_ID_BATCH; ++u) {
      const long long i = i0 + (long long)u * blockDim.x;
      ids[u] = i < n ? epx_topk_get(p.topk_idx, p.topk_is_int64, i / K, K, (int)(i % K)) : -1;
    }
#pragma unroll
    for (int u = 0; u < EPX_HELLO_ID_BATCH; ++u)
      (void)epx_hello_id_ok(ids[u], p.ctx.num_experts, (int)((i0 + (long long)u * blockDim.x) / K), s_bad,
                            s_bad_id, s_bad_token);
  }
}

__global__ void __launch_bounds__(EPX_CUDA_HELLO_THREADS, 1) epx_hello_kernel(EpxHelloParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  extern __shared__ int smem[];
  const EpxDevCtx &c = p.ctx;
  const int R = c.nranks, El = c.num_local_experts, me = c.rank;
  const int warp = threadIdx.x / 32;
  int *s_wcnt = smem;                  /* [warps][R]: counts, then exclusive prefix over warps */
  int *s_mat = s_wcnt + EPX_HELLO_WARPS * R; /* [R][R]: row s = tokens s sends to each rank */
  int *s_expert = s_mat + R * R;       /* [E]: my tokens per expert */
  int *s_recv_expert = s_expert + c.num_experts; /* [El]: tokens I receive per local expert */
  __shared__ unsigned long long s_epoch;
  __shared__ int s_fatal, s_failed, s_bad, s_bad_token;
  __shared__ long long s_bad_id;
  __shared__ int s_code[EPX_CUDA_MAX_RANKS], s_field[EPX_CUDA_MAX_RANKS];
  __shared__ long long s_mine[EPX_CUDA_MAX_RANKS], s_theirs[EPX_CUDA_MAX_RANKS];
  __shared__ int s_base[EPX_CUDA_MAX_RANKS];

  if (threadIdx.x == 0) {
    s_fatal = epx_ld_volatile_i32((volatile int *)&c.state->fatal);
    s_epoch = c.state->epoch + 1;
    if (!s_fatal) {
      /* Only this single-block kernel advances the epoch; the data kernels of
       * the op read it after this kernel completes (stream order). */
      c.state->epoch = s_epoch;
      c.state->err_claim = 0;
      c.state->call_status = 0;
      if (p.op == EPX_OP_DISPATCH || p.op == EPX_OP_COMBINE) epx_trace_start(c, p.op);
    }
    s_failed = 0;
    s_bad = 0;
    s_bad_id = 0;
    s_bad_token = -1;
  }
  /* The chunk claim counters of this op's data kernel (EpxWork), which reads
   * them only after this kernel completed (stream order or the PDL wait). */
  if (p.op == EPX_OP_DISPATCH || p.op == EPX_OP_COMBINE) {
    unsigned *claims = epx_work_counters(c);
    for (int i = threadIdx.x; i < c.lay.claim_chunks; i += blockDim.x) claims[i] = 0u;
  }
  size_t smem_ints = epx_cuda_hello_smem_bytes(R, c.num_experts) / sizeof(int);
  for (size_t i = threadIdx.x; i < smem_ints; i += blockDim.x) smem[i] = 0;
  __syncthreads();
  if (s_fatal) return;
  const unsigned long long e = s_epoch;

  /* ---- pass 1 ---- */
  const int T = p.topk_idx ? p.num_tokens : 0;
  const int chunk = (T + EPX_HELLO_WARPS - 1) / EPX_HELLO_WARPS;
  if (!(p.flags & EPX_HELLO_INVALID) && T > 0) {
    int t0 = warp * chunk, t1 = min(T, t0 + chunk);
    if (p.counted) epx_hello_scan_tokens(p, t0, t1, s_wcnt + warp * R, s_expert, &s_bad, &s_bad_id, &s_bad_token);
    else epx_hello_check_ids(p, T, &s_bad, &s_bad_id, &s_bad_token);
  }
  __syncthreads();
  if ((int)threadIdx.x < R) {
    int r = threadIdx.x, total = 0;
    for (int w = 0; w < EPX_HELLO_WARPS; ++w) {
      int v = s_wcnt[w * R + r];
      s_wcnt[w * R + r] = total;
      total += v;
    }
    s_mat[me * R + r] = total;
  }
  __syncthreads();

  /* ---- post my hello to every peer (thread r -> peer r) ---- */
  if ((int)threadIdx.x < R) {
    int r = threadIdx.x;
    EpxHello *h = epx_hello_slot(c, c.peers[r], e, me);
    h->seq = p.seq;
    h->op = p.op;
    h->flags = p.flags | (s_bad ? EPX_HELLO_BAD_ID : 0);
    h->hidden = p.hidden;
    h->topk = p.topk;
    h->x_type = p.x_type;
    h->idx_type = p.idx_type;
    h->scale_format = p.scale_format;
    h->path = p.path;
    h->bad_id = s_bad_id;
    h->bad_token = s_bad_token;
    int *body = (int *)(h + 1);
    if (p.counted) {
      for (int q = 0; q < R; ++q) body[q] = s_mat[me * R + q];
      for (int j = 0; j < El; ++j) body[R + j] = s_expert[r * El + j];
    }
    /* Release: the header and counts above (this thread's stores) become
     * visible before the epoch; pairs with the acquire in the wait below on rank r. */
    epx_st_release_sys(&h->epoch, e);
  }
  __syncthreads(); /* the posts above read s_mat[me]; the gather below rewrites it */

  /* ---- gather every peer's hello (thread s <- peer s) ---- */
  if ((int)threadIdx.x < R) {
    int s = threadIdx.x;
    EpxHello *h = epx_hello_slot(c, c.peers[me], e, s);
    s_code[s] = 0;
    if (!epx_wait_epoch(c, &h->epoch, e, p.op, EPX_PHASE_HELLO, s, p.seq)) {
      s_failed = 1;
    } else {
      EpxHello hv = *h; /* ordered after the acquire of h->epoch */
      int code = 0, field = EPX_FIELD_NONE;
      long long mine = 0, theirs = 0;
      if (hv.flags & EPX_HELLO_INVALID) {
        code = s == me ? epxInvalidArgument : epxRemoteError;
      } else if (hv.flags & EPX_HELLO_BAD_ID) {
        code = s == me ? epxInvalidArgument : epxRemoteError;
        field = EPX_FIELD_EXPERT_ID;
        mine = hv.bad_token;
        theirs = hv.bad_id;
      } else if (!(p.flags & EPX_HELLO_INVALID)) {
        code = epx_hello_compare(p, hv, &field, &mine, &theirs);
      }
      s_code[s] = code;
      s_field[s] = field;
      s_mine[s] = mine;
      s_theirs[s] = theirs;
      if (p.counted && code == 0 && !(p.flags & EPX_HELLO_INVALID)) {
        const int *body = (const int *)(h + 1);
        for (int q = 0; q < R; ++q) s_mat[s * R + q] = body[q];
        for (int j = 0; j < El; ++j) atomicAdd(&s_recv_expert[j], body[R + j]);
      }
    }
  }
  __syncthreads();
  if (s_failed) {
    if (threadIdx.x == 0) c.state->call_status = epxTimeout; /* the record holds the cause */
    return;
  }
  __shared__ int s_status;
  if (threadIdx.x == 0) {
    int best = me, best_prio = epx_code_priority(s_code[me]);
    for (int s = 0; s < R; ++s) {
      int prio = epx_code_priority(s_code[s]);
      if (prio > best_prio) {
        best = s;
        best_prio = prio;
      }
    }
    s_status = s_code[best];
    if (s_status != 0) {
      epx_record_error(c, s_status, p.op, EPX_PHASE_CHECK, best, s_field[best], s_mine[best],
                       s_theirs[best], p.seq);
      c.state->call_status = s_status;
      if (p.write_host) c.host->status = s_status;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && (p.op == EPX_OP_DISPATCH || p.op == EPX_OP_COMBINE))
    epx_trace(c, p.op, EPX_TRACE_SEND_PREP);
  if (s_status != 0 || !p.counted || (p.flags & EPX_HELLO_INVALID)) {
    if (threadIdx.x == 0 && s_status == 0 && p.write_host) c.host->status = 0;
    return;
  }

  /* ---- counted path: prefix matrix, per-expert counts, final send rows ---- */
  if ((int)threadIdx.x < R) {
    int r = threadIdx.x, acc = 0;
    for (int s = 0; s < R; ++s) {
      if (s == me) s_base[r] = acc; /* rows on r from sources before me */
      acc += s_mat[s * R + r];
      p.rank_prefix_matrix[s * R + r] = acc;
    }
    if (r == me && p.write_host) c.host->n_recv = acc;
  }
  for (int j = threadIdx.x; j < El; j += blockDim.x) {
    int aligned = (int)epx_align_up(s_recv_expert[j], p.expert_alignment);
    p.num_recv_per_expert[j] = aligned;
    if (p.write_host) c.host->per_expert[j] = aligned;
  }
  __syncthreads(); /* pass-1 positions in scratch (global) are visible block-wide */
  /* The handle is written only now, once the call is known to succeed: a
   * failed count exchange leaves the caller's handle as it was. */
  for (size_t i = threadIdx.x; i < (size_t)T * R; i += blockDim.x) {
    int pos = p.scratch_pos[i];
    int t = (int)(i / R), r = (int)(i % R);
    p.is_token_in_rank[i] = pos >= 0;
    p.send_row[i] = pos >= 0 ? s_base[r] + s_wcnt[(t / chunk) * R + r] + pos : -1;
  }
  if (threadIdx.x == 0 && p.write_host) c.host->status = 0;
}

cudaError_t epx_cuda_preload_hello(void) { return epx_preload(epx_hello_kernel); }

cudaError_t epx_cuda_launch_hello(const EpxHelloParams *p, cudaStream_t stream) {
  size_t smem = epx_cuda_hello_smem_bytes(p->ctx.nranks, p->ctx.num_experts);
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(epx_hello_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  return epx_launch(epx_hello_kernel, p->ctx.pdl, 1, EPX_CUDA_HELLO_THREADS, smem, stream, *p);
}
