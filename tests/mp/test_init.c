/*
 * test_init.c - communicator set-up on the host backend: init and info for
 * 1..8 ranks, the caller-supplied all-gather, static queries, invalid
 * configs, a rank that never arrives (R10), settings and versions that
 * differ between ranks (R7), a duplicate rank, and a fresh init after a
 * failed one.
 *
 *   test_init            run every case
 *   test_init NAME...    run the named cases
 */
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "common/harness.h"
#include "common/layout_math.h"
#include "common/world.h"
#include "core/comm.h" /* epxAgreement: the versions test changes one field in transit */

#define SPAWN_TIMEOUT_S 60
/* The deadline given to init when a rank is missing, and the slack allowed
 * on top of it before the test calls the error late. */
#define MISSING_RANK_BOOTSTRAP_MS 2000
#define LATE_SLACK_S 1.0

static int failures_in_main;

#define CHECK(cond, ...) EPX_TEST_CHECK(failures_in_main, NULL, cond, __VA_ARGS__)

static epxConfig_t base_config(void) {
  epxConfig_t c = EPX_CONFIG_INITIALIZER;
  c.backend = epxBackendHost;
  c.num_experts = 16;
  c.hidden = 256;
  c.max_topk = 4;
  c.max_tokens_per_rank = 64;
  c.ll_max_tokens_per_rank = 16;
  c.timeout_ms = 20000;
  return c;
}

/* ------------------------------------------------ init and info */

typedef struct info_case {
  int R, rpn;
} info_case;

static int rank_init_info(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const info_case *ic = arg;
  epxConfig_t cfg = base_config();
  cfg.num_experts = 8 * nranks;
  cfg.ranks_per_node = ic->rpn;
  epxComm_t comm;
  if (epx_test_comm_init(&comm, rank, nranks, id, &cfg)) return 1;
  epxCommInfo_t info;
  int f = 0;
  if (epxCommGetInfo(comm, &info) != epxSuccess) {
    fprintf(stderr, "  rank %d: epxCommGetInfo failed: %s\n", rank, epxCommGetLastError(comm));
    f = 1;
  } else {
    int rpn = ic->rpn ? ic->rpn : nranks;
    int ok = info.rank == rank && info.nranks == nranks && info.ranks_per_node == rpn &&
             info.num_nodes == nranks / rpn && info.num_experts == 8 * nranks &&
             info.num_local_experts == 8 && info.hidden == 256 && info.max_topk == 4 &&
             info.max_tokens_per_rank == 64 && info.ll_max_tokens_per_rank == 16 &&
             info.backend == epxBackendHost;
    if (!ok) {
      fprintf(stderr,
              "  rank %d: info rank %d nranks %d rpn %d nodes %d E %d El %d H %d K %d T %d llT %d "
              "backend %d\n",
              rank, info.rank, info.nranks, info.ranks_per_node, info.num_nodes, info.num_experts,
              info.num_local_experts, info.hidden, info.max_topk, info.max_tokens_per_rank,
              info.ll_max_tokens_per_rank, (int)info.backend);
      f = 1;
    }
  }
  epxResult_t async = epxNumResults;
  if (epxCommGetAsyncError(comm, &async) != epxSuccess || async != epxSuccess) {
    fprintf(stderr, "  rank %d: async error %d on a fresh communicator\n", rank, (int)async);
    f = 1;
  }
  const char *m = epxCommGetLastError(comm);
  if (!m || m[0]) {
    fprintf(stderr, "  rank %d: last error of a fresh communicator is \"%s\"\n", rank, m ? m : "(null)");
    f = 1;
  }
  /* handles come and go without collective calls */
  epxHandle_t h = NULL;
  if (epxHandleCreate(comm, &h) != epxSuccess) f = 1;
  epxHandleInfo_t hi;
  if (epxHandleGetInfo(h, &hi) != epxSuccess || hi.state != epxHandleEmpty || hi.recv_pending) f = 1;
  if (epxHandleReset(h) != epxSuccess) f = 1;
  if (epxHandleDestroy(h) != epxSuccess) f = 1;
  if (epxCommDestroy(comm) != epxSuccess) f = 1;
  return f;
}

