/*
 * validate.c - every host-side argument check, in one place.
 *
 * Rules (also in include/epx.h): payload rows and outputs are 16-byte aligned
 * (kernels move 16-byte vectors), scales 4-byte aligned, index arrays aligned to
 * their element size; expert ids in [-1, E). Ids are checked here only where
 * the host can read them (host backend); device backends check them on the
 * device and turn a bad id into an error record.
 */
#include <stdint.h>

#include "common/layout_math.h"
#include "core/comm.h"
#include "core/validate.h"

/* Payload vectors: what one 16-byte load or store moves. */
#define EPX_PAYLOAD_ALIGN 16
/* Largest expert_alignment: a per-expert count rounded past this is surely a mistake. */
#define EPX_MAX_EXPERT_ALIGNMENT (1 << 16)

static int misaligned(const void *p, uintptr_t align) { return ((uintptr_t)p % align) != 0; }

static epxResult_t check_ptr(epxComm_t comm, const char *fn, const char *name, const void *p,
                             uintptr_t align, int required) {
  if (!p) {
    if (required) return epx_error(comm, epxInvalidArgument, "%s: %s is NULL", fn, name);
    return epxSuccess;
  }
  if (misaligned(p, align))
    return epx_error(comm, epxInvalidArgument, "%s: %s (%p) is not %u-byte aligned", fn, name, p,
                     (unsigned)align);
  return epxSuccess;
}

#define CHECK(expr)                        \
  do {                                     \
    epxResult_t check_res_ = (expr);       \
    if (check_res_ != epxSuccess) return check_res_; \
  } while (0)

static int idx_size(epxDataType_t t) { return t == epxInt64 ? 8 : 4; }

epxResult_t epx_validate_handle(epxComm_t comm, const char *fn, epxHandle_t handle) {
  if (!handle) return epx_error(comm, epxInvalidArgument, "%s: handle is NULL", fn);
  if (!epx_registry_contains(handle))
    return epx_error(comm, epxInvalidUsage, "%s: handle %p is not live (destroyed?)", fn,
                     (void *)handle);
  if (handle->comm != comm || handle->comm_uid != comm->uid)
    return epx_error(comm, epxInvalidUsage, "%s: handle %p belongs to another communicator", fn,
                     (void *)handle);
  return epxSuccess;
}

static epxResult_t check_common_shape(epxComm_t comm, const char *fn, int num_tokens,
                                      int max_tokens, const char *max_name, int hidden,
                                      int num_topk) {
  if (num_tokens < 0 || num_tokens > max_tokens)
    return epx_error(comm, epxInvalidArgument, "%s: num_tokens is %d, must be 0..%d (config.%s)",
                     fn, num_tokens, max_tokens, max_name);
  if (hidden <= 0 || hidden > comm->config.hidden || hidden % 8 != 0)
    return epx_error(comm, epxInvalidArgument,
                     "%s: hidden is %d, must be a multiple of 8 in 8..%d (config.hidden)", fn,
                     hidden, comm->config.hidden);
  if (num_topk < 1 || num_topk > comm->config.max_topk)
    return epx_error(comm, epxInvalidArgument, "%s: num_topk is %d, must be 1..%d (config.max_topk)",
                     fn, num_topk, comm->config.max_topk);
  return epxSuccess;
}

epxResult_t epx_validate_topk(epxComm_t comm, const char *fn, const void *topk_idx,
                              epxDataType_t idx_type, int num_tokens, int num_topk) {
  if (idx_type != epxInt64 && idx_type != epxInt32)
    return epx_error(comm, epxInvalidArgument,
                     "%s: topk_idx_type is %d, must be epxInt64 or epxInt32", fn, (int)idx_type);
  if (num_tokens == 0) return epxSuccess;
  CHECK(check_ptr(comm, fn, "topk_idx", topk_idx, (uintptr_t)idx_size(idx_type), 1));
  if (comm->config.backend != epxBackendHost) return epxSuccess;
  int is64 = idx_type == epxInt64;
  int64_t E = comm->config.num_experts;
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int k = 0; k < num_topk; ++k) {
      int64_t id = epx_topk_get(topk_idx, is64, t, num_topk, k);
      if (id < -1 || id >= E)
        return epx_error(comm, epxInvalidArgument,
                         "%s: topk_idx[%lld][%d] is %lld, must be -1 or an expert in 0..%lld", fn,
                         (long long)t, k, (long long)id, (long long)(E - 1));
    }
  return epxSuccess;
}

