/*
 * ll_dispatch_recv.cu - low-latency dispatch, receive kernel (the hook of a
 * split dispatch, or the second kernel of a plain one when the send and
 * receive are not fused). The work itself is in ll_dispatch_recv.cuh.
 */
#include "backends/cuda/ll_dispatch_recv.cuh"

__global__ void __launch_bounds__(EPX_LL_THREADS, 1)
    epx_ll_dispatch_recv_kernel(EpxLLDispatchRecvParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  __shared__ int s_fatal;
  __shared__ unsigned long long s_epoch;
  if (threadIdx.x == 0) {
    s_fatal = epx_ll_fatal(p.ctx);
    s_epoch = *p.epoch_src; /* written by the send kernel (stream order) */
  }
  __syncthreads();
  if (s_fatal) return;
  epx_ll_dispatch_recv_body(p, s_epoch, epx_ll_whole_grid());
}

cudaError_t epx_cuda_preload_ll_dispatch_recv(void) {
  return epx_preload(epx_ll_dispatch_recv_kernel);
}

cudaError_t epx_cuda_launch_ll_dispatch_recv(const EpxLLDispatchRecvParams *p, int blocks,
                                             cudaStream_t stream) {
  size_t smem = sizeof(int) * (size_t)p->ctx.num_local_experts * (size_t)p->ctx.nranks;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(epx_ll_dispatch_recv_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  return epx_launch(epx_ll_dispatch_recv_kernel, p->ctx.pdl, blocks, EPX_LL_THREADS, smem, stream, *p);
}
