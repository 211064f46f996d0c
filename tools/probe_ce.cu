/*
 * probe_ce.cu - how fast can the copy engines move a normal-mode exchange?
 *
 * One process drives every GPU present (peer access on). Each GPU g copies
 * `rows` rows of `row_bytes` to every other GPU (contiguous blocks, as the
 * combine's per-source blocks are), with no SM doing the data movement:
 *   ring    one stream; pieces interleaved over the peers in ring order
 *           (piece q to g+1, g+2, ... then piece q+1), so at each step every
 *           GPU writes into a different peer;
 *   streams one stream per peer, each its pieces in order, all at once;
 * --2d: each piece as a 2D copy of row_bytes-wide rows (pitch = width);
 * --spin B [--spin-sleep NS]: meanwhile B blocks of 512 threads on each GPU
 * poll its flags (as the combine's reduce kernel waits), sleeping NS between;
 * each piece followed by a 64-bit flag written into the peer
 * (cuStreamWriteValue64 on the peer's mapped address) unless --no-flags.
 * All GPUs start behind one host-released gate; the time is the slowest GPU's,
 * median of --iters. Data are checked once (a piece's bytes at its peer).
 *
 * Build: make build/probe-ce (nvcc; cuStreamWriteValue64 is found through the
 * runtime, so nothing links libcuda).
 */
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXG 8
#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));   \
      exit(1);                                                                             \
    }                                                                                      \
  } while (0)
#define CKD(x)                                                                             \
  do {                                                                                     \
    CUresult r_ = (x);                                                                     \
    if (r_ != CUDA_SUCCESS) {                                                              \
      fprintf(stderr, "%s:%d %s: CUresult %d\n", __FILE__, __LINE__, #x, (int)r_);         \
      exit(1);                                                                             \
    }                                                                                      \
  } while (0)

__global__ void gate_kernel(volatile int *gate) {
  while (*gate == 0) {
  }
}

/* What a waiting combine kernel does meanwhile: lanes 0..G-2 of every warp
 * poll the flag of one source each (system-scope loads) until it reaches
 * `want`, sleeping sleep_ns between polls. */
__global__ void spin_kernel(const unsigned long long *flags, int me, int G, unsigned long long want,
                            unsigned sleep_ns) {
  const int lane = threadIdx.x % 32;
  if (lane >= G - 1) return;
  const int src = (me + 1 + lane) % G;
  for (;;) {
    unsigned long long v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(flags + src) : "memory");
    if (v >= want) break;
    if (sleep_ns) __nanosleep(sleep_ns);
  }
}

__global__ void fill_kernel(unsigned *p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = (unsigned)(i * 2654435761u) ^ seed;
}

static int cmp_f(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return x < y ? -1 : x > y;
}

typedef CUresult (*WriteValue64Fn)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);