/* ------------------------------------- all-gather through shared memory */

#define SHM_MAX_BYTES (64 * 1024)
#define SHM_MAX_RANKS 8
typedef struct shm_gather {
  atomic_int arrived; /* ranks that have written call i: reaches R * (i + 1) */
  int nranks;
  char data[2][SHM_MAX_RANKS][SHM_MAX_BYTES];
} shm_gather;

typedef struct gather_user {
  shm_gather *g;
  int rank;
  int calls;
} gather_user;

static int shm_allgather(void *user, const void *send, void *recv, size_t bytes) {
  gather_user *u = user;
  shm_gather *g = u->g;
  if (bytes > SHM_MAX_BYTES) return 1;
  int buf = u->calls % 2;
  memcpy(g->data[buf][u->rank], send, bytes);
  atomic_fetch_add(&g->arrived, 1);
  int target = g->nranks * (u->calls + 1);
  double deadline = epx_test_now() + 10.0;
  while (atomic_load(&g->arrived) < target) {
    if (epx_test_now() > deadline) return 1;
    struct timespec ts = {0, 100000};
    nanosleep(&ts, NULL);
  }
  for (int r = 0; r < g->nranks; ++r) memcpy((char *)recv + (size_t)r * bytes, g->data[buf][r], bytes);
  u->calls++;
  return 0;
}

static int rank_allgather_init(int rank, int nranks, const epxUniqueId *id, void *arg) {
  (void)id;
  gather_user u = {arg, rank, 0};
  epxConfig_t cfg = base_config();
  epxComm_t comm = NULL;
  epxResult_t r = epxCommInitRankWithAllGather(&comm, nranks, rank, shm_allgather, &u, &cfg);
  if (r != epxSuccess) {
    fprintf(stderr, "  rank %d: epxCommInitRankWithAllGather: %s: %s\n", rank,
            epxGetErrorString(r), epxCommGetLastError(NULL));
    return 1;
  }
  /* the communicator works: a layout call and an all-(-1) notify */
  int f = 0;
  int64_t topk[2 * 4];
  for (int i = 0; i < 8; ++i) topk[i] = -1;
  topk[0] = (rank + 1) % nranks * (16 / nranks);
  epxHandle_t h;
  if (epxHandleCreate(comm, &h) != epxSuccess) return 1;
  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  a.x_type = epxBFloat16;
  a.topk_idx = topk;
  a.topk_idx_type = epxInt64;
  a.num_tokens = 2;
  a.hidden = 256;
  a.num_topk = 4;
  int64_t n = -1;
  r = epxDispatchNotify(comm, &a, h, &n, NULL, NULL);
  if (r != epxSuccess || n != 1) {
    fprintf(stderr, "  rank %d: notify over an all-gather communicator: %s, N_recv %" PRId64 ": %s\n",
            rank, epxGetErrorString(r), n, epxCommGetLastError(comm));
    f = 1;
  }
  epxHandleDestroy(h);
  epxCommDestroy(comm);
  return f;
}

/* ------------------------------------------------- a missing rank */

typedef struct missing_case {
  int R;
} missing_case;