epxResult_t epx_validate_layout(epxComm_t comm, const void *topk_idx, epxDataType_t idx_type,
                                int num_tokens, int num_topk, const epxLayout_t *layout) {
  const char *fn = "epxGetDispatchLayout";
  if (num_tokens < 0 || num_tokens > comm->config.max_tokens_per_rank)
    return epx_error(comm, epxInvalidArgument,
                     "%s: num_tokens is %d, must be 0..%d (config.max_tokens_per_rank)", fn,
                     num_tokens, comm->config.max_tokens_per_rank);
  if (num_topk < 1 || num_topk > comm->config.max_topk)
    return epx_error(comm, epxInvalidArgument, "%s: num_topk is %d, must be 1..%d", fn, num_topk,
                     comm->config.max_topk);
  CHECK(epx_validate_topk(comm, fn, topk_idx, idx_type, num_tokens, num_topk));
  if (!layout) return epx_error(comm, epxInvalidArgument, "%s: layout is NULL", fn);
  CHECK(check_ptr(comm, fn, "layout->num_tokens_per_rank", layout->num_tokens_per_rank, 4, 1));
  CHECK(check_ptr(comm, fn, "layout->num_tokens_per_node", layout->num_tokens_per_node, 4, 0));
  CHECK(check_ptr(comm, fn, "layout->num_tokens_per_expert", layout->num_tokens_per_expert, 4, 1));
  CHECK(check_ptr(comm, fn, "layout->is_token_in_rank", layout->is_token_in_rank, 1,
                  num_tokens > 0));
  return epxSuccess;
}

static epxResult_t check_payload_type(epxComm_t comm, const char *fn, epxDataType_t x_type,
                                      epxScaleFormat_t fmt, int hidden) {
  if (x_type == epxBFloat16) {
    if (fmt != epxScalesNone)
      return epx_error(comm, epxInvalidArgument,
                       "%s: scale_format is %d but x_type is BF16 (use epxScalesNone)", fn,
                       (int)fmt);
    return epxSuccess;
  }
  if (x_type != epxFloat8E4M3)
    return epx_error(comm, epxInvalidArgument,
                     "%s: x_type is %d, must be epxBFloat16 or epxFloat8E4M3", fn, (int)x_type);
  if (fmt != epxScalesFloat32 && fmt != epxScalesUE8M0)
    return epx_error(comm, epxInvalidArgument,
                     "%s: scale_format is %d, FP8 needs epxScalesFloat32 or epxScalesUE8M0", fn,
                     (int)fmt);
  if (hidden % EPX_FP8_GROUP != 0)
    return epx_error(comm, epxInvalidArgument,
                     "%s: hidden is %d, FP8 needs a multiple of %d (one scale per group)", fn,
                     hidden, EPX_FP8_GROUP);
  return epxSuccess;
}

