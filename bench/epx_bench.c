/*
 * epx_bench.c - epx-bench, the benchmark command line (in the spirit of nccl-tests).
 *
 *   epx-bench [--ranks N] [--backend host|cuda|auto] [--mode normal|low_latency|all]
 *             [--dtype bf16|fp8|all] [--tokens T] [--hidden H] [--topk K] [--experts E]
 *             [--iters N] [--warmup N] [--json FILE] [--machine NAME] ...
 *
 * Forks one process per rank for each mode, checks one iteration of every operation against
 * the CPU reference, times the rest, prints one fixed-column line per (mode, op, dtype) and,
 * with --json, merges spec.md §9 records into FILE. Exit status 0 only when every job ran and
 * every check passed. See bench.h for the parts.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "core/internal.h"

/* Default wall-clock limit of one mode's job (s): the standard shapes on 2 cores take minutes. */
#define DEFAULT_JOB_TIMEOUT_S 1800
#define DEFAULT_ITERS BENCH_MIN_RECORDED_ITERS
#define DEFAULT_WARMUP 5
#define DEFAULT_SEED 1
/* Records of one run: modes x dtypes x ops (low latency: x 3, the phases). */
#define MAX_RECORDS 32

const char *bench_mode_name(benchMode m) {
  return m == BENCH_LOW_LATENCY ? "low_latency" : "normal";
}
const char *bench_dtype_name(benchDtype d) { return d == BENCH_FP8 ? "fp8" : "bf16"; }
const char *bench_series_op(benchSeries s) {
  switch (s) {
    case BENCH_LAYOUT:
    case BENCH_LAYOUT_E2E: return "layout";
    case BENCH_COMBINE:
    case BENCH_COMBINE_E2E:
    case BENCH_LL_COMBINE:
    case BENCH_LL_COMBINE_E2E:
    case BENCH_LL_COMBINE_SEND:
    case BENCH_LL_COMBINE_RECV:
    case BENCH_NCCL_COMBINE: return "combine";
    default: return "dispatch";
  }
}

const char *bench_series_phase(benchSeries s) {
  switch (s) {
    case BENCH_LL_DISPATCH_SEND:
    case BENCH_LL_COMBINE_SEND: return "send";
    case BENCH_LL_DISPATCH_RECV:
    case BENCH_LL_COMBINE_RECV: return "recv";
    default: return NULL;
  }
}

benchSeries bench_series_e2e(benchSeries s) {
  switch (s) {
    case BENCH_LAYOUT: return BENCH_LAYOUT_E2E;
    case BENCH_DISPATCH: return BENCH_DISPATCH_E2E;
    case BENCH_COMBINE: return BENCH_COMBINE_E2E;
    case BENCH_LL_DISPATCH: return BENCH_LL_DISPATCH_E2E;
    case BENCH_LL_COMBINE: return BENCH_LL_COMBINE_E2E;
    default: return BENCH_NUM_SERIES;
  }
}

benchSeries bench_series_base(benchSeries s) {
  switch (s) {
    case BENCH_LAYOUT_E2E: return BENCH_LAYOUT;
    case BENCH_COMBINE_E2E: return BENCH_COMBINE;
    case BENCH_LL_DISPATCH_E2E: return BENCH_LL_DISPATCH;
    case BENCH_LL_COMBINE_E2E: return BENCH_LL_COMBINE;
    default: return s;
  }
}

