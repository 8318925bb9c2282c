#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Build a seeded, random MoE checkpoint at a real model's width but with few layers.

The checkpoint has the layout transformers' save_pretrained writes (config.json from the config
class + one F32 model.safetensors with the Hub's per-expert tensor names), so autoglm's
load_model and transformers' from_pretrained read the same file. It is GBs: write it outside the
repository (default /tmp/autoglm_models/<name>_<layers>l).

  python3 tools/bench/make_model.py --model qwen3 [--layers 2] [--out DIR]
  python3 tools/bench/make_model.py --model glm   [--layers 1] [--out DIR]

Shapes (the vocabulary is cut to --vocab, default 8192, to keep the embedding and LM head small;
everything else is the real model's):

  qwen3: Qwen3-30B-A3B   hidden 2048, 32 heads / 4 kv heads, head_dim 128, q/k norm,
                         128 experts top-8, expert ffn 768, no shared expert
  glm:   GLM-4.5-Air     hidden 4096, 96 heads / 8 kv heads, head_dim 128, qkv bias, partial
                         rotary 0.5, 128 experts top-8 (sigmoid + selection bias, 1 group),
                         expert ffn 1408, 1 shared expert of 1408; first_k_dense_replace 0
                         (the real model's dense first layer, ffn 10944, would add 0.5 GB/layer)

Weights: like tools/fixtures/make_fixtures.py, every matrix is N(0, 1/fan_in), norms 1 + 0.2 N,
biases 0.3 N, the router 2 N(0, 1/d), the selection bias -0.3 + 0.5 N, the embedding N(0, 1) and
the LM head 3 N(0, 1/d): the routing is not degenerate and greedy tokens have a clear margin.
Everything is drawn from one torch.Generator seeded with --seed, in sorted tensor-name order, so
two runs give the same file. The model is never built: its tensor names and shapes come from a
meta-device instance, and each tensor is drawn and streamed to the file in turn, so the peak
memory is one tensor (the whole model at once would not fit beside transformers' own load of it
on a 24 GB machine for GLM-4.5-Air widths).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings

MODELS = {
    "qwen3": dict(
        config_class="Qwen3MoeConfig", layers=2, seed=3030,
        config=dict(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], rms_norm_eps=1e-6, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False, max_position_embeddings=4096,
        )),
    "glm": dict(
        config_class="Glm4MoeConfig", layers=1, seed=4545,
        config=dict(
            hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
            num_attention_heads=96, num_key_value_heads=8, head_dim=128,
            partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False,
            n_routed_experts=128, num_experts_per_tok=8, n_group=1, topk_group=1,
            n_shared_experts=1, routed_scaling_factor=1.0, norm_topk_prob=True,
            first_k_dense_replace=0, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "partial_rotary_factor": 0.5},
            tie_word_embeddings=False, max_position_embeddings=4096,
        )),
}


