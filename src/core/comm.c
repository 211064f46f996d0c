/*
 * comm.c - communicator lifecycle: config resolution, rendezvous, the init
 * agreement between ranks, backend selection, destroy and abort, size hints.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "bootstrap/bootstrap.h"
#include "common/layout_math.h"
#include "core/comm.h"
#include "core/log.h"
#include "core/params.h"

/* ---- live-object registry: API entry points recognise destroyed or foreign
 * pointers without dereferencing them. ---- */

#define EPX_REGISTRY_MAX 4096
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static const void *registry[EPX_REGISTRY_MAX];

int epx_registry_add(const void *p) {
  int ok = 0;
  pthread_mutex_lock(&registry_lock);
  for (int i = 0; i < EPX_REGISTRY_MAX; ++i)
    if (!registry[i]) {
      registry[i] = p;
      ok = 1;
      break;
    }
  pthread_mutex_unlock(&registry_lock);
  return ok;
}

void epx_registry_remove(const void *p) {
  pthread_mutex_lock(&registry_lock);
  for (int i = 0; i < EPX_REGISTRY_MAX; ++i)
    if (registry[i] == p) registry[i] = NULL;
  pthread_mutex_unlock(&registry_lock);
}

int epx_registry_contains(const void *p) {
  int found = 0;
  if (!p) return 0;
  pthread_mutex_lock(&registry_lock);
  for (int i = 0; i < EPX_REGISTRY_MAX && !found; ++i) found = registry[i] == p;
  pthread_mutex_unlock(&registry_lock);
  return found;
}

/* ---- CUDA backend stubs for builds without CUDA ---- */

#ifndef EPX_WITH_CUDA
const epxBackendOps *epx_cuda_backend_ops(void) { return NULL; }
int epx_cuda_backend_available(void) { return 0; }
#endif

/* ---- config ---- */

/* Copies the caller's config (which may come from an older header with fewer
 * fields), checks every field and fills defaults. Messages name the field. */
