/*
 * bench_cuda.c - the benchmark's device for the CUDA backend.
 *
 * Per rank (a forked process): GPU rank % device_count, one non-blocking stream on which
 * every epx call, copy and fill of the benchmark is ordered, two CUDA events around each
 * timed call, and a 256 MiB buffer written between timed iterations to evict L2 (50 MiB on
 * an H200). Copies and fills wait for the stream, so results are read after the work that
 * wrote them.
 *
 * The parent never initialises CUDA (a forked child of a process that did cannot use it): it
 * counts the GPUs in a short-lived child of its own.
 *
 * Baseline: NCCL, loaded with dlopen so that neither the library nor the benchmark links it.
 * The library is $EPX_NCCL_LIB, else the nvidia-nccl wheel's lib/libnccl.so.2 (found with
 * python3), else libnccl.so.2 on the loader's path. The few entry points used are declared
 * here with NCCL's ABI (nccl.h 2.28), so no NCCL header is needed to build. NCCL cannot put
 * two ranks of one communicator on one GPU: with more ranks than GPUs the baseline is
 * skipped, and the reason printed.
 */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

/* Larger than any GPU's L2 (H100/H200: 50 MiB, B200: 126 MiB). */
#define CUDA_FLUSH_BYTES ((size_t)256 << 20)
/* Seconds the parent waits for its GPU-counting child. */
#define COUNT_TIMEOUT_S 60

/* ------------------------------------------------------------- NCCL ABI */

/* From nccl.h (2.28): ncclUniqueId is 128 bytes, ncclResult_t and ncclDataType_t are enums
 * (ncclSuccess = 0, ncclUint8 = 1), ncclComm_t a pointer. */
typedef struct {
  char internal[BENCH_BASELINE_ID_BYTES];
} benchNcclId;
#define NCCL_SUCCESS 0
#define NCCL_UINT8 1
typedef int (*ncclGetUniqueId_fn)(benchNcclId *id);
typedef int (*ncclCommInitRank_fn)(void **comm, int nranks, benchNcclId id, int rank);
typedef int (*ncclSend_fn)(const void *buf, size_t count, int dtype, int peer, void *comm,
                           cudaStream_t stream);
typedef int (*ncclRecv_fn)(void *buf, size_t count, int dtype, int peer, void *comm,
                           cudaStream_t stream);
typedef int (*ncclGroup_fn)(void);
typedef int (*ncclCommDestroy_fn)(void *comm);
typedef const char *(*ncclGetErrorString_fn)(int result);
typedef int (*ncclGetVersion_fn)(int *version);

static struct {
  void *lib;
  ncclGetUniqueId_fn get_unique_id;
  ncclCommInitRank_fn comm_init_rank;
  ncclSend_fn send;
  ncclRecv_fn recv;
  ncclGroup_fn group_start, group_end;
  ncclCommDestroy_fn comm_destroy;
  ncclGetErrorString_fn error_string;
  ncclGetVersion_fn get_version;
  void *comm;
} nccl;

/* ------------------------------------------------------------- state */

/* Parent-side facts, inherited by the ranks (set before the fork). */
static int gpu_count = -1; /* -1: not counted yet */
static char nccl_path[4096];
static char baseline_why[256];
static int baseline_checked_for = -1; /* nranks of the cached answer */

/* Per rank. */
static int device = -1, rank_count;
static cudaStream_t stream;
static cudaEvent_t ev_start, ev_stop;
static void *flush_buf;
static unsigned flush_round;
static struct timespec wall_t0;

static int cuda_failed(cudaError_t e, const char *what) {
  if (e == cudaSuccess) return 0;
  fprintf(stderr, "epx-bench: %s: %s\n", what, cudaGetErrorString(e));
  return 1;
}

/* --------------------------------------------------------- the parent */

