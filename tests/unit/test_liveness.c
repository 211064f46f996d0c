/*
 * test_liveness.c - src/core/liveness.c and posix_shm.c without a GPU: /proc
 * liveness (zombies, reused pids), the packed liveness words and their first
 * reason, the shared segment seen from two mappings, the watcher marking a
 * killed process (through the segment and through a process-local mirror),
 * and a watcher that stops at once however long its interval.
 */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/harness.h"
#include "core/internal.h"
#include "core/liveness.h"
#include "core/posix_shm.h"

static int failures;

#define CHECK(cond, ...) EPX_TEST_CHECK(failures, NULL, cond, __VA_ARGS__)

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

/* A child that waits to be killed. */
static pid_t spawn_sleeper(void) {
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    for (;;) pause();
  }
  return pid;
}

/* A fresh, unused communicator id for segment names. */
static uint64_t test_uid(int salt) {
  return ((uint64_t)getpid() << 20) ^ (uint64_t)time(NULL) ^ ((uint64_t)salt << 48) ^
         0x5eed0000ull;
}

static int segment_exists(uint64_t uid) {
  char path[96];
  snprintf(path, sizeof path, "/dev/shm/epx-%016llx-live", (unsigned long long)uid);
  return access(path, F_OK) == 0;
}

static void processes(void) {
  uint64_t self_start = 0;
  char state = '?';
  CHECK(epx_proc_stat(0, &self_start, &state) == 1, "own /proc/self/stat");
  CHECK(self_start > 0 && state == 'R', "own start %llu, state %c", (unsigned long long)self_start,
        state);
  CHECK(epx_proc_visible(getpid(), self_start), "own pid visible");
  CHECK(!epx_proc_visible(getpid(), self_start + 1), "another start time: not this process");
  CHECK(!epx_proc_visible(getpid(), 0), "unknown start time: never watched");
  CHECK(epx_proc_alive(getpid(), self_start, 1), "this process is alive");
  CHECK(!epx_proc_alive(getpid(), self_start + 7, 1), "a reused pid reads as gone");

  pid_t child = spawn_sleeper();
  CHECK(child > 0, "fork");
  if (child <= 0) return;
  uint64_t start = 0;
  CHECK(epx_proc_stat(child, &start, NULL) == 1, "child's stat");
  CHECK(epx_proc_alive(child, start, 1), "child alive");
  kill(child, SIGKILL);
  /* A zombie until reaped: kill(pid, 0) still succeeds, /proc says 'Z'. */
  int gone = 0;
  for (int i = 0; i < 1000 && !gone; ++i) {
    gone = !epx_proc_alive(child, start, 1);
    if (!gone) sleep_ms(1);
  }
  CHECK(gone, "killed child (a zombie) seen as gone through /proc");
  CHECK(epx_proc_alive(child, start, 0), "without /proc a zombie still looks alive");
  waitpid(child, NULL, 0);
  CHECK(!epx_proc_alive(child, start, 0), "reaped child gone for kill(pid, 0)");
  CHECK(epx_proc_stat(child, NULL, NULL) == -1, "reaped child has no /proc entry");
}

static void words(void) {
  uint32_t w = epx_live_word(EPX_PEER_FAILED, 5, epxTimeout);
  CHECK(w != 0, "a failed word is nonzero");
  CHECK(epx_live_why(w) == EPX_PEER_FAILED && epx_live_fail_peer(w) == 5 &&
            epx_live_fail_code(w) == epxTimeout,
        "round trip: %u %d %d", epx_live_why(w), epx_live_fail_peer(w), epx_live_fail_code(w));
  w = epx_live_word(EPX_PEER_EXITED, -1, 0);
  CHECK(epx_live_why(w) == EPX_PEER_EXITED && epx_live_fail_peer(w) == -1, "no peer: -1");
  CHECK(sizeof(epxLiveSlot) == EPX_LIVE_SLOT_BYTES, "slot size %zu", sizeof(epxLiveSlot));

  char msg[200];
  epx_describe_dead(msg, sizeof msg, 1, 1234, EPX_PEER_EXITED, -1, 0);
  CHECK(!strcmp(msg, "rank 1 (pid 1234) exited or was killed"), "%s", msg);
  epx_describe_dead(msg, sizeof msg, 1, 1234, EPX_PEER_ABORTED, -1, epxAborted);
  CHECK(!strcmp(msg, "rank 1 aborted its communicator (epxCommAbort)"), "%s", msg);
  epx_describe_dead(msg, sizeof msg, 2, 1, EPX_PEER_DESTROYED, -1, 0);
  CHECK(!strcmp(msg, "rank 2 destroyed its communicator"), "%s", msg);
  epx_describe_dead(msg, sizeof msg, 0, 1, EPX_PEER_FAILED, 3, epxPeerFailed);
  CHECK(strstr(msg, "rank 0 left the call after it lost rank 3 (") != NULL, "%s", msg);
  epx_describe_dead(msg, sizeof msg, 0, 1, EPX_PEER_FAILED, -1, epxTimeout);
  CHECK(!strcmp(msg, "rank 0 left the call after a fatal error"), "%s", msg);
}

