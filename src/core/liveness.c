/*
 * liveness.c - process liveness, dead-peer messages, and the liveness words
 * and watcher of a communicator (see liveness.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"
#include "core/liveness.h"
#include "core/posix_shm.h"

/* ---- processes ---- */

int epx_proc_stat(pid_t pid, uint64_t *start_time, char *state) {
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

int epx_proc_visible(pid_t pid, uint64_t start_time) {
  uint64_t start = 0;
  return pid > 0 && start_time != 0 && epx_proc_stat(pid, &start, NULL) > 0 &&
         start == start_time;
}

int epx_proc_alive(pid_t pid, uint64_t start_time, int read_proc) {
  if (kill(pid, 0) != 0 && errno == ESRCH) return 0;
  if (!read_proc) return 1;
  uint64_t start = 0;
  char state = '?';
  int known = epx_proc_stat(pid, &start, &state);
  if (known < 0) return 0;
  if (known == 0) return 1; /* /proc could not tell: rely on the other checks */
  if (state == 'Z' || state == 'X') return 0; /* exited, not yet reaped */
  return start == start_time;
}

void epx_describe_dead(char *out, size_t len, int rank, int pid, unsigned why, int fail_peer,
                       int fail_code) {
  switch (why) {
    case EPX_PEER_ABORTED:
      snprintf(out, len, "rank %d aborted its communicator (epxCommAbort)", rank);
      break;
    case EPX_PEER_DESTROYED:
      snprintf(out, len, "rank %d destroyed its communicator", rank);
      break;
    case EPX_PEER_EXITED:
      snprintf(out, len, "rank %d (pid %d) exited or was killed", rank, pid);
      break;
    case EPX_PEER_FAILED:
      if (fail_peer >= 0)
        snprintf(out, len, "rank %d left the call after it lost rank %d (%s)", rank, fail_peer,
                 epxGetErrorString((epxResult_t)fail_code));
      else
        snprintf(out, len, "rank %d left the call after a fatal error", rank);
      break;
    default:
      snprintf(out, len, "rank %d stopped (reason %u)", rank, why);
      break;
  }
}

/* ---- liveness words ---- */

#define LIVE_MAGIC 0x004550584c495645ull /* "EPXLIVE" */

/* Slot 0 of a segment is this header; rank r's slot is r + 1. */
typedef struct liveHeader {
  uint64_t magic;
  int32_t nranks;
  int32_t version;
} liveHeader;

struct epxLive {
  int rank, nranks;
  /* the segment */
  void *seg;
  size_t seg_bytes;
  epxLiveSlot *shared; /* [R] inside seg; NULL without a segment */
  char name[64];
  int named; /* this rank created the name and has not dropped it yet */
  /* the process-local mirror (caller's memory) */
  epxLiveSlot *mirror;
  /* peers */
  pid_t *pid;
  uint64_t *start;
  unsigned char *watch;
  /* the watcher */
  pthread_t thread;
  int running;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int stop;
  int64_t interval_ns;
  epxLiveTickFn tick;
  void *tick_arg;
};

static uint32_t load_word(const epxLiveSlot *s) {
  return __atomic_load_n(&s->word, __ATOMIC_ACQUIRE);
}

/* Sets the word from 0 to w; returns 1 when this call did. */
static int cas_word(epxLiveSlot *s, uint32_t w) {
  uint32_t expected = 0;
  return __atomic_compare_exchange_n(&s->word, &expected, w, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE);
}

epxLive *epx_live_new(int rank, int nranks) {
  epxLive *l = calloc(1, sizeof *l);
  if (!l) return NULL;
  l->rank = rank;
  l->nranks = nranks;
  l->pid = calloc((size_t)nranks, sizeof *l->pid);
  l->start = calloc((size_t)nranks, sizeof *l->start);
  l->watch = calloc((size_t)nranks, 1);
  if (!l->pid || !l->start || !l->watch || pthread_mutex_init(&l->mu, NULL) != 0) {
    free(l->pid);
    free(l->start);
    free(l->watch);
    free(l);
    return NULL;
  }
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  int err = pthread_cond_init(&l->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (err != 0) {
    pthread_mutex_destroy(&l->mu);
    free(l->pid);
    free(l->start);
    free(l->watch);
    free(l);
    return NULL;
  }
  return l;
}

static size_t seg_bytes_for(int nranks) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  if (page == 0 || page > (1u << 24)) page = 4096;
  size_t b = (size_t)(nranks + 1) * EPX_LIVE_SLOT_BYTES;
  return (b + page - 1) / page * page;
}

static void seg_name(char *out, size_t len, uint64_t uid) {
  snprintf(out, len, "/epx-%016llx-live", (unsigned long long)uid);
}

int epx_live_seg_create(epxLive *l, uint64_t uid, char *why, size_t len) {
  const char *failed = "";
  seg_name(l->name, sizeof l->name, uid);
  size_t bytes = seg_bytes_for(l->nranks);
  void *base = NULL;
  int err = epx_shm_create(l->name, bytes, 1, &base, &failed);
  if (err) {
    snprintf(why, len, "%s of the %zu-byte segment %s failed: %s", failed, bytes, l->name,
             strerror(err));
    l->name[0] = '\0';
    return err;
  }
  /* Fresh pages are zero: every word says alive. */
  liveHeader *h = (liveHeader *)base;
  h->nranks = l->nranks;
  h->version = EPX_PROTOCOL_VERSION;
  __atomic_store_n(&h->magic, LIVE_MAGIC, __ATOMIC_RELEASE);
  l->seg = base;
  l->seg_bytes = bytes;
  l->shared = (epxLiveSlot *)((char *)base + EPX_LIVE_SLOT_BYTES);
  l->named = 1;
  return 0;
}

int epx_live_seg_open(epxLive *l, uint64_t uid, char *why, size_t len) {
  const char *failed = "";
  char name[64];
  seg_name(name, sizeof name, uid);
  size_t bytes = seg_bytes_for(l->nranks);
  void *base = NULL;
  long long actual = -1;
  int err = epx_shm_open(name, bytes, &base, &failed, &actual);
  if (err) {
    if (!strcmp(failed, "size"))
      snprintf(why, len, "segment %s has %lld bytes, expected %zu", name, actual, bytes);
    else
      snprintf(why, len, "%s of segment %s failed: %s", failed, name, strerror(err));
    return err;
  }
  const liveHeader *h = (const liveHeader *)base;
  if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != LIVE_MAGIC || h->nranks != l->nranks ||
      h->version != EPX_PROTOCOL_VERSION) {
    snprintf(why, len, "segment %s does not match (%d ranks, protocol %d; expected %d, %d)", name,
             h->nranks, h->version, l->nranks, EPX_PROTOCOL_VERSION);
    munmap(base, bytes);
    return EINVAL;
  }
  l->seg = base;
  l->seg_bytes = bytes;
  l->shared = (epxLiveSlot *)((char *)base + EPX_LIVE_SLOT_BYTES);
  return 0;
}

