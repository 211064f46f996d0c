/*
 * bench_gate.cu - the start gate of epx-bench's CUDA device (see bench.h): a one-thread
 * kernel that holds its stream until rank 0 releases the iteration, so that every GPU starts
 * the timed call at about the same moment. The word it polls is host memory shared by the
 * rank processes and mapped for the device (cudaHostRegisterMapped); each look crosses PCIe,
 * so a GPU sees the release about a microsecond after the store.
 */
#include <cuda_runtime.h>

#include "bench_gate.h"

static __device__ __forceinline__ uint64_t gate_now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/* An acquire load at system scope: the host's store is seen as soon as it lands. */
static __device__ __forceinline__ uint32_t gate_load(const uint32_t *p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

static __global__ void bench_gate_kernel(const uint32_t *go, uint32_t gen, uint32_t *timed_out,
                                         uint64_t timeout_ns) {
  const uint64_t t0 = gate_now_ns();
  while ((int32_t)(gate_load(go) - gen) < 0) {
    if (gate_now_ns() - t0 > timeout_ns) {
      *(volatile uint32_t *)timed_out = gen;
      __threadfence_system();
      return;
    }
  }
}

extern "C" cudaError_t bench_gate_prepare(void) {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, bench_gate_kernel);
}

extern "C" cudaError_t bench_gate_launch(const uint32_t *go, uint32_t gen, uint32_t *timed_out,
                                         uint64_t timeout_ns, cudaStream_t stream) {
  bench_gate_kernel<<<1, 1, 0, stream>>>(go, gen, timed_out, timeout_ns);
  return cudaGetLastError();
}
