/*
 * log.c - one line per message on stderr: "host:pid [rank] epx LEVEL message".
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "core/log.h"
#include "core/params.h"

epxLogLevel_t epx_log_level(void) {
  /* Cached after the first read; every thread computes the same value. */
  static atomic_int cached = -1;
  int level = atomic_load_explicit(&cached, memory_order_relaxed);
  if (level < 0) {
    const char *s = epx_param_str(EPX_PARAM_DEBUG);
    int l = EPX_LOG_NONE;
    if (!strcasecmp(s, "WARN")) l = EPX_LOG_WARN;
    else if (!strcasecmp(s, "INFO")) l = EPX_LOG_INFO;
    else if (!strcasecmp(s, "TRACE")) l = EPX_LOG_TRACE;
    level = l;
    atomic_store_explicit(&cached, level, memory_order_relaxed);
  }
  return (epxLogLevel_t)level;
}

void epx_log(epxLogLevel_t level, int rank, const char *fmt, ...) {
  static const char *names[] = {"", "WARN", "INFO", "TRACE"};
  char host[64] = "?";
  gethostname(host, sizeof host - 1);
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (rank >= 0)
    fprintf(stderr, "%s:%d [%d] epx %s %s\n", host, (int)getpid(), rank, names[level], msg);
  else
    fprintf(stderr, "%s:%d [-] epx %s %s\n", host, (int)getpid(), names[level], msg);
}