int bench_mode_tokens(const benchOptions *o, benchMode m) {
  if (o->tokens > 0) return o->tokens;
  return m == BENCH_LOW_LATENCY ? BENCH_STD_LL_TOKENS : BENCH_STD_NORMAL_TOKENS;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: epx-bench [options]\n"
          "  --ranks N            ranks (default: GPUs visible with the CUDA backend, else 4 "
          "processes)\n"
          "  --ranks-per-node N   ranks per NVLink domain (default: all)\n"
          "  --backend B          host | cuda | auto (default auto)\n"
          "  --mode M             normal | low_latency | all (default all)\n"
          "  --dtype D            bf16 | fp8 | all (default all)\n"
          "  --tokens T           tokens per rank (default: normal %d, low_latency %d)\n"
          "  --hidden H           hidden size (default %d)\n"
          "  --topk K             experts per token (default %d)\n"
          "  --experts E          experts in total (default %d)\n"
          "  --iters N            timed iterations per op (default %d; at least %d with --json)\n"
          "  --warmup N           untimed iterations before them (default %d)\n"
          "  --sms N              SMs for normal-mode kernels (0 = library default)\n"
          "  --seed S             input seed (default %d)\n"
          "  --check, --no-check  compare one iteration with the CPU reference (default on)\n"
          "  --json FILE          merge result records into FILE (a JSON array)\n"
          "  --machine NAME       machine kind in the records (default $EPX_MACHINE, else "
          "from the GPUs\n"
          "                       as <gpu name>-x<count> (e.g. nvidia-h200-x2; one GPU: "
          "nvidia-h200)\n"
          "                       with the CUDA backend,\n"
          "                       else host-<nproc>cpu)\n"
          "  --timeout S          wall-clock limit of one mode's run (default %d)\n"
          "  --print-backend      print the backend and rank count a run would use, and exit\n",
          BENCH_STD_NORMAL_TOKENS, BENCH_STD_LL_TOKENS, BENCH_STD_HIDDEN, BENCH_STD_TOPK,
          BENCH_STD_EXPERTS, DEFAULT_ITERS, BENCH_MIN_RECORDED_ITERS, DEFAULT_WARMUP, DEFAULT_SEED,
          DEFAULT_JOB_TIMEOUT_S);
}

static int parse_int(const char *flag, const char *s, long lo, long hi, int *out) {
  char *end = NULL;
  long v = strtol(s, &end, 10);
  if (!*s || *end || v < lo || v > hi) {
    fprintf(stderr, "epx-bench: %s %s: expected an integer in %ld..%ld\n", flag, s, lo, hi);
    return 1;
  }
  *out = (int)v;
  return 0;
}

static void append(char *out, size_t cap, size_t *len, const char *s, size_t n) {
  if (*len + n >= cap) n = cap - 1 - *len;
  memcpy(out + *len, s, n);
  *len += n;
  out[*len] = 0;
}

/* argv joined with spaces, each argument single-quoted when the shell would need it. */
static void join_command(int argc, char **argv, char *out, size_t cap) {
  size_t len = 0;
  out[0] = 0;
  for (int i = 0; i < argc; ++i) {
    const char *a = argv[i];
    if (i) append(out, cap, &len, " ", 1);
    if (*a && !strpbrk(a, " \t\n'\"\\$`*?[]{}()<>|&;!#~")) {
      append(out, cap, &len, a, strlen(a));
      continue;
    }
    append(out, cap, &len, "'", 1);
    for (const char *c = a; *c; ++c) {
      if (*c == '\'')
        append(out, cap, &len, "'\\''", 4);
      else
        append(out, cap, &len, c, 1);
    }
    append(out, cap, &len, "'", 1);
  }
}