/* GPUs visible, counted in a child so that this process never initialises CUDA. */
static int count_gpus(void) {
  if (gpu_count >= 0) return gpu_count;
  int fds[2];
  gpu_count = 0;
  if (pipe(fds) != 0) {
    fprintf(stderr, "epx-bench: pipe: %s\n", strerror(errno));
    return 0;
  }
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "epx-bench: fork: %s\n", strerror(errno));
    close(fds[0]);
    close(fds[1]);
    return 0;
  }
  if (pid == 0) {
    close(fds[0]);
    alarm(COUNT_TIMEOUT_S);
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    ssize_t w = write(fds[1], &n, sizeof n);
    _exit(w == (ssize_t)sizeof n ? 0 : 1);
  }
  close(fds[1]);
  int n = 0;
  ssize_t got;
  do {
    got = read(fds[0], &n, sizeof n);
  } while (got < 0 && errno == EINTR);
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  gpu_count = got == (ssize_t)sizeof n && n > 0 ? n : 0;
  return gpu_count;
}

static int cuda_default_ranks(void) { return count_gpus(); }

/* The NCCL library to load: $EPX_NCCL_LIB, the wheel's, or the loader's libnccl.so.2. */
static void find_nccl(void) {
  const char *env = getenv("EPX_NCCL_LIB");
  if (env && *env) {
    snprintf(nccl_path, sizeof nccl_path, "%s", env);
    return;
  }
  FILE *f = popen(
      "python3 -c 'import os, nvidia.nccl as m; "
      "print(os.path.join(list(m.__path__)[0], \"lib\", \"libnccl.so.2\"))' 2>/dev/null",
      "r");
  if (f) {
    char line[sizeof nccl_path] = {0};
    if (fgets(line, sizeof line, f)) line[strcspn(line, "\r\n")] = 0;
    pclose(f);
    if (line[0] && access(line, R_OK) == 0) {
      snprintf(nccl_path, sizeof nccl_path, "%s", line);
      return;
    }
  }
  snprintf(nccl_path, sizeof nccl_path, "libnccl.so.2");
}

static const char *cuda_baseline_unavailable(int nranks) {
  if (baseline_checked_for == nranks) return baseline_why[0] ? baseline_why : NULL;
  baseline_checked_for = nranks;
  baseline_why[0] = 0;
  const char *off = getenv("EPX_BENCH_NO_NCCL");
  int gpus = count_gpus();
  if (off && *off && strcmp(off, "0") != 0) {
    snprintf(baseline_why, sizeof baseline_why, "EPX_BENCH_NO_NCCL is set");
  } else if (nranks > gpus) {
    snprintf(baseline_why, sizeof baseline_why,
             "%d ranks on %d GPU%s: NCCL cannot run two ranks of one communicator on one GPU",
             nranks, gpus, gpus == 1 ? "" : "s");
  } else {
    find_nccl();
  }
  return baseline_why[0] ? baseline_why : NULL;
}

/* ------------------------------------------------------------ a rank */

static int cuda_rank_setup(int rank, int nranks) {
  int n = 0;
  if (cuda_failed(cudaGetDeviceCount(&n), "cudaGetDeviceCount")) return 1;
  if (n <= 0) {
    fprintf(stderr, "epx-bench rank %d: no CUDA device visible\n", rank);
    return 1;
  }
  device = rank % n;
  rank_count = nranks;
  /* The machine keeps NVLink multicast off; keep it so if the variable is missing. */
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  if (cuda_failed(cudaSetDevice(device), "cudaSetDevice") ||
      cuda_failed(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate") ||
      cuda_failed(cudaEventCreate(&ev_start), "cudaEventCreate") ||
      cuda_failed(cudaEventCreate(&ev_stop), "cudaEventCreate") ||
      cuda_failed(cudaMalloc(&flush_buf, CUDA_FLUSH_BYTES), "cudaMalloc (L2 flush buffer)"))
    return 1;
  return 0;
}

static void cuda_rank_teardown(void) {
  if (stream) cudaStreamSynchronize(stream);
  if (flush_buf) cudaFree(flush_buf);
  if (ev_start) cudaEventDestroy(ev_start);
  if (ev_stop) cudaEventDestroy(ev_stop);
  if (stream) cudaStreamDestroy(stream);
  flush_buf = NULL;
  ev_start = ev_stop = NULL;
  stream = NULL;
}

static int cuda_effective_sms(int requested) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return -1;
#ifdef BENCH_CUDA_DEFAULT_SMS
  int want = requested > 0 ? requested : BENCH_CUDA_DEFAULT_SMS;
#else
  if (requested <= 0) return -1; /* the backend's default is not known to this build */
  int want = requested;
#endif
  return want < sms ? want : sms; /* the backend clamps to the device */
}