epxResult_t epx_config_resolve(const epxConfig_t *in, int nranks, epxConfig_t *out) {
  if (!in) return epx_error(NULL, epxInvalidArgument, "config is NULL (use EPX_CONFIG_INITIALIZER)");
  if (in->magic != EPX_CONFIG_MAGIC)
    return epx_error(NULL, epxInvalidArgument,
                     "config.magic is 0x%x, expected 0x%x: initialise with EPX_CONFIG_INITIALIZER",
                     in->magic, EPX_CONFIG_MAGIC);
  size_t first_version_size = offsetof(epxConfig_t, bootstrap_timeout_ms) + sizeof(int);
  if (in->size < first_version_size || in->size > sizeof(epxConfig_t) * 4)
    return epx_error(NULL, epxInvalidArgument, "config.size is %zu, expected %zu", in->size,
                     sizeof(epxConfig_t));
  if (in->version / 10000 != EPX_VERSION_MAJOR || in->version > EPX_VERSION_CODE)
    return epx_error(NULL, epxInvalidArgument,
                     "config.version %u is not supported by library version %d", in->version,
                     EPX_VERSION_CODE);
  epxConfig_t c;
  memset(&c, 0, sizeof c);
  memcpy(&c, in, in->size < sizeof c ? in->size : sizeof c);
  c.size = sizeof c;

  if (c.backend != epxBackendAuto && c.backend != epxBackendHost && c.backend != epxBackendCuda)
    return epx_error(NULL, epxInvalidArgument, "config.backend is %d, not an epxBackend_t",
                     (int)c.backend);
  if (c.backend == epxBackendAuto)
    c.backend = epx_cuda_backend_available() ? epxBackendCuda : epxBackendHost;
  if (c.backend == epxBackendCuda && !epx_cuda_backend_ops())
    return epx_error(NULL, epxNotSupported,
                     "config.backend is epxBackendCuda but this library was built without CUDA");
  if (c.ranks_per_node == 0) c.ranks_per_node = nranks;
  if (c.ranks_per_node < 1 || c.ranks_per_node > nranks || nranks % c.ranks_per_node != 0)
    return epx_error(NULL, epxInvalidArgument,
                     "config.ranks_per_node is %d: it must divide nranks (%d)", c.ranks_per_node,
                     nranks);
  if (c.num_experts <= 0 || c.num_experts % nranks != 0)
    return epx_error(NULL, epxInvalidArgument,
                     "config.num_experts is %d: it must be a positive multiple of nranks (%d)",
                     c.num_experts, nranks);
  if (c.hidden <= 0 || c.hidden % 8 != 0 || c.hidden > (1 << 20))
    return epx_error(NULL, epxInvalidArgument,
                     "config.hidden is %d: it must be a positive multiple of 8 (16-byte BF16 rows) "
                     "and at most 1048576",
                     c.hidden);
  if (c.max_topk < 1 || c.max_topk > EPX_MAX_TOPK)
    return epx_error(NULL, epxInvalidArgument, "config.max_topk is %d: it must be in 1..%d",
                     c.max_topk, EPX_MAX_TOPK);
  if (c.max_tokens_per_rank < 1 || c.max_tokens_per_rank > (1 << 24))
    return epx_error(NULL, epxInvalidArgument,
                     "config.max_tokens_per_rank is %d: it must be in 1..16777216",
                     c.max_tokens_per_rank);
  /* Row indices of received tokens are int32 in handles and outputs. */
  if ((int64_t)nranks * c.max_tokens_per_rank > INT32_MAX)
    return epx_error(NULL, epxInvalidArgument,
                     "config.max_tokens_per_rank is %d: nranks (%d) x max_tokens_per_rank must "
                     "stay below 2^31 received rows",
                     c.max_tokens_per_rank, nranks);
  if (c.ll_max_tokens_per_rank < 0 || c.ll_max_tokens_per_rank > (1 << 16))
    return epx_error(NULL, epxInvalidArgument,
                     "config.ll_max_tokens_per_rank is %d: it must be in 0..65536",
                     c.ll_max_tokens_per_rank);
  if (c.num_sms < 0 || c.cuda_device < -1 || c.timeout_ms < 0 || c.soft_timeout_ms < 0 ||
      c.bootstrap_timeout_ms < 0)
    return epx_error(NULL, epxInvalidArgument,
                     "config: num_sms (%d), cuda_device (%d), timeout_ms (%d), soft_timeout_ms (%d) "
                     "and bootstrap_timeout_ms (%d) must not be negative (cuda_device may be -1)",
                     c.num_sms, c.cuda_device, c.timeout_ms, c.soft_timeout_ms,
                     c.bootstrap_timeout_ms);
  if (c.timeout_ms == 0) c.timeout_ms = (int)epx_param_int(EPX_PARAM_TIMEOUT_MS);
  if (c.soft_timeout_ms == 0) c.soft_timeout_ms = (int)epx_param_int(EPX_PARAM_SOFT_TIMEOUT_MS);
  if (c.bootstrap_timeout_ms == 0)
    c.bootstrap_timeout_ms = (int)epx_param_int(EPX_PARAM_BOOTSTRAP_TIMEOUT_MS);
  *out = c;
  return epxSuccess;
}

static const epxBackendOps *backend_ops_for(epxBackend_t b) {
  return b == epxBackendCuda ? epx_cuda_backend_ops() : &epx_host_backend_ops;
}

/* ---- size hints ---- */

