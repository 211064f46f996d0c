/*
 * bench_json.c - result records (spec.md §9) and their merge into a results file.
 *
 * A results file is a JSON array of flat objects, one per configuration, written one object
 * per line so that a change to one configuration is a one-line diff. The merge parses the
 * existing array with a small strict parser (any JSON value is accepted inside an object, but
 * only the configuration keys are looked at), keeps every object's text as it was, replaces in
 * place the objects whose configuration a new record has, and appends the rest. A file that
 * does not parse is left untouched and the merge fails: it never destroys what it cannot read.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

/* The fields that name a configuration: a new record replaces an old one equal in all. Every
 * record has each of them but "phase", which only the phase records of a low-latency op have
 * (bench.h): two records without it are equal in it, one with it and one without are not. */
static const char *const config_keys[] = {"mode",   "op",     "phase", "dtype",   "ranks",
                                          "ranks_per_node", "tokens", "hidden", "topk",
                                          "experts", "sms"};
#define NUM_CONFIG_KEYS ((int)(sizeof(config_keys) / sizeof(config_keys[0])))
#define OPTIONAL_CONFIG_KEY "phase"
/* Bytes of one record line: the command is the only long field. */
#define RECORD_BYTES 8192
/* Nesting depth the parser accepts inside a record. */
#define MAX_DEPTH 32

/* ------------------------------------------------------------ run info */

static void read_commit(char *out, size_t cap) {
  snprintf(out, cap, "unknown");
  /* A copy of the tree without .git (the GPU machine gets one) names its
   * commit through EPX_COMMIT. */
  const char *env = getenv("EPX_COMMIT");
  if (env && *env) {
    snprintf(out, cap, "%s", env);
    return;
  }
  FILE *f = popen("git rev-parse --short HEAD 2>/dev/null", "r");
  if (!f) return;
  char line[64] = {0};
  if (fgets(line, sizeof(line), f)) {
    line[strcspn(line, "\r\n")] = 0;
    if (line[0]) snprintf(out, cap, "%s", line);
  }
  pclose(f);
  if (strcmp(out, "unknown") == 0) return;
  /* The record names the commit; say when the measured code differs from it. */
  f = popen("git status --porcelain --untracked-files=no 2>/dev/null", "r");
  if (!f) return;
  if (fgets(line, sizeof(line), f))
    fprintf(stderr,
            "epx-bench: note: the working tree has uncommitted changes; records name "
            "commit %s\n",
            out);
  pclose(f);
}

void bench_run_info(benchRunInfo *info, const benchOptions *o) {
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  strftime(info->date, sizeof(info->date), "%Y-%m-%dT%H:%M:%SZ", &tm);
  read_commit(info->commit, sizeof(info->commit));
  info->machine = o->machine;
  info->command = o->command;
}

/* ---------------------------------------------------------------- write */

typedef struct outbuf {
  char *p;
  size_t len, cap;
  int overflow;
} outbuf;

static void put(outbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(outbuf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= b->cap - b->len) {
    b->overflow = 1;
    b->len = b->cap - 1;
  } else {
    b->len += (size_t)n;
  }
}

static void put_string(outbuf *b, const char *key, const char *s) {
  put(b, "\"%s\": \"", key);
  for (const unsigned char *c = (const unsigned char *)s; *c; ++c) {
    if (*c == '"' || *c == '\\')
      put(b, "\\%c", *c);
    else if (*c < 0x20)
      put(b, "\\u%04x", *c);
    else
      put(b, "%c", *c);
  }
  put(b, "\", ");
}

/* A rate or time, or null when absent (< 0). */
static void put_number(outbuf *b, const char *key, double v, const char *sep) {
  if (v < 0.0)
    put(b, "\"%s\": null%s", key, sep);
  else
    put(b, "\"%s\": %.2f%s", key, v, sep);
}

