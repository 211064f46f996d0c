/*
 * bench_gate.h - the start gate's kernel (bench_gate.cu), for bench_cuda.c; C and C++.
 */
#ifndef EPX_BENCH_GATE_H
#define EPX_BENCH_GATE_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Enqueues on `stream` a one-thread kernel that returns once *go (device view of host memory
 * shared by every rank) has reached `gen` (compared as (int32_t)(*go - gen) >= 0, so the
 * numbers may wrap), or, after `timeout_ns` of wall time (%globaltimer), stores gen into
 * *timed_out and returns. It never traps: the work after it runs either way. */
/* Loads the kernel now (CUDA loads modules lazily, and a load may wait for the device: it
 * must not happen behind a waiting gate). */
cudaError_t bench_gate_prepare(void);

cudaError_t bench_gate_launch(const uint32_t *go, uint32_t gen, uint32_t *timed_out,
                              uint64_t timeout_ns, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* EPX_BENCH_GATE_H */
