/*
 * shm.c - POSIX shared-memory segments of the host backend and their layout.
 */
#include <string.h>

#include "backends/host/shm.h"
#include "common/layout_math.h"
#include "core/posix_shm.h"

size_t epx_host_align(size_t n) {
  return (n + EPX_HOST_ALIGN - 1) / EPX_HOST_ALIGN * EPX_HOST_ALIGN;
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

void epx_host_seg_layout(hostSegLayout *l, int nranks, int num_experts, int hidden, int max_topk,
                         int chunk, int ll_tokens) {
  memset(l, 0, sizeof *l);
  l->nranks = nranks;
  l->num_experts = num_experts;
  l->hidden = hidden;
  l->max_topk = max_topk;
  l->chunk = chunk;
  l->ll_tokens = ll_tokens;
  size_t R = (size_t)nranks, C = (size_t)chunk, K = (size_t)max_topk;
  size_t bf16_row = epx_payload_row_bytes(hidden, 0);
  /* Both scale formats are 4-byte words; reserve the wider row. */
  size_t scale_row = max_size(epx_scale_row_bytes(hidden, epxScalesFloat32),
                              epx_scale_row_bytes(hidden, epxScalesUE8M0));
  size_t off = epx_host_align(sizeof(hostCtrl));

  l->hdr_counts_off = epx_host_align(sizeof(hostHeader));
  l->hdr_ecounts_off = l->hdr_counts_off + epx_host_align(R * sizeof(int32_t));
  l->hdr_slot_bytes = l->hdr_ecounts_off + epx_host_align((size_t)num_experts * sizeof(int32_t));
  l->hdr_off = off;
  off += 2 * l->hdr_slot_bytes;

  /* A dispatch window holds C source tokens; a BF16 row bounds an FP8 one. */
  size_t w = 0;
  l->win_bitmap_off = w;
  w += epx_host_align(C * R);
  l->win_payload_off = w;
  w += epx_host_align(C * bf16_row);
  l->win_scales_off = w;
  w += epx_host_align(C * scale_row);
  l->win_topk_off = w;
  w += epx_host_align(C * K * sizeof(int32_t));
  l->win_weights_off = w;
  w += epx_host_align(C * K * sizeof(float));
  /* A combine inbox has a slot for every (receiving rank, window token). */
  size_t in = 0;
  l->inbox_x_off = in;
  in += epx_host_align(R * C * bf16_row);
  l->inbox_w_off = in;
  in += epx_host_align(R * C * K * sizeof(float));
  l->norm_buf_bytes = max_size(w, in);
  l->norm_off = off;
  off += 2 * l->norm_buf_bytes;

  l->ll_off = off;
  if (ll_tokens > 0) {
    size_t T = (size_t)ll_tokens, d = 0;
    l->ll_payload_off = d;
    d += epx_host_align(T * bf16_row);
    l->ll_scales_off = d;
    d += epx_host_align(T * scale_row);
    l->ll_topk_off = d;
    d += epx_host_align(T * K * sizeof(int32_t));
    /* combine inbox: one BF16 row per (token, top-k slot) */
    size_t c = epx_host_align(T * K * bf16_row);
    l->ll_slot_bytes = max_size(d, c);
    off += 2 * l->ll_slot_bytes;
  }
  l->total_bytes = off;
}

epxResult_t epx_host_seg_create(epxComm_t comm, const char *name, size_t bytes, void **base) {
  const char *failed = "";
  int err = epx_shm_create(name, bytes, 1, base, &failed);
  if (err == 0) return epxSuccess;
  if (!strcmp(failed, "posix_fallocate"))
    return epx_error(comm, epxOutOfMemory,
                     "no room for the %zu-byte shared-memory segment %s (%s): enlarge /dev/shm or "
                     "lower EPX_HOST_CHUNK_TOKENS",
                     bytes, name, strerror(err));
  return epx_error(comm, epxSystemError, "%s of the %zu-byte shared-memory segment %s failed: %s",
                   failed, bytes, name, strerror(err));
}

epxResult_t epx_host_seg_open(epxComm_t comm, const char *name, size_t bytes, void **base) {
  const char *failed = "";
  long long actual = -1;
  int err = epx_shm_open(name, bytes, base, &failed, &actual);
  if (err == 0) return epxSuccess;
  if (!strcmp(failed, "size"))
    return epx_error(comm, epxMismatch,
                     "peer segment %s has %lld bytes, expected %zu: the ranks disagree on the "
                     "host backend's sizes",
                     name, actual, bytes);
  return epx_error(comm, epxSystemError, "%s of a peer's segment %s failed: %s", failed, name,
                   strerror(err));
}