EPX_API epxResult_t epxGetSizeHints(const epxConfig_t *config, int nranks, epxSizeHints_t *hints) {
  if (!hints) return epx_error(NULL, epxInvalidArgument, "epxGetSizeHints: hints is NULL");
  if (hints->size < sizeof(epxSizeHints_t))
    return epx_error(NULL, epxInvalidArgument, "epxGetSizeHints: hints->size is %zu, expected %zu",
                     hints->size, sizeof(epxSizeHints_t));
  if (nranks < 1 || nranks > EPX_BOOTSTRAP_MAX_RANKS)
    return epx_error(NULL, epxInvalidArgument, "epxGetSizeHints: nranks is %d", nranks);
  epxConfig_t c;
  epxResult_t res = epx_config_resolve(config, nranks, &c);
  if (res != epxSuccess) return res;
  epxSizeHints_t h;
  memset(&h, 0, sizeof h);
  h.size = sizeof h;
  int H = c.hidden;
  h.max_recv_tokens = (int64_t)nranks * c.max_tokens_per_rank;
  h.recv_x_bytes_per_row_bf16 = epx_payload_row_bytes(H, 0);
  h.recv_x_bytes_per_row_fp8 = epx_payload_row_bytes(H, 1);
  h.recv_scales_bytes_per_row_f32 = epx_scale_row_bytes(H, epxScalesFloat32);
  h.recv_scales_bytes_per_row_ue8m0 = epx_scale_row_bytes(H, epxScalesUE8M0);
  h.ll_recv_rows = (int64_t)(c.num_experts / nranks) *
                   epx_ll_rows_per_expert(nranks, c.ll_max_tokens_per_rank);
  h.ll_recv_x_bytes_bf16 = (size_t)h.ll_recv_rows * h.recv_x_bytes_per_row_bf16;
  h.ll_recv_x_bytes_fp8 = (size_t)h.ll_recv_rows * h.recv_x_bytes_per_row_fp8;
  h.ll_recv_scales_bytes_f32 = (size_t)h.ll_recv_rows * h.recv_scales_bytes_per_row_f32;
  h.ll_recv_scales_bytes_ue8m0 = (size_t)h.ll_recv_rows * h.recv_scales_bytes_per_row_ue8m0;
  const epxBackendOps *ops = backend_ops_for(c.backend);
  if (ops && ops->size_hints) ops->size_hints(&c, nranks, &h);
  *hints = h;
  return epxSuccess;
}

/* ---- init agreement ---- */

#define EPX_AGREEMENT_MAGIC 0x45505841u /* "EPXA" */

typedef struct agreed_field {
  const char *name;
  size_t offset;
} agreed_field;

static const agreed_field agreed_fields[] = {
    {"protocol_version", offsetof(epxAgreement, protocol_version)},
    {"library_version", offsetof(epxAgreement, library_version)},
    {"nranks", offsetof(epxAgreement, nranks)},
    {"backend", offsetof(epxAgreement, backend)},
    {"ranks_per_node", offsetof(epxAgreement, ranks_per_node)},
    {"num_experts", offsetof(epxAgreement, num_experts)},
    {"hidden", offsetof(epxAgreement, hidden)},
    {"max_topk", offsetof(epxAgreement, max_topk)},
    {"max_tokens_per_rank", offsetof(epxAgreement, max_tokens_per_rank)},
    {"ll_max_tokens_per_rank", offsetof(epxAgreement, ll_max_tokens_per_rank)},
};

static int32_t agreed_value(const epxAgreement *a, const agreed_field *f) {
  int32_t v;
  memcpy(&v, (const char *)a + f->offset, sizeof v);
  return v;
}

/* Every rank runs the same check over the same gathered table, so every rank
 * fails (or passes) identically and names the same field. */
static epxResult_t check_agreement(const epxAgreement *all, int nranks) {
  for (int r = 0; r < nranks; ++r) {
    if (all[r].magic != EPX_AGREEMENT_MAGIC)
      return epx_error(NULL, epxMismatch, "init: rank %d sent no valid agreement record", r);
    if (all[r].rank != r)
      return epx_error(NULL, epxMismatch,
                       "init: slot %d of the rendezvous holds rank %d (duplicate or wrong rank)", r,
                       all[r].rank);
  }
  for (size_t f = 0; f < sizeof agreed_fields / sizeof agreed_fields[0]; ++f) {
    int32_t v0 = agreed_value(&all[0], &agreed_fields[f]);
    for (int r = 1; r < nranks; ++r) {
      int32_t v = agreed_value(&all[r], &agreed_fields[f]);
      if (v != v0)
        return epx_error(NULL, epxMismatch,
                         "init: setting '%s' differs between ranks: rank 0 has %d, rank %d has %d",
                         agreed_fields[f].name, v0, r, v);
    }
  }
  return epxSuccess;
}

/* ---- init ---- */

typedef struct bootstrap_source {
  const epxUniqueId *unique_id; /* TCP when non-NULL */
  epxAllGatherFn allgather;
  void *user;
} bootstrap_source;

/* Frees the core's part of a communicator (the backend's is gone by then). */
static void free_comm(epxComm_t comm) {
  if (comm->wait_stats) pthread_mutex_destroy(&comm->stats_lock);
  free(comm->wait_stats);
  free(comm);
}

