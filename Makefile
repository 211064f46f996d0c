# epx build. `make` builds the libraries, `make test` runs every test,
# `make bench` runs the benchmark (GPUs when present, else the host backend).
# Variables: SANITIZE=address,undefined | thread ; BUILD=<dir> ; NVCC=<path> (empty = no CUDA).

BUILD ?= build$(if $(SANITIZE),-$(subst $(comma),-,$(SANITIZE)))
comma := ,
CC ?= cc
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_ARCH ?= sm_90

WARN := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-unused-parameter
# -ffp-contract=off: host sums must round like the GPU's (__fadd_rn/__fmul_rn), never fused.
CFLAGS_BASE := -std=c11 -g -O2 -fPIC -pthread -D_GNU_SOURCE -ffp-contract=off -fvisibility=hidden \
               -Iinclude -Isrc $(WARN)
ifneq ($(SANITIZE),)
  CFLAGS_BASE += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -O1
  LDFLAGS_SAN := -fsanitize=$(SANITIZE)
endif
CFLAGS += $(CFLAGS_BASE)
LDLIBS := -pthread -lrt -lm

LIB_SRCS := $(wildcard src/core/*.c src/bootstrap/*.c src/backends/host/*.c)
REF_SRCS := $(wildcard src/reference/*.c)
CUDA_SRCS := $(wildcard src/backends/cuda/*.cu)

# The CUDA backend is built whenever nvcc is present (CI compiles every kernel);
# sanitizer builds leave it out (ASan/UBSan cover the host code).
WITH_CUDA :=
ifneq ($(NVCC),)
ifneq ($(CUDA_SRCS),)
ifeq ($(SANITIZE),)
  WITH_CUDA := 1
endif
endif
endif

LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
REF_OBJS := $(REF_SRCS:%.c=$(BUILD)/obj/%.o)
ifeq ($(WITH_CUDA),1)
  CFLAGS += -DEPX_WITH_CUDA=1
  NVCCFLAGS := -std=c++17 -O3 -arch=$(CUDA_ARCH) -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Werror \
               -Werror all-warnings -fmad=false -Iinclude -Isrc -DEPX_WITH_CUDA=1 -lineinfo
  CUDA_OBJS := $(CUDA_SRCS:%.cu=$(BUILD)/obj/%.o)
  CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lstdc++
endif

SO := $(BUILD)/libepx.so
AR_LIB := $(BUILD)/libepx.a
REF_LIB := $(BUILD)/libepx_ref.a

UNIT_SRCS := $(wildcard tests/unit/*.c)
MP_SRCS := $(wildcard tests/mp/*.c)
TEST_COMMON := $(wildcard tests/common/*.c)
TEST_COMMON_OBJS := $(TEST_COMMON:%.c=$(BUILD)/obj/%.o)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)
MP_BINS := $(MP_SRCS:tests/mp/%.c=$(BUILD)/tests/%)
# bench/bench_cuda.c (the GPU path: CUDA events, L2 flush, the start gate whose kernel is
# bench/bench_gate.cu, the NCCL baseline loaded with dlopen) is built with the CUDA backend;
# BENCH_CFLAGS reach the bench objects only.
BENCH_SRCS := $(filter-out bench/bench_cuda.c,$(wildcard bench/*.c))
BENCH_CU_SRCS :=
BENCH_CFLAGS :=
BENCH_LIBS :=
ifeq ($(WITH_CUDA),1)
  BENCH_SRCS += bench/bench_cuda.c
  BENCH_CU_SRCS += bench/bench_gate.cu
  BENCH_CFLAGS += -I$(CUDA_HOME)/include -DEPX_BENCH_HAVE_CUDA=1
  BENCH_LIBS += -ldl
endif
BENCH_OBJS := $(BENCH_SRCS:%.c=$(BUILD)/obj/%.o) $(BENCH_CU_SRCS:%.cu=$(BUILD)/obj/%.o)
BENCH := $(BUILD)/epx-bench

.PHONY: all lib test test-cuda bench clean header-check
all: lib $(REF_LIB)
lib: $(SO) $(AR_LIB)

# Objects are rebuilt when the flags change (for example when nvcc appears and
# EPX_WITH_CUDA is defined), not only when sources do.
FLAGS_STAMP := $(BUILD)/flags.stamp
FLAGS_NOW := $(CC) $(CFLAGS) $(NVCC) $(WITH_CUDA)
$(shell mkdir -p $(BUILD); [ "$$(cat $(FLAGS_STAMP) 2>/dev/null)" = "$(FLAGS_NOW)" ] || echo "$(FLAGS_NOW)" > $(FLAGS_STAMP))

$(BUILD)/obj/%.o: %.c $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/%.o: %.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

$(SO): $(LIB_OBJS) $(CUDA_OBJS)
	$(CC) -shared -o $@ $^ $(LDFLAGS_SAN) $(CUDA_LIBS) $(LDLIBS)

$(AR_LIB): $(LIB_OBJS) $(CUDA_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(REF_LIB): $(REF_OBJS)
	@rm -f $@
	ar rcs $@ $^

# Tests and the benchmark link the static library, so they see internal
# symbols (hidden in libepx.so) and need no LD_LIBRARY_PATH.
$(BUILD)/tests/%: tests/unit/%.c $(AR_LIB) $(REF_LIB) $(TEST_COMMON_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -o $@ $< $(TEST_COMMON_OBJS) $(REF_LIB) $(AR_LIB) $(LDFLAGS_SAN) $(CUDA_LIBS) $(LDLIBS)

$(BUILD)/tests/%: tests/mp/%.c $(AR_LIB) $(REF_LIB) $(TEST_COMMON_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -o $@ $< $(TEST_COMMON_OBJS) $(REF_LIB) $(AR_LIB) $(LDFLAGS_SAN) $(CUDA_LIBS) $(LDLIBS)

$(BUILD)/obj/tests/common/%.o: tests/common/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -MMD -MP -c $< -o $@

$(BENCH): $(BENCH_OBJS) $(AR_LIB) $(REF_LIB) $(TEST_COMMON_OBJS)
	$(CC) $(CFLAGS) -o $@ $(BENCH_OBJS) $(TEST_COMMON_OBJS) $(REF_LIB) $(AR_LIB) $(LDFLAGS_SAN) $(CUDA_LIBS) $(BENCH_LIBS) $(LDLIBS)

$(BUILD)/obj/bench/%.o: bench/%.c $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(BENCH_CFLAGS) -Itests -MMD -MP -c $< -o $@

# The public header must compile as C11 and as C++ on its own.
header-check:
	@mkdir -p $(BUILD)
	printf '#include "epx.h"\nint main(void){epxConfig_t c = EPX_CONFIG_INITIALIZER; return (int)c.version * 0;}\n' > $(BUILD)/hc.c
	$(CC) -std=c11 -pedantic -Wall -Wextra -Werror -Iinclude -c $(BUILD)/hc.c -o $(BUILD)/hc_c.o
	cp $(BUILD)/hc.c $(BUILD)/hc.cpp
	c++ -std=c++11 -pedantic -Wall -Wextra -Werror -Iinclude -c $(BUILD)/hc.cpp -o $(BUILD)/hc_cpp.o

# GPU tests: built wherever nvcc is (CI compiles them), run by tools/gpu-check
# on the GPU machine.
ifeq ($(WITH_CUDA),1)
CUDA_TEST_BINS := $(patsubst tests/cuda/%.c,$(BUILD)/tests/%,$(wildcard tests/cuda/*.c))
$(BUILD)/tests/%: tests/cuda/%.c $(AR_LIB) $(REF_LIB) $(TEST_COMMON_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -I$(CUDA_HOME)/include -o $@ $< $(TEST_COMMON_OBJS) $(REF_LIB) $(AR_LIB) $(CUDA_LIBS) $(LDLIBS)
endif

# Studies: small programs that measure a design question (see each file's head).
STUDY_BINS := $(BUILD)/study-combine-precision
$(BUILD)/study-combine-precision: tools/study_combine_precision.c src/common/numerics.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LDFLAGS_SAN) -lm

# Probes: GPU programs that measure the hardware (not run by the tests; built
# here so that they keep compiling). probe-ce: copy-engine exchange rates.
PROBE_BINS :=
ifeq ($(WITH_CUDA),1)
PROBE_BINS += $(BUILD)/probe-ce
$(BUILD)/probe-ce: tools/probe_ce.cu
	@mkdir -p $(dir $@)
	$(NVCC) -O3 -arch=$(CUDA_ARCH) -Werror all-warnings -o $@ $<
endif

# Tests of the scripts in tools/ (plain executables; python3 only)
TOOL_TESTS := tests/tools/test_trace_skew

test: header-check $(UNIT_BINS) $(MP_BINS) $(BENCH) $(CUDA_TEST_BINS) $(STUDY_BINS) $(PROBE_BINS)
	@tools/run-tests $(BUILD) $(UNIT_BINS) $(MP_BINS) $(TOOL_TESTS)


test-cuda: $(CUDA_TEST_BINS)
	@if [ -z "$(CUDA_TEST_BINS)" ]; then echo "no CUDA tests built (nvcc missing?)"; exit 1; fi
	tools/run-tests $(BUILD) $(CUDA_TEST_BINS)

bench: $(BENCH)
	tools/bench $(BUILD)

clean:
	rm -rf build build-*

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
