/*
 * bulk_copy.cuh - row copies through the copy engine of the SM (TMA, sm_90
 * cp.async.bulk), used by the normal-mode send warps (EPX_CUDA_BULK=1).
 *
 * Each warp owns one EPX_BULK_PIECE_BYTES buffer in dynamic shared memory and
 * one mbarrier. Its lane 0 moves a row in pieces: a bulk load of the piece
 * from global memory into the buffer (completion counted on the mbarrier),
 * then one bulk store of the buffer per destination (local or a peer's region
 * over NVLink), committed as a bulk group. Before the next load into the
 * buffer it waits until those stores have read it. A register copy keeps 2 KB
 * per warp in flight; a bulk copy up to a whole piece per warp, without
 * holding the warp's registers, so fewer SMs can keep the links busy.
 *
 * Ordering: before a send block publishes a chunk (epx_post_progress), every
 * lane 0 waits for its bulk stores to complete (epx_bulk_drain: the writes
 * are then performed) and fences the async proxy against the generic one; the
 * block's system fence and release store follow, as for register stores.
 */
#ifndef EPX_CUDA_BULK_COPY_CUH
#define EPX_CUDA_BULK_COPY_CUH

#include "backends/cuda/cuda_common.cuh"

/* Bytes of one warp's buffer (16 warps: 128 KB of shared memory per block). */
#define EPX_BULK_PIECE_BYTES 8192
/* Dynamic shared memory of a data kernel with bulk copies. */
#define EPX_BULK_SMEM_BYTES ((size_t)EPX_CUDA_DATA_WARPS * EPX_BULK_PIECE_BYTES)

/* True when rows of `row_bytes` at these bases can move as bulk copies:
 * 16-byte aligned addresses, sizes a multiple of 16. */
static inline __host__ __device__ int epx_bulk_ok(const void *a, const void *b, long long row_bytes) {
  return ((uintptr_t)a % 16 == 0) && ((uintptr_t)b % 16 == 0) && row_bytes % 16 == 0;
}

#ifdef __CUDACC__

typedef struct EpxBulkWarp {
  uint32_t buf;   /* shared-memory address of the warp's buffer */
  uint32_t bar;   /* shared-memory address of its mbarrier */
  uint32_t phase; /* parity of the next load's completion */
} EpxBulkWarp;

/* Every lane of the warp, once per kernel: lane 0 sets up the mbarrier. */
static __device__ EpxBulkWarp epx_bulk_warp_init(unsigned long long *bars, char *smem) {
  const int warp = threadIdx.x / 32;
  EpxBulkWarp w;
  w.buf = (uint32_t)__cvta_generic_to_shared(smem + (size_t)warp * EPX_BULK_PIECE_BYTES);
  w.bar = (uint32_t)__cvta_generic_to_shared(&bars[warp]);
  w.phase = 0;
  if (threadIdx.x % 32 == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(w.bar) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncwarp();
  return w;
}

/* Lane 0: loads `bytes` at src into the buffer and waits for them, once the
 * previous stores have read the buffer. Returns 0 if the load did not land
 * within the communicator's timeout (recorded; cannot happen on a sane GPU). */
static __device__ int epx_bulk_load(const EpxDevCtx &c, int op, EpxBulkWarp &w, const void *src,
                                    int bytes) {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(w.bar), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          w.buf),
      "l"(src), "r"(bytes), "r"(w.bar)
      : "memory");
  const long long start = epx_globaltimer();
  for (;;) {
    uint32_t done;
    asm volatile(
        "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(w.bar), "r"(w.phase)
        : "memory");
    if (done) break;
    if (epx_globaltimer() - start > c.timeout_ns) {
      epx_record_error(c, epxTimeout, op, EPX_PHASE_NONE, c.rank, EPX_FIELD_NONE, bytes,
                       0, 0);
      return 0;
    }
  }
  w.phase ^= 1u;
  return 1;
}

/* Lane 0: stores the first `bytes` of the buffer at dst (any global address,
 * a peer's mapped region included). Committed by epx_bulk_commit. */
static __device__ __forceinline__ void epx_bulk_store(const EpxBulkWarp &w, void *dst, int bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(w.buf),
               "r"(bytes)
               : "memory");
}

static __device__ __forceinline__ void epx_bulk_commit(void) {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

/* Lane 0: waits until every bulk store it issued is performed, then orders
 * them (async proxy) before its later generic-proxy operations (the fences
 * and release stores that publish them). */
static __device__ __forceinline__ void epx_bulk_drain(void) {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async;" ::: "memory");
}

#endif /* __CUDACC__ */

#endif /* EPX_CUDA_BULK_COPY_CUH */
