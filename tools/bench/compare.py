#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""autoglm MoE layer vs. PyTorch eager vs. this machine's roofline, in one invocation.

Runs, one after another (so at most one model's weights are in memory at any time):

  1. build-dir/benchmarks/bench_reference: STREAM triad / read bandwidth, OpenBLAS SGEMM peak
     and one SGEMM per MoE shape with the routed experts' active FLOPs;
  2. build-dir/benchmarks/bench_moe_layer: the autoglm MoE layers (Mixtral-8x7B,
     Qwen3-30B-A3B, GLM-4.5-Air at 1/16/128/512 tokens), as a subprocess;
  3. the same layers in PyTorch eager, in this process, after (2) has exited: a
     transformers-style per-expert loop (router linear -> softmax/sigmoid routing -> for each
     hit expert: gather its tokens, down(silu(gate(x)) * up(x)), index_add_), FP32, same
     thread count. The router weight, selection bias, expert weights and input are the same
     numbers autoglm uses (its counter-based fill_uniform is reproduced bit for bit), so both
     take the same routing; the output sums are compared as a correctness check.

then prints one table per model: tokens/s of autoglm and PyTorch and their ratio, autoglm's
GFLOP/s and GB/s (bytes of the distinct experts hit, shared expert and router), the roofline
min(BLAS GFLOP/s at the same shape, read bandwidth x arithmetic intensity) and autoglm's
percentage of it.

Every timed call, in autoglm and PyTorch alike, starts with cold caches (--flush-mb MiB read
before it, untimed). Each benchmark is repeated (--repetitions) and the fastest repetition is
reported (--stat). The CPU time other processes take during each phase is measured from
/proc/stat, and numbers taken while it was >= 5% of the machine are starred.

Build first:
  cmake -S . -B build-bench -G Ninja -DAUTOGLM_BUILD_BENCHMARKS=ON \\
        -DAUTOGLM_BUILD_TESTS=OFF -DAUTOGLM_BUILD_EXAMPLES=OFF
  cmake --build build-bench -j2
Then:
  python3 tools/bench/compare.py                 # all models (peak ~16 GB, ~10 minutes)
  python3 tools/bench/compare.py --models Qwen3  # one model (peak ~5 GB, ~2 minutes)
  python3 tools/bench/compare.py --tiny          # smoke test with small shapes, ~1 minute
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENS = [1, 16, 128, 512]
CHECK_RTOL = 1e-4  # |sum_torch - sum_autoglm| / sum|out| allowed


# ---------------------------------------------------------------------------------------------
# Noise: CPU time other processes used while we measured


def _busy_seconds() -> float | None:
    """CPU-seconds all processes spent busy since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        return None


def _own_seconds() -> float:
    import resource
    t = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        t += r.ru_utime + r.ru_stime
    return t


class NoiseMeter:
    """Measures the CPU-seconds other processes took during a phase."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.share = None

    def __enter__(self):
        self.busy, self.own, self.wall = _busy_seconds(), _own_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc):
        busy = _busy_seconds()
        if busy is None or self.busy is None:
            self.other = None
            return
        self.other = max(0.0, (busy - self.busy) - (_own_seconds() - self.own))
        wall = time.monotonic() - self.wall
        share = self.share = self.other / max(wall * (os.cpu_count() or 1), 1e-9)
        if self.quiet:
            return
        msg = f"  ({wall:.0f} s; other processes used {self.other:.1f} CPU-s"
        msg += f" = {100 * share:.0f}% of the machine" if share >= 0.02 else ""
        print(msg + (": timings are noisy)" if share >= 0.05 else ")"), flush=True)


# ---------------------------------------------------------------------------------------------
# Running the Google Benchmark binaries


