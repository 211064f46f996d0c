/*
 * log.h - EPX_DEBUG=WARN|INFO|TRACE logging, silent by default.
 * Lines read "host:pid [rank] epx LEVEL message".
 */
#ifndef EPX_CORE_LOG_H
#define EPX_CORE_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum epxLogLevel {
  EPX_LOG_NONE = 0,
  EPX_LOG_WARN = 1,
  EPX_LOG_INFO = 2,
  EPX_LOG_TRACE = 3
} epxLogLevel_t;

epxLogLevel_t epx_log_level(void);
/* rank < 0 when no communicator exists yet. */
void epx_log(epxLogLevel_t level, int rank, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define EPX_WARN(rank, ...) \
  do { if (epx_log_level() >= EPX_LOG_WARN) epx_log(EPX_LOG_WARN, rank, __VA_ARGS__); } while (0)
#define EPX_INFO(rank, ...) \
  do { if (epx_log_level() >= EPX_LOG_INFO) epx_log(EPX_LOG_INFO, rank, __VA_ARGS__); } while (0)
#define EPX_TRACE(rank, ...) \
  do { if (epx_log_level() >= EPX_LOG_TRACE) epx_log(EPX_LOG_TRACE, rank, __VA_ARGS__); } while (0)

#ifdef __cplusplus
}
#endif

#endif /* EPX_CORE_LOG_H */
