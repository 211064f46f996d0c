/*
 * liveness.h - knowing that a peer will not arrive any more: process
 * liveness through /proc, the reasons a rank gives up and how they read, and
 * the liveness words a backend shares with its peers and its device.
 *
 * The host backend keeps its dead words in its own segments and polls peers'
 * processes inside its waits. The CUDA backend cannot poll /proc from a kernel:
 * it keeps one small segment per communicator (an epxLiveSlot per rank, mapped
 * by every rank and registered with CUDA so that kernels read the words), and
 * a watcher thread per communicator marks a peer whose process is gone.
 */
#ifndef EPX_CORE_LIVENESS_H
#define EPX_CORE_LIVENESS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Why a rank will not arrive any more (0: it may). The host backend's dead
 * words use the same values. */
enum {
  EPX_PEER_ALIVE = 0,
  EPX_PEER_ABORTED = 1,   /* epxCommAbort */
  EPX_PEER_FAILED = 2,    /* gave up after a fatal error (timeout, dead peer) */
  EPX_PEER_DESTROYED = 3, /* epxCommDestroy */
  EPX_PEER_EXITED = 4     /* its process is gone (seen by a peer's watcher, or at its exit) */
};

/* ---- processes ---- */

/* Reads /proc/<pid>/stat (pid 0: this process): start time (field 22, tells a
 * reused pid apart) and run state. Returns 1 on success, -1 when the process
 * does not exist, 0 when /proc could not tell (unreadable, out of
 * descriptors...). */
int epx_proc_stat(pid_t pid, uint64_t *start_time, char *state);

/* 1 when `pid` names, in this pid namespace, the process that started at
 * `start_time` (0 = unknown: never). Only such a pid may be watched: in
 * another namespace (containers sharing /dev/shm) it could name anything. */
int epx_proc_visible(pid_t pid, uint64_t start_time);

/* 0 when the process has certainly exited: kill(pid, 0) says so, or (with
 * read_proc) /proc shows it a zombie or the pid reused; 1 otherwise (alive,
 * or nothing certain). kill(pid, 0) succeeds on zombies, so read_proc is what
 * sees a killed child its parent has not reaped yet. */
int epx_proc_alive(pid_t pid, uint64_t start_time, int read_proc);

/* Why rank `rank` (process `pid`) will not arrive, in words, for error
 * messages: "rank 1 (pid 1234) exited or was killed", "rank 1 aborted its
 * communicator (epxCommAbort)", "rank 1 left the call after it lost rank 2
 * (...)". fail_peer / fail_code: for EPX_PEER_FAILED, the rank it lost (-1:
 * none known) and the code it returned. */
void epx_describe_dead(char *out, size_t len, int rank, int pid, unsigned why, int fail_peer,
                       int fail_code);

/* ---- liveness words ----
 *
 * One 32-bit word per rank holds everything, so that one compare-and-swap
 * makes the first reason stick: why (bits 0-7), the epxResult_t it returned
 * (bits 8-15) and the rank it lost plus one (bits 16-31: ranks < 65535). A
 * device reads the word of rank r at words + r * EPX_LIVE_SLOT_WORDS; nonzero
 * means "will not arrive". */
#define EPX_LIVE_SLOT_BYTES 64
#define EPX_LIVE_SLOT_WORDS (EPX_LIVE_SLOT_BYTES / 4)

typedef struct epxLiveSlot {
  uint32_t word;       /* 0, or epx_live_word(...) */
  int32_t pid;         /* informational: the rank's process */
  uint64_t start_time; /* informational: its /proc start time */
  uint8_t pad[EPX_LIVE_SLOT_BYTES - 16];
} epxLiveSlot;

static inline uint32_t epx_live_word(unsigned why, int fail_peer, int fail_code) {
  return (uint32_t)(why & 0xffu) | ((uint32_t)fail_code & 0xffu) << 8 |
         ((uint32_t)(fail_peer + 1) & 0xffffu) << 16;
}
static inline unsigned epx_live_why(uint32_t w) { return w & 0xffu; }
static inline int epx_live_fail_code(uint32_t w) { return (int)((w >> 8) & 0xffu); }
static inline int epx_live_fail_peer(uint32_t w) { return (int)(w >> 16) - 1; }

/* The liveness state of one communicator on one rank: the shared segment (if
 * any), an optional process-local mirror of it, what is known of every peer's
 * process, and the watcher thread. */
typedef struct epxLive epxLive;

/* Called by the watcher thread at every interval, before the peer checks
 * (the CUDA backend publishes its own device errors from it). */
typedef void (*epxLiveTickFn)(void *arg);

/* NULL when out of memory. */
epxLive *epx_live_new(int rank, int nranks);

/* The segment of a communicator: one rank creates it (before the others can
 * open it), the others open it, and once all have (or have given up) the
 * creator drops the name. Each returns 0, or nonzero with the reason in `why`;
 * without a segment the words are process-local (the mirror only). */
int epx_live_seg_create(epxLive *l, uint64_t uid, char *why, size_t len);
int epx_live_seg_open(epxLive *l, uint64_t uid, char *why, size_t len);
void epx_live_seg_unlink(epxLive *l);
/* The whole mapping (page-aligned, whole pages) and the first rank's slot in
 * it; NULL when there is no segment. */
void *epx_live_seg_mapping(const epxLive *l, size_t *bytes, size_t *slots_offset);

/* Bytes of a slot array for nranks (a mirror the caller allocates, zeroed). */
size_t epx_live_slots_bytes(int nranks);
/* Gives the live state a caller-owned, zeroed slot array kept in step with
 * the segment by the watcher (and the only words when there is no segment). */
void epx_live_set_mirror(epxLive *l, epxLiveSlot *mirror);

/* What is known of rank r's process; watch = 1 lets the watcher check it. */
void epx_live_set_peer(epxLive *l, int r, pid_t pid, uint64_t start_time, int watch);

/* Marks rank r as not arriving any more; the first reason stays. Returns 1
 * when this call set it. Safe from any thread (and from an atexit handler). */
int epx_live_mark(epxLive *l, int r, unsigned why, int fail_peer, int fail_code);
/* Rank r's word (0 = alive). */
uint32_t epx_live_get(const epxLive *l, int r);

/* Starts the watcher: every interval_ms it calls tick (if any), copies the
 * segment's words into the mirror (when both exist) and marks EXITED every
 * watched peer whose process is gone. Returns 0, or an errno. */
int epx_live_start(epxLive *l, int interval_ms, epxLiveTickFn tick, void *arg);

/* Stops the watcher and waits for it (promptly: it waits on a condition
 * variable); the words stay mapped. Idempotent; not concurrently with itself. */
void epx_live_stop(epxLive *l);

/* Stops the watcher (promptly: it waits on a condition variable), unmaps,
 * drops the name if this rank still holds it, frees. Never waits on peers. */
void epx_live_free(epxLive *l);

#ifdef __cplusplus
}
#endif

#endif /* EPX_CORE_LIVENESS_H */