static int rank_missing(int rank, int nranks_present, const epxUniqueId *id, void *arg) {
  const missing_case *mc = arg;
  (void)nranks_present;
  epxConfig_t cfg = base_config();
  cfg.num_experts = 8 * mc->R;
  cfg.bootstrap_timeout_ms = MISSING_RANK_BOOTSTRAP_MS;
  epxComm_t comm = (epxComm_t)(uintptr_t)1; /* must come back NULL */
  double t0 = epx_test_now();
  epxResult_t r = epxCommInitRank(&comm, mc->R, *id, rank, &cfg);
  double dt = epx_test_now() - t0;
  const char *m = epxCommGetLastError(NULL);
  int f = 0;
  if (r != epxTimeout) {
    fprintf(stderr, "  rank %d: init with rank %d missing returned %s (%s), expected epxTimeout\n",
            rank, mc->R - 1, epxGetErrorString(r), m);
    f = 1;
  }
  if (dt > MISSING_RANK_BOOTSTRAP_MS / 1000.0 + LATE_SLACK_S) {
    fprintf(stderr, "  rank %d: init failed after %.2f s (deadline %.1f s)\n", rank, dt,
            MISSING_RANK_BOOTSTRAP_MS / 1000.0);
    f = 1;
  }
  if (comm != NULL) {
    fprintf(stderr, "  rank %d: *comm is not NULL after a failed init\n", rank);
    f = 1;
  }
  if (!m || !*m) {
    fprintf(stderr, "  rank %d: no message after a failed init\n", rank);
    f = 1;
  } else {
    /* the message names the rank that never arrived */
    char missing[16];
    snprintf(missing, sizeof missing, "%d", mc->R - 1);
    if (!strstr(m, missing)) {
      fprintf(stderr, "  rank %d: message \"%s\" does not name the missing rank %d\n", rank, m,
              mc->R - 1);
      f = 1;
    }
  }
  if (rank == 0) printf("  (rank 0 failed after %.2f s: %s)\n", dt, m);
  return f;
}

/* ----------------------------------------------- settings that differ */

typedef enum field { F_HIDDEN, F_EXPERTS, F_MAX_TOKENS, F_LL_MAX_TOKENS, F_MAX_TOPK, F_RPN } field;
typedef struct mismatch_case {
  field f;
  int odd_rank;
  const char *name; /* the field name the message must contain */
} mismatch_case;

static int rank_mismatch(int rank, int nranks, const epxUniqueId *id, void *arg) {
  const mismatch_case *mc = arg;
  epxConfig_t cfg = base_config();
  cfg.num_experts = 8 * nranks;
  if (rank == mc->odd_rank) {
    switch (mc->f) {
      case F_HIDDEN: cfg.hidden = 512; break;
      case F_EXPERTS: cfg.num_experts = 16 * nranks; break;
      case F_MAX_TOKENS: cfg.max_tokens_per_rank = 128; break;
      case F_LL_MAX_TOKENS: cfg.ll_max_tokens_per_rank = 32; break;
      case F_MAX_TOPK: cfg.max_topk = 8; break;
      case F_RPN: cfg.ranks_per_node = 1; break;
    }
  }
  cfg.bootstrap_timeout_ms = 5000;
  epxComm_t comm = NULL;
  double t0 = epx_test_now();
  epxResult_t r = epxCommInitRank(&comm, nranks, *id, rank, &cfg);
  double dt = epx_test_now() - t0;
  const char *m = epxCommGetLastError(NULL);
  int f = 0;
  if (r != epxMismatch || comm != NULL) {
    fprintf(stderr, "  rank %d: init with '%s' differing returned %s (%s), expected epxMismatch\n",
            rank, mc->name, epxGetErrorString(r), m);
    f = 1;
    if (comm) epxCommDestroy(comm);
  } else if (!strstr(m, mc->name)) {
    fprintf(stderr, "  rank %d: mismatch message \"%s\" does not name '%s'\n", rank, m, mc->name);
    f = 1;
  }
  if (dt > 2.0) {
    fprintf(stderr, "  rank %d: the mismatch took %.2f s to report (limit 2 s)\n", rank, dt);
    f = 1;
  }
  return f;
}

/* --------------------------------------------------- duplicate rank */

static int rank_duplicate(int rank, int nranks, const epxUniqueId *id, void *arg) {
  (void)arg;
  (void)rank;
  epxConfig_t cfg = base_config();
  cfg.bootstrap_timeout_ms = 2000;
  epxComm_t comm = NULL;
  double t0 = epx_test_now();
  /* both processes claim rank 0 of 2 */
  epxResult_t r = epxCommInitRank(&comm, nranks, *id, 0, &cfg);
  double dt = epx_test_now() - t0;
  if (r == epxSuccess) {
    fprintf(stderr, "  process %d: init as a duplicate rank 0 succeeded\n", rank);
    epxCommDestroy(comm);
    return 1;
  }
  if (dt > 2.0 + LATE_SLACK_S) {
    fprintf(stderr, "  process %d: duplicate rank reported after %.2f s\n", rank, dt);
    return 1;
  }
  printf("  (process %d: %s after %.2f s: %s)\n", rank, epxGetErrorString(r), dt,
         epxCommGetLastError(NULL));
  return 0;
}

