#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Whole-model prefill / decode speed and load memory: autoglm vs. transformers, in one run.

On one F32 checkpoint written by tools/bench/make_model.py (a random model at a real model's
width with few layers; built first when --model-dir does not exist), runs one after another, so
that only one copy of the weights is in memory at a time:

  1. transformers (this process), FP32, attn_implementation="eager", once per
     --experts implementation: "eager" (the per-expert loop: transformers eager proper) and
     "grouped_mm" (transformers 5's default MoE kernel, torch._grouped_mm). Per run: a warm-up,
     then --repetitions times: the prefill of the prompt with a fresh DynamicCache (the last
     position's logits only, logits_to_keep=1), and --decode greedy single-token steps on that
     cache. The model is freed before the next phase.
  2. build-dir/benchmarks/bench_model as a subprocess: the same prompt and the same prefill /
     decode steps on autoglm's Session (Google Benchmark, --repetitions repetitions), plus the
     peak resident memory of load_model and of one prefill.

Then prints the tokens/s of each and autoglm's ratios, the first greedy tokens of both and how
many agree, the difference of the prefill's last logits, and autoglm's peak RSS against the
checkpoint's size. Each speed is the fastest repetition (--stat best; robust on a shared
machine) or the median. Threads: torch.set_num_threads(N) and autoglm --threads=N.

The timed phases hold /tmp/autoglm_bench.lock (other sessions' builds wait while it exists;
this script waits for a lock someone else holds); it is removed on exit, error or signal.
The CPU time other processes take during each timed phase is measured from /proc/stat.

Build first:
  cmake -S . -B build-mbench -G Ninja -DAUTOGLM_BUILD_BENCHMARKS=ON -DAUTOGLM_BUILD_TESTS=OFF
  cmake --build build-mbench -j2 --target bench_model
Then:
  python3 tools/bench/compare_model.py --model qwen3 --build-dir build-mbench
  python3 tools/bench/compare_model.py --model glm --build-dir build-mbench
"""
from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import NoiseMeter, cpu_name, git_state  # noqa: E402  (same directory)
import make_model  # noqa: E402

REPO = HERE.parents[1]
LOCK = Path("/tmp/autoglm_bench.lock")


# ---------------------------------------------------------------------------------------------
# The shared-machine lock


class BenchLock:
    """Holds LOCK for a timed phase; waits (up to `wait_s`) while someone else holds it."""

    def __init__(self, what: str, wait_s: float = 600.0):
        self.what, self.wait_s, self.held = what, wait_s, False

    def __enter__(self):
        t0 = time.monotonic()
        while True:
            try:
                fd = os.open(LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, f"{os.getpid()} compare_model.py {self.what}\n".encode())
                os.close(fd)
                self.held = True
                _held_locks.add(self)
                return self
            except FileExistsError:
                if time.monotonic() - t0 > self.wait_s:
                    sys.exit(f"error: {LOCK} still exists after {self.wait_s:.0f} s")
                time.sleep(2.0)

    def release(self):
        if self.held:
            self.held = False
            _held_locks.discard(self)
            try:
                LOCK.unlink()
            except FileNotFoundError:
                pass

    def __exit__(self, *exc):
        self.release()


_held_locks: set = set()


def _release_all(*_):
    for lock in list(_held_locks):
        lock.release()


def _on_signal(signum, _frame):
    _release_all()
    sys.exit(128 + signum)


atexit.register(_release_all)
for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


# ---------------------------------------------------------------------------------------------
# Memory


def status_kib(key: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def gib(kib_or_bytes: float, unit: str = "kib") -> float:
    return kib_or_bytes / (2**20 if unit == "kib" else 2**30)


# ---------------------------------------------------------------------------------------------
# transformers


def run_transformers(model_dir: Path, experts: str, dtype: str, prompt: list[int], args) -> dict:
    import torch
    import transformers
    from transformers import DynamicCache

    t0 = time.monotonic()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="eager",
        experts_implementation=experts).eval()
    load_s = time.monotonic() - t0
    impl = (model.config._attn_implementation,
            getattr(model.config, "_experts_implementation", None))
    ids = torch.tensor([prompt])

    def prefill():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values

    def decode(cache, tok: int, steps: int) -> list[int]:
        toks = []
        for _ in range(steps):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            cache = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
        return toks

    prefill_s, decode_s = [], []
    with torch.inference_mode():
        logits, cache = prefill()  # warm-up (untimed), also the reference logits and tokens
        first = int(logits.argmax())
        greedy = [first] + decode(cache, first, args.decode)
        last_logits = logits.float().numpy().copy()
        del cache
        with BenchLock(f"transformers {experts} {dtype}"), NoiseMeter() as noise:
            for _ in range(args.repetitions):
                t = time.perf_counter()
                logits, cache = prefill()
                prefill_s.append(time.perf_counter() - t)
                tok = int(logits.argmax())
                t = time.perf_counter()
                toks = decode(cache, tok, args.decode)
                decode_s.append(time.perf_counter() - t)
                del cache
                if [tok] + toks != greedy:
                    print(f"  warning: transformers {experts} {dtype}: a repetition's greedy "
                          "tokens differ", flush=True)
    del model, logits
    gc.collect()
    return {"experts": experts, "dtype": dtype, "impl": impl, "load_s": load_s, "prefill_s": prefill_s,
            "decode_s": decode_s, "greedy": greedy, "last_logits": last_logits,
            "noise": noise.share, "rss_after_free_kib": status_kib("VmRSS")}


# ---------------------------------------------------------------------------------------------
# autoglm


def run_autoglm(binary: Path, model_dir: Path, prompt: list[int], args) -> dict:
    if not binary.exists():
        sys.exit(f"error: {binary} not found; build it (see the top of {Path(__file__).name})")
    logits_file = tempfile.NamedTemporaryFile(prefix="autoglm_logits_", suffix=".f32",
                                              delete=False).name
    cmd = [str(binary), f"--model={model_dir}", f"--threads={args.threads}",
           "--tokens=" + ",".join(map(str, prompt)), f"--decode={args.decode}",
           f"--greedy={args.decode + 1}", f"--dump-logits={logits_file}",
           "--benchmark_format=json", f"--benchmark_repetitions={args.repetitions}",
           f"--benchmark_min_time={args.min_time}"] + (["--bf16-compute"] if args.bf16_compute else [])
    print("  $ " + shlex.join(cmd[:3] + ["--tokens=..."] + cmd[4:]), flush=True)
    with BenchLock("autoglm"), NoiseMeter() as noise:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {binary.name} exited with {r.returncode}")
    import numpy as np
    data = json.loads(r.stdout)
    info = json.loads(data["context"]["autoglm_model"])
    runs = {"prefill": [], "decode": []}
    for b in data["benchmarks"]:
        if b.get("run_type") == "iteration":
            runs["prefill" if "prefill" in b["run_name"] else "decode"].append(b["tokens/s"])
    last_logits = np.fromfile(logits_file, dtype=np.float32)
    os.unlink(logits_file)
    return {"info": info, "prefill_tps": runs["prefill"], "decode_tps": runs["decode"],
            "last_logits": last_logits, "noise": noise.share, "raw": data}


# ---------------------------------------------------------------------------------------------


def pick(values: list[float], stat: str, higher_is_better: bool) -> float:
    if stat == "median":
        return statistics.median(values)
    return max(values) if higher_is_better else min(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", choices=sorted(make_model.MODELS), default="qwen3",
                   help="shapes of the checkpoint to build when --model-dir does not exist")
    p.add_argument("--layers", type=int, help="layers of a checkpoint to build (make_model.py)")
    p.add_argument("--dtype", choices=("f32", "bf16"), default="f32",
                   help="stored dtype of the checkpoint to build / pick (make_model.py --dtype)")
    p.add_argument("--torch-dtypes", default=None,
                   help="dtype(s) transformers computes in, comma list of float32 / bfloat16 "
                        "(default: float32 for an F32 checkpoint, bfloat16,float32 for BF16)")
    p.add_argument("--model-dir", type=Path,
                   help="checkpoint directory (default /tmp/autoglm_models/<model>_<layers>l)")
    p.add_argument("--build-dir", type=Path, default=REPO / "build-mbench")
    p.add_argument("--threads", type=int, default=int(os.environ.get("AUTOGLM_THREADS", "2")))
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--decode", type=int, default=32, help="decode steps (default 32)")
    p.add_argument("--seed", type=int, default=7, help="seed of the random prompt")
    p.add_argument("--experts", default="eager,grouped_mm",
                   help="transformers experts_implementation(s) to time (default eager,grouped_mm)")
    p.add_argument("--bf16-compute", action="store_true",
                   help="run autoglm with CpuBackendOptions::bf16_compute (bf16 weights on "
                        "AMX-BF16 tiles or AVX512_BF16 dot products, bf16-rounded activations, as transformers-bf16 computes)")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.5,
                   help="Google Benchmark seconds per autoglm repetition")
    p.add_argument("--stat", choices=("best", "median"), default="best")
    p.add_argument("--json-out", type=Path, help="also write the results here")
    args = p.parse_args()

    import numpy as np
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    layers = args.layers or make_model.MODELS[args.model]["layers"]
    model_dir = args.model_dir or Path(make_model.default_dir(args.model, layers, args.dtype))
    torch_dtypes = [d for d in (args.torch_dtypes or (
        "bfloat16,float32" if args.dtype == "bf16" else "float32")).split(",") if d]
    binary = args.build_dir / "benchmarks" / "bench_model"

    print("command: " + shlex.join([sys.executable] + sys.argv))
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, numpy {np.__version__}; autoglm {git_state()}; "
          f"{args.threads} threads; {cpu_name()}, {os.cpu_count()} CPUs")

    if not (model_dir / "config.json").exists():
        print(f"\n[0] building {model_dir} (tools/bench/make_model.py, a subprocess)", flush=True)
        cmd = [sys.executable, str(HERE / "make_model.py"), "--model", args.model,
               "--layers", str(layers), "--out", str(model_dir),
               "--threads", str(args.threads), "--dtype", args.dtype]
        subprocess.run(cmd, check=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    ckpt_bytes = make_model.checkpoint_bytes(str(model_dir))
    vocab = cfg["vocab_size"]
    n_experts = next((cfg[k] for k in ("num_experts", "num_local_experts", "n_routed_experts")
                      if cfg.get(k)), "?")
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (args.prompt,), generator=gen).tolist()
    print(f"checkpoint: {model_dir}: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, "
          f"hidden {cfg['hidden_size']}, {n_experts} "
          f"experts top-{cfg['num_experts_per_tok']}, vocab {vocab}; "
          f"{ckpt_bytes / 2**30:.2f} GiB of {args.dtype.upper()} safetensors")
    print(f"prompt: {args.prompt} random ids (seed {args.seed}); decode {args.decode} greedy "
          f"steps; {args.repetitions} repetitions, {args.stat} reported")

    results = {}
    runs = [(e, d) for d in torch_dtypes for e in args.experts.split(",") if e]
    for i, (experts, dtype) in enumerate(runs):
        key = f"{experts}, {dtype}"
        print(f"\n[{i + 1}] transformers, attn eager, experts {experts}, {dtype}", flush=True)
        results[key] = run_transformers(model_dir, experts, dtype, prompt, args)
        r = results[key]
        print(f"  loaded in {r['load_s']:.1f} s ({r['impl']}); prefill "
              f"{[round(args.prompt / s, 1) for s in r['prefill_s']]} tok/s; decode "
              f"{[round(args.decode / s, 2) for s in r['decode_s']]} tok/s; "
              f"RSS after freeing {gib(r['rss_after_free_kib']):.2f} GiB", flush=True)

    print(f"\n[{len(results) + 1}] autoglm (bench_model)", flush=True)
    ag = run_autoglm(binary, model_dir, prompt, args)
    info = ag["info"]
    import resource
    script_peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)

    # ---- speed table
    ag_pf = pick(ag["prefill_tps"], args.stat, True)
    ag_dc = pick(ag["decode_tps"], args.stat, True)
    star = lambda share: "*" if share is not None and share >= 0.05 else ""  # noqa: E731
    print(f"\n== {cfg['model_type']} x{cfg['num_hidden_layers']} layers, {args.threads} threads, "
          f"{args.dtype.upper()} checkpoint (autoglm: "
          f"{'bf16 activations on AMX-BF16 or AVX512_BF16' if args.bf16_compute else 'f32 compute on the stored weights'}): "
          f"prompt {args.prompt} tokens, decode {args.decode} steps ==")
    print(f"{'':38} {'prefill tok/s':>14} {'decode tok/s':>13}")
    rows = [("autoglm", ag_pf, ag_dc, ag["noise"])]
    for experts, r in results.items():
        rows.append((f"transformers ({experts})",
                     args.prompt / pick(r["prefill_s"], args.stat, False),
                     args.decode / pick(r["decode_s"], args.stat, False), r["noise"]))
    for name, pf, dc, noise in rows:
        print(f"{name:38} {pf:14.1f} {dc:13.2f}{star(noise)}")
    for name, pf, dc, _ in rows[1:]:
        ok = "meets" if ag_pf / pf >= 2 and ag_dc / dc >= 2 else "misses"
        print(f"  autoglm / {name}: prefill {ag_pf / pf:.2f}x, decode {ag_dc / dc:.2f}x "
              f"({ok} the >= 2x target)")
    if any(star(n) for *_, n in rows):
        print("  * other processes used >= 5% of the machine during that phase: noisy")

    # ---- correctness sanity check
    print("\ngreedy tokens (first = argmax of the prefill, then the decode steps):")
    ag_greedy = info["greedy"]
    print(f"  autoglm                 {ag_greedy[:16]}")
    for experts, r in results.items():
        agree = next((i for i, (a, b) in enumerate(zip(ag_greedy, r["greedy"])) if a != b),
                     min(len(ag_greedy), len(r["greedy"])))
        tl = r["last_logits"]
        diff = float(np.abs(ag["last_logits"] - tl).max())
        print(f"  transformers {experts:22} {r['greedy'][:16]}")
        print(f"    first {agree} of {len(r['greedy'])} greedy tokens agree; prefill last-position "
              f"logits: max |diff| {diff:.2e} (max |logit| {float(np.abs(tl).max()):.2f}, "
              f"rel {diff / max(1.0, float(np.abs(tl).max())):.1e})")

    # ---- memory
    m = info["memory"]
    print(f"\nautoglm memory (checkpoint {ckpt_bytes / 2**30:.2f} GiB = {ckpt_bytes} bytes, "
          f"load {info['load_s']:.1f} s):")
    for key, what in (("after_load", "load_model"), ("after_prefill", "load + one prefill")):
        mk = m[key]
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so the child would
        # report this (larger, transformers-holding) process's peak.
        print(f"  peak RSS (VmHWM) of {what:20} {gib(mk['hwm_kib']):6.2f} GiB = "
              f"{mk['hwm_kib'] * 1024 / ckpt_bytes:.2f}x the checkpoint (target <= 1.2x); "
              f"RSS then {gib(mk['rss_kib']):.2f} GiB: anon {gib(mk['rss_anon_kib']):.2f}, "
              f"file-backed (mmap) {gib(mk['rss_file_kib']):.2f}")
    print(f"  peak RSS of this whole script (itself, with transformers, or its largest child): "
          f"{gib(script_peak_kib):.2f} GiB")

    if args.json_out:
        out = {"command": [sys.executable] + sys.argv, "torch": torch.__version__,
               "transformers": transformers.__version__, "checkpoint_bytes": ckpt_bytes,
               "prompt": prompt, "autoglm": {k: v for k, v in ag.items()
                                             if k not in ("last_logits",)},
               "transformers_runs": {k: {kk: vv for kk, vv in v.items() if kk != "last_logits"}
                                     for k, v in results.items()}}
        args.json_out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