def run_benchmark(binary: Path, args: argparse.Namespace, bench_filter: str) -> dict:
    """Runs one benchmark binary with JSON on stdout; its stderr passes through."""
    if not binary.exists():
        sys.exit(f"error: {binary} not found; build with -DAUTOGLM_BUILD_BENCHMARKS=ON "
                 f"(see the top of {Path(__file__).name})")
    cmd = [str(binary), f"--threads={args.threads}", "--benchmark_format=json",
           f"--benchmark_filter={bench_filter}"]
    if args.tiny:
        cmd.append("--tiny")
    if args.repetitions > 1:
        cmd.append(f"--benchmark_repetitions={args.repetitions}")
    cmd += args.benchmark_arg
    env = dict(os.environ, AUTOGLM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               AUTOGLM_BENCH_FLUSH_MB=str(args.flush_mb))
    print(f"$ {shlex.join(cmd)}", flush=True)
    with NoiseMeter() as noise:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"error: {binary.name} exited with {proc.returncode}")
    data = json.loads(proc.stdout)
    data["noise_share"] = noise.share
    return data


def results_by_label(data: dict, prefix: str, stat: str) -> dict:
    """{(label, tokens): entry} for benchmarks whose name starts with prefix, plus
    {name: entry} for the unlabelled ones. Of several repetitions, the fastest (stat "best")
    or the median one; the median aggregate when only aggregates were reported."""
    runs: dict = {}
    medians: dict = {}
    for b in data.get("benchmarks", []):
        if not b["name"].startswith(prefix):
            continue
        label = b.get("label") or ""
        key = (label, int(b["tokens"])) if "tokens" in b else b["run_name"].split("/min_time")[0]
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[key] = b
        else:
            runs.setdefault(key, []).append(b)
    out = dict(medians)
    for key, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["real_time"])
        out[key] = rs[0] if stat == "best" else rs[(len(rs) - 1) // 2]
    return out


def list_models(binary: Path, tiny: bool) -> list[str]:
    cmd = [str(binary), "--benchmark_list_tests"] + (["--tiny"] if tiny else [])
    names = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.split()
    models = []
    for n in names:
        m = re.match(r"MoELayer/([^/]+)/tokens:", n)
        if m and m.group(1) not in models:
            models.append(m.group(1))
    return models


# ---------------------------------------------------------------------------------------------
# PyTorch side


def hash_self_check(torch) -> None:
    """The int64 torch port of autoglm's splitmix64 fill_uniform must match exact integers."""
    M = (1 << 64) - 1

    def ref(seed: int, i: int) -> int:
        z = (seed * 0x9E3779B97F4A7C15 + i + 0x632BE59BD9B4E019) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return (z ^ (z >> 31)) >> 40

    for seed in (0, 7, 1000, 2001):
        idx = [0, 1, 12345, (1 << 31) + 5, (1 << 33) + 77]
        got = _hash_top24(torch, seed, torch.tensor(idx, dtype=torch.int64)).tolist()
        want = [ref(seed, i) for i in idx]
        if got != want:
            raise RuntimeError(f"torch port of autoglm's hash disagrees: {got} != {want}")


def _s64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _hash_top24(torch, seed: int, i):
    """Top 24 bits of autoglm::detail::hash64(seed, i) for an int64 index tensor (in place)."""
    z = i.add_(_s64(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019))
    z ^= (z >> 30) & ((1 << 34) - 1)
    z *= _s64(0xBF58476D1CE4E5B9)
    z ^= (z >> 27) & ((1 << 37) - 1)
    z *= _s64(0x94D049BB133111EB)
    z ^= (z >> 31) & ((1 << 33) - 1)
    return (z >> 40) & 0xFFFFFF


def fill_uniform(torch, shape, seed: int, scale: float):
    """autoglm's CpuBackend::fill_uniform: scale * u(seed, flat index), u in [-1, 1), FP32."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float32)
    chunk = 1 << 16  # int64 temporaries stay in L2: ~10x faster than large chunks
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        o = out[s:e]
        o.copy_(_hash_top24(torch, seed, torch.arange(s, e, dtype=torch.int64)))  # exact < 2^24
        o.mul_(2.0 / 16777216.0).sub_(1.0).mul_(scale)
    return out.view(*shape)


def f32_inv_sqrt(torch, n: int) -> float:
    """1.0f / std::sqrt(float(n)) in FP32, as autoglm's ::random factories compute it."""
    return float(torch.tensor(1.0, dtype=torch.float32) /
                 torch.tensor(float(n), dtype=torch.float32).sqrt())


class TorchMoE:
    """The MoE layer in transformers 5.x style (fused gate_up_proj [E, 2F, d], down_proj
    [E, d, F], per-expert loop with index_add_); shared expert as separate gate/up/down."""

    def __init__(self, torch, spec: dict, seeds: dict):
        self.t = torch
        self.spec = spec
        E, d, F, Fs = spec["experts"], spec["d"], spec["ffn"], spec["shared_ffn"]
        self.router = fill_uniform(torch, (E, d), seeds["router"], f32_inv_sqrt(torch, d))
        self.bias = (fill_uniform(torch, (E,), seeds["router"] + 1, 0.1)
                     if spec["selection_bias"] else None)
        self.gate_up = fill_uniform(torch, (E, 2 * F, d), seeds["experts"], f32_inv_sqrt(torch, d))
        self.down = fill_uniform(torch, (E, d, F), seeds["experts"] + 1, f32_inv_sqrt(torch, F))
        self.shared = None
        if Fs > 0:
            gu = fill_uniform(torch, (2 * Fs, d), seeds["shared"], f32_inv_sqrt(torch, d))
            dn = fill_uniform(torch, (d, Fs), seeds["shared"] + 1, f32_inv_sqrt(torch, Fs))
            self.shared = (gu[:Fs].clone(), gu[Fs:].clone(), dn)
            del gu

    def route(self, x):
        torch, s = self.t, self.spec
        F = torch.nn.functional
        logits = F.linear(x, self.router)
        k = s["top_k"]
        if s["score"] == "softmax":  # MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            w, idx = torch.topk(probs, k, dim=-1)
        else:  # Glm4MoeTopkRouter + Glm4MoeMoE.route_tokens_to_experts
            scores = logits.sigmoid()
            choice = scores + self.bias if self.bias is not None else scores
            ng, tg, E = s["n_group"], s["topk_group"], s["experts"]
            if ng > 1:
                gs = choice.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(dim=-1)
                gidx = torch.topk(gs, k=tg, dim=-1, sorted=False)[1]
                gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
                smask = gmask.unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
                choice = choice.masked_fill(~smask.bool(), 0.0)
            idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
            w = scores.gather(1, idx)
        if s["renormalize"]:
            w = w / (w.sum(dim=-1, keepdim=True) + s["renorm_epsilon"])
        if s["routed_scaling"] != 1.0:
            w = w * s["routed_scaling"]
        return w, idx

    def forward(self, x):
        torch = self.t
        F = torch.nn.functional
        E = self.spec["experts"]
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(idx, num_classes=E).permute(2, 1, 0)  # [E, k, T]
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in expert_hit:
            e = e[0]
            top_k_pos, token_idx = torch.where(expert_mask[e])
            cur = x[token_idx]
            gate, up = F.linear(cur, self.gate_up[e]).chunk(2, dim=-1)
            h = F.linear(F.silu(gate) * up, self.down[e])
            h = h * w[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        if self.shared is not None:
            g, u, dn = self.shared
            out = out + F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), dn)
        return out, int(expert_hit.numel())


