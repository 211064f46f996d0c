/*
 * handle.c - lifecycle of epxHandle_t: created once per communicator limits,
 * filled by dispatches, read by combines, reused across calls.
 */
#include <stdlib.h>
#include <string.h>

#include "core/comm.h"
#include "core/internal.h"

EPX_API epxResult_t epxHandleCreate(epxComm_t comm, epxHandle_t *handle) {
  epxResult_t res = epx_comm_enter(comm, "epxHandleCreate");
  if (res != epxSuccess) return res;
  if (!handle) return epx_error(comm, epxInvalidArgument, "epxHandleCreate: handle is NULL");
  *handle = NULL;
  epxHandle_t h = calloc(1, sizeof *h);
  if (!h) return epx_error(comm, epxOutOfMemory, "epxHandleCreate: cannot allocate a handle");
  h->magic = EPX_HANDLE_MAGIC;
  h->comm = comm;
  h->comm_uid = comm->uid;
  h->state = epxHandleEmpty;
  h->num_recv_tokens = 0;
  res = comm->ops->handle_alloc(comm, h);
  if (res != epxSuccess) {
    free(h);
    return res;
  }
  if (!epx_registry_add(h)) {
    comm->ops->handle_free(comm, h);
    free(h);
    return epx_error(comm, epxOutOfMemory, "epxHandleCreate: too many live handles");
  }
  *handle = h;
  return epxSuccess;
}

EPX_API epxResult_t epxHandleDestroy(epxHandle_t handle) {
  if (!handle) return epxSuccess;
  if (!epx_registry_contains(handle))
    return epx_error(NULL, epxInvalidUsage,
                     "epxHandleDestroy: %p is not a live handle (destroyed twice?)",
                     (void *)handle);
  epx_registry_remove(handle);
  /* The arrays belong to the backend of the communicator; if that
   * communicator is already gone its backend memory went with it. */
  if (epx_registry_contains(handle->comm) && handle->comm->uid == handle->comm_uid)
    handle->comm->ops->handle_free(handle->comm, handle);
  handle->magic = EPX_DEAD_MAGIC;
  free(handle);
  return epxSuccess;
}

EPX_API epxResult_t epxHandleGetInfo(epxHandle_t handle, epxHandleInfo_t *info) {
  if (!handle || !epx_registry_contains(handle))
    return epx_error(NULL, epxInvalidUsage, "epxHandleGetInfo: %p is not a live handle",
                     (void *)handle);
  if (!info) return epx_error(NULL, epxInvalidArgument, "epxHandleGetInfo: info is NULL");
  info->state = handle->state;
  info->num_tokens = handle->num_tokens;
  info->num_topk = handle->num_topk;
  info->num_recv_tokens = handle->num_recv_tokens;
  info->recv_pending = handle->recv_pending;
  return epxSuccess;
}

EPX_API epxResult_t epxHandleReset(epxHandle_t handle) {
  if (!handle || !epx_registry_contains(handle))
    return epx_error(NULL, epxInvalidUsage, "epxHandleReset: %p is not a live handle",
                     (void *)handle);
  if (handle->recv_pending)
    return epx_error(NULL, epxInvalidUsage,
                     "epxHandleReset: a send-only %s phase still awaits epxLowLatencyRecv",
                     epx_op_name(handle->pending_op));
  handle->state = epxHandleEmpty;
  handle->num_tokens = 0;
  handle->num_recv_tokens = 0;
  return epxSuccess;
}

void epx_handle_forget_arrays(epxHandle_t h) {
  h->is_token_in_rank = NULL;
  h->send_row = NULL;
  h->rank_prefix_matrix = NULL;
  h->recv_src_idx = NULL;
  h->num_recv_per_expert = NULL;
  h->ll_row_src_rank = NULL;
  h->ll_row_src_token = NULL;
  h->ll_row_kmask = NULL;
  h->ll_recv_count = NULL;
  h->ll_layout_range = NULL;
  h->backend_private = NULL;
}