/* ------------------------------------------------------ static checks */

static int failing_allgather(void *user, const void *send, void *recv, size_t bytes) {
  (void)user;
  (void)send;
  (void)recv;
  (void)bytes;
  return 1;
}


static int static_checks(void) {
  failures_in_main = 0;
  int v = -1;
  CHECK(epxGetVersion(&v) == epxSuccess && v == EPX_VERSION_CODE, "version %d", v);
  CHECK(epxGetVersion(NULL) == epxInvalidArgument, "epxGetVersion(NULL)");
  for (int r = 0; r < epxNumResults; ++r) {
    const char *s = epxGetErrorString((epxResult_t)r);
    CHECK(s && *s, "error string of %d", r);
  }
  CHECK(epxGetErrorString((epxResult_t)999) != NULL, "error string of an unknown code");
  CHECK(epxCommDestroy(NULL) == epxSuccess, "epxCommDestroy(NULL)");
  CHECK(epxHandleDestroy(NULL) == epxSuccess, "epxHandleDestroy(NULL)");
  epxCommInfo_t info;
  CHECK(epxCommGetInfo(NULL, &info) != epxSuccess, "epxCommGetInfo(NULL)");

  /* size hints agree with layout_math */
  epxConfig_t c = base_config();
  c.hidden = 7168;
  c.num_experts = 256;
  c.max_tokens_per_rank = 4096;
  c.ll_max_tokens_per_rank = 128;
  epxSizeHints_t h;
  memset(&h, 0, sizeof h);
  h.size = sizeof h;
  CHECK(epxGetSizeHints(&c, 8, &h) == epxSuccess, "size hints: %s", epxCommGetLastError(NULL));
  CHECK(h.max_recv_tokens == 8 * 4096, "max_recv_tokens %" PRId64, h.max_recv_tokens);
  CHECK(h.recv_x_bytes_per_row_bf16 == 14336 && h.recv_x_bytes_per_row_fp8 == 7168, "row bytes");
  CHECK(h.recv_scales_bytes_per_row_f32 == 224 && h.recv_scales_bytes_per_row_ue8m0 == 56,
        "scale row bytes %zu %zu", h.recv_scales_bytes_per_row_f32,
        h.recv_scales_bytes_per_row_ue8m0);
  CHECK(h.ll_recv_rows == 32 * 8 * 128, "ll_recv_rows %" PRId64, h.ll_recv_rows);
  CHECK(h.ll_recv_x_bytes_bf16 == (size_t)32 * 8 * 128 * 14336, "ll bf16 bytes");
  CHECK(h.ll_recv_x_bytes_fp8 == (size_t)32 * 8 * 128 * 7168, "ll fp8 bytes");
  CHECK(h.ll_recv_scales_bytes_f32 == (size_t)32 * 8 * 128 * 224, "ll f32 scale bytes");
  CHECK(h.ll_recv_scales_bytes_ue8m0 == (size_t)32 * 8 * 128 * 56, "ll ue8m0 scale bytes");
  epxSizeHints_t small;
  memset(&small, 0, sizeof small);
  small.size = 8;
  CHECK(epxGetSizeHints(&c, 8, &small) == epxInvalidArgument, "hints->size too small");

  /* invalid configs fail before any rendezvous, naming the field */
#define BAD(fieldname, stmt)                                \
  do {                                                      \
    epxConfig_t b = base_config();                          \
    stmt;                                                   \
    epxComm_t comm = NULL;                                  \
    epxResult_t r = epxCommInitRankWithAllGather(           \
        &comm, 2, 0, failing_allgather, NULL, &b);          \
    const char *m = epxCommGetLastError(NULL);              \
    CHECK(r == epxInvalidArgument && comm == NULL && strstr(m, fieldname), \
          "config with bad %s: %s (%s)", fieldname, epxGetErrorString(r), m); \
  } while (0)
  BAD("magic", b.magic = 0);
  BAD("num_experts", b.num_experts = 15);
  BAD("hidden", b.hidden = 100);
  BAD("max_topk", b.max_topk = 33);
  BAD("max_tokens_per_rank", b.max_tokens_per_rank = 0);
  BAD("ranks_per_node", b.ranks_per_node = 3);
  BAD("backend", b.backend = (epxBackend_t)7);
  BAD("ll_max_tokens_per_rank", b.ll_max_tokens_per_rank = -1);
#undef BAD
  CHECK(epxCommInitRank(NULL, 2, (epxUniqueId){{0}}, 0, NULL) == epxInvalidArgument, "comm NULL");
  epxComm_t cm = NULL;
  epxConfig_t ok = base_config();
  CHECK(epxCommInitRankWithAllGather(&cm, 2, 2, shm_allgather, NULL, &ok) == epxInvalidArgument,
        "rank out of range");
  CHECK(epxCommInitRankWithAllGather(&cm, 0, 0, shm_allgather, NULL, &ok) == epxInvalidArgument,
        "nranks 0");
  CHECK(epxCommInitRankWithAllGather(&cm, 2, 0, NULL, NULL, &ok) == epxInvalidArgument,
        "allgather NULL");
  return failures_in_main;
}

