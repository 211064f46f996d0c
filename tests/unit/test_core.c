/*
 * test_core.c - the core runtime without peers: result strings, version,
 * config checks (each failure names its field), size hints, NULL and
 * destroyed-object handling.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "epx.h"

static int failures;

#define EXPECT(cond, ...) EPX_TEST_CHECK(failures, NULL, cond, __VA_ARGS__)

static void result_strings_are_distinct_and_total(void) {
  for (int i = 0; i < epxNumResults; ++i) {
    const char *s = epxGetErrorString((epxResult_t)i);
    EXPECT(s && *s, "empty string for result %d", i);
    for (int j = 0; j < i; ++j)
      EXPECT(strcmp(s, epxGetErrorString((epxResult_t)j)) != 0, "results %d and %d share '%s'", i,
             j, s);
  }
  EXPECT(strcmp(epxGetErrorString((epxResult_t)999), "unknown result code") == 0,
         "out-of-range code");
  /* Pinned values: changing one breaks every caller that stored it. */
  EXPECT(epxSuccess == 0 && epxInvalidArgument == 1 && epxTimeout == 6 && epxPeerFailed == 7 &&
             epxAborted == 8 && epxMismatch == 9 && epxRemoteError == 13,
         "pinned result values changed");
}

static void version_matches_header(void) {
  int v = -1;
  EXPECT(epxGetVersion(&v) == epxSuccess && v == EPX_VERSION_CODE, "version %d", v);
  EXPECT(epxGetVersion(NULL) == epxInvalidArgument, "NULL version accepted");
}

/* A bad config must fail with the field's name in the message. */
static void expect_config_error(const epxConfig_t *c, int nranks, epxResult_t code,
                                const char *field) {
  epxSizeHints_t h;
  memset(&h, 0, sizeof h);
  h.size = sizeof h;
  epxResult_t r = epxGetSizeHints(c, nranks, &h);
  const char *msg = epxCommGetLastError(NULL);
  EXPECT(r == code, "config with bad %s: got %d (%s), want %d", field, (int)r, msg, (int)code);
  EXPECT(strstr(msg, field) != NULL, "message '%s' does not name '%s'", msg, field);
}

static void config_errors_name_the_field(void) {
  epxConfig_t base = EPX_CONFIG_INITIALIZER;
  base.backend = epxBackendHost;
  base.num_experts = 256;
  base.hidden = 7168;
  epxConfig_t c;

  c = base; c.magic = 1;
  expect_config_error(&c, 4, epxInvalidArgument, "magic");
  c = base; c.size = 8;
  expect_config_error(&c, 4, epxInvalidArgument, "size");
  c = base; c.num_experts = 250;
  expect_config_error(&c, 4, epxInvalidArgument, "num_experts");
  c = base; c.num_experts = 0;
  expect_config_error(&c, 4, epxInvalidArgument, "num_experts");
  c = base; c.hidden = 7167;
  expect_config_error(&c, 4, epxInvalidArgument, "hidden");
  c = base; c.max_topk = 33;
  expect_config_error(&c, 4, epxInvalidArgument, "max_topk");
  c = base; c.max_topk = 0;
  expect_config_error(&c, 4, epxInvalidArgument, "max_topk");
  c = base; c.ranks_per_node = 3;
  expect_config_error(&c, 4, epxInvalidArgument, "ranks_per_node");
  c = base; c.max_tokens_per_rank = 0;
  expect_config_error(&c, 4, epxInvalidArgument, "max_tokens_per_rank");
  c = base; c.ll_max_tokens_per_rank = -1;
  expect_config_error(&c, 4, epxInvalidArgument, "ll_max_tokens_per_rank");
  c = base; c.backend = (epxBackend_t)7;
  expect_config_error(&c, 4, epxInvalidArgument, "backend");
  c = base; c.timeout_ms = -5;
  expect_config_error(&c, 4, epxInvalidArgument, "timeout_ms");
  c = base; c.version = EPX_VERSION_CODE + 10000;
  expect_config_error(&c, 4, epxInvalidArgument, "version");
  expect_config_error(NULL, 4, epxInvalidArgument, "config");
}

