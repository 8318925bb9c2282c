#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds every libFuzzer target (tests/fuzz/fuzz_<name>.cpp) with clang, AddressSanitizer and
# UndefinedBehaviorSanitizer, then runs each for a bounded time on a copy of its seed corpus
# (tests/fuzz/corpus/<name>/; the committed seeds are never modified), with the dictionary
# tests/fuzz/<name>.dict when there is one. Exits non-zero when any target finds a crash; the
# reproducer is left in $work/artifacts/<name>/ (rerun it: build-fuzz/tests/fuzz/fuzz_<name> FILE).
#
# Usage: tests/fuzz/run.sh [seconds per target (default 60)] [name ...]   e.g. run.sh 300 safetensors
# Env:   AUTOGLM_FUZZ_BUILD (default build-fuzz), AUTOGLM_FUZZ_JOBS (build -j, default 1),
#        AUTOGLM_FUZZ_WORK (corpus copies and artifacts, default <build>/fuzz-work),
#        AUTOGLM_FUZZ_ARGS (extra libFuzzer flags, e.g. "-jobs=2 -workers=2").
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
shift || true
build=${AUTOGLM_FUZZ_BUILD:-build-fuzz}
jobs=${AUTOGLM_FUZZ_JOBS:-1}
work=${AUTOGLM_FUZZ_WORK:-$build/fuzz-work}
if ! command -v clang++ > /dev/null; then
  echo "run.sh: clang++ not found; scripts/install_deps.sh installs clang and libclang-rt-14-dev" >&2
  exit 2
fi

names=("$@")
if ((${#names[@]} == 0)); then
  for src in tests/fuzz/fuzz_*.cpp; do
    n=$(basename "$src" .cpp)
    names+=("${n#fuzz_}")
  done
fi

CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DAUTOGLM_FUZZ=ON -DAUTOGLM_BUILD_TESTS=OFF -DAUTOGLM_BUILD_EXAMPLES=OFF \
  -DAUTOGLM_BUILD_BENCHMARKS=OFF -DAUTOGLM_INSTALL=OFF > /dev/null
targets=()
for n in "${names[@]}"; do targets+=("fuzz_$n"); done
cmake --build "$build" -j "$jobs" --target "${targets[@]}"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
for n in "${names[@]}"; do
  corpus="$work/corpus/$n"
  artifacts="$work/artifacts/$n/"
  mkdir -p "$corpus" "$artifacts"
  if [ -d "tests/fuzz/corpus/$n" ]; then
    cp -n "tests/fuzz/corpus/$n"/* "$corpus"/ 2> /dev/null || true
  fi
  extra=()
  [ -f "tests/fuzz/$n.dict" ] && extra+=("-dict=tests/fuzz/$n.dict")
  # shellcheck disable=SC2206
  extra+=(${AUTOGLM_FUZZ_ARGS:-})
  echo "== fuzz_$n: ${secs}s on $corpus =="
  if ! "$build/tests/fuzz/fuzz_$n" "$corpus" "${extra[@]}" -max_total_time="$secs" -max_len=65536 \
       -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$artifacts" -print_final_stats=1; then
    echo "run.sh: fuzz_$n failed; reproducers in $artifacts" >&2
    status=1
  fi
done
exit $status