static int one_rank_allgather(void *user, const void *send, void *recv, size_t bytes) {
  (void)user;
  memcpy(recv, send, bytes);
  return 0;
}

static int single_rank_allgather_checks(void) {
  failures_in_main = 0;
  epxConfig_t c = base_config();
  epxComm_t comm = NULL;
  epxResult_t r = epxCommInitRankWithAllGather(&comm, 1, 0, one_rank_allgather, NULL, &c);
  CHECK(r == epxSuccess, "one-rank all-gather init: %s: %s", epxGetErrorString(r),
        epxCommGetLastError(NULL));
  if (r == epxSuccess) {
    epxCommInfo_t info;
    CHECK(epxCommGetInfo(comm, &info) == epxSuccess && info.nranks == 1 && info.num_nodes == 1,
          "one-rank info");
    /* wait statistics: zero on a fresh communicator; bad arguments named */
    epxPeerWaitStats_t st;
    memset(&st, 0xA5, sizeof st);
    CHECK(epxCommGetPeerWaitStats(comm, 0, &st) == epxSuccess && st.slow_waits == 0 &&
              st.longest_wait_ns == 0 && st.last_slow_seq == 0,
          "fresh wait statistics: %llu waits, %lld ns, seq %llu", (unsigned long long)st.slow_waits,
          (long long)st.longest_wait_ns, (unsigned long long)st.last_slow_seq);
    CHECK(epxCommGetPeerWaitStats(comm, 1, &st) == epxInvalidArgument &&
              strstr(epxCommGetLastError(comm), "peer is 1, not in [0, 1)"),
          "wait statistics of peer 1 of 1: %s", epxCommGetLastError(comm));
    CHECK(epxCommGetPeerWaitStats(comm, -1, &st) == epxInvalidArgument, "wait statistics of peer -1");
    CHECK(epxCommGetPeerWaitStats(comm, 0, NULL) == epxInvalidArgument &&
              strstr(epxCommGetLastError(comm), "stats is NULL"),
          "wait statistics into NULL: %s", epxCommGetLastError(comm));
    CHECK(epxCommGetPeerWaitStats(NULL, 0, &st) == epxInvalidArgument, "wait statistics of NULL");
    CHECK(epxCommGetInfo(comm, &info) == epxSuccess, "the communicator works after the bad calls");
    CHECK(epxCommDestroy(comm) == epxSuccess, "destroy");
    CHECK(epxCommGetPeerWaitStats(comm, 0, &st) == epxInvalidArgument, "wait statistics after destroy");
    /* a destroyed communicator is recognised, not dereferenced */
    CHECK(epxCommDestroy(comm) == epxInvalidUsage, "double destroy");
  }
  comm = (epxComm_t)(uintptr_t)1;
  r = epxCommInitRankWithAllGather(&comm, 2, 0, failing_allgather, NULL, &c);
  CHECK(r != epxSuccess && comm == NULL, "a failing all-gather: %s, comm %p", epxGetErrorString(r),
        (void *)comm);
  return failures_in_main;
}

