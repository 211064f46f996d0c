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
 * counts the GPUs, and reads the first one's name (the default machine kind, e.g.
 * nvidia-h200-x2, as tools/gpu-check names it), in a short-lived child of its own.
 *
 * The start gate (bench.h): each rank maps the shared gate page with cudaHostRegister
 * (cudaHostRegisterMapped) and enqueues bench_gate.cu's kernel before the start event; the
 * kernel gives up after GATE_TIMEOUT_NS of wall time and says so in the page, and the timer
 * then reports the iteration failed (never a hang, never a trap).
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
#include "bench_gate.h"

/* Larger than any GPU's L2 (H100/H200: 50 MiB, B200: 126 MiB). */
#define CUDA_FLUSH_BYTES ((size_t)256 << 20)
/* Seconds the parent waits for its GPU-counting child. */
#define COUNT_TIMEOUT_S 60
/* Wall time a gate waits for rank 0's release before it gives up (ns). A release comes
 * microseconds after the last rank has enqueued its call; this only bounds a lost one. */
#define GATE_TIMEOUT_NS 10000000000ull

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
static char gpu_name[256]; /* of device 0, as CUDA names it ("NVIDIA H200") */
static char machine_name[300];
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
/* The gate: the registered page, and device views of its words. */
static void *gate_page;
static uint32_t *gate_go_dev, *gate_timed_out_dev;
static volatile uint32_t *gate_timed_out_host;

static int cuda_failed(cudaError_t e, const char *what) {
  if (e == cudaSuccess) return 0;
  fprintf(stderr, "epx-bench: %s: %s\n", what, cudaGetErrorString(e));
  return 1;
}

/* --------------------------------------------------------- the parent */

/* What the counting child writes into the pipe. */
typedef struct gpuCount {
  int n;
  char name[256];
} gpuCount;

/* GPUs visible (and device 0's name), counted in a child so that this process never
 * initialises CUDA. */
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
    gpuCount c;
    memset(&c, 0, sizeof c);
    if (cudaGetDeviceCount(&c.n) != cudaSuccess) c.n = 0;
    struct cudaDeviceProp prop;
    if (c.n > 0 && cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
      snprintf(c.name, sizeof c.name, "%s", prop.name);
    ssize_t w = write(fds[1], &c, sizeof c);
    _exit(w == (ssize_t)sizeof c ? 0 : 1);
  }
  close(fds[1]);
  gpuCount c;
  memset(&c, 0, sizeof c);
  size_t have = 0;
  while (have < sizeof c) { /* one write of a few hundred bytes: atomic, but be sure */
    ssize_t got = read(fds[0], (char *)&c + have, sizeof c - have);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    have += (size_t)got;
  }
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  gpu_count = have == sizeof c && c.n > 0 ? c.n : 0;
  if (gpu_count > 0) {
    c.name[sizeof c.name - 1] = 0;
    snprintf(gpu_name, sizeof gpu_name, "%s", c.name);
  }
  return gpu_count;
}

/* "<GPU name, lower case, runs of other characters as '-'>-x<GPUs>", as tools/gpu-check and
 * tools/bench name the machine kind: "NVIDIA H200" x 2 -> nvidia-h200-x2. NULL without GPUs. */
