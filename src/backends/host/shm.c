/*
 * shm.c - POSIX shared-memory segments of the host backend and their layout.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backends/host/shm.h"
#include "common/layout_math.h"

size_t epx_host_align(size_t n) {
  return (n + EPX_HOST_ALIGN - 1) / EPX_HOST_ALIGN * EPX_HOST_ALIGN;
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

void epx_host_seg_layout(hostSegLayout *l, int nranks, int num_experts, int hidden, int max_topk,
                         int chunk, int ll_tokens) {
  memset(l, 0, sizeof *l);
  l->nranks = nranks;
  l->num_experts = num_experts;
  l->hidden = hidden;
  l->max_topk = max_topk;
  l->chunk = chunk;
  l->ll_tokens = ll_tokens;
  size_t R = (size_t)nranks, C = (size_t)chunk, K = (size_t)max_topk;
  size_t bf16_row = epx_payload_row_bytes(hidden, 0);
  /* Both scale formats are 4-byte words; reserve the wider row. */
  size_t scale_row = max_size(epx_scale_row_bytes(hidden, epxScalesFloat32),
                              epx_scale_row_bytes(hidden, epxScalesUE8M0));
  size_t off = epx_host_align(sizeof(hostCtrl));

  l->hdr_counts_off = epx_host_align(sizeof(hostHeader));
  l->hdr_ecounts_off = l->hdr_counts_off + epx_host_align(R * sizeof(int32_t));
  l->hdr_slot_bytes = l->hdr_ecounts_off + epx_host_align((size_t)num_experts * sizeof(int32_t));
  l->hdr_off = off;
  off += 2 * l->hdr_slot_bytes;

  /* A dispatch window holds C source tokens; a BF16 row bounds an FP8 one. */
  size_t w = 0;
  l->win_bitmap_off = w;
  w += epx_host_align(C * R);
  l->win_payload_off = w;
  w += epx_host_align(C * bf16_row);
  l->win_scales_off = w;
  w += epx_host_align(C * scale_row);
  l->win_topk_off = w;
  w += epx_host_align(C * K * sizeof(int32_t));
  l->win_weights_off = w;
  w += epx_host_align(C * K * sizeof(float));
  /* A combine inbox has a slot for every (receiving rank, window token). */
  size_t in = 0;
  l->inbox_x_off = in;
  in += epx_host_align(R * C * bf16_row);
  l->inbox_w_off = in;
  in += epx_host_align(R * C * K * sizeof(float));
  l->norm_buf_bytes = max_size(w, in);
  l->norm_off = off;
  off += 2 * l->norm_buf_bytes;

  l->ll_off = off;
  if (ll_tokens > 0) {
    size_t T = (size_t)ll_tokens, d = 0;
    l->ll_payload_off = d;
    d += epx_host_align(T * bf16_row);
    l->ll_scales_off = d;
    d += epx_host_align(T * scale_row);
    l->ll_topk_off = d;
    d += epx_host_align(T * K * sizeof(int32_t));
    /* combine inbox: one BF16 row per (token, top-k slot) */
    size_t c = epx_host_align(T * K * bf16_row);
    l->ll_slot_bytes = max_size(d, c);
    off += 2 * l->ll_slot_bytes;
  }
  l->total_bytes = off;
}

int epx_host_proc_stat(pid_t pid, uint64_t *start_time, char *state) {
  char path[64], buf[1024];
  if (pid > 0)
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  else
    snprintf(path, sizeof path, "/proc/self/stat");
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return (errno == ENOENT || errno == ESRCH) ? -1 : 0;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  int read_errno = errno;
  close(fd);
  if (n < 0 && read_errno == ESRCH) return -1; /* exited between open and read */
  if (n <= 0) return 0;
  buf[n] = '\0';
  /* The command name may hold spaces and parentheses: fields start after the last ')'. */
  char *p = strrchr(buf, ')');
  if (!p || p[1] != ' ') return 0;
  p += 2;
  if (state) *state = *p;
  /* starttime is field 22; the state is field 3. */
  for (int field = 3; field < 22; ++field) {
    p = strchr(p, ' ');
    if (!p) return 0;
    ++p;
  }
  if (start_time) *start_time = strtoull(p, NULL, 10);
  return 1;
}

epxResult_t epx_host_seg_create(epxComm_t comm, const char *name, size_t bytes, void **base) {
  *base = NULL;
  int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0 && errno == EEXIST) {
    /* Only a crashed communicator with the same random id could have left it. */
    shm_unlink(name);
    fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  }
  if (fd < 0)
    return epx_error(comm, epxSystemError, "shm_open(%s) failed: %s", name, strerror(errno));
  epxResult_t res = epxSuccess;
  if (ftruncate(fd, (off_t)bytes) != 0) {
    res = epx_error(comm, epxSystemError, "ftruncate(%s, %zu) failed: %s", name, bytes,
                    strerror(errno));
    goto fail;
  }
  /* Reserve the pages now: a full /dev/shm should fail init with a message,
   * not kill a process with SIGBUS on first touch in the middle of a call. */
  int err = posix_fallocate(fd, 0, (off_t)bytes);
  if (err == ENOSPC || err == ENOMEM) {
    res = epx_error(comm, epxOutOfMemory,
                    "no room for the %zu-byte shared-memory segment %s (%s): enlarge /dev/shm or "
                    "lower EPX_HOST_CHUNK_TOKENS",
                    bytes, name, strerror(err));
    goto fail;
  }
  /* Other errors (EINVAL, EOPNOTSUPP) mean the filesystem cannot reserve; go on without. */
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    res = epx_error(comm, epxSystemError, "mmap of %s (%zu bytes) failed: %s", name, bytes,
                    strerror(errno));
    goto fail;
  }
  close(fd);
  *base = p;
  return epxSuccess;
fail:
  close(fd);
  shm_unlink(name);
  return res;
}

epxResult_t epx_host_seg_open(epxComm_t comm, const char *name, size_t bytes, void **base) {
  *base = NULL;
  int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
  if (fd < 0)
    return epx_error(comm, epxSystemError, "shm_open(%s) of a peer's segment failed: %s", name,
                     strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0 || (size_t)st.st_size != bytes) {
    close(fd);
    return epx_error(comm, epxMismatch,
                     "peer segment %s has %lld bytes, expected %zu: the ranks disagree on the "
                     "host backend's sizes",
                     name, (long long)st.st_size, bytes);
  }
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int saved = errno;
  close(fd);
  if (p == MAP_FAILED)
    return epx_error(comm, epxSystemError, "mmap of peer segment %s failed: %s", name,
                     strerror(saved));
  *base = p;
  return epxSuccess;
}
