#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""INT8 MoE layers against FP32 and against oneDNN, in one run.

Runs, one after another on the same machine and threads:
  1. build/benchmarks/bench_moe_layer: the Mixtral / Qwen3 / GLM-4.5-Air layers at 1, 16, 128
     and 512 tokens in FP32 (MoELayer/...) and with int8 per-channel experts in both activation
     modes (MoELayerInt8W8A8/..., MoELayerInt8WOnly/...), router f32, cold caches;
  2. build/benchmarks/bench_dnnl_moe: oneDNN's u8 x s8 matmul on the same active shapes (each
     hit expert's rows, its own weights; GEMMs only), cold caches;
and prints per shape the times, the INT8 speed-ups over FP32 and W8A8's throughput as a share
of oneDNN's. The timed phases hold /tmp/autoglm_bench.lock (removed on exit); the CPU time other
processes took during each phase is printed.

  cmake -S . -B build-bench -G Ninja -DAUTOGLM_BUILD_BENCHMARKS=ON -DAUTOGLM_BUILD_TESTS=OFF
  cmake --build build-bench --target bench_moe_layer bench_dnnl_moe
  python3 tools/bench/compare_int8.py --build build-bench [--models Qwen3] [--repetitions 3]

Standard library only.
"""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (run_benchmark, results_by_label, NoiseMeter)

LOCK = Path("/tmp/autoglm_bench.lock")


def take_lock() -> None:
    while True:
        try:
            fd = os.open(LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            atexit.register(lambda: LOCK.unlink(missing_ok=True))
            return
        except FileExistsError:
            print(f"waiting for {LOCK} ...", flush=True)
            time.sleep(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--build", default="build-bench", help="build dir with the benchmarks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="", help="regex on the model name (default: all)")
    ap.add_argument("--repetitions", type=int, default=1)
    ap.add_argument("--stat", choices=("best", "median"), default="best")
    ap.add_argument("--flush-mb", type=int, default=1024)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test)")
    ap.add_argument("--benchmark-arg", action="append", default=[])
    args = ap.parse_args()
    bdir = Path(args.build) / "benchmarks"
    take_lock()
    pattern = f"/{args.models}" if args.models else ""
    layer = compare.run_benchmark(bdir / "bench_moe_layer", args, "^MoELayer(Int8W8A8|Int8WOnly)?/" + (args.models or ""))
    dnnl = compare.run_benchmark(bdir / "bench_dnnl_moe", args, f"^DnnlMoE{pattern}")
    fp32 = compare.results_by_label(layer, "MoELayer/", args.stat)
    w8a8 = compare.results_by_label(layer, "MoELayerInt8W8A8/", args.stat)
    wonly = compare.results_by_label(layer, "MoELayerInt8WOnly/", args.stat)
    ref = compare.results_by_label(dnnl, "DnnlMoE/", args.stat)

    def ms(d, key):
        e = d.get(key)
        return None if e is None else e["real_time"]  # benchmarks report milliseconds

    print()
    print("| layer | tokens | FP32 ms | W8A8 ms | weight-only ms | oneDNN u8s8 ms | W8A8 / FP32 "
          "speed-up | weight-only / FP32 | W8A8 throughput vs oneDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(fp32, key=lambda k: (k[0], k[1])):
        f, a, w, o = ms(fp32, key), ms(w8a8, key), ms(wonly, key), ms(ref, key)
        def r(x, y):
            return f"{x / y:.2f}x" if x and y else "-"
        share = f"{100 * o / a:.0f} %" if o and a else "-"
        print(f"| {key[0]} | {key[1]} | {compare.fmt(f, '.3f')} | {compare.fmt(a, '.3f')} | "
              f"{compare.fmt(w, '.3f')} | {compare.fmt(o, '.3f')} | {r(f, a)} | {r(f, w)} | {share} |")
    for name, d in (("bench_moe_layer", layer), ("bench_dnnl_moe", dnnl)):
        share = d.get("noise_share")
        if share is not None:
            print(f"{name}: other processes used {100 * share:.0f} % of the machine")


if __name__ == "__main__":
    main()