static void size_hints_follow_the_formulas(void) {
  epxConfig_t c = EPX_CONFIG_INITIALIZER;
  c.backend = epxBackendHost;
  c.num_experts = 256;
  c.hidden = 7168;
  c.max_tokens_per_rank = 4096;
  c.ll_max_tokens_per_rank = 128;
  epxSizeHints_t h;
  memset(&h, 0, sizeof h);
  h.size = sizeof h;
  EXPECT(epxGetSizeHints(&c, 4, &h) == epxSuccess, "hints: %s", epxCommGetLastError(NULL));
  EXPECT(h.max_recv_tokens == 4 * 4096, "max_recv_tokens %lld", (long long)h.max_recv_tokens);
  EXPECT(h.recv_x_bytes_per_row_bf16 == 7168 * 2, "bf16 row");
  EXPECT(h.recv_x_bytes_per_row_fp8 == 7168, "fp8 row");
  EXPECT(h.recv_scales_bytes_per_row_f32 == 56 * 4, "f32 scale row");
  EXPECT(h.recv_scales_bytes_per_row_ue8m0 == 14 * 4, "ue8m0 scale row");
  EXPECT(h.ll_recv_rows == 64LL * 4 * 128, "ll rows %lld", (long long)h.ll_recv_rows);
  EXPECT(h.ll_recv_x_bytes_fp8 == (size_t)64 * 4 * 128 * 7168, "ll fp8 bytes");
  EXPECT(h.comm_buffer_bytes > 0 && h.handle_bytes > 0, "backend sizes missing");
  epxSizeHints_t small = h;
  small.size = 4;
  EXPECT(epxGetSizeHints(&c, 4, &small) == epxInvalidArgument, "short hints struct accepted");
  EXPECT(epxGetSizeHints(&c, 0, &h) == epxInvalidArgument, "nranks 0 accepted");
}

static void null_and_foreign_objects_are_rejected(void) {
  EXPECT(epxCommDestroy(NULL) == epxSuccess, "destroy(NULL)");
  EXPECT(epxHandleDestroy(NULL) == epxSuccess, "handle destroy(NULL)");
  int not_a_comm[64] = {0};
  epxComm_t fake = (epxComm_t)(void *)not_a_comm;
  EXPECT(epxCommDestroy(fake) == epxInvalidUsage, "destroy of a non-communicator");
  EXPECT(epxCommAbort(fake) == epxInvalidArgument, "abort of a non-communicator");
  epxHandle_t h;
  EXPECT(epxHandleCreate(fake, &h) == epxInvalidUsage, "handle on a non-communicator");
  EXPECT(epxHandleCreate(NULL, &h) == epxInvalidArgument, "handle on NULL");
  EXPECT(strstr(epxCommGetLastError(NULL), "comm is NULL") != NULL, "message: %s",
         epxCommGetLastError(NULL));
  epxDispatchArgs_t a;
  memset(&a, 0, sizeof a);
  EXPECT(epxDispatch(NULL, &a, NULL, NULL, NULL) == epxInvalidArgument, "dispatch on NULL");
  EXPECT(epxGetUniqueId(NULL) == epxInvalidArgument, "unique id NULL");
  epxConfig_t c = EPX_CONFIG_INITIALIZER;
  epxComm_t comm = (epxComm_t)(void *)1;
  EXPECT(epxCommInitRank(&comm, 2, (epxUniqueId){{0}}, 5, &c) == epxInvalidArgument,
         "rank out of range accepted");
  EXPECT(comm == NULL, "comm not cleared on failure");
  EXPECT(strstr(epxCommGetLastError(NULL), "rank is 5") != NULL, "message: %s",
         epxCommGetLastError(NULL));
}

int main(void) {
  result_strings_are_distinct_and_total();
  version_matches_header();
  config_errors_name_the_field();
  size_hints_follow_the_formulas();
  null_and_foreign_objects_are_rejected();
  if (failures) {
    fprintf(stderr, "test_core: %d failure(s)\n", failures);
    return 1;
  }
  printf("test_core: all passed\n");
  return 0;
}