epxResult_t epx_validate_dispatch(epxComm_t comm, const char *fn, const epxDispatchArgs_t *a,
                                  epxHandle_t h, const epxDispatchOutputs_t *o, int is_notify) {
  if (!a) return epx_error(comm, epxInvalidArgument, "%s: args is NULL", fn);
  CHECK(epx_validate_handle(comm, fn, h));
  if (h->recv_pending)
    return epx_error(comm, epxInvalidUsage, "%s: handle has a pending low-latency receive", fn);
  CHECK(check_common_shape(comm, fn, a->num_tokens, comm->config.max_tokens_per_rank,
                           "max_tokens_per_rank", a->hidden, a->num_topk));
  CHECK(check_payload_type(comm, fn, a->x_type, a->scale_format, a->hidden));
  if (a->expert_alignment < 0 || a->expert_alignment > EPX_MAX_EXPERT_ALIGNMENT)
    return epx_error(comm, epxInvalidArgument, "%s: expert_alignment is %d, must be 0..%d", fn,
                     a->expert_alignment, EPX_MAX_EXPERT_ALIGNMENT);
  if (a->num_worst_tokens < 0 ||
      a->num_worst_tokens > (int64_t)comm->nranks * comm->config.max_tokens_per_rank)
    return epx_error(comm, epxInvalidArgument,
                     "%s: num_worst_tokens is %lld, must be 0..%lld (nranks * max_tokens_per_rank)",
                     fn, (long long)a->num_worst_tokens,
                     (long long)comm->nranks * comm->config.max_tokens_per_rank);
  int cached = !is_notify && h->state == epxHandleNormal;
  if (h->state == epxHandleLowLatency && !is_notify)
    return epx_error(comm, epxInvalidUsage,
                     "%s: handle holds a low-latency dispatch; use epxHandleReset or another handle",
                     fn);
  if (!is_notify && h->state == epxHandleEmpty && a->num_worst_tokens == 0)
    return epx_error(comm, epxInvalidUsage,
                     "%s: handle is empty and num_worst_tokens is 0: call epxDispatchNotify first, "
                     "or pass num_worst_tokens for the no-host-sync mode",
                     fn);
  if (cached && (a->num_tokens != h->num_tokens || a->num_topk != h->num_topk))
    return epx_error(comm, epxInvalidArgument,
                     "%s: cached re-dispatch with num_tokens %d / num_topk %d, but the handle was "
                     "filled with %d / %d",
                     fn, a->num_tokens, a->num_topk, h->num_tokens, h->num_topk);
  if (!cached || a->topk_idx)
    CHECK(epx_validate_topk(comm, fn, a->topk_idx, a->topk_idx_type, a->num_tokens, a->num_topk));
  CHECK(check_ptr(comm, fn, "args->topk_weights", a->topk_weights, 4, 0));
  if (is_notify) return epxSuccess;

  int has_tokens = a->num_tokens > 0;
  CHECK(check_ptr(comm, fn, "args->x", a->x, EPX_PAYLOAD_ALIGN, has_tokens));
  if (a->x_type == epxFloat8E4M3)
    CHECK(check_ptr(comm, fn, "args->x_scales", a->x_scales, 4, has_tokens));
  if (!o) return epx_error(comm, epxInvalidArgument, "%s: outputs is NULL", fn);
  int64_t need = a->num_worst_tokens > 0 ? a->num_worst_tokens : h->num_recv_tokens;
  if (cached && h->num_recv_tokens > need) need = h->num_recv_tokens;
  if (o->capacity_rows < need)
    return epx_error(comm, epxInvalidArgument,
                     "%s: outputs->capacity_rows is %lld, fewer than the %lld rows this dispatch "
                     "writes",
                     fn, (long long)o->capacity_rows, (long long)need);
  int rows = o->capacity_rows > 0;
  CHECK(check_ptr(comm, fn, "outputs->recv_x", o->recv_x, EPX_PAYLOAD_ALIGN, rows));
  if (a->x_type == epxFloat8E4M3)
    CHECK(check_ptr(comm, fn, "outputs->recv_x_scales", o->recv_x_scales, 4, rows));
  CHECK(check_ptr(comm, fn, "outputs->recv_topk_idx", o->recv_topk_idx,
                  (uintptr_t)idx_size(a->topk_idx_type), 0));
  if (o->recv_topk_idx && cached && !a->topk_idx)
    return epx_error(comm, epxInvalidArgument,
                     "%s: outputs->recv_topk_idx requested but args->topk_idx is NULL", fn);
  if (o->recv_topk_weights && !a->topk_weights)
    return epx_error(comm, epxInvalidArgument,
                     "%s: outputs->recv_topk_weights requested but args->topk_weights is NULL", fn);
  CHECK(check_ptr(comm, fn, "outputs->recv_topk_weights", o->recv_topk_weights, 4, 0));
  CHECK(check_ptr(comm, fn, "outputs->recv_src_idx", o->recv_src_idx, 4, 0));
  CHECK(check_ptr(comm, fn, "outputs->recv_rank_prefix", o->recv_rank_prefix, 4, 0));
  CHECK(check_ptr(comm, fn, "outputs->num_recv_tokens_per_expert", o->num_recv_tokens_per_expert,
                  4, 0));
  CHECK(check_ptr(comm, fn, "outputs->num_recv_tokens", o->num_recv_tokens, 4, 0));
  return epxSuccess;
}

