/*
 * comm.h - core-internal helpers shared by comm.c, handle.c, api.c and validate.c.
 */
#ifndef EPX_CORE_COMM_H
#define EPX_CORE_COMM_H

#include "core/internal.h"

/* Registry of live communicators and handles (pointers only, never dereferenced). */
int epx_registry_add(const void *p);
void epx_registry_remove(const void *p);
int epx_registry_contains(const void *p);

/* Resolves and checks a caller config: defaults filled, backend chosen. */
epxResult_t epx_config_resolve(const epxConfig_t *in, int nranks, epxConfig_t *out);

/* Entry check of every call taking a communicator: live, not failed. Clears
 * the last-error message. */
epxResult_t epx_comm_enter(epxComm_t comm, const char *fn);

/* What every rank sends before any memory is exchanged (reliability.md item 5). */
typedef struct epxAgreement {
  uint32_t magic;
  int32_t protocol_version;
  int32_t library_version;
  int32_t rank;
  int32_t nranks;
  int32_t backend;
  int32_t ranks_per_node;
  int32_t num_experts;
  int32_t hidden;
  int32_t max_topk;
  int32_t max_tokens_per_rank;
  int32_t ll_max_tokens_per_rank;
  int32_t pid;
  uint64_t uid_proposal;
  char hostname[64];
} epxAgreement;

#endif /* EPX_CORE_COMM_H */
