"""The `gptoss` command line: generate, make-checkpoint (and more as they land)."""

from __future__ import annotations

import argparse
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json + *.safetensors) or hub repo id")
    p.add_argument("--moe-backend", default="auto",
                   help="MoE backend name ('auto' picks the fastest supported one; see `gptoss backends`)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8"],
                   help="KV cache storage: 'auto' follows --dtype; 'fp8' stores e4m3 with per-token scales")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="activation/weight dtype; 'auto' is bfloat16 on GPU and float32 on CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                   help="fraction of GPU memory for weights, activations and KV cache")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="fix the KV cache size in bytes (overrides --gpu-memory-utilization)")


def _engine_kwargs(a) -> dict:
    return dict(moe_backend=a.moe_backend, kv_cache_dtype=a.kv_cache_dtype, dtype=a.dtype, device=a.device,
                max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                gpu_memory_utilization=a.gpu_memory_utilization, kv_cache_memory_bytes=a.kv_cache_memory_bytes)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")


def cmd_generate(a) -> int:
    from . import LLM, SamplingParams
    llm = LLM(a.model, **_engine_kwargs(a))
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                        seed=a.seed)
    t0 = time.perf_counter()
    outs = llm.generate(a.prompt, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = 0
    for o in outs:
        c = o.outputs[0]
        n += len(c.token_ids)
        print(f"[prompt] {o.prompt!r}\n[output] {c.text!r}\n[finish] {c.finish_reason} "
              f"({len(c.token_ids)} tokens)")
    print(f"[stats] {n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s) on {llm.engine.device}, "
          f"moe_backend={llm.engine.moe_backend}", file=sys.stderr)
    return 0


def cmd_make_checkpoint(a) -> int:
    from .testing import make_checkpoint
    t0 = time.perf_counter()
    out = make_checkpoint(a.dir, preset=a.preset, seed=a.seed, device=a.device, progress=True)
    print(f"wrote a random {a.preset} checkpoint to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_backends(a) -> int:
    import torch

    from .config import ModelConfig
    from .moe.registry import _REGISTRY, list_moe_backends
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig()
    for name in list_moe_backends():
        ok, why = _REGISTRY[name].is_supported(dev, cfg)
        print(f"{name:16s} {'yes' if ok else 'no ':3s} {why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptoss", description="Run OpenAI's gpt-oss models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="complete one or more prompts and print the text",
                       description="Complete prompts with a gpt-oss checkpoint and print the outputs.")
    _add_engine_args(g)
    g.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("make-checkpoint", help="write a random gpt-oss checkpoint in the HF layout",
                       description="Random weights in exactly the Hugging Face gpt-oss layout (MXFP4 "
                                   "experts, bf16 elsewhere), scaled so activations stay realistic.")
    m.add_argument("dir", help="output directory")
    m.add_argument("--preset", default="tiny", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"],
                   help="model shape: 'tiny' for CPU tests, or the published 20b/120b shapes")
    m.add_argument("--seed", type=int, default=0, help="random seed (same seed, same weights)")
    m.add_argument("--device", default=None, help="where to draw the weights (default: cuda if present)")
    m.set_defaults(func=cmd_make_checkpoint)

    b = sub.add_parser("backends", help="list the MoE backends and whether they run here",
                       description="List registered MoE backends and whether each supports this machine.")
    b.set_defaults(func=cmd_backends)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        # user errors get one clear line, not a traceback
        print(f"gptoss {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