void epx_live_seg_unlink(epxLive *l) {
  if (l && l->named) {
    shm_unlink(l->name);
    l->named = 0;
  }
}

void *epx_live_seg_mapping(const epxLive *l, size_t *bytes, size_t *slots_offset) {
  if (!l || !l->seg) return NULL;
  *bytes = l->seg_bytes;
  *slots_offset = EPX_LIVE_SLOT_BYTES;
  return l->seg;
}

size_t epx_live_slots_bytes(int nranks) { return (size_t)nranks * EPX_LIVE_SLOT_BYTES; }

void epx_live_set_mirror(epxLive *l, epxLiveSlot *mirror) { l->mirror = mirror; }

void epx_live_set_peer(epxLive *l, int r, pid_t pid, uint64_t start_time, int watch) {
  l->pid[r] = pid;
  l->start[r] = start_time;
  l->watch[r] = (unsigned char)(watch != 0);
  if (l->shared && r == l->rank) {
    l->shared[r].pid = (int32_t)pid;
    l->shared[r].start_time = start_time;
  }
}

int epx_live_mark(epxLive *l, int r, unsigned why, int fail_peer, int fail_code) {
  if (!l || r < 0 || r >= l->nranks) return 0;
  uint32_t w = epx_live_word(why, fail_peer, fail_code);
  int set = 0;
  if (l->shared) {
    set = cas_word(&l->shared[r], w);
    w = load_word(&l->shared[r]); /* the first reason, ours or an earlier one */
  }
  if (l->mirror) {
    int m = cas_word(&l->mirror[r], w);
    if (!l->shared) set = m;
  }
  return set;
}