static void *cuda_alloc(size_t bytes) {
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, bytes ? bytes : 16);
  if (e != cudaSuccess) {
    fprintf(stderr, "epx-bench: cudaMalloc of %zu bytes: %s\n", bytes, cudaGetErrorString(e));
    return NULL;
  }
  return p;
}

static void cuda_free(void *p) {
  if (stream) cudaStreamSynchronize(stream);
  cudaFree(p);
}

static int cuda_upload(void *dst, const void *src, size_t bytes) {
  if (bytes == 0) return 0;
  return cuda_failed(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream),
                     "cudaMemcpyAsync (upload)") ||
         cuda_failed(cudaStreamSynchronize(stream), "cudaStreamSynchronize (upload)");
}

static int cuda_download(void *dst, const void *src, size_t bytes) {
  if (bytes == 0) return 0;
  return cuda_failed(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream),
                     "cudaMemcpyAsync (download)") ||
         cuda_failed(cudaStreamSynchronize(stream), "cudaStreamSynchronize (download)");
}

static int cuda_fill(void *dst, int byte, size_t bytes) {
  if (bytes == 0) return 0;
  return cuda_failed(cudaMemsetAsync(dst, byte, bytes, stream), "cudaMemsetAsync") ||
         cuda_failed(cudaStreamSynchronize(stream), "cudaStreamSynchronize (fill)");
}

static epxStream_t cuda_stream(void) { return stream; }

/* Writes 256 MiB (a different byte each round) and waits, so the next timed call starts
 * from a cold L2 and no rank's flush overlaps another's call. */
static void cuda_flush_cache(void) {
  if (!flush_buf) return;
  cuda_failed(cudaMemsetAsync(flush_buf, (int)(++flush_round & 0xffu), CUDA_FLUSH_BYTES, stream),
              "cudaMemsetAsync (L2 flush)");
  cuda_failed(cudaStreamSynchronize(stream), "cudaStreamSynchronize (L2 flush)");
}

static void cuda_timer_start(void) {
  cuda_failed(cudaEventRecord(ev_start, stream), "cudaEventRecord");
}

/* Microseconds between the two events, or -1 after printing why. */
static double cuda_timer_stop_us(void) {
  float ms = 0.0f;
  if (cuda_failed(cudaEventRecord(ev_stop, stream), "cudaEventRecord") ||
      cuda_failed(cudaEventSynchronize(ev_stop), "cudaEventSynchronize") ||
      cuda_failed(cudaEventElapsedTime(&ms, ev_start, ev_stop), "cudaEventElapsedTime"))
    return -1.0;
  return (double)ms * 1e3;
}

static void cuda_wall_start(void) { clock_gettime(CLOCK_MONOTONIC, &wall_t0); }

static double cuda_wall_stop_us(void) {
  if (cuda_failed(cudaStreamSynchronize(stream), "cudaStreamSynchronize")) return -1.0;
  struct timespec t1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  return (double)(t1.tv_sec - wall_t0.tv_sec) * 1e6 +
         (double)(t1.tv_nsec - wall_t0.tv_nsec) * 1e-3;
}

/* ------------------------------------------------------------- NCCL */

static int nccl_failed(int res, const char *what) {
  if (res == NCCL_SUCCESS) return 0;
  fprintf(stderr, "epx-bench: %s: NCCL error %d (%s)\n", what, res,
          nccl.error_string ? nccl.error_string(res) : "?");
  return 1;
}