int main(int argc, char **argv) {
  int rows = 3690, row_bytes = 14336, pieces = 8, iters = 20, flags = 1, two_d = 0, spin = 0, spin_sleep = 0;
  const char *pattern = "ring";
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--rows")) rows = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--row-bytes")) row_bytes = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--pieces")) pieces = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--pattern")) pattern = argv[++i];
    else if (!strcmp(argv[i], "--no-flags")) flags = 0;
    else if (!strcmp(argv[i], "--2d")) two_d = 1;
    else if (!strcmp(argv[i], "--spin")) spin = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--spin-sleep")) spin_sleep = atoi(argv[++i]);
  }
  const int streams_mode = !strcmp(pattern, "streams");
  WriteValue64Fn write_value64 = NULL;
  {
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    void *fn = NULL;
    CK(cudaGetDriverEntryPointByVersion("cuStreamWriteValue64", &fn, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || !fn) {
      fprintf(stderr, "probe-ce: the driver has no cuStreamWriteValue64\n");
      return 1;
    }
    write_value64 = (WriteValue64Fn)fn;
  }
  int G = 0;
  CK(cudaGetDeviceCount(&G));
  if (G > MAXG) G = MAXG;
  if (G < 2) {
    fprintf(stderr, "probe-ce: needs 2+ GPUs\n");
    return 1;
  }
  const size_t block = (size_t)rows * row_bytes; /* bytes from one GPU to one peer */
  char *src[MAXG], *dst[MAXG];
  unsigned long long *flag[MAXG];
  cudaStream_t st[MAXG][MAXG];
  cudaEvent_t ev_start[MAXG], ev_end[MAXG], ev_fork[MAXG], ev_join[MAXG][MAXG];
  int *gate_h;
  CK(cudaHostAlloc(&gate_h, sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
  for (int g = 0; g < G; ++g) {
    CK(cudaSetDevice(g));
    for (int h = 0; h < G; ++h)
      if (h != g) {
        cudaError_t e = cudaDeviceEnablePeerAccess(h, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) CK(e);
      }
    CK(cudaMalloc(&src[g], block * G));
    CK(cudaMalloc(&dst[g], block * G)); /* block from source h at h * block */
    CK(cudaMalloc(&flag[g], sizeof(unsigned long long) * MAXG));
    CK(cudaMemset(flag[g], 0, sizeof(unsigned long long) * MAXG));
    fill_kernel<<<264, 512>>>((unsigned *)src[g], block * G / 4, 0x9e3779b9u * (g + 1));
    for (int s = 0; s < G; ++s) CK(cudaStreamCreateWithFlags(&st[g][s], cudaStreamNonBlocking));
    CK(cudaEventCreate(&ev_start[g]));
    CK(cudaEventCreate(&ev_end[g]));
    CK(cudaEventCreateWithFlags(&ev_fork[g], cudaEventDisableTiming));
    for (int s = 0; s < G; ++s) CK(cudaEventCreateWithFlags(&ev_join[g][s], cudaEventDisableTiming));
    CK(cudaDeviceSynchronize());
  }
  int *gate_d;
  CK(cudaHostGetDevicePointer((void **)&gate_d, gate_h, 0));
  float *ms = (float *)calloc((size_t)iters, sizeof(float));
  unsigned long long flag_value = 0;
  for (int it = 0; it < iters + 2; ++it) {
    *(volatile int *)gate_h = 0;
    ++flag_value;
    for (int g = 0; g < G; ++g) {
      CK(cudaSetDevice(g));
      gate_kernel<<<1, 1, 0, st[g][0]>>>(gate_d);
      CK(cudaEventRecord(ev_start[g], st[g][0]));
      CK(cudaEventRecord(ev_fork[g], st[g][0]));
      for (int s = 1; s < G; ++s) CK(cudaStreamWaitEvent(st[g][s], ev_fork[g], 0));
      if (spin && flags) /* on the last stream: waits for every source's last piece */
        spin_kernel<<<spin, 512, 0, st[g][G - 1]>>>(flag[g], g, G, flag_value << 8 | (unsigned)pieces,
                                                    (unsigned)spin_sleep);
      const size_t piece = (block + pieces - 1) / pieces;
      for (int q = 0; q < pieces; ++q) {
        const size_t off = (size_t)q * piece, n = off < block ? (block - off < piece ? block - off : piece) : 0;
        for (int j = 1; j < G; ++j) {
          const int peer = (g + j) % G;
          cudaStream_t s = streams_mode ? st[g][j] : st[g][0];
          if (n && two_d) /* the same bytes as rows of a 2D copy (pitch = row) */
            CK(cudaMemcpy2DAsync(dst[peer] + (size_t)g * block + off, (size_t)row_bytes,
                                 src[g] + (size_t)peer * block + off, (size_t)row_bytes, (size_t)row_bytes,
                                 n / (size_t)row_bytes, cudaMemcpyDeviceToDevice, s));
          else if (n)
            CK(cudaMemcpyAsync(dst[peer] + (size_t)g * block + off, src[g] + (size_t)peer * block + off, n,
                               cudaMemcpyDeviceToDevice, s));
          if (flags)
            CKD(write_value64((CUstream)s, (CUdeviceptr)(flag[peer] + g),
                                     (cuuint64_t)(flag_value << 8 | (unsigned)(q + 1)), 0));
        }
      }
      for (int s = 1; s < G; ++s) {
        CK(cudaEventRecord(ev_join[g][s], st[g][s]));
        CK(cudaStreamWaitEvent(st[g][0], ev_join[g][s], 0));
      }
      CK(cudaEventRecord(ev_end[g], st[g][0]));
    }
    *(volatile int *)gate_h = 1;
    float worst = 0;
    for (int g = 0; g < G; ++g) {
      CK(cudaSetDevice(g));
      CK(cudaEventSynchronize(ev_end[g]));
      float t = 0;
      CK(cudaEventElapsedTime(&t, ev_start[g], ev_end[g]));
      if (t > worst) worst = t;
    }
    if (it >= 2) ms[it - 2] = worst;
  }
  /* check: GPU 0's block at GPU 1, and the last flag */
  {
    size_t n = block < (1u << 20) ? block : (1u << 20);
    char *a = (char *)malloc(n), *b = (char *)malloc(n);
    CK(cudaSetDevice(0));
    CK(cudaMemcpy(a, src[0] + 1 * block, n, cudaMemcpyDeviceToHost));
    CK(cudaSetDevice(1));
    CK(cudaMemcpy(b, dst[1] + 0 * block, n, cudaMemcpyDeviceToHost));
    unsigned long long f = 0;
    CK(cudaMemcpy(&f, flag[1] + 0, sizeof f, cudaMemcpyDeviceToHost));
    if (memcmp(a, b, n) != 0 || (flags && f != (flag_value << 8 | (unsigned)pieces))) {
      fprintf(stderr, "probe-ce: CHECK FAILED (flag %llx)\n", f);
      return 1;
    }
    free(a);
    free(b);
  }
  qsort(ms, (size_t)iters, sizeof(float), cmp_f);
  const double us = ms[iters / 2] * 1000.0;
  const double out_bytes = (double)block * (G - 1);
  printf("probe-ce G=%d pattern=%s%s spin=%d/%dns pieces=%d flags=%d rows=%d row_bytes=%d: median %.1f us (min %.1f), "
         "%.1f GB/s egress per GPU\n",
         G, pattern, two_d ? " 2d" : "", spin, spin_sleep, pieces, flags, rows, row_bytes, us, ms[0] * 1000.0, out_bytes / us / 1e3);
  return 0;
}
