/*
 * layout.c - epxGetDispatchLayout on the host: routing counts of this rank's
 * tokens. Local; touches no shared memory.
 */
#include <string.h>

#include "backends/host/host.h"
#include "common/layout_math.h"

epxResult_t epx_host_layout(epxComm_t comm, const void *topk_idx, epxDataType_t idx_type,
                            int num_tokens, int num_topk, const epxLayout_t *layout,
                            epxStream_t stream) {
  hostComm *hc = epx_host_of(comm);
  int R = comm->nranks, el = comm->num_local_experts, rpn = comm->ranks_per_node;
  int is64 = idx_type == epxInt64;
  /* Per-token stamps (token + 1) say whether a rank / node already counted it. */
  int *rank_stamp = hc->cursor, *node_stamp = hc->peer_tokens;
  memset(rank_stamp, 0, sizeof(int) * (size_t)R);
  memset(node_stamp, 0, sizeof(int) * (size_t)R);
  memset(layout->num_tokens_per_rank, 0, sizeof(int) * (size_t)R);
  memset(layout->num_tokens_per_expert, 0, sizeof(int) * (size_t)comm->config.num_experts);
  if (layout->num_tokens_per_node)
    memset(layout->num_tokens_per_node, 0, sizeof(int) * (size_t)comm->num_nodes);
  for (int t = 0; t < num_tokens; ++t) {
    uint8_t *in_rank = layout->is_token_in_rank ? layout->is_token_in_rank + (size_t)t * R : NULL;
    if (in_rank) memset(in_rank, 0, (size_t)R);
    for (int k = 0; k < num_topk; ++k) {
      int64_t id = epx_topk_get(topk_idx, is64, t, num_topk, k);
      if (!epx_topk_valid(id)) continue;
      if (!epx_host_repeats_earlier_slot(topk_idx, is64, t, num_topk, k, id))
        layout->num_tokens_per_expert[id]++;
      int r = epx_expert_rank(id, el);
      if (rank_stamp[r] != t + 1) {
        rank_stamp[r] = t + 1;
        layout->num_tokens_per_rank[r]++;
        if (in_rank) in_rank[r] = 1;
      }
      int n = epx_rank_node(r, rpn);
      if (node_stamp[n] != t + 1) {
        node_stamp[n] = t + 1;
        if (layout->num_tokens_per_node) layout->num_tokens_per_node[n]++;
      }
    }
  }
  return epxSuccess;
}