static epxResult_t comm_init(epxComm_t *out, int nranks, int rank, const bootstrap_source *src,
                             const epxConfig_t *config) {
  epxResult_t res = epxSuccess;
  epxBootstrap *boot = NULL;
  epxComm_t comm = NULL;
  char err[EPX_ERROR_MSG_BYTES] = "";
  int backend_ready = 0;

  if (!out) return epx_error(NULL, epxInvalidArgument, "epxCommInitRank: comm is NULL");
  *out = NULL;
  if (nranks < 1 || nranks > EPX_BOOTSTRAP_MAX_RANKS)
    return epx_error(NULL, epxInvalidArgument, "epxCommInitRank: nranks is %d, must be 1..%d",
                     nranks, EPX_BOOTSTRAP_MAX_RANKS);
  if (rank < 0 || rank >= nranks)
    return epx_error(NULL, epxInvalidArgument, "epxCommInitRank: rank is %d, must be 0..%d", rank,
                     nranks - 1);
  epxConfig_t cfg;
  res = epx_config_resolve(config, nranks, &cfg);
  if (res != epxSuccess) return res;

  int64_t deadline = epx_now_ns() + (int64_t)cfg.bootstrap_timeout_ms * 1000000;
  if (src->unique_id)
    res = epx_bootstrap_tcp_create(src->unique_id, rank, nranks, deadline, &boot, err, sizeof err);
  else
    res = epx_bootstrap_callback_create(src->allgather, src->user, rank, nranks, &boot, err,
                                        sizeof err);
  if (res != epxSuccess) {
    epx_error(NULL, res, "init rank %d/%d: %s", rank, nranks, err);
    goto fail;
  }

  epxAgreement mine;
  memset(&mine, 0, sizeof mine);
  mine.magic = EPX_AGREEMENT_MAGIC;
  mine.protocol_version = EPX_PROTOCOL_VERSION;
  mine.library_version = EPX_VERSION_CODE;
  mine.rank = rank;
  mine.nranks = nranks;
  mine.backend = (int32_t)cfg.backend;
  mine.ranks_per_node = cfg.ranks_per_node;
  mine.num_experts = cfg.num_experts;
  mine.hidden = cfg.hidden;
  mine.max_topk = cfg.max_topk;
  mine.max_tokens_per_rank = cfg.max_tokens_per_rank;
  mine.ll_max_tokens_per_rank = cfg.ll_max_tokens_per_rank;
  mine.pid = (int32_t)getpid();
  if (getrandom(&mine.uid_proposal, sizeof mine.uid_proposal, 0) != sizeof mine.uid_proposal)
    mine.uid_proposal = (uint64_t)epx_now_ns() ^ ((uint64_t)getpid() << 32);
  gethostname(mine.hostname, sizeof mine.hostname - 1);

  epxAgreement *all = calloc((size_t)nranks, sizeof *all);
  if (!all) {
    res = epx_error(NULL, epxOutOfMemory, "init: cannot allocate the agreement table");
    goto fail;
  }
  res = epx_bootstrap_allgather(boot, &mine, all, sizeof mine, err, sizeof err);
  if (res != epxSuccess) {
    free(all);
    epx_error(NULL, res, "init rank %d/%d, agreement exchange: %s", rank, nranks, err);
    goto fail;
  }
  res = check_agreement(all, nranks);
  uint64_t uid = all[0].uid_proposal;
  free(all);
  if (res != epxSuccess) goto fail;

  comm = calloc(1, sizeof *comm);
  if (!comm) {
    res = epx_error(NULL, epxOutOfMemory, "init: cannot allocate the communicator");
    goto fail;
  }
  comm->magic = EPX_COMM_MAGIC;
  comm->rank = rank;
  comm->nranks = nranks;
  comm->ranks_per_node = cfg.ranks_per_node;
  comm->num_nodes = nranks / cfg.ranks_per_node;
  comm->num_local_experts = cfg.num_experts / nranks;
  comm->config = cfg;
  comm->uid = uid;
  comm->timeout_ns = (int64_t)cfg.timeout_ms * 1000000;
  comm->soft_timeout_ns = (int64_t)cfg.soft_timeout_ms * 1000000;
  pthread_mutex_init(&comm->stats_lock, NULL);
  comm->wait_stats = calloc((size_t)nranks, sizeof *comm->wait_stats);
  if (!comm->wait_stats) {
    res = epx_error(NULL, epxOutOfMemory, "init: cannot allocate the wait statistics");
    goto fail;
  }
  atomic_init(&comm->abort_flag, 0);
  atomic_init(&comm->async_error, epxSuccess);
  comm->ops = backend_ops_for(cfg.backend);

  res = comm->ops->init(comm, boot);
  if (res != epxSuccess) {
    /* The backend recorded its message on comm; move it to the thread slot. */
    epx_error(NULL, res, "init rank %d/%d, %s backend: %s", rank, nranks, comm->ops->name,
              comm->last_error);
    goto fail;
  }
  backend_ready = 1;
  /* Nobody leaves init until every rank's backend is ready, so the first
   * collective call never waits on a peer still setting up. */
  res = epx_bootstrap_barrier(boot, err, sizeof err);
  if (res != epxSuccess) {
    epx_error(NULL, res, "init rank %d/%d, final barrier: %s", rank, nranks, err);
    goto fail;
  }
  if (!epx_registry_add(comm)) {
    res = epx_error(NULL, epxOutOfMemory, "init: too many live communicators");
    goto fail;
  }
  epx_bootstrap_destroy(boot);
  EPX_INFO(rank, "communicator ready: %d ranks, %d per node, %d experts, hidden %d, %s backend",
           nranks, cfg.ranks_per_node, cfg.num_experts, cfg.hidden, comm->ops->name);
  comm->last_error[0] = '\0';
  *out = comm;
  return epxSuccess;

fail:
  if (comm) {
    if (backend_ready) comm->ops->destroy(comm);
    comm->magic = EPX_DEAD_MAGIC;
    free_comm(comm);
  }
  epx_bootstrap_destroy(boot);
  return res;
}

