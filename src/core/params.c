/*
 * params.c - the table of every environment variable epx reads.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "core/log.h"
#include "core/params.h"

typedef struct epxParamDef {
  const char *name;
  int is_int;
  int64_t int_default;
  const char *str_default;
  const char *description;
} epxParamDef;

static const epxParamDef param_defs[EPX_PARAM_COUNT] = {
    [EPX_PARAM_DEBUG] = {"EPX_DEBUG", 0, 0, "", "log level: WARN, INFO or TRACE (silent when unset)"},
    [EPX_PARAM_TIMEOUT_MS] = {"EPX_TIMEOUT_MS", 1, 30000, NULL,
                              "hard timeout of every wait on a peer, when the config leaves it 0"},
    [EPX_PARAM_SOFT_TIMEOUT_MS] = {"EPX_SOFT_TIMEOUT_MS", 1, 5000, NULL,
                                   "waits longer than this are logged at WARN"},
    [EPX_PARAM_BOOTSTRAP_TIMEOUT_MS] = {"EPX_BOOTSTRAP_TIMEOUT_MS", 1, 60000, NULL,
                                        "deadline of init, when the config leaves it 0"},
    [EPX_PARAM_SOCKET_IFNAME] = {"EPX_SOCKET_IFNAME", 0, 0, "",
                                 "network interface the rendezvous binds to"},
    [EPX_PARAM_SOCKET_LOOPBACK] = {"EPX_SOCKET_LOOPBACK", 1, 0, NULL,
                                   "1: bind the rendezvous to 127.0.0.1 (single host)"},
    [EPX_PARAM_HOST_CHUNK_TOKENS] = {"EPX_HOST_CHUNK_TOKENS", 1, 128, NULL,
                                     "host backend: source tokens per shared-memory round"},
    [EPX_PARAM_DUMP_PARAMS] = {"EPX_DUMP_PARAMS", 1, 0, NULL, "1: print this table at first use"},
    [EPX_PARAM_CUDA_LL_VARIANT] = {"EPX_CUDA_LL_VARIANT", 1, 2, NULL,
                                   "CUDA low-latency kernels: 1 = a send kernel, then a receive "
                                   "kernel; 2 = both fused into one launch when there is no "
                                   "receive hook (default; ~2 us faster on 2xH200)"},
    [EPX_PARAM_LIVENESS_INTERVAL_MS] = {"EPX_LIVENESS_INTERVAL_MS", 1, 100, NULL,
                                        "CUDA backend: how often a watcher thread checks that "
                                        "the peers' processes live (0 = no watcher: a killed "
                                        "peer is then seen only at the timeout)"},
    [EPX_PARAM_CUDA_TRACE] = {"EPX_CUDA_TRACE", 1, 0, NULL,
                              "1: the CUDA low-latency kernels add up %globaltimer deltas per "
                              "phase (fused launches apart from split ones); each rank prints "
                              "the means to stderr at destroy"},
    [EPX_PARAM_CUDA_PDL] = {"EPX_CUDA_PDL", 1, 1, NULL,
                            "1: the CUDA op kernels are launched as programmatic dependents of "
                            "the kernel before them (hides launch gaps); 0: plain stream order"},
    [EPX_PARAM_CUDA_CHUNK_TOKENS] = {"EPX_CUDA_CHUNK_TOKENS", 1, 0, NULL,
                                     "CUDA normal mode: source tokens per chunk; the consuming "
                                     "blocks (copy-out, reduce) start on a chunk once every peer "
                                     "has sent it (at least 16; the same on every rank; 0 = 512 "
                                     "at 2 ranks, 256 above)"},
    [EPX_PARAM_CUDA_COMBINE_CHUNK_TOKENS] = {"EPX_CUDA_COMBINE_CHUNK_TOKENS", 1, 0, NULL,
                                             "CUDA normal mode: source tokens per combine chunk "
                                             "(at least 16; its own, not the dispatch's "
                                             "EPX_CUDA_CHUNK_TOKENS; the same on every rank; "
                                             "0 = 256)"},
    [EPX_PARAM_CUDA_SEND_SHARE] = {"EPX_CUDA_SEND_SHARE", 1, 50, NULL,
                                   "CUDA normal mode: percent of the data blocks (config.num_sms) "
                                   "that send; the others consume (the same on every rank)"},
    [EPX_PARAM_CUDA_SEND_ORDER] = {"EPX_CUDA_SEND_ORDER", 1, 0, NULL,
                                   "CUDA normal mode: which data blocks send: 0 the first ones, "
                                   "1 the last ones, 2 spread evenly over the launch (the block "
                                   "scheduler places the first blocks of a launch together)"},
    [EPX_PARAM_CUDA_DYNAMIC] = {"EPX_CUDA_DYNAMIC", 1, 1, NULL,
                                "CUDA normal mode: 1 = the send warps claim the tokens (dispatch) "
                                "or rows (combine) of each chunk from a counter, so faster SMs move "
                                "more; 0 = fixed round robin"},
    [EPX_PARAM_CUDA_BULK] = {"EPX_CUDA_BULK", 1, 2, NULL,
                             "CUDA normal mode: the send warps move rows as bulk copies (TMA, "
                             "through shared memory) when the rows are 16-byte aligned, in "
                             "dispatch (bit 1) and combine (bit 2); otherwise register copies"},
    [EPX_PARAM_CUDA_LL_PIECES] = {"EPX_CUDA_LL_PIECES", 1, 1, NULL,
                                  "CUDA low-latency combine: each expert row travels in this many "
                                  "pieces (1-4), each with its own flag, so the source may reduce "
                                  "a piece before the rest of the row is in (the same on every "
                                  "rank)"},
    [EPX_PARAM_CUDA_TRACE_FILE] = {"EPX_CUDA_TRACE_FILE", 0, 0, "",
                                   "with EPX_CUDA_TRACE=1: each rank writes the per-op times of the "
                                   "last fused LL ops to <this>.rank<r>.csv at destroy "
                                   "(tools/trace-skew reads them)"},
};

static int64_t int_values[EPX_PARAM_COUNT];
static const char *str_values[EPX_PARAM_COUNT];
static pthread_once_t params_once = PTHREAD_ONCE_INIT;

static void params_load(void) {
  for (int p = 0; p < EPX_PARAM_COUNT; ++p) {
    const epxParamDef *d = &param_defs[p];
    const char *env = getenv(d->name);
    if (d->is_int) {
      int_values[p] = d->int_default;
      if (env && *env) {
        char *end = NULL;
        errno = 0;
        long long v = strtoll(env, &end, 10);
        if (errno || *end || v < 0)
          fprintf(stderr, "epx: ignoring %s=%s (expected a non-negative integer)\n", d->name, env);
        else
          int_values[p] = v;
      }
    } else {
      str_values[p] = (env && *env) ? env : d->str_default;
    }
  }
  /* Overrides are logged here with epx_log directly: the EPX_INFO macro asks
   * epx_log_level(), which reads this table and would re-enter pthread_once. */
  const char *debug = str_values[EPX_PARAM_DEBUG];
  int info = !strcasecmp(debug, "INFO") || !strcasecmp(debug, "TRACE");
  for (int p = 0; p < EPX_PARAM_COUNT && info; ++p) {
    const char *env = getenv(param_defs[p].name);
    if (env && *env) epx_log(EPX_LOG_INFO, -1, "%s set to %s", param_defs[p].name, env);
  }
  if (int_values[EPX_PARAM_DUMP_PARAMS]) epx_params_dump();
}

int64_t epx_param_int(epxParam_t p) {
  pthread_once(&params_once, params_load);
  return int_values[p];
}

const char *epx_param_str(epxParam_t p) {
  pthread_once(&params_once, params_load);
  return str_values[p] ? str_values[p] : "";
}

void epx_params_dump(void) {
  for (int p = 0; p < EPX_PARAM_COUNT; ++p) {
    const epxParamDef *d = &param_defs[p];
    if (d->is_int)
      fprintf(stderr, "epx param %-26s = %-8lld (default %lld) %s\n", d->name,
              (long long)int_values[p], (long long)d->int_default, d->description);
    else
      fprintf(stderr, "epx param %-26s = %-8s (default \"%s\") %s\n", d->name,
              str_values[p] ? str_values[p] : "", d->str_default, d->description);
  }
}