static int nccl_load(void) {
  if (nccl.lib) return 0;
  void *lib = dlopen(nccl_path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "epx-bench: baseline: cannot load NCCL (%s): %s; set EPX_NCCL_LIB\n",
            nccl_path, dlerror());
    return 1;
  }
  struct {
    const char *name;
    void **slot;
  } syms[] = {
      {"ncclGetUniqueId", (void **)&nccl.get_unique_id},
      {"ncclCommInitRank", (void **)&nccl.comm_init_rank},
      {"ncclSend", (void **)&nccl.send},
      {"ncclRecv", (void **)&nccl.recv},
      {"ncclGroupStart", (void **)&nccl.group_start},
      {"ncclGroupEnd", (void **)&nccl.group_end},
      {"ncclCommDestroy", (void **)&nccl.comm_destroy},
      {"ncclGetErrorString", (void **)&nccl.error_string},
      {"ncclGetVersion", (void **)&nccl.get_version},
  };
  for (size_t i = 0; i < sizeof syms / sizeof syms[0]; ++i) {
    *syms[i].slot = dlsym(lib, syms[i].name);
    if (!*syms[i].slot) {
      fprintf(stderr, "epx-bench: baseline: %s has no %s\n", nccl_path, syms[i].name);
      dlclose(lib);
      memset(&nccl, 0, sizeof nccl);
      return 1;
    }
  }
  nccl.lib = lib;
  return 0;
}

static int cuda_baseline_make_id(void *id) {
  if (nccl_load()) return 1;
  int version = 0;
  if (nccl.get_version(&version) == NCCL_SUCCESS)
    fprintf(stderr, "epx-bench: baseline: NCCL %d.%d.%d from %s\n", version / 10000,
            version / 100 % 100, version % 100, nccl_path);
  benchNcclId nid;
  if (nccl_failed(nccl.get_unique_id(&nid), "ncclGetUniqueId")) return 1;
  memcpy(id, &nid, sizeof nid);
  return 0;
}

static int cuda_baseline_join(int rank, int nranks, const void *id) {
  if (nccl_load()) return 1;
  benchNcclId nid;
  memcpy(&nid, id, sizeof nid);
  void *comm = NULL;
  if (nccl_failed(nccl.comm_init_rank(&comm, nranks, nid, rank), "ncclCommInitRank")) return 1;
  nccl.comm = comm;
  return 0;
}

static int cuda_baseline_alltoall(const void *send, const size_t *send_off,
                                  const size_t *send_bytes, void *recv, const size_t *recv_off,
                                  const size_t *recv_bytes) {
  int R = rank_count; /* the arrays have one entry per rank */
  if (nccl_failed(nccl.group_start(), "ncclGroupStart")) return 1;
  int rc = 0;
  for (int r = 0; r < R && !rc; ++r) {
    if (send_bytes[r])
      rc = nccl_failed(nccl.send((const char *)send + send_off[r], send_bytes[r], NCCL_UINT8, r,
                                 nccl.comm, stream),
                       "ncclSend");
    if (!rc && recv_bytes[r])
      rc = nccl_failed(nccl.recv((char *)recv + recv_off[r], recv_bytes[r], NCCL_UINT8, r,
                                 nccl.comm, stream),
                       "ncclRecv");
  }
  rc |= nccl_failed(nccl.group_end(), "ncclGroupEnd");
  return rc;
}

static void cuda_baseline_leave(void) {
  if (nccl.comm) {
    cudaStreamSynchronize(stream);
    nccl.comm_destroy(nccl.comm);
  }
  nccl.comm = NULL;
}

const benchDevice bench_cuda_device = {
    .name = "cuda",
    .backend = epxBackendCuda,
    .host_addressable = 0,
    .default_ranks = cuda_default_ranks,
    .rank_setup = cuda_rank_setup,
    .rank_teardown = cuda_rank_teardown,
    .effective_sms = cuda_effective_sms,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .fill = cuda_fill,
    .stream = cuda_stream,
    .flush_cache = cuda_flush_cache,
    .timer_start = cuda_timer_start,
    .timer_stop_us = cuda_timer_stop_us,
    .wall_start = cuda_wall_start,
    .wall_stop_us = cuda_wall_stop_us,
    .baseline_unavailable = cuda_baseline_unavailable,
    .baseline_make_id = cuda_baseline_make_id,
    .baseline_join = cuda_baseline_join,
    .baseline_alltoall = cuda_baseline_alltoall,
    .baseline_leave = cuda_baseline_leave,
};