static const char *cuda_default_machine(void) {
  int n = count_gpus();
  if (n <= 0 || !gpu_name[0]) return NULL;
  char slug[sizeof gpu_name];
  size_t len = 0;
  for (const char *c = gpu_name; *c; ++c) {
    char ch = *c;
    if (ch >= 'A' && ch <= 'Z') ch = (char)(ch - 'A' + 'a');
    if ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9'))
      slug[len++] = ch;
    else if (len > 0 && slug[len - 1] != '-')
      slug[len++] = '-';
  }
  while (len > 0 && slug[len - 1] == '-') --len;
  slug[len] = 0;
  if (!len) return NULL;
  /* the device kinds' names: nvidia-h200 for one GPU, nvidia-h200-x4 for four */
  if (n == 1)
    snprintf(machine_name, sizeof machine_name, "%s", slug);
  else
    snprintf(machine_name, sizeof machine_name, "%s-x%d", slug, n);
  return machine_name;
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

static void cuda_gate_detach(void);

static void cuda_rank_teardown(void) {
  cuda_gate_detach();
  if (stream) cudaStreamSynchronize(stream);
  if (flush_buf) cudaFree(flush_buf);
  if (ev_start) cudaEventDestroy(ev_start);
  if (ev_stop) cudaEventDestroy(ev_stop);
  if (stream) cudaStreamDestroy(stream);
  flush_buf = NULL;
  ev_start = ev_stop = NULL;
  stream = NULL;
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

static int cuda_sync(void) {
  return cuda_failed(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

/* ------------------------------------------------------------ the gate */

static const char *cuda_gate_attach(void *page, size_t bytes, volatile uint32_t *go,
                                    volatile uint32_t *timed_out) {
  static char why[256];
  const char *off = getenv("EPX_BENCH_NO_GATE");
  if (off && *off && strcmp(off, "0") != 0) return "EPX_BENCH_NO_GATE is set";
  cudaError_t e = bench_gate_prepare();
  if (e != cudaSuccess) {
    cudaGetLastError();
    snprintf(why, sizeof why, "the gate kernel: %s", cudaGetErrorString(e));
    return why;
  }
  e = cudaHostRegister(page, bytes, cudaHostRegisterMapped);
  if (e != cudaSuccess) {
    cudaGetLastError(); /* not sticky, but leave no error for the next check */
    snprintf(why, sizeof why, "cudaHostRegister of the shared gate page: %s",
             cudaGetErrorString(e));
    return why;
  }
  void *go_dev = NULL, *to_dev = NULL;
  e = cudaHostGetDevicePointer(&go_dev, (void *)go, 0);
  if (e == cudaSuccess) e = cudaHostGetDevicePointer(&to_dev, (void *)timed_out, 0);
  if (e != cudaSuccess) {
    cudaGetLastError();
    cudaHostUnregister(page);
    snprintf(why, sizeof why, "cudaHostGetDevicePointer of the gate page: %s",
             cudaGetErrorString(e));
    return why;
  }
  gate_page = page;
  gate_go_dev = go_dev;
  gate_timed_out_dev = to_dev;
  gate_timed_out_host = timed_out;
  *gate_timed_out_host = 0;
  return NULL;
}

static void cuda_gate_detach(void) {
  if (!gate_page) return;
  if (stream) cudaStreamSynchronize(stream);
  cudaHostUnregister(gate_page);
  gate_page = NULL;
  gate_go_dev = gate_timed_out_dev = NULL;
  gate_timed_out_host = NULL;
}

static int cuda_gate_enqueue(uint32_t gen) {
  if (!gate_page) {
    fprintf(stderr, "epx-bench: the gate is not attached\n");
    return 1;
  }
  return cuda_failed(bench_gate_launch(gate_go_dev, gen, gate_timed_out_dev, GATE_TIMEOUT_NS,
                                       stream),
                     "gate kernel launch");
}

static void cuda_gate_timer_stop(void) {
  cuda_failed(cudaEventRecord(ev_stop, stream), "cudaEventRecord");
}

static double cuda_gate_timer_read_us(uint32_t gen) {
  float ms = 0.0f;
  if (cuda_failed(cudaEventSynchronize(ev_stop), "cudaEventSynchronize") ||
      cuda_failed(cudaEventElapsedTime(&ms, ev_start, ev_stop), "cudaEventElapsedTime"))
    return -1.0;
  if (gate_timed_out_host && *gate_timed_out_host == gen) {
    fprintf(stderr,
            "epx-bench: the start gate of iteration %u gave up after %.0f s without a release "
            "(a rank lost, or a call that waits for the GPU inside)\n",
            (unsigned)gen, (double)GATE_TIMEOUT_NS * 1e-9);
    return -1.0;
  }
  return (double)ms * 1e3;
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
    .default_machine = cuda_default_machine,
    .rank_setup = cuda_rank_setup,
    .rank_teardown = cuda_rank_teardown,
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
    .sync = cuda_sync,
    .gate_attach = cuda_gate_attach,
    .gate_detach = cuda_gate_detach,
    .gate_enqueue = cuda_gate_enqueue,
    .gate_timer_stop = cuda_gate_timer_stop,
    .gate_timer_read_us = cuda_gate_timer_read_us,
    .baseline_unavailable = cuda_baseline_unavailable,
    .baseline_make_id = cuda_baseline_make_id,
    .baseline_join = cuda_baseline_join,
    .baseline_alltoall = cuda_baseline_alltoall,
    .baseline_leave = cuda_baseline_leave,
};