def hub_tensors(model) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, init rule, fan_in) of every tensor of the Hub checkpoint, sorted by name.

    The model is on the meta device (no memory): its parameters give the names and shapes;
    transformers 5's fused expert stacks are split into the Hub's per-expert matrices, as
    save_pretrained writes them (from_pretrained fuses them back).
    """
    out = []
    named = dict(model.named_parameters())
    named.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    for name, t in named.items():
        shape = tuple(t.shape)
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, d] -> gate_proj / up_proj [I, d]
            base, (E, I2, d) = name[: -len("gate_up_proj")], shape
            for e in range(E):
                for part in ("gate_proj", "up_proj"):
                    out.append((f"{base}{e}.{part}.weight", (I2 // 2, d), "matrix", d))
        elif name.endswith("experts.down_proj"):  # [E, d, I] -> down_proj [d, I]
            base, (E, d, I) = name[: -len("down_proj")], shape
            for e in range(E):
                out.append((f"{base}{e}.down_proj.weight", (d, I), "matrix", I))
        elif name.endswith("e_score_correction_bias"):
            out.append((name, shape, "selection_bias", 0))
        elif "norm" in name.split(".")[-2] or name.endswith("norm.weight"):
            out.append((name, shape, "norm", 0))
        elif name.endswith(".bias"):
            out.append((name, shape, "bias", 0))
        elif name.endswith("embed_tokens.weight"):
            out.append((name, shape, "embedding", 0))
        elif name == "lm_head.weight":
            out.append((name, shape, "lm_head", shape[-1]))
        elif name.endswith("mlp.gate.weight"):
            out.append((name, shape, "router", shape[-1]))
        elif len(shape) >= 2:
            out.append((name, shape, "matrix", shape[-1]))
        else:
            raise RuntimeError(f"no init rule for {name} {shape}")
    return sorted(out)


def draw(rule: str, shape, fan_in: int, gen, torch):
    t = torch.empty(shape, dtype=torch.float32)
    if rule == "selection_bias":
        return t.normal_(0.0, 1.0, generator=gen).mul_(0.5).add_(-0.3)
    if rule == "norm":
        return t.normal_(0.0, 1.0, generator=gen).mul_(0.2).add_(1.0)
    if rule == "bias":
        return t.normal_(0.0, 0.3, generator=gen)
    if rule == "embedding":
        return t.normal_(0.0, 1.0, generator=gen)
    scale = {"lm_head": 3.0, "router": 2.0, "matrix": 1.0}[rule]
    return t.normal_(0.0, scale / math.sqrt(fan_in), generator=gen)


def write_safetensors(path: str, tensors, gen, torch, dtype: str = "f32") -> int:
    """Streams the tensors into one F32 (or BF16) safetensors file: the header first (every
    shape is known), then each tensor drawn and written in turn, so at most one is in memory.
    BF16 values are the F32 draws rounded to nearest even (torch's conversion)."""
    size, tag = (2, "BF16") if dtype == "bf16" else (4, "F32")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _, _ in tensors:
        n = size * math.prod(shape)
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data section 8-byte aligned, as the writers do
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, shape, rule, fan_in in tensors:  # data in header order: sorted by name
            t = draw(rule, shape, fan_in, gen, torch)
            if dtype == "bf16":  # numpy has no bfloat16: write the bits
                t = t.to(torch.bfloat16).view(torch.int16)
            f.write(memoryview(t.numpy()).cast("B"))
    os.replace(tmp, path)
    return offset


def build(name: str, layers: int, vocab: int, seed: int, out: str, threads: int,
          dtype: str = "f32") -> str:
    import torch
    import transformers
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    spec = MODELS[name]
    kw = dict(spec["config"], num_hidden_layers=layers, vocab_size=vocab, bos_token_id=None,
              eos_token_id=None, pad_token_id=None, use_cache=True)
    cfg = getattr(transformers, spec["config_class"])(**kw)
    cfg.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    t0 = time.monotonic()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tensors = hub_tensors(model)
    del model
    n = sum(math.prod(s) for _, s, _, _ in tensors)
    size = 2 if dtype == "bf16" else 4
    print(f"  {name}: {layers} layers, {n / 1e9:.3f} G parameters ({size * n / 2**30:.2f} GiB "
          f"{dtype.upper()}), {len(tensors)} tensors", flush=True)
    os.makedirs(out, exist_ok=True)
    cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, gen, torch, dtype)
    with open(os.path.join(out, "make_model.json"), "w") as f:
        json.dump({"model": name, "layers": layers, "vocab": vocab, "seed": seed, "dtype": dtype,
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "command": [sys.executable] + sys.argv}, f, indent=2)
    print(f"  wrote {out} in {time.monotonic() - t0:.0f} s", flush=True)
    return out


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--layers", type=int, help="decoder layers (default: qwen3 2, glm 1)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32",
                    help="stored dtype (bf16: the f32 draws rounded, as Hub checkpoints ship)")
    ap.add_argument("--out", help="default /tmp/autoglm_models/<model>_<layers>l[_bf16]")
    a = ap.parse_args(argv)
    layers = a.layers or MODELS[a.model]["layers"]
    seed = a.seed if a.seed is not None else MODELS[a.model]["seed"]
    out = a.out or default_dir(a.model, layers, a.dtype)
    print("command: " + shlex.join([sys.executable] + sys.argv))
    build(a.model, layers, a.vocab, seed, out, a.threads, a.dtype)


def default_dir(model: str, layers: int, dtype: str = "f32") -> str:
    return f"/tmp/autoglm_models/{model}_{layers}l" + ("_bf16" if dtype == "bf16" else "")


if __name__ == "__main__":
    main()
