/*
 * ll_combine_recv.cu - low-latency combine, receive kernel (the hook of a
 * split combine, or the second kernel of a plain one when the send and
 * receive are not fused). The work itself is in ll_combine_recv.cuh.
 */
#include "backends/cuda/ll_combine_recv.cuh"

__global__ void __launch_bounds__(EPX_LL_THREADS, 1)
    epx_ll_combine_recv_kernel(EpxLLCombineRecvParams p) {
  epx_wait_prior_grid(); /* PDL: the previous kernel's writes are visible from here */
  epx_allow_dependents();
  __shared__ int s_fatal;
  __shared__ unsigned long long s_epoch;
  if (threadIdx.x == 0) {
    s_fatal = epx_ll_fatal(p.ctx);
    s_epoch = *p.epoch_src;
  }
  __syncthreads();
  if (s_fatal) return;
  epx_ll_combine_recv_body(p, s_epoch, epx_ll_whole_grid());
}

cudaError_t epx_cuda_preload_ll_combine_recv(void) {
  return epx_preload(epx_ll_combine_recv_kernel);
}

cudaError_t epx_cuda_launch_ll_combine_recv(const EpxLLCombineRecvParams *p, int blocks,
                                            cudaStream_t stream) {
  return epx_launch(epx_ll_combine_recv_kernel, p->ctx.pdl, blocks, EPX_LL_THREADS, 0, stream, *p);
}