/* ------------------------------------------------------------- main */

typedef struct named {
  const char *name;
  int (*run)(void);
} named;

static int spawn_info(int R, int rpn) {
  info_case ic = {R, rpn};
  return epx_test_spawn(R, rank_init_info, &ic, SPAWN_TIMEOUT_S);
}
static int init_info_1(void) { return spawn_info(1, 0); }
static int init_info_2(void) { return spawn_info(2, 0); }
static int init_info_3(void) { return spawn_info(3, 0); }
static int init_info_4_two_nodes(void) { return spawn_info(4, 2); }
static int init_info_8_eight_nodes(void) { return spawn_info(8, 1); }
static int init_info_8(void) { return spawn_info(8, 0); }

/* R7, versions: a rank built from another release. The all-gather hands
 * every rank the same agreement table with one int32 field of rank 2's record
 * (its library or protocol version) one higher, as that rank would have sent
 * it; init must fail on every rank with epxMismatch naming the field, within
 * 2 s, and leave no communicator. */
typedef struct version_case {
  shm_gather *g;
  size_t offset; /* of the field in epxAgreement */
  const char *name;
} version_case;

typedef struct version_user {
  gather_user gu;
  size_t offset;
} version_user;

static int version_bumping_allgather(void *user, const void *send, void *recv, size_t bytes) {
  version_user *v = user;
  const int first = v->gu.calls == 0; /* init's first all-gather is the agreement */
  int rc = shm_allgather(&v->gu, send, recv, bytes);
  if (rc == 0 && first && bytes == sizeof(epxAgreement) && v->gu.g->nranks > 2) {
    char *at = (char *)recv + 2 * bytes + v->offset;
    int32_t x;
    memcpy(&x, at, sizeof x);
    x += 1;
    memcpy(at, &x, sizeof x);
  }
  return rc;
}

static int rank_version_mismatch(int rank, int nranks, const epxUniqueId *id, void *arg) {
  (void)id;
  const version_case *vc = arg;
  version_user u = {{vc->g, rank, 0}, vc->offset};
  epxConfig_t cfg = base_config();
  cfg.num_experts = 8 * nranks;
  epxComm_t comm = NULL;
  double t0 = epx_test_now();
  epxResult_t r = epxCommInitRankWithAllGather(&comm, nranks, rank, version_bumping_allgather, &u, &cfg);
  double dt = epx_test_now() - t0;
  const char *m = epxCommGetLastError(NULL);
  if (r != epxMismatch || comm != NULL) {
    fprintf(stderr, "  rank %d: init with rank 2's %s one higher returned %s (%s), expected epxMismatch\n",
            rank, vc->name, epxGetErrorString(r), m);
    if (comm) epxCommDestroy(comm);
    return 1;
  }
  if (!strstr(m, vc->name) || !strstr(m, "rank 2")) {
    fprintf(stderr, "  rank %d: mismatch message \"%s\" does not name '%s' and rank 2\n", rank, m,
            vc->name);
    return 1;
  }
  if (dt > 2.0) {
    fprintf(stderr, "  rank %d: the version mismatch took %.2f s to report\n", rank, dt);
    return 1;
  }
  return 0;
}