int bench_record_json(const benchRecord *r, const benchRunInfo *info, char *buf, size_t cap) {
  outbuf b = {buf, 0, cap, 0};
  if (cap == 0) return -1;
  buf[0] = 0;
  put(&b, "{");
  put_string(&b, "date", info->date);
  put_string(&b, "commit", info->commit);
  put_string(&b, "machine", info->machine);
  put_string(&b, "command", info->command);
  put_string(&b, "mode", bench_mode_name(r->mode));
  put_string(&b, "op", bench_series_op(r->series));
  if (bench_series_phase(r->series)) put_string(&b, "phase", bench_series_phase(r->series));
  put_string(&b, "dtype", bench_dtype_name(r->dtype));
  put(&b,
      "\"ranks\": %d, \"ranks_per_node\": %d, \"tokens\": %d, \"hidden\": %d, \"topk\": %d, "
      "\"experts\": %d, ",
      r->ranks, r->ranks_per_node, r->tokens, r->hidden, r->topk, r->experts);
  if (r->sms < 0) /* unknown (the LL grid of a backend this build cannot see into) */
    put(&b, "\"sms\": null, ");
  else
    put(&b, "\"sms\": %d, ", r->sms);
  put_number(&b, "time_us_p50", r->time_us_p50, ", ");
  put_number(&b, "time_us_p99", r->time_us_p99, ", ");
  put_number(&b, "logical_gbps", r->logical_gbps, ", ");
  put_number(&b, "physical_gbps", r->physical_gbps, ", ");
  put_number(&b, "e2e_us", r->e2e_us, ", ");
  put_number(&b, "nccl_time_us_p50", r->nccl_time_us_p50, ", ");
  put(&b, "\"buffer_bytes\": %zu, \"correct\": %s}", r->buffer_bytes,
      r->verdict == BENCH_CORRECT ? "true" : "false");
  return b.overflow ? -1 : (int)b.len;
}

/* ---------------------------------------------------------------- parse */

typedef struct span {
  const char *s;
  size_t n;
} span;

typedef struct parsedObject {
  span raw;                  /* the object's text, braces included */
  span key[NUM_CONFIG_KEYS]; /* raw value text of each configuration key; n = 0 if absent */
} parsedObject;

typedef struct parser {
  const char *begin, *p, *end;
  const char *path;
} parser;

static int fail_at(const parser *ps, const char *what) {
  fprintf(stderr, "epx-bench: %s: not a results array (%s at byte %ld); left as it is\n", ps->path,
          what, (long)(ps->p - ps->begin));
  return 1;
}

static void skip_ws(parser *ps) {
  while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
    ++ps->p;
}

static int parse_string(parser *ps, span *out) {
  const char *start = ps->p;
  if (ps->p >= ps->end || *ps->p != '"') return fail_at(ps, "expected a string");
  for (++ps->p; ps->p < ps->end; ++ps->p) {
    unsigned char c = (unsigned char)*ps->p;
    if (c == '\\') {
      if (++ps->p >= ps->end) break;
    } else if (c == '"') {
      ++ps->p;
      if (out) *out = (span){start, (size_t)(ps->p - start)};
      return 0;
    } else if (c < 0x20) {
      return fail_at(ps, "control character in a string");
    }
  }
  return fail_at(ps, "unterminated string");
}

static int parse_value(parser *ps, span *out, int depth);

/* An object; when `obj` is given, the configuration keys are recorded. */
static int parse_object(parser *ps, parsedObject *obj, int depth) {
  const char *start = ps->p;
  if (depth > MAX_DEPTH) return fail_at(ps, "nesting too deep");
  ++ps->p; /* '{' */
  if (obj) memset(obj->key, 0, sizeof(obj->key));
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == '}') {
    ++ps->p;
  } else {
    for (;;) {
      span key, val;
      skip_ws(ps);
      if (parse_string(ps, &key)) return 1;
      skip_ws(ps);
      if (ps->p >= ps->end || *ps->p != ':') return fail_at(ps, "expected ':'");
      ++ps->p;
      skip_ws(ps);
      if (parse_value(ps, &val, depth + 1)) return 1;
      if (obj) {
        for (int k = 0; k < NUM_CONFIG_KEYS; ++k) {
          size_t kl = strlen(config_keys[k]);
          if (key.n == kl + 2 && memcmp(key.s + 1, config_keys[k], kl) == 0) obj->key[k] = val;
        }
      }
      skip_ws(ps);
      if (ps->p < ps->end && *ps->p == ',') {
        ++ps->p;
        continue;
      }
      if (ps->p < ps->end && *ps->p == '}') {
        ++ps->p;
        break;
      }
      return fail_at(ps, "expected ',' or '}'");
    }
  }
  if (obj) obj->raw = (span){start, (size_t)(ps->p - start)};
  return 0;
}

