/*
 * validate.h - argument checks run by the core before any backend sees a call.
 * Each returns epxSuccess or records a message naming the argument and value.
 */
#ifndef EPX_CORE_VALIDATE_H
#define EPX_CORE_VALIDATE_H

#include "core/internal.h"

epxResult_t epx_validate_handle(epxComm_t comm, const char *fn, epxHandle_t handle);
epxResult_t epx_validate_topk(epxComm_t comm, const char *fn, const void *topk_idx,
                              epxDataType_t idx_type, int num_tokens, int num_topk);
epxResult_t epx_validate_layout(epxComm_t comm, const void *topk_idx, epxDataType_t idx_type,
                                int num_tokens, int num_topk, const epxLayout_t *layout);
epxResult_t epx_validate_dispatch(epxComm_t comm, const char *fn, const epxDispatchArgs_t *args,
                                  epxHandle_t handle, const epxDispatchOutputs_t *outputs,
                                  int is_notify);
epxResult_t epx_validate_combine(epxComm_t comm, const epxCombineArgs_t *args, epxHandle_t handle,
                                 const epxCombineOutputs_t *outputs);
epxResult_t epx_validate_ll_dispatch(epxComm_t comm, const epxLowLatencyDispatchArgs_t *args,
                                     epxHandle_t handle,
                                     const epxLowLatencyDispatchOutputs_t *outputs);
epxResult_t epx_validate_ll_combine(epxComm_t comm, const epxLowLatencyCombineArgs_t *args,
                                    epxHandle_t handle, const void *combined_x);

#endif /* EPX_CORE_VALIDATE_H */