static void segment(void) {
  uint64_t uid = test_uid(1);
  char why[256] = "";
  epxLive *a = epx_live_new(0, 3), *b = epx_live_new(1, 3);
  CHECK(a && b, "allocation");
  if (!a || !b) return;
  CHECK(epx_live_seg_create(a, uid, why, sizeof why) == 0, "create: %s", why);
  CHECK(segment_exists(uid), "the segment has its name until every rank mapped it");
  CHECK(epx_live_seg_open(b, uid, why, sizeof why) == 0, "open: %s", why);
  epxLive *c = epx_live_new(1, 4);
  CHECK(c && epx_live_seg_open(c, uid, why, sizeof why) != 0, "another rank count is refused");
  epx_live_free(c);
  size_t bytes = 0, off = 0;
  void *m = epx_live_seg_mapping(b, &bytes, &off);
  CHECK(m && bytes % 4096 == 0 && off == EPX_LIVE_SLOT_BYTES, "mapping %zu bytes, slots at %zu",
        bytes, off);
  epx_live_seg_unlink(a);
  CHECK(!segment_exists(uid), "the name is gone after the unlink");
  for (int r = 0; r < 3; ++r) CHECK(epx_live_get(a, r) == 0 && epx_live_get(b, r) == 0, "alive");
  /* The first reason stays, whoever marks. */
  CHECK(epx_live_mark(b, 1, EPX_PEER_FAILED, 2, epxTimeout) == 1, "first mark sets");
  CHECK(epx_live_mark(b, 1, EPX_PEER_ABORTED, -1, epxAborted) == 0, "second mark does not");
  uint32_t w = epx_live_get(a, 1);
  CHECK(epx_live_why(w) == EPX_PEER_FAILED && epx_live_fail_peer(w) == 2, "seen through the "
        "other mapping: why %u peer %d", epx_live_why(w), epx_live_fail_peer(w));
  CHECK(epx_live_mark(a, 2, EPX_PEER_DESTROYED, -1, 0) == 1, "mark rank 2");
  CHECK(epx_live_why(epx_live_get(b, 2)) == EPX_PEER_DESTROYED, "destroy seen");
  CHECK(epx_live_get(b, 0) == 0, "rank 0 untouched");
  /* A mirror next to the segment takes the same first reason. */
  epxLiveSlot *mirror = calloc(3, sizeof *mirror);
  epx_live_set_mirror(b, mirror);
  epx_live_mark(b, 0, EPX_PEER_ABORTED, -1, epxAborted);
  CHECK(epx_live_why(mirror[0].word) == EPX_PEER_ABORTED, "mirror follows the segment");
  epx_live_free(a);
  epx_live_free(b);
  free(mirror);
  /* A stale segment of the same name (a crashed creator) is replaced. */
  const char *failed = "";
  void *base = NULL;
  char name[64];
  snprintf(name, sizeof name, "/epx-%016llx-live", (unsigned long long)uid);
  CHECK(epx_shm_create(name, 100, 0, &base, &failed) == 0, "stale one: %s", failed);
  epxLive *d = epx_live_new(0, 2);
  CHECK(d && epx_live_seg_create(d, uid, why, sizeof why) == 0, "create over a stale one: %s", why);
  long long actual = 0;
  void *e = NULL;
  CHECK(epx_shm_open(name, 100, &e, &failed, &actual) == EINVAL && !strcmp(failed, "size") &&
            actual == 4096,
        "size mismatch: %s %lld", failed, actual);
  epx_live_free(d);
  CHECK(!segment_exists(uid), "free drops a name still held");
  if (base) munmap(base, 100);
}

/* Waits up to limit_ms for rank r's word to become nonzero; returns ms or -1. */
static int wait_marked(epxLive *l, int r, int limit_ms) {
  double t0 = epx_test_now();
  while (epx_live_get(l, r) == 0) {
    if ((epx_test_now() - t0) * 1e3 > limit_ms) return -1;
    sleep_ms(1);
  }
  return (int)((epx_test_now() - t0) * 1e3);
}