static int parse_value(parser *ps, span *out, int depth) {
  const char *start = ps->p;
  if (ps->p >= ps->end) return fail_at(ps, "expected a value");
  char c = *ps->p;
  if (c == '"') {
    if (parse_string(ps, NULL)) return 1;
  } else if (c == '{') {
    if (parse_object(ps, NULL, depth)) return 1;
  } else if (c == '[') {
    if (depth > MAX_DEPTH) return fail_at(ps, "nesting too deep");
    ++ps->p;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ']') {
      ++ps->p;
    } else {
      for (;;) {
        skip_ws(ps);
        if (parse_value(ps, NULL, depth + 1)) return 1;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
          ++ps->p;
          continue;
        }
        if (ps->p < ps->end && *ps->p == ']') {
          ++ps->p;
          break;
        }
        return fail_at(ps, "expected ',' or ']'");
      }
    }
  } else {
    /* number or literal: a run of the characters they are made of */
    while (ps->p < ps->end && strchr("0123456789+-.eEtruefalsn", *ps->p) && *ps->p) ++ps->p;
    size_t n = (size_t)(ps->p - start);
    int is_literal = (n == 4 && (memcmp(start, "true", 4) == 0 || memcmp(start, "null", 4) == 0)) ||
                     (n == 5 && memcmp(start, "false", 5) == 0);
    int is_number = n > 0 && (start[0] == '-' || (start[0] >= '0' && start[0] <= '9'));
    if (!is_literal && !is_number) return fail_at(ps, "expected a value");
  }
  if (out) *out = (span){start, (size_t)(ps->p - start)};
  return 0;
}

/* Parses the array text into objects (*objs, *n, malloc'd). Empty text is an empty array. */
static int parse_results(const char *text, size_t len, const char *path, parsedObject **objs,
                         int *n) {
  parser ps = {text, text, text + len, path};
  int cap = 16;
  *n = 0;
  *objs = epx_test_xmalloc(sizeof(parsedObject) * (size_t)cap);
  skip_ws(&ps);
  if (ps.p == ps.end) return 0;
  if (*ps.p != '[') return fail_at(&ps, "expected '['");
  ++ps.p;
  skip_ws(&ps);
  if (ps.p < ps.end && *ps.p == ']') {
    ++ps.p;
  } else {
    for (;;) {
      skip_ws(&ps);
      if (ps.p >= ps.end || *ps.p != '{') return fail_at(&ps, "expected a record object");
      if (*n == cap) {
        cap *= 2;
        parsedObject *grown = realloc(*objs, sizeof(parsedObject) * (size_t)cap);
        if (!grown) return fail_at(&ps, "out of memory");
        *objs = grown;
      }
      if (parse_object(&ps, &(*objs)[*n], 0)) return 1;
      ++*n;
      skip_ws(&ps);
      if (ps.p < ps.end && *ps.p == ',') {
        ++ps.p;
        continue;
      }
      if (ps.p < ps.end && *ps.p == ']') {
        ++ps.p;
        break;
      }
      return fail_at(&ps, "expected ',' or ']'");
    }
  }
  skip_ws(&ps);
  if (ps.p != ps.end) return fail_at(&ps, "text after the array");
  return 0;
}

static int same_config(const parsedObject *a, const parsedObject *b) {
  for (int k = 0; k < NUM_CONFIG_KEYS; ++k) {
    if (a->key[k].n == 0 && b->key[k].n == 0 && strcmp(config_keys[k], OPTIONAL_CONFIG_KEY) == 0)
      continue; /* neither has a phase: both whole-op records */
    if (a->key[k].n == 0 || a->key[k].n != b->key[k].n) return 0;
    if (memcmp(a->key[k].s, b->key[k].s, a->key[k].n) != 0) return 0;
  }
  return 1;
}