static int parse_options(int argc, char **argv, benchOptions *o) {
  static char machine_buf[64];
  enum {
    OPT_RANKS = 256,
    OPT_RPN,
    OPT_BACKEND,
    OPT_MODE,
    OPT_DTYPE,
    OPT_TOKENS,
    OPT_HIDDEN,
    OPT_TOPK,
    OPT_EXPERTS,
    OPT_ITERS,
    OPT_WARMUP,
    OPT_SMS,
    OPT_SEED,
    OPT_CHECK,
    OPT_NO_CHECK,
    OPT_JSON,
    OPT_MACHINE,
    OPT_TIMEOUT,
    OPT_PRINT_BACKEND,
    OPT_HELP
  };
  static const struct option longopts[] = {{"ranks", required_argument, NULL, OPT_RANKS},
                                           {"ranks-per-node", required_argument, NULL, OPT_RPN},
                                           {"backend", required_argument, NULL, OPT_BACKEND},
                                           {"mode", required_argument, NULL, OPT_MODE},
                                           {"dtype", required_argument, NULL, OPT_DTYPE},
                                           {"tokens", required_argument, NULL, OPT_TOKENS},
                                           {"hidden", required_argument, NULL, OPT_HIDDEN},
                                           {"topk", required_argument, NULL, OPT_TOPK},
                                           {"experts", required_argument, NULL, OPT_EXPERTS},
                                           {"iters", required_argument, NULL, OPT_ITERS},
                                           {"warmup", required_argument, NULL, OPT_WARMUP},
                                           {"sms", required_argument, NULL, OPT_SMS},
                                           {"seed", required_argument, NULL, OPT_SEED},
                                           {"check", no_argument, NULL, OPT_CHECK},
                                           {"no-check", no_argument, NULL, OPT_NO_CHECK},
                                           {"json", required_argument, NULL, OPT_JSON},
                                           {"machine", required_argument, NULL, OPT_MACHINE},
                                           {"timeout", required_argument, NULL, OPT_TIMEOUT},
                                           {"print-backend", no_argument, NULL, OPT_PRINT_BACKEND},
                                           {"help", no_argument, NULL, OPT_HELP},
                                           {NULL, 0, NULL, 0}};

  memset(o, 0, sizeof(*o));
  o->backend = epxBackendAuto;
  o->modes[BENCH_NORMAL] = o->modes[BENCH_LOW_LATENCY] = 1;
  o->dtypes[BENCH_BF16] = o->dtypes[BENCH_FP8] = 1;
  o->hidden = BENCH_STD_HIDDEN;
  o->topk = BENCH_STD_TOPK;
  o->experts = BENCH_STD_EXPERTS;
  o->iters = DEFAULT_ITERS;
  o->warmup = DEFAULT_WARMUP;
  o->check = 1;
  o->seed = DEFAULT_SEED;
  o->timeout_s = DEFAULT_JOB_TIMEOUT_S;
  const char *env_machine = getenv("EPX_MACHINE");
  if (env_machine && *env_machine) {
    o->machine = env_machine;
    o->machine_given = 1;
  } else {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    snprintf(machine_buf, sizeof(machine_buf), "host-%ldcpu", ncpu > 0 ? ncpu : 1L);
    o->machine = machine_buf;
  }
  join_command(argc, argv, o->command, sizeof(o->command));

  int c, bad = 0, seed = DEFAULT_SEED;
  while (!bad && (c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (c) {
      case OPT_RANKS: bad = parse_int("--ranks", optarg, 1, EPX_TEST_MAX_RANKS, &o->nranks); break;
      case OPT_RPN:
        bad = parse_int("--ranks-per-node", optarg, 1, EPX_TEST_MAX_RANKS, &o->ranks_per_node);
        break;
      case OPT_TOKENS: bad = parse_int("--tokens", optarg, 1, 1 << 20, &o->tokens); break;
      case OPT_HIDDEN: bad = parse_int("--hidden", optarg, 8, 1 << 16, &o->hidden); break;
      case OPT_TOPK: bad = parse_int("--topk", optarg, 1, 32, &o->topk); break;
      case OPT_EXPERTS: bad = parse_int("--experts", optarg, 1, 1 << 16, &o->experts); break;
      case OPT_ITERS: bad = parse_int("--iters", optarg, 1, 1000000, &o->iters); break;
      case OPT_WARMUP: bad = parse_int("--warmup", optarg, 0, 1000000, &o->warmup); break;
      case OPT_SMS: bad = parse_int("--sms", optarg, 0, 100000, &o->sms); break;
      case OPT_SEED: bad = parse_int("--seed", optarg, 0, 0x7fffffff, &seed); break;
      case OPT_TIMEOUT: bad = parse_int("--timeout", optarg, 1, 86400, &o->timeout_s); break;
      case OPT_CHECK: o->check = 1; break;
      case OPT_NO_CHECK: o->check = 0; break;
      case OPT_JSON: o->json_path = optarg; break;
      case OPT_PRINT_BACKEND: o->print_backend = 1; break;
      case OPT_MACHINE:
        o->machine = optarg;
        o->machine_given = 1;
        break;
      case OPT_BACKEND:
        if (strcmp(optarg, "host") == 0)
          o->backend = epxBackendHost;
        else if (strcmp(optarg, "cuda") == 0)
          o->backend = epxBackendCuda;
        else if (strcmp(optarg, "auto") == 0)
          o->backend = epxBackendAuto;
        else {
          fprintf(stderr, "epx-bench: --backend %s: expected host, cuda or auto\n", optarg);
          bad = 1;
        }
        break;
      case OPT_MODE:
        o->modes[BENCH_NORMAL] = strcmp(optarg, "normal") == 0 || strcmp(optarg, "all") == 0;
        o->modes[BENCH_LOW_LATENCY] =
            strcmp(optarg, "low_latency") == 0 || strcmp(optarg, "all") == 0;
        if (!o->modes[BENCH_NORMAL] && !o->modes[BENCH_LOW_LATENCY]) {
          fprintf(stderr, "epx-bench: --mode %s: expected normal, low_latency or all\n", optarg);
          bad = 1;
        }
        break;
      case OPT_DTYPE:
        o->dtypes[BENCH_BF16] = strcmp(optarg, "bf16") == 0 || strcmp(optarg, "all") == 0;
        o->dtypes[BENCH_FP8] = strcmp(optarg, "fp8") == 0 || strcmp(optarg, "all") == 0;
        if (!o->dtypes[BENCH_BF16] && !o->dtypes[BENCH_FP8]) {
          fprintf(stderr, "epx-bench: --dtype %s: expected bf16, fp8 or all\n", optarg);
          bad = 1;
        }
        break;
      case OPT_HELP:
      case 'h': usage(stdout); exit(0);
      default: bad = 1; break;
    }
  }
  if (!bad && optind < argc) {
    fprintf(stderr, "epx-bench: unexpected argument '%s'\n", argv[optind]);
    bad = 1;
  }
  if (bad) {
    usage(stderr);
    return 1;
  }
  o->seed = (uint64_t)seed;
  return 0;
}

/* Picks the backend and the rank count, then checks the shape. */
static int resolve(benchOptions *o, const benchDevice **dev) {
  const benchDevice *cuda = bench_device_for(epxBackendCuda);
  if (o->backend == epxBackendAuto) {
    int gpus = cuda && epx_cuda_backend_ops() ? cuda->default_ranks() : 0;
    o->backend = gpus > 0 ? epxBackendCuda : epxBackendHost;
  }
  *dev = bench_device_for(o->backend);
  if (!*dev) {
    fprintf(stderr,
            "epx-bench: --backend cuda: this epx-bench was built without its CUDA path "
            "(no nvcc at build time); use --backend host\n");
    return 1;
  }
  if (o->nranks == 0) o->nranks = (*dev)->default_ranks();
  if (!o->machine_given && (*dev)->default_machine) {
    const char *m = (*dev)->default_machine();
    if (m) o->machine = m;
  }
  int R = o->nranks;
  const char *why = NULL;
  if (R < 1)
    why = "no ranks: the CUDA backend sees no GPU here (use --backend host, or --ranks N)";
  else if (o->experts % R != 0)
    why = "--experts must be a multiple of --ranks";
  else if (o->ranks_per_node > 0 && R % o->ranks_per_node != 0)
    why = "--ranks must be a multiple of --ranks-per-node";
  else if (o->topk > o->experts)
    why = "--topk must not exceed --experts";
  else if (o->hidden % 8 != 0)
    why = "--hidden must be a multiple of 8 (rows move in 16 bytes)";
  else if (o->dtypes[BENCH_FP8] && o->hidden % 128 != 0)
    why = "FP8 needs --hidden a multiple of 128 (one scale per 128 channels); use --dtype bf16";
  else if (o->json_path && o->iters < BENCH_MIN_RECORDED_ITERS)
    why = "recorded runs (--json) need --iters 50 or more (spec.md §8)";
  if (why) {
    fprintf(stderr, "epx-bench: %s\n", why);
    return 1;
  }
  return 0;
}

static const char *verdict_word(benchVerdict v) {
  switch (v) {
    case BENCH_CORRECT: return "ok";
    case BENCH_WRONG: return "WRONG";
    case BENCH_UNCHECKED: return "unchecked";
    case BENCH_NOT_SUPPORTED: return "not supported";
    default: return "-";
  }
}

static void print_header(const benchOptions *o, const benchDevice *dev, const benchRunInfo *info) {
  printf("# epx-bench: backend %s, %d ranks (%d per node), machine %s, commit %s, %s\n", dev->name,
         o->nranks, o->ranks_per_node > 0 ? o->ranks_per_node : o->nranks, o->machine, info->commit,
         info->date);
  printf(
      "# shape: hidden %d, top-%d of %d experts; tokens per rank: normal %d, low_latency %d;"
      " seed %llu\n",
      o->hidden, o->topk, o->experts, bench_mode_tokens(o, BENCH_NORMAL),
      bench_mode_tokens(o, BENCH_LOW_LATENCY), (unsigned long long)o->seed);
  if (dev->gate_attach)
    printf(
        "# time = GPU time from a gated common start (CUDA events; every GPU held until all "
        "ranks have enqueued the call, then released at once: no host launch skew)\n"
        "# e2e = host call to completion (wall clock, after a host barrier); "
        "dispatch e2e = layout + notify + dispatch\n");
  else
    printf(
        "# time = host call to completion (wall clock, after a host barrier); e2e = the same,"
        " except dispatch e2e = layout + notify + dispatch\n");
  printf(
      "# time: per iteration the slowest rank's, p50/p99 over %d timed iterations after %d "
      "warm-up, caches flushed before each\n",
      o->iters, o->warmup);
  printf(
      "# GB/s: logical = DeepEP's count (normal: received tokens x H x 2, FP8 x (1+4/128)/2;"
      " low latency: selections x message); physical = bytes sent to other ranks\n");
  printf("# dispatch time = cached re-dispatch (data movement)\n");
  if (o->modes[BENCH_LOW_LATENCY])
    printf(
        "# low latency, op/send = the call with return_recv_hook=1 alone (its receive follows, "
        "untimed); op/recv = epxLowLatencyRecv alone, after every rank's send has completed; "
        "phases have a time only\n");
  const char *why = dev->baseline_unavailable ? dev->baseline_unavailable(o->nranks)
                                              : "this device has no baseline";
  if (why)
    printf("# nccl baseline: skipped (%s)\n", why);
  else
    printf("# nccl baseline: ncclSend/ncclRecv all-to-all of the same rows, timed the same way\n");
  printf("%-11s %-13s %-5s %5s %6s %6s %4s %7s %10s %10s %9s %9s %10s %9s %10s %-9s\n", "mode",
         "op", "dtype", "ranks", "tokens", "hidden", "topk", "experts", "p50_us", "p99_us",
         "log_GB/s", "phys_GB/s", "e2e_us", "nccl_us", "buf_MiB", "check");
  fflush(stdout);
}

/* "dispatch", or with its phase "dispatch/send". */
static const char *row_op(benchSeries s, char *buf, size_t cap) {
  const char *phase = bench_series_phase(s);
  if (!phase) return bench_series_op(s);
  snprintf(buf, cap, "%s/%s", bench_series_op(s), phase);
  return buf;
}

/* A figure, or "-" when absent (< 0). */
static const char *figure(double v, const char *fmt, char *buf, size_t cap) {
  if (v < 0)
    snprintf(buf, cap, "-");
  else
    snprintf(buf, cap, fmt, v);
  return buf;
}

static void print_row(const benchRecord *r) {
  char op[32], logical[32], physical[32], e2e[32], nccl[32];
  if (r->verdict == BENCH_NOT_SUPPORTED) {
    printf("%-11s %-13s %-5s %5d %6d %6d %4d %7d %10s %10s %9s %9s %10s %9s %10s %-9s\n",
           bench_mode_name(r->mode), row_op(r->series, op, sizeof(op)), bench_dtype_name(r->dtype),
           r->ranks, r->tokens, r->hidden, r->topk, r->experts, "-", "-", "-", "-", "-", "-", "-",
           "not supported");
    fflush(stdout);
    return;
  }
  printf("%-11s %-13s %-5s %5d %6d %6d %4d %7d %10.1f %10.1f %9s %9s %10s %9s %10.1f %-9s\n",
         bench_mode_name(r->mode), row_op(r->series, op, sizeof(op)), bench_dtype_name(r->dtype),
         r->ranks, r->tokens, r->hidden, r->topk, r->experts, r->time_us_p50, r->time_us_p99,
         figure(r->logical_gbps, "%.2f", logical, sizeof(logical)),
         figure(r->physical_gbps, "%.2f", physical, sizeof(physical)),
         figure(r->e2e_us, "%.1f", e2e, sizeof(e2e)),
         figure(r->nccl_time_us_p50, "%.1f", nccl, sizeof(nccl)),
         (double)r->buffer_bytes / (1024.0 * 1024.0), verdict_word(r->verdict));
  fflush(stdout);
}

/* The records of one finished job, in table order. */
static int collect(const benchShm *shm, const benchOptions *o, benchMode mode, benchRecord *recs,
                   int n) {
  static const benchSeries normal_ops[] = {BENCH_LAYOUT, BENCH_DISPATCH, BENCH_COMBINE};
  static const benchSeries ll_ops[] = {BENCH_LL_DISPATCH,     BENCH_LL_DISPATCH_SEND,
                                       BENCH_LL_DISPATCH_RECV, BENCH_LL_COMBINE,
                                       BENCH_LL_COMBINE_SEND,  BENCH_LL_COMBINE_RECV};
  const benchSeries *ops = mode == BENCH_NORMAL ? normal_ops : ll_ops;
  int nops = mode == BENCH_NORMAL ? 3 : 6;
  for (int d = 0; d < BENCH_NUM_DTYPES; ++d)
    for (int i = 0; i < nops && n < MAX_RECORDS; ++i)
      if (bench_summarise(shm, o, mode, (benchDtype)d, ops[i], &recs[n]) == 0)
        print_row(&recs[n++]);
  return n;
}

int main(int argc, char **argv) {
  benchOptions o;
  const benchDevice *dev = NULL;
  if (parse_options(argc, argv, &o) || resolve(&o, &dev)) return 2;
  if (o.print_backend) {
    printf("%s %d\n", dev->name, o.nranks);
    return 0;
  }
  if (o.iters < BENCH_MIN_RECORDED_ITERS)
    fprintf(stderr, "epx-bench: note: %d timed iterations (fewer than %d): not for the records\n",
            o.iters, BENCH_MIN_RECORDED_ITERS);

  benchRunInfo info;
  bench_run_info(&info, &o);
  print_header(&o, dev, &info);

  benchShm *shm = bench_shm_create(o.nranks, o.iters);
  if (!shm) return 1;
  benchRecord recs[MAX_RECORDS];
  int nrec = 0, failed = 0;
  for (int m = 0; m < BENCH_NUM_MODES; ++m) {
    if (!o.modes[m]) continue;
    bench_shm_reset(shm);
    benchJob job = {&o, dev, (benchMode)m, shm};
    double t0 = epx_test_now();
    int rc = epx_test_spawn(o.nranks, bench_rank_main, &job, o.timeout_s);
    if (rc != 0 || bench_shm_failed(shm)) {
      fprintf(stderr, "epx-bench: the %s run failed after %.1f s (messages above); no records\n",
              bench_mode_name((benchMode)m), epx_test_now() - t0);
      failed = 1;
      continue;
    }
    nrec = collect(shm, &o, (benchMode)m, recs, nrec);
    fprintf(stderr, "epx-bench: %s: %.1f s\n", bench_mode_name((benchMode)m), epx_test_now() - t0);
  }
  bench_shm_destroy(shm);

  int wrong = 0, nkeep = 0, unsupported = 0;
  for (int i = 0; i < nrec; ++i) {
    wrong |= recs[i].verdict == BENCH_WRONG;
    /* An operation the backend does not serve has a row, not a record: it measured nothing. */
    if (recs[i].verdict == BENCH_NOT_SUPPORTED)
      ++unsupported;
    else
      recs[nkeep++] = recs[i];
  }
  if (wrong) fprintf(stderr, "epx-bench: some outputs differ from the reference (check column)\n");
  if (unsupported)
    printf("# %d operations not supported by the %s backend: no records for them\n", unsupported,
           dev->name);
  if (o.json_path && nkeep > 0) {
    if (bench_json_merge(o.json_path, recs, nkeep, &info) != 0) {
      failed = 1;
    } else {
      printf("# %d records merged into %s\n", nkeep, o.json_path);
    }
  }
  return failed || wrong ? 1 : 0;
}