static int ticks;
static void count_tick(void *arg) { __atomic_add_fetch((int *)arg, 1, __ATOMIC_RELAXED); }

static void watcher(int with_segment) {
  pid_t child = spawn_sleeper();
  CHECK(child > 0, "fork");
  if (child <= 0) return;
  uint64_t start = 0;
  epx_proc_stat(child, &start, NULL);
  uint64_t own = 0;
  epx_proc_stat(0, &own, NULL);
  char why[256] = "";
  epxLive *l = epx_live_new(0, 3);
  epxLiveSlot *mirror = NULL;
  if (with_segment) {
    CHECK(epx_live_seg_create(l, test_uid(2), why, sizeof why) == 0, "create: %s", why);
    epx_live_seg_unlink(l);
  } else {
    mirror = calloc(3, sizeof *mirror);
    epx_live_set_mirror(l, mirror);
  }
  epx_live_set_peer(l, 0, getpid(), own, 0);
  epx_live_set_peer(l, 1, child, start, 1);
  /* rank 2: a pid from another namespace (not visible): never watched */
  epx_live_set_peer(l, 2, 999999, 12345, 0);
  ticks = 0;
  CHECK(epx_live_start(l, 10, count_tick, &ticks) == 0, "start");
  sleep_ms(50);
  CHECK(epx_live_get(l, 1) == 0, "a live peer is not marked");
  double t_kill = epx_test_now();
  kill(child, SIGKILL); /* not reaped: the watcher must see the zombie */
  int ms = wait_marked(l, 1, 2000);
  CHECK(ms >= 0, "the killed peer was marked within 2 s");
  uint32_t w = epx_live_get(l, 1);
  CHECK(epx_live_why(w) == EPX_PEER_EXITED, "marked EXITED (%u)", epx_live_why(w));
  if (mirror)
    CHECK(__atomic_load_n(&mirror[1].word, __ATOMIC_ACQUIRE) == w, "the mirror holds the mark");
  CHECK(epx_live_get(l, 0) == 0 && epx_live_get(l, 2) == 0, "others untouched");
  CHECK(__atomic_load_n(&ticks, __ATOMIC_RELAXED) >= 3, "the tick ran (%d)", ticks);
  printf("  watcher (%s): killed peer marked %.1f ms after SIGKILL (10 ms interval)\n",
         with_segment ? "segment" : "mirror", (epx_test_now() - t_kill) * 1e3);
  double t0 = epx_test_now();
  epx_live_free(l);
  double stop_ms = (epx_test_now() - t0) * 1e3;
  CHECK(stop_ms < 100, "free took %.1f ms", stop_ms);
  free(mirror);
  waitpid(child, NULL, 0);
}

static void watcher_segment(void) { watcher(1); }
static void watcher_mirror(void) { watcher(0); }

static void watcher_stops_at_once(void) {
  epxLive *l = epx_live_new(0, 2);
  CHECK(epx_live_start(l, 60000, NULL, NULL) == 0, "start");
  CHECK(epx_live_start(l, 10, NULL, NULL) != 0, "a second start is refused");
  sleep_ms(20);
  double t0 = epx_test_now();
  epx_live_free(l);
  double ms = (epx_test_now() - t0) * 1e3;
  CHECK(ms < 100, "a 60 s watcher stopped in %.1f ms", ms);
  epxLive *n = epx_live_new(0, 2);
  CHECK(epx_live_start(n, 0, NULL, NULL) != 0, "interval 0: no watcher");
  epx_live_free(n);
}

/* Segments named "epx-...-live" in /dev/shm. */
static int count_live_segments(void) {
  DIR *d = opendir("/dev/shm");
  if (!d) return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)))
    if (!strncmp(e->d_name, "epx-", 4) && strstr(e->d_name, "-live")) ++n;
  closedir(d);
  return n;
}

int main(void) {
  int before = count_live_segments();
  static const epx_test_unit units[] = {
      {"processes", processes},
      {"words", words},
      {"segment", segment},
      {"watcher_segment", watcher_segment},
      {"watcher_mirror", watcher_mirror},
      {"watcher_stops_at_once", watcher_stops_at_once},
  };
  int rc = epx_test_run_units(units, sizeof units / sizeof units[0], &failures);
  int after = count_live_segments();
  if (rc == 0 && before >= 0 && after > before) {
    printf("FAIL %d liveness segments left in /dev/shm\n", after - before);
    rc = 1;
  }
  return rc;
}