def time_torch(torch, model: TorchMoE, x, min_time: float, flush,
               stat: str) -> tuple[float, int, object]:
    """Fastest or median seconds of model.forward(x) after warm-up, plus experts hit and the
    output.
    flush (a large tensor or None) is read before every call, untimed, as bench_moe_layer
    does, so the experts a call hits are not left in the last-level cache by the previous one."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out, hit = model.forward(x)  # warm-up 1 (also sizes the run count)
        first = time.perf_counter() - t0
        model.forward(x)  # warm-up 2
        runs = max(3, min(50, math.ceil(min_time / max(first, 1e-6))))
        times = []
        for _ in range(runs):
            if flush is not None:
                flush.sum()
            t0 = time.perf_counter()
            model.forward(x)
            times.append(time.perf_counter() - t0)
    return (min(times) if stat == "best" else statistics.median(times)), hit, out


def run_torch(torch, specs: list, seeds: dict, wanted: set, args) -> dict:
    """{(model, T): {...}} for every (model, T) in wanted, one model alive at a time."""
    torch.set_num_threads(args.threads)
    flush = (torch.ones(args.flush_mb * (1 << 20) // 4, dtype=torch.float32)
             if args.flush_mb > 0 else None)
    res = {}
    for spec in specs:
        tokens = sorted(T for (m, T) in wanted if m == spec["name"])
        if not tokens:
            continue
        t0 = time.monotonic()
        model = TorchMoE(torch, spec, seeds)
        print(f"  {spec['name']}: weights built in {time.monotonic() - t0:.0f} s", flush=True)
        for T in tokens:
            x = fill_uniform(torch, (T, spec["d"]), seeds["input"], 1.0)
            with NoiseMeter(quiet=True) as noise:
                sec, hit, out = time_torch(torch, model, x, args.torch_min_time, flush,
                                           args.stat)
            res[(spec["name"], T)] = {
                "seconds": sec, "tokens_per_s": T / sec, "experts_hit": hit,
                "noise_share": noise.share,
                "checksum": float(out.double().sum()), "abs_sum": float(out.double().abs().sum())}
            busy = (f"; other processes took {100 * noise.share:.0f}% of the CPUs"
                    if noise.share is not None and noise.share >= 0.05 else "")
            print(f"  {spec['name']} T={T}: {T / sec:,.1f} tokens/s ({sec * 1e3:.2f} ms{busy})",
                  flush=True)
            del x, out
        del model
        gc.collect()
    return res


# ---------------------------------------------------------------------------------------------
# Report


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


NOISY = 0.05  # share of the machine other processes may take before a number is starred


def print_tables(specs, ref, moe, tch, torch_note, args, noise) -> None:
    triad = ref.get("StreamTriad", {}).get("GB/s")
    read_bw = ref.get("StreamRead", {}).get("GB/s")
    peak = next((v.get("GFLOP/s") for k, v in ref.items() if isinstance(k, str)
                 and k.startswith("BlasGemm/peak")), None)
    print()
    print("References (this machine, same run, "
          f"{args.threads} threads): STREAM triad {fmt(triad)} GB/s (3 arrays), "
          f"read {fmt(read_bw)} GB/s, OpenBLAS SGEMM peak {fmt(peak)} GFLOP/s")
    print("roofline = min(OpenBLAS GFLOP/s of [T*k, d] x [d, 3F], read GB/s x AI); "
          "AI = active_flops / weight_bytes")
    flush = (f"caches flushed ({args.flush_mb} MiB read) before every timed call"
             if args.flush_mb else "warm caches (no flush)")
    print(f"each number: the {'fastest' if args.stat == 'best' else 'median'} of "
          f"{args.repetitions} Google Benchmark repetition(s) / of the timed PyTorch runs; "
          + flush)
    if torch_note:
        print(torch_note)
    star = lambda share: "*" if share is not None and share >= NOISY else ""  # noqa: E731
    ref_star, moe_star = star(noise.get("reference")), star(noise.get("autoglm"))
    if ref_star or moe_star or any(star(t.get("noise_share")) for t in tch.values()):
        print(f"* measured while other processes took >= {100 * NOISY:.0f}% of the CPUs: "
              "noisy (" + ", ".join(f"{k} {100 * v:.0f}%" for k, v in noise.items()
                                    if v is not None) + ")")
    for spec in specs:
        rows = [T for T in TOKENS if (spec["name"], T) in moe]
        if not rows:
            continue
        E, d, F = spec["experts"], spec["d"], spec["ffn"]
        desc = (f"d {d}, ffn {F}, {E} experts, top-{spec['top_k']}, {spec['score']}"
                + (", renormalised" if spec["renormalize"] else "")
                + (", selection bias" if spec["selection_bias"] else "")
                + (f", shared expert ffn {spec['shared_ffn']}" if spec["shared_ffn"] else ""))
        gb = (E * 3 * d * F + 3 * d * spec["shared_ffn"] + E * d) * 4 / 1e9
        print()
        print(f"{spec['name']}  ({desc}; {gb:.2f} GB FP32)")
        head = ("tokens", "hit", "autoglm tok/s", "torch tok/s", "ratio", "GFLOP/s", "GB/s",
                "AI", "BLAS GF/s", "BW*AI GF/s", "roofline", "% roof", "check")
        table = [head]
        for T in rows:
            a = moe[(spec["name"], T)]
            t = tch.get((spec["name"], T))
            blas = ref.get((spec["name"], T), {}).get("GFLOP/s")
            ai = a["active_flops"] / a["weight_bytes"]
            bw_ai = read_bw * ai if read_bw else None
            roof = min(v for v in (blas, bw_ai) if v is not None) if (blas or bw_ai) else None
            check = "-"
            if t:
                rel = abs(t["checksum"] - a["checksum"]) / max(a["abs_sum"], 1e-30)
                rel_abs = abs(t["abs_sum"] - a["abs_sum"]) / max(a["abs_sum"], 1e-30)
                err = max(rel, rel_abs)
                check = "ok" if err < CHECK_RTOL else f"DIFF {err:.1e}"
                if t["experts_hit"] != int(a["experts_hit"]):
                    check += f" (torch hit {t['experts_hit']})"
            t_star = star(t.get("noise_share")) if t else ""
            table.append((
                str(T), str(int(a["experts_hit"])), fmt(a["tokens/s"]) + moe_star,
                fmt(t["tokens_per_s"]) + t_star if t else "-",
                fmt(a["tokens/s"] / t["tokens_per_s"], ".2f") + (moe_star or t_star)
                if t else "-",
                fmt(a["GFLOP/s"]) + moe_star, fmt(a["GB/s"]) + moe_star, fmt(ai, ".2f"),
                fmt(blas) + ref_star if blas else "-", fmt(bw_ai) + ref_star if bw_ai else "-",
                fmt(roof) + ref_star if roof else "-",
                fmt(100 * a["GFLOP/s"] / roof if roof else None, ".0f") + (moe_star or ref_star),
                check))
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        for i, r in enumerate(table):
            print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "include",
                                "src", "benchmarks", "CMakeLists.txt"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes in include/src/benchmarks)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def warn_if_stale(moe_bin: Path, ref_bin: Path) -> None:
    """Warns when a source file is newer than the benchmark binary built from it (the numbers
    would not be those of the checked-out code)."""
    def newest(subdirs):
        files = [f for sub in subdirs for f in (REPO / sub).rglob("*")
                 if f.is_file() and f.suffix in (".hpp", ".cpp", ".h", ".txt")]
        return max(files, key=lambda f: f.stat().st_mtime, default=None)

    for binary, subdirs in ((moe_bin, ("include", "src", "benchmarks")),
                            (ref_bin, ("benchmarks",))):
        src = newest(subdirs)
        if binary.exists() and src is not None and binary.stat().st_mtime < src.stat().st_mtime:
            print(f"warning: {src.relative_to(REPO)} is newer than {binary.name}: run "
                  f"`cmake --build {binary.parent.parent} -j2` to measure the current sources")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--build-dir", type=Path, default=REPO / "build-bench",
                   help="CMake build dir with AUTOGLM_BUILD_BENCHMARKS=ON (default: build-bench)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("AUTOGLM_THREADS", "2")),
                   help="threads for autoglm, OpenBLAS, STREAM and torch (default: "
                        "AUTOGLM_THREADS or 2)")
    p.add_argument("--models", default="",
                   help="regex on model names, e.g. Qwen3 (default: all)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                   help="comma-separated token counts among 1,16,128,512")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test shapes (the binaries' --tiny) instead of the real models")
    p.add_argument("--skip-torch", action="store_true", help="do not run the PyTorch layers")
    p.add_argument("--torch-min-time", type=float, default=2.0,
                   help="seconds of timed PyTorch runs per shape (at least 3 runs)")
    p.add_argument("--flush-mb", type=int, default=None,
                   help="MiB read before every timed call to evict the caches, in autoglm and "
                        "torch alike (default 1024, 0 with --tiny; 0 = warm caches)")
    p.add_argument("--repetitions", type=int, default=3,
                   help="Google Benchmark repetitions of every benchmark (default 3)")
    p.add_argument("--stat", choices=("best", "median"), default="best",
                   help="which repetition / PyTorch run is reported: the fastest (default; "
                        "robust on a shared machine) or the median")
    p.add_argument("--benchmark-arg", action="append", default=[],
                   help="extra flag for both benchmark binaries (repeatable)")
    p.add_argument("--json-out", type=Path, help="also write every raw result here")
    args = p.parse_args()

    if args.flush_mb is None:
        args.flush_mb = 0 if args.tiny else 1024
    tokens = [int(t) for t in args.tokens.split(",") if t]
    if not tokens or any(t not in TOKENS for t in tokens):
        sys.exit(f"--tokens must be among {TOKENS}")
    bench_dir = args.build_dir / "benchmarks"
    moe_bin, ref_bin = bench_dir / "bench_moe_layer", bench_dir / "bench_reference"

    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = "not installed"
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch = None
        torch_version = "not installed"

    print("command: " + shlex.join([sys.executable] + sys.argv))
    print(f"python {platform.python_version()}, torch {torch_version}, numpy {numpy_version}; "
          f"autoglm {git_state()}; {args.threads} threads; "
          f"{cpu_name()}, {os.cpu_count()} CPUs; "
          f"cache flush {args.flush_mb} MiB before each timed call")
    b0 = _busy_seconds()
    time.sleep(1.0)
    b1 = _busy_seconds()
    if b0 is not None and b1 is not None and (b1 - b0) > 0.1:
        print(f"warning: the CPUs were {100 * (b1 - b0) / (os.cpu_count() or 1):.0f}% busy "
              "before starting: other processes will make the timings noisy")
    if not moe_bin.exists():
        sys.exit(f"error: {moe_bin} not found; build with -DAUTOGLM_BUILD_BENCHMARKS=ON")
    warn_if_stale(moe_bin, ref_bin)

    models = [m for m in list_models(moe_bin, args.tiny) if re.search(args.models, m)]
    if not models:
        sys.exit(f"no model matches --models {args.models!r}")
    alt_models = "(" + "|".join(re.escape(m).replace("\\-", "-") for m in models) + ")"
    alt_tokens = "(" + "|".join(map(str, tokens)) + ")"

    print("\n[1/3] references")
    ref_raw = run_benchmark(ref_bin, args,
                            f"^(Stream|BlasGemm/peak|BlasGemm/{alt_models}/tokens:{alt_tokens}/)")
    print("[2/3] autoglm MoE layers")
    moe_raw = run_benchmark(moe_bin, args, f"^MoELayer/{alt_models}/tokens:{alt_tokens}/")
    ref = results_by_label(ref_raw, "", args.stat)
    moe = results_by_label(moe_raw, "MoELayer/", args.stat)
    ctx = moe_raw["context"]
    specs = [s for s in json.loads(ctx["autoglm_models"]) if s["name"] in models]
    seeds = json.loads(ctx["autoglm_seeds"])

    print("[3/3] PyTorch eager")
    noise = {"reference": ref_raw.get("noise_share"), "autoglm": moe_raw.get("noise_share")}
    tch, note = {}, None
    if args.skip_torch:
        note = "PyTorch: skipped (--skip-torch)"
    elif torch is None:
        note = "PyTorch not installed: skipped"
    else:
        print(f"  torch {torch.__version__}, {args.threads} threads, FP32, per-expert loop")
        hash_self_check(torch)
        with NoiseMeter() as torch_noise:
            tch = run_torch(torch, specs, seeds, set(moe.keys()), args)
        noise["pytorch"] = torch_noise.share
    if note:
        print("  " + note)

    print_tables(specs, ref, moe, tch, note, args, noise)

    if args.json_out:
        args.json_out.write_text(json.dumps({
            "command": [sys.executable] + sys.argv, "torch": torch_version,
            "numpy": numpy_version, "reference": ref_raw, "autoglm": moe_raw,
            "pytorch": [{"model": m, "tokens": T, **v} for (m, T), v in tch.items()]},
            indent=1))
        print(f"\nraw results: {args.json_out}")


if __name__ == "__main__":
    main()