epxResult_t epx_validate_combine(epxComm_t comm, const epxCombineArgs_t *a, epxHandle_t h,
                                 const epxCombineOutputs_t *o) {
  const char *fn = "epxCombine";
  if (!a) return epx_error(comm, epxInvalidArgument, "%s: args is NULL", fn);
  CHECK(epx_validate_handle(comm, fn, h));
  if (h->state != epxHandleNormal)
    return epx_error(comm, epxInvalidUsage,
                     "%s: handle holds no normal-mode dispatch (state %d): dispatch first", fn,
                     (int)h->state);
  if (a->hidden <= 0 || a->hidden > comm->config.hidden || a->hidden % 8 != 0)
    return epx_error(comm, epxInvalidArgument,
                     "%s: hidden is %d, must be a multiple of 8 in 8..%d (config.hidden)", fn,
                     a->hidden, comm->config.hidden);
  /* N_recv is host-known after a notify; -1 when it stayed on the device. */
  CHECK(check_ptr(comm, fn, "args->x", a->x, EPX_PAYLOAD_ALIGN, h->num_recv_tokens != 0));
  if (a->topk_weights && a->num_topk != h->num_topk)
    return epx_error(comm, epxInvalidArgument,
                     "%s: num_topk is %d but the dispatch used %d", fn, a->num_topk, h->num_topk);
  CHECK(check_ptr(comm, fn, "args->topk_weights", a->topk_weights, 4, 0));
  CHECK(check_ptr(comm, fn, "args->bias[0]", a->bias[0], EPX_PAYLOAD_ALIGN, 0));
  CHECK(check_ptr(comm, fn, "args->bias[1]", a->bias[1], EPX_PAYLOAD_ALIGN, 0));
  if (!o) return epx_error(comm, epxInvalidArgument, "%s: outputs is NULL", fn);
  CHECK(check_ptr(comm, fn, "outputs->combined_x", o->combined_x, EPX_PAYLOAD_ALIGN,
                  h->num_tokens > 0));
  CHECK(check_ptr(comm, fn, "outputs->combined_topk_weights", o->combined_topk_weights, 4, 0));
  if (o->combined_topk_weights && !a->topk_weights)
    return epx_error(comm, epxInvalidArgument,
                     "%s: outputs->combined_topk_weights requested but args->topk_weights is NULL",
                     fn);
  return epxSuccess;
}

static epxResult_t check_ll_enabled(epxComm_t comm, const char *fn) {
  if (comm->config.ll_max_tokens_per_rank <= 0)
    return epx_error(comm, epxInvalidUsage,
                     "%s: low-latency mode is off (config.ll_max_tokens_per_rank is 0)", fn);
  return epxSuccess;
}

