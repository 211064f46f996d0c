/*
 * api.c - the data-path entry points: check the communicator, validate, then
 * run the backend. A collective call whose arguments fail validation still
 * takes part in the exchange (call.local_invalid), so every rank fails that
 * call together and the next one lines up again.
 */
#include <string.h>

#include "core/comm.h"
#include "core/internal.h"
#include "core/validate.h"

/* Runs after a collective backend op. Keeps the validation message of an
 * invalid local call unless the exchange itself failed fatally (timeout, dead
 * peer, abort), which matters more. */
static epxResult_t finish_collective(epxComm_t comm, epxResult_t validation,
                                     const char *validation_msg, epxResult_t backend) {
  if (validation == epxSuccess) return backend;
  if (backend == epxTimeout || backend == epxPeerFailed || backend == epxAborted) return backend;
  strncpy(comm->last_error, validation_msg, EPX_ERROR_MSG_BYTES - 1);
  comm->last_error[EPX_ERROR_MSG_BYTES - 1] = '\0';
  return validation;
}

static epxCall_t next_call(epxComm_t comm, epxOp_t op, epxResult_t validation) {
  epxCall_t call;
  call.op = op;
  call.seq = ++comm->seq;
  call.local_invalid = validation != epxSuccess;
  return call;
}

EPX_API epxResult_t epxGetDispatchLayout(epxComm_t comm, const void *topk_idx,
                                         epxDataType_t idx_type, int num_tokens, int num_topk,
                                         const epxLayout_t *layout, epxStream_t stream) {
  epxResult_t res = epx_comm_enter(comm, "epxGetDispatchLayout");
  if (res != epxSuccess) return res;
  res = epx_validate_layout(comm, topk_idx, idx_type, num_tokens, num_topk, layout);
  if (res != epxSuccess) return res;
  return comm->ops->layout(comm, topk_idx, idx_type, num_tokens, num_topk, layout, stream);
}

EPX_API epxResult_t epxDispatchNotify(epxComm_t comm, const epxDispatchArgs_t *args,
                                      epxHandle_t handle, int64_t *num_recv_tokens,
                                      int *num_recv_tokens_per_expert, epxStream_t stream) {
  epxResult_t res = epx_comm_enter(comm, "epxDispatchNotify");
  if (res != epxSuccess) return res;
  epxResult_t v = epx_validate_dispatch(comm, "epxDispatchNotify", args, handle, NULL, 1);
  if (v == epxSuccess && !num_recv_tokens)
    v = epx_error(comm, epxInvalidArgument, "epxDispatchNotify: num_recv_tokens is NULL");
  char msg[EPX_ERROR_MSG_BYTES];
  memcpy(msg, comm->last_error, sizeof msg);
  epxCall_t call = next_call(comm, EPX_OP_DISPATCH_NOTIFY, v);
  res = comm->ops->dispatch_notify(comm, &call, v ? NULL : args, v ? NULL : handle,
                                   v ? NULL : num_recv_tokens,
                                   v ? NULL : num_recv_tokens_per_expert, stream);
  return finish_collective(comm, v, msg, res);
}

EPX_API epxResult_t epxDispatch(epxComm_t comm, const epxDispatchArgs_t *args, epxHandle_t handle,
                                const epxDispatchOutputs_t *outputs, epxStream_t stream) {
  epxResult_t res = epx_comm_enter(comm, "epxDispatch");
  if (res != epxSuccess) return res;
  epxResult_t v = epx_validate_dispatch(comm, "epxDispatch", args, handle, outputs, 0);
  char msg[EPX_ERROR_MSG_BYTES];
  memcpy(msg, comm->last_error, sizeof msg);
  epxCall_t call = next_call(comm, EPX_OP_DISPATCH, v);
  res = comm->ops->dispatch(comm, &call, v ? NULL : args, v ? NULL : handle, v ? NULL : outputs,
                            stream);
  return finish_collective(comm, v, msg, res);
}