EPX_API epxResult_t epxGetUniqueId(epxUniqueId *unique_id) {
  if (!unique_id) return epx_error(NULL, epxInvalidArgument, "epxGetUniqueId: unique_id is NULL");
  char err[EPX_ERROR_MSG_BYTES] = "";
  /* The root outlives the ranks' own init deadline (counted from their init,
   * which may start later), and exits early once every rank has closed. */
  int64_t root_deadline_ms = 2 * epx_param_int(EPX_PARAM_BOOTSTRAP_TIMEOUT_MS) + 10000;
  epxResult_t res = epx_bootstrap_get_unique_id(unique_id, root_deadline_ms, err, sizeof err);
  if (res != epxSuccess) return epx_error(NULL, res, "epxGetUniqueId: %s", err);
  return epxSuccess;
}

EPX_API epxResult_t epxCommInitRank(epxComm_t *comm, int nranks, epxUniqueId unique_id, int rank,
                                    const epxConfig_t *config) {
  bootstrap_source src = {&unique_id, NULL, NULL};
  return comm_init(comm, nranks, rank, &src, config);
}

EPX_API epxResult_t epxCommInitRankWithAllGather(epxComm_t *comm, int nranks, int rank,
                                                 epxAllGatherFn allgather, void *user,
                                                 const epxConfig_t *config) {
  if (!allgather)
    return epx_error(NULL, epxInvalidArgument, "epxCommInitRankWithAllGather: allgather is NULL");
  bootstrap_source src = {NULL, allgather, user};
  return comm_init(comm, nranks, rank, &src, config);
}

/* ---- destroy, abort, queries ---- */

EPX_API epxResult_t epxCommDestroy(epxComm_t comm) {
  if (!comm) return epxSuccess;
  if (!epx_registry_contains(comm))
    return epx_error(NULL, epxInvalidUsage,
                     "epxCommDestroy: %p is not a live communicator (destroyed twice?)",
                     (void *)comm);
  epx_registry_remove(comm);
  /* Handles of this communicator stay allocated until epxHandleDestroy; they
   * recognise the communicator is gone through the registry. */
  /* The backend owns comm->ll_combine_buffer and frees it in destroy. */
  comm->ops->destroy(comm);
  comm->magic = EPX_DEAD_MAGIC;
  free_comm(comm);
  return epxSuccess;
}

EPX_API epxResult_t epxCommAbort(epxComm_t comm) {
  if (!comm || !epx_registry_contains(comm))
    return epx_error(NULL, epxInvalidArgument, "epxCommAbort: %p is not a live communicator",
                     (void *)comm);
  atomic_store(&comm->abort_flag, 1);
  epx_set_async_error(comm, epxAborted);
  if (comm->ops->abort) comm->ops->abort(comm);
  return epxSuccess;
}