epxResult_t epx_validate_ll_dispatch(epxComm_t comm, const epxLowLatencyDispatchArgs_t *a,
                                     epxHandle_t h, const epxLowLatencyDispatchOutputs_t *o) {
  const char *fn = "epxLowLatencyDispatch";
  CHECK(check_ll_enabled(comm, fn));
  if (!a) return epx_error(comm, epxInvalidArgument, "%s: args is NULL", fn);
  CHECK(epx_validate_handle(comm, fn, h));
  if (h->recv_pending)
    return epx_error(comm, epxInvalidUsage,
                     "%s: the handle's send-only %s phase has not been received "
                     "(call epxLowLatencyRecv first)",
                     fn, epx_op_name(h->pending_op));
  CHECK(check_common_shape(comm, fn, a->num_tokens, comm->config.ll_max_tokens_per_rank,
                           "ll_max_tokens_per_rank", a->hidden, a->num_topk));
  if (a->use_fp8 && a->hidden % EPX_FP8_GROUP != 0)
    return epx_error(comm, epxInvalidArgument,
                     "%s: hidden is %d, use_fp8 needs a multiple of %d", fn, a->hidden,
                     EPX_FP8_GROUP);
  if (a->use_ue8m0 && !(a->use_fp8 && a->round_scale))
    return epx_error(comm, epxInvalidArgument,
                     "%s: use_ue8m0 needs use_fp8 and round_scale (got use_fp8=%d round_scale=%d)",
                     fn, a->use_fp8, a->round_scale);
  if (a->round_scale && !a->use_fp8)
    return epx_error(comm, epxInvalidArgument, "%s: round_scale needs use_fp8", fn);
  CHECK(check_ptr(comm, fn, "args->x", a->x, EPX_PAYLOAD_ALIGN, a->num_tokens > 0));
  CHECK(epx_validate_topk(comm, fn, a->topk_idx, a->topk_idx_type, a->num_tokens, a->num_topk));
  CHECK(check_ptr(comm, fn, "args->cumulative_local_expert_recv_stats",
                  a->cumulative_local_expert_recv_stats, 4, 0));
  if (!o) return epx_error(comm, epxInvalidArgument, "%s: outputs is NULL", fn);
  CHECK(check_ptr(comm, fn, "outputs->recv_x", o->recv_x, EPX_PAYLOAD_ALIGN, 1));
  CHECK(check_ptr(comm, fn, "outputs->recv_x_scales", o->recv_x_scales, 4, a->use_fp8));
  CHECK(check_ptr(comm, fn, "outputs->recv_count", o->recv_count, 4, 1));
  CHECK(check_ptr(comm, fn, "outputs->recv_src_info", o->recv_src_info, 4, 0));
  CHECK(check_ptr(comm, fn, "outputs->recv_layout_range", o->recv_layout_range, 8, 0));
  return epxSuccess;
}

epxResult_t epx_validate_ll_combine(epxComm_t comm, const epxLowLatencyCombineArgs_t *a,
                                    epxHandle_t h, const void *combined_x) {
  const char *fn = "epxLowLatencyCombine";
  CHECK(check_ll_enabled(comm, fn));
  if (!a) return epx_error(comm, epxInvalidArgument, "%s: args is NULL", fn);
  CHECK(epx_validate_handle(comm, fn, h));
  if (h->state != epxHandleLowLatency)
    return epx_error(comm, epxInvalidUsage,
                     "%s: handle holds no low-latency dispatch (state %d)", fn, (int)h->state);
  if (h->recv_pending)
    return epx_error(comm, epxInvalidUsage,
                     "%s: the handle's send-only %s phase has not been received", fn,
                     epx_op_name(h->pending_op));
  if (a->num_tokens != h->num_tokens || a->num_topk != h->num_topk || a->hidden != h->hidden)
    return epx_error(comm, epxInvalidArgument,
                     "%s: num_tokens/num_topk/hidden are %d/%d/%d but the dispatch used %d/%d/%d",
                     fn, a->num_tokens, a->num_topk, a->hidden, h->num_tokens, h->num_topk,
                     h->hidden);
  if (a->zero_copy && !comm->ll_combine_buffer)
    return epx_error(comm, epxInvalidUsage,
                     "%s: zero_copy needs the buffer from epxLowLatencyGetCombineBuffer", fn);
  CHECK(check_ptr(comm, fn, "args->x", a->x, EPX_PAYLOAD_ALIGN, !a->zero_copy));
  CHECK(epx_validate_topk(comm, fn, a->topk_idx, a->topk_idx_type, a->num_tokens, a->num_topk));
  CHECK(check_ptr(comm, fn, "args->topk_weights", a->topk_weights, 4, a->num_tokens > 0));
  CHECK(check_ptr(comm, fn, "combined_x", combined_x, EPX_PAYLOAD_ALIGN, a->num_tokens > 0));
  return epxSuccess;
}