EPX_API epxResult_t epxCombine(epxComm_t comm, const epxCombineArgs_t *args, epxHandle_t handle,
                               const epxCombineOutputs_t *outputs, epxStream_t stream) {
  epxResult_t res = epx_comm_enter(comm, "epxCombine");
  if (res != epxSuccess) return res;
  epxResult_t v = epx_validate_combine(comm, args, handle, outputs);
  char msg[EPX_ERROR_MSG_BYTES];
  memcpy(msg, comm->last_error, sizeof msg);
  epxCall_t call = next_call(comm, EPX_OP_COMBINE, v);
  res = comm->ops->combine(comm, &call, v ? NULL : args, v ? NULL : handle, v ? NULL : outputs,
                           stream);
  return finish_collective(comm, v, msg, res);
}

EPX_API epxResult_t epxLowLatencyDispatch(epxComm_t comm, const epxLowLatencyDispatchArgs_t *args,
                                          epxHandle_t handle,
                                          const epxLowLatencyDispatchOutputs_t *outputs,
                                          epxStream_t stream) {
  epxResult_t res = epx_comm_enter(comm, "epxLowLatencyDispatch");
  if (res != epxSuccess) return res;
  epxResult_t v = epx_validate_ll_dispatch(comm, args, handle, outputs);
  char msg[EPX_ERROR_MSG_BYTES];
  memcpy(msg, comm->last_error, sizeof msg);
  epxCall_t call = next_call(comm, EPX_OP_LL_DISPATCH, v);
  res = comm->ops->ll_dispatch(comm, &call, v ? NULL : args, v ? NULL : handle,
                               v ? NULL : outputs, stream);
  return finish_collective(comm, v, msg, res);
}

EPX_API epxResult_t epxLowLatencyCombine(epxComm_t comm, const epxLowLatencyCombineArgs_t *args,
                                         epxHandle_t handle, void *combined_x,
                                         epxStream_t stream) {
  epxResult_t res = epx_comm_enter(comm, "epxLowLatencyCombine");
  if (res != epxSuccess) return res;
  epxResult_t v = epx_validate_ll_combine(comm, args, handle, combined_x);
  char msg[EPX_ERROR_MSG_BYTES];
  memcpy(msg, comm->last_error, sizeof msg);
  epxCall_t call = next_call(comm, EPX_OP_LL_COMBINE, v);
  res = comm->ops->ll_combine(comm, &call, v ? NULL : args, v ? NULL : handle,
                              v ? NULL : combined_x, stream);
  return finish_collective(comm, v, msg, res);
}

/* The receive half of a send-only phase. It is collective only in the sense
 * that its peers' send halves must have been issued; it issues no new call
 * number, since it completes the call that the send half numbered. */
EPX_API epxResult_t epxLowLatencyRecv(epxComm_t comm, epxHandle_t handle, epxStream_t stream) {
  epxResult_t res = epx_comm_enter(comm, "epxLowLatencyRecv");
  if (res != epxSuccess) return res;
  res = epx_validate_handle(comm, "epxLowLatencyRecv", handle);
  if (res != epxSuccess) return res;
  if (!handle->recv_pending)
    return epx_error(comm, epxInvalidUsage,
                     "epxLowLatencyRecv: the handle has no send-only phase awaiting its receive");
  return comm->ops->ll_recv(comm, handle, stream);
}

EPX_API epxResult_t epxLowLatencyGetCombineBuffer(epxComm_t comm, void **buffer) {
  epxResult_t res = epx_comm_enter(comm, "epxLowLatencyGetCombineBuffer");
  if (res != epxSuccess) return res;
  if (!buffer)
    return epx_error(comm, epxInvalidArgument, "epxLowLatencyGetCombineBuffer: buffer is NULL");
  if (comm->config.ll_max_tokens_per_rank <= 0)
    return epx_error(comm, epxInvalidUsage,
                     "epxLowLatencyGetCombineBuffer: low-latency mode is off "
                     "(config.ll_max_tokens_per_rank is 0)");
  return comm->ops->ll_combine_buffer(comm, buffer);
}
