/*
 * bench_device.c - which benchmark device serves a backend, and host views of its buffers.
 */
#include <stdio.h>
#include <stdlib.h>

#include "bench.h"

#ifdef EPX_BENCH_HAVE_CUDA
/* bench_cuda.c: device buffers, CUDA events, an L2 flush and the NCCL baseline. */
extern const benchDevice bench_cuda_device;
#endif

const benchDevice *bench_device_for(epxBackend_t backend) {
  if (backend == epxBackendHost) return &bench_host_device;
#ifdef EPX_BENCH_HAVE_CUDA
  if (backend == epxBackendCuda) return &bench_cuda_device;
#endif
  return NULL;
}

const void *bench_fetch(const benchDevice *dev, const void *p, size_t bytes, void **scratch) {
  *scratch = NULL;
  if (dev->host_addressable || bytes == 0) return p;
  void *copy = malloc(bytes);
  if (!copy) {
    fprintf(stderr, "epx-bench: cannot allocate %zu bytes to read results back\n", bytes);
    return NULL;
  }
  if (dev->download(copy, p, bytes)) {
    free(copy);
    return NULL;
  }
  *scratch = copy;
  return copy;
}