static int version_mismatch(size_t offset, const char *name) {
  shm_gather *g = mmap(NULL, sizeof(shm_gather), PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (g == MAP_FAILED) return 1;
  atomic_init(&g->arrived, 0);
  g->nranks = 3;
  version_case vc = {g, offset, name};
  int rc = epx_test_spawn(3, rank_version_mismatch, &vc, SPAWN_TIMEOUT_S);
  munmap(g, sizeof(shm_gather));
  return rc;
}
static int mismatch_library_version(void) {
  return version_mismatch(offsetof(epxAgreement, library_version), "library_version");
}
static int mismatch_protocol_version(void) {
  return version_mismatch(offsetof(epxAgreement, protocol_version), "protocol_version");
}

static int allgather_init_4(void) {
  shm_gather *g = mmap(NULL, sizeof(shm_gather), PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (g == MAP_FAILED) return 1;
  atomic_init(&g->arrived, 0);
  g->nranks = 4;
  int rc = epx_test_spawn(4, rank_allgather_init, g, SPAWN_TIMEOUT_S);
  munmap(g, sizeof(shm_gather));
  return rc;
}

static int missing_rank_3(void) {
  missing_case mc = {3};
  return epx_test_spawn(2, rank_missing, &mc, SPAWN_TIMEOUT_S);
}
static int missing_rank_2(void) {
  missing_case mc = {2};
  return epx_test_spawn(1, rank_missing, &mc, SPAWN_TIMEOUT_S);
}

static int mismatch(field f, int odd, const char *name, int R) {
  mismatch_case mc = {f, odd, name};
  return epx_test_spawn(R, rank_mismatch, &mc, SPAWN_TIMEOUT_S);
}
static int mismatch_hidden(void) { return mismatch(F_HIDDEN, 1, "hidden", 2); }
static int mismatch_experts(void) { return mismatch(F_EXPERTS, 0, "num_experts", 3); }
static int mismatch_max_tokens(void) { return mismatch(F_MAX_TOKENS, 2, "max_tokens_per_rank", 4); }
static int mismatch_ll_max_tokens(void) {
  return mismatch(F_LL_MAX_TOKENS, 1, "ll_max_tokens_per_rank", 2);
}
static int mismatch_max_topk(void) { return mismatch(F_MAX_TOPK, 1, "max_topk", 2); }
static int mismatch_ranks_per_node(void) { return mismatch(F_RPN, 3, "ranks_per_node", 4); }

static int duplicate_rank(void) { return epx_test_spawn(2, rank_duplicate, NULL, SPAWN_TIMEOUT_S); }

/* After the failures above, a fresh id and a fresh init work. */
static int fresh_init_after_failures(void) { return spawn_info(3, 0); }

static const named cases[] = {
    {"static_queries_size_hints_and_bad_configs", static_checks},
    {"single_rank_allgather_and_double_destroy", single_rank_allgather_checks},
    {"init_info_1_rank", init_info_1},
    {"init_info_2_ranks", init_info_2},
    {"init_info_3_ranks", init_info_3},
    {"init_info_4_ranks_two_nodes", init_info_4_two_nodes},
    {"init_info_8_ranks", init_info_8},
    {"init_info_8_ranks_eight_nodes", init_info_8_eight_nodes},
    {"init_with_shared_memory_allgather_4_ranks", allgather_init_4},
    {"missing_rank_of_3_times_out", missing_rank_3},
    {"missing_rank_of_2_times_out", missing_rank_2},
    {"mismatch_hidden", mismatch_hidden},
    {"mismatch_num_experts", mismatch_experts},
    {"mismatch_max_tokens_per_rank", mismatch_max_tokens},
    {"mismatch_ll_max_tokens_per_rank", mismatch_ll_max_tokens},
    {"mismatch_max_topk", mismatch_max_topk},
    {"mismatch_ranks_per_node", mismatch_ranks_per_node},
    {"mismatch_library_version", mismatch_library_version},
    {"mismatch_protocol_version", mismatch_protocol_version},
    {"duplicate_rank_rejected", duplicate_rank},
    {"fresh_init_after_failures", fresh_init_after_failures},
};

int main(int argc, char **argv) {
  int n = (int)(sizeof cases / sizeof cases[0]), ran = 0;
  for (int i = 0; i < n; ++i) {
    if (!epx_test_case_wanted(argc, argv, cases[i].name)) continue;
    double t0 = epx_test_now();
    fflush(stdout);
    if (cases[i].run() != 0) {
      printf("FAIL %s seed=0\n", cases[i].name);
      return 1;
    }
    printf("PASS %s (%.2f s)\n", cases[i].name, epx_test_now() - t0);
    ++ran;
  }
  if (ran == 0) {
    printf("FAIL no case matched\n");
    return 1;
  }
  printf("test_init: %d cases passed\n", ran);
  return 0;
}