uint32_t epx_live_get(const epxLive *l, int r) {
  if (!l || r < 0 || r >= l->nranks) return 0;
  if (l->shared) return load_word(&l->shared[r]);
  if (l->mirror) return load_word(&l->mirror[r]);
  return 0;
}

/* One round of the watcher. */
static void watch_once(epxLive *l) {
  if (l->tick) l->tick(l->tick_arg);
  for (int q = 0; q < l->nranks; ++q) {
    if (l->shared && l->mirror) {
      uint32_t w = load_word(&l->shared[q]);
      if (w) cas_word(&l->mirror[q], w);
    }
    if (q == l->rank || !l->watch[q] || epx_live_get(l, q) != 0) continue;
    if (!epx_proc_alive(l->pid[q], l->start[q], 1))
      epx_live_mark(l, q, EPX_PEER_EXITED, -1, 0);
  }
}

static void *watcher_main(void *arg) {
  epxLive *l = arg;
  struct timespec next;
  clock_gettime(CLOCK_MONOTONIC, &next);
  pthread_mutex_lock(&l->mu);
  while (!l->stop) {
    int64_t ns = (int64_t)next.tv_nsec + l->interval_ns;
    next.tv_sec += (time_t)(ns / 1000000000);
    next.tv_nsec = (long)(ns % 1000000000);
    while (!l->stop) {
      int rc = pthread_cond_timedwait(&l->cv, &l->mu, &next);
      if (rc == ETIMEDOUT) break;
    }
    if (l->stop) break;
    pthread_mutex_unlock(&l->mu);
    watch_once(l);
    pthread_mutex_lock(&l->mu);
    /* A late round (a stopped process, a slow /proc) does not queue up rounds. */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec > next.tv_sec || (now.tv_sec == next.tv_sec && now.tv_nsec > next.tv_nsec))
      next = now;
  }
  pthread_mutex_unlock(&l->mu);
  return NULL;
}

int epx_live_start(epxLive *l, int interval_ms, epxLiveTickFn tick, void *arg) {
  if (l->running || interval_ms <= 0) return EINVAL;
  l->interval_ns = (int64_t)interval_ms * 1000000;
  l->tick = tick;
  l->tick_arg = arg;
  l->stop = 0;
  /* The watcher takes no signals: they stay with the application's threads. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int err = pthread_create(&l->thread, NULL, watcher_main, l);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (err == 0) l->running = 1;
  return err;
}

void epx_live_stop(epxLive *l) {
  if (!l || !l->running) return;
  pthread_mutex_lock(&l->mu);
  l->stop = 1;
  pthread_cond_signal(&l->cv);
  pthread_mutex_unlock(&l->mu);
  pthread_join(l->thread, NULL);
  l->running = 0;
}

void epx_live_free(epxLive *l) {
  if (!l) return;
  epx_live_stop(l);
  epx_live_seg_unlink(l);
  if (l->seg) munmap(l->seg, l->seg_bytes);
  pthread_cond_destroy(&l->cv);
  pthread_mutex_destroy(&l->mu);
  free(l->pid);
  free(l->start);
  free(l->watch);
  free(l);
}