EPX_API epxResult_t epxCommGetAsyncError(epxComm_t comm, epxResult_t *async_error) {
  if (!comm || !epx_registry_contains(comm))
    return epx_error(NULL, epxInvalidArgument,
                     "epxCommGetAsyncError: %p is not a live communicator", (void *)comm);
  if (!async_error)
    return epx_error(comm, epxInvalidArgument, "epxCommGetAsyncError: async_error is NULL");
  *async_error = (epxResult_t)atomic_load(&comm->async_error);
  return epxSuccess;
}

EPX_API const char *epxCommGetLastError(epxComm_t comm) {
  if (!comm || !epx_registry_contains(comm)) return epx_thread_error_slot();
  return comm->last_error;
}

void epx_note_slow_wait(epxComm_t comm, int peer, uint64_t seq, int64_t waited_ns, int new_wait) {
  if (!comm->wait_stats || peer < 0 || peer >= comm->nranks) return;
  pthread_mutex_lock(&comm->stats_lock);
  epxPeerWaitStats_t *st = &comm->wait_stats[peer];
  if (new_wait) {
    st->slow_waits++;
    if (seq > st->last_slow_seq) st->last_slow_seq = seq;
  }
  if (waited_ns > st->longest_wait_ns) st->longest_wait_ns = waited_ns;
  pthread_mutex_unlock(&comm->stats_lock);
}

EPX_API epxResult_t epxCommGetPeerWaitStats(epxComm_t comm, int peer, epxPeerWaitStats_t *stats) {
  if (!comm || !epx_registry_contains(comm))
    return epx_error(NULL, epxInvalidArgument, "epxCommGetPeerWaitStats: %p is not a live communicator",
                     (void *)comm);
  if (!stats) return epx_error(comm, epxInvalidArgument, "epxCommGetPeerWaitStats: stats is NULL");
  if (peer < 0 || peer >= comm->nranks)
    return epx_error(comm, epxInvalidArgument, "epxCommGetPeerWaitStats: peer is %d, not in [0, %d)", peer,
                     comm->nranks);
  if (comm->ops->poll_events) comm->ops->poll_events(comm);
  pthread_mutex_lock(&comm->stats_lock);
  *stats = comm->wait_stats[peer];
  pthread_mutex_unlock(&comm->stats_lock);
  return epxSuccess;
}

EPX_API epxResult_t epxCommGetInfo(epxComm_t comm, epxCommInfo_t *info) {
  epxResult_t res = epx_comm_enter(comm, "epxCommGetInfo");
  if (res != epxSuccess) return res;
  if (!info) return epx_error(comm, epxInvalidArgument, "epxCommGetInfo: info is NULL");
  info->rank = comm->rank;
  info->nranks = comm->nranks;
  info->ranks_per_node = comm->ranks_per_node;
  info->num_nodes = comm->num_nodes;
  info->num_experts = comm->config.num_experts;
  info->num_local_experts = comm->num_local_experts;
  info->hidden = comm->config.hidden;
  info->max_topk = comm->config.max_topk;
  info->max_tokens_per_rank = comm->config.max_tokens_per_rank;
  info->ll_max_tokens_per_rank = comm->config.ll_max_tokens_per_rank;
  info->backend = comm->config.backend;
  info->normal_sms = comm->normal_sms;
  info->ll_sms = comm->ll_sms;
  return epxSuccess;
}

epxResult_t epx_comm_enter(epxComm_t comm, const char *fn) {
  if (!comm) return epx_error(NULL, epxInvalidArgument, "%s: comm is NULL", fn);
  if (!epx_registry_contains(comm))
    return epx_error(NULL, epxInvalidUsage,
                     "%s: %p is not a live communicator (used after epxCommDestroy?)", fn,
                     (void *)comm);
  epxResult_t async = (epxResult_t)atomic_load(&comm->async_error);
  if (async != epxSuccess)
    return epx_error(comm, async,
                     "%s: the communicator failed earlier (%s); only epxCommDestroy is valid now",
                     fn, epxGetErrorString(async));
  comm->last_error[0] = '\0';
  return epxSuccess;
}
