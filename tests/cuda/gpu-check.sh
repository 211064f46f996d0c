#!/usr/bin/env bash
# GPU check of the CUDA backend's normal mode: build, correctness against the
# CPU reference (small cases first, stop at the first failure), compute-sanitizer
# memcheck on the small cases, then the standard shapes.
#
#   tests/cuda/gpu-check.sh [case...]     (no case: the default list below)
#
# Logs go to $OUT (or build/gpu-check). Needs nvcc ($CUDA_HOME) and a GPU; every
# rank of a case is a process on device rank % device_count.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build/gpu-check}
mkdir -p "$out"
jobs=$(nproc 2>/dev/null || echo 8)
cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}

nvidia-smi -L 2>&1 | tee "$out/gpus.log"
echo "== build"
if ! make -j"$jobs" all >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  exit 1
fi
mkdir -p build/tests
cc -std=c11 -O2 -g -D_GNU_SOURCE -Wall -Wextra -Werror -Iinclude -Isrc -Itests -I"$cuda_home/include" \
  tests/cuda/test_cuda_normal.c tests/common/harness.c tests/common/world.c \
  build/libepx_ref.a build/libepx.a -L"$cuda_home/lib64" -Wl,-rpath,"$cuda_home/lib64" \
  -lcudart -lstdc++ -lpthread -lrt -lm -o build/tests/test_cuda_normal >>"$out/build.log" 2>&1 ||
  { tail -n 40 "$out/build.log"; exit 1; }
small="small_two_ranks_bf16_cached small_two_ranks_worst_case_graph
fault_invalid_args_on_one_rank_then_exact fault_bad_expert_id_on_device_then_exact
fault_num_topk_mismatch_then_exact fault_absent_peer_times_out fault_abort_ends_wait"
sanitize="small_two_ranks_bf16_cached small_two_ranks_worst_case_graph"
rest="four_ranks_worst_case_int32_vary four_ranks_h7168_fp8_f32_align128
two_ranks_worst_case_fp8_ue8m0_cached four_ranks_repeated_experts_and_minus1
four_ranks_zero_tokens_on_ranks_1_and_3 three_ranks_all_minus1_biases_alone
four_ranks_two_virtual_nodes_t4096 three_ranks_back_to_back_cycles
standard_two_ranks_t4096_h7168_k8_e256 standard_four_ranks_t4096_h7168_k8_e256"
if [ $# -gt 0 ]; then small="$*"; rest=""; sanitize="$*"; fi

status=0
echo "== correctness (small)"
for c in $small; do
  timeout 120 build/tests/test_cuda_normal "$c" 2>&1 | tee -a "$out/test.log" | tail -n 20 || true
  grep -q "^PASS $c" "$out/test.log" || status=1
done
if [ $status -eq 0 ] && command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck (small)"
  for c in $sanitize; do
    # Ranks re-exec themselves (EPX_TEST_EXEC_RANKS=1) so the sanitizer follows them; one log
    # per process (%p): the count shows that every rank was checked (ranks + 1 expected).
    rm -rf build/memcheck && mkdir -p build/memcheck
    EPX_TEST_EXEC_RANKS=1 EPX_TEST_TIMEOUT_MS=120000 timeout 150 compute-sanitizer --tool memcheck --target-processes all \
      --print-limit 20 --log-file build/memcheck/%p.log build/tests/test_cuda_normal "$c" \
      >build/memcheck/stdout.txt 2>&1
    rc=$?
    for f in build/memcheck/*; do echo "== $f"; cat "$f"; done >"$out/memcheck_$c.log"
    echo "memcheck $c: exit $rc; $(ls build/memcheck/*.log | wc -l) process logs;" \
      "$(grep -hE 'ERROR SUMMARY' build/memcheck/*.log | sort | uniq -c | tr '\n' ' ')"
  done
fi
echo "== correctness (rest)"
for c in $rest; do
  timeout 120 build/tests/test_cuda_normal "$c" 2>&1 | tee -a "$out/test.log" | tail -n 12 || true
  grep -q "^PASS $c" "$out/test.log" || status=1
done
echo "== summary"
grep -E "^(PASS|FAIL)" "$out/test.log"
exit $status