static int read_file(const char *path, char **text, size_t *len) {
  *text = NULL;
  *len = 0;
  FILE *f = fopen(path, "rb");
  if (!f) {
    if (errno == ENOENT) return 0;
    fprintf(stderr, "epx-bench: cannot read %s: %s\n", path, strerror(errno));
    return 1;
  }
  size_t cap = 1 << 16;
  char *buf = epx_test_xmalloc(cap);
  size_t n;
  while ((n = fread(buf + *len, 1, cap - *len, f)) > 0) {
    *len += n;
    if (*len == cap) {
      cap *= 2;
      char *grown = realloc(buf, cap);
      if (!grown) {
        free(buf);
        fclose(f);
        fprintf(stderr, "epx-bench: out of memory reading %s\n", path);
        return 1;
      }
      buf = grown;
    }
  }
  int err = ferror(f);
  fclose(f);
  if (err) {
    free(buf);
    fprintf(stderr, "epx-bench: error reading %s\n", path);
    return 1;
  }
  *text = buf;
  return 0;
}

static int write_span(FILE *f, span s) { return fwrite(s.s, 1, s.n, f) == s.n ? 0 : 1; }

int bench_json_merge(const char *path, const benchRecord *recs, int n, const benchRunInfo *info) {
  int rc = 1;
  char *text = NULL, *fresh_text = NULL;
  size_t len = 0;
  parsedObject *old = NULL, *fresh = NULL;
  int *used = NULL;
  int n_old = 0;
  FILE *f = NULL;
  char tmp[4096];

  if (read_file(path, &text, &len)) goto done;
  if (parse_results(text ? text : "", len, path, &old, &n_old)) goto done;

  /* The new records, as text and parsed back, so keys compare as the same raw tokens. */
  fresh_text = epx_test_xmalloc((size_t)(n > 0 ? n : 1) * RECORD_BYTES);
  fresh = epx_test_xmalloc(sizeof(parsedObject) * (size_t)(n > 0 ? n : 1));
  used = calloc((size_t)(n > 0 ? n : 1), sizeof(int));
  if (!used) goto done;
  for (int i = 0; i < n; ++i) {
    char *line = fresh_text + (size_t)i * RECORD_BYTES;
    int l = bench_record_json(&recs[i], info, line, RECORD_BYTES);
    if (l < 0) {
      fprintf(stderr, "epx-bench: a record is longer than %d bytes\n", RECORD_BYTES);
      goto done;
    }
    parser ps = {line, line, line + l, "(new record)"};
    if (parse_object(&ps, &fresh[i], 0)) goto done;
  }

  if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof(tmp)) {
    fprintf(stderr, "epx-bench: path too long: %s\n", path);
    goto done;
  }
  f = fopen(tmp, "wb");
  if (!f) {
    fprintf(stderr, "epx-bench: cannot write %s: %s\n", tmp, strerror(errno));
    goto done;
  }
  int wrote = 0, werr = 0;
  werr |= fputs("[\n", f) < 0;
  for (int i = 0; i < n_old; ++i) {
    int match = -1;
    for (int j = 0; j < n && match < 0; ++j)
      if (same_config(&fresh[j], &old[i])) match = j;
    if (match >= 0 && used[match]) continue; /* a duplicate of a replaced record */
    werr |= wrote ? fputs(",\n", f) < 0 : 0;
    if (match >= 0) {
      used[match] = 1;
      werr |= write_span(f, fresh[match].raw);
    } else {
      werr |= write_span(f, old[i].raw);
    }
    ++wrote;
  }
  for (int j = 0; j < n; ++j) {
    if (used[j]) continue;
    werr |= wrote ? fputs(",\n", f) < 0 : 0;
    werr |= write_span(f, fresh[j].raw);
    ++wrote;
  }
  werr |= fputs("\n]\n", f) < 0;
  werr |= fflush(f) != 0;
  werr |= fsync(fileno(f)) != 0;
  werr |= fclose(f) != 0;
  f = NULL;
  if (werr) {
    fprintf(stderr, "epx-bench: error writing %s\n", tmp);
    unlink(tmp);
    goto done;
  }
  if (rename(tmp, path) != 0) {
    fprintf(stderr, "epx-bench: cannot replace %s: %s\n", path, strerror(errno));
    unlink(tmp);
    goto done;
  }
  rc = 0;
done:
  if (f) {
    fclose(f);
    unlink(tmp);
  }
  free(used);
  free(fresh);
  free(fresh_text);
  free(old);
  free(text);
  return rc;
}
