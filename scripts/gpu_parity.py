"""GPU check at the gpt-oss-20b shape: our bf16 model vs transformers' GptOssForCausalLM (MXFP4 dequantized).

    python scripts/gpu_parity.py [--ckpt DIR] [--moe-backend NAME ...]

Makes the 20b-shaped random checkpoint on the GPU (timed) unless --ckpt exists, then compares the
last-position logits of a few prompts: normalised max error max|ours - ref| / max|ref| (target <= 2e-2).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch


def our_logits(ckpt, backend, prompts, dtype="bfloat16"):
    from gptoss import LLM, SamplingParams
    llm = LLM(str(ckpt), moe_backend=backend, dtype=dtype, device="cuda", max_model_len=4096,
              kv_cache_memory_bytes=2 << 30, progress=False)
    captured = []
    model = llm.engine.model
    orig = model.compute_logits

    def capture(hidden, *residual):
        out = orig(hidden, *residual)
        captured.append(out.detach().clone())
        return out

    model.compute_logits = capture
    logits, tokens = [], []
    for p in prompts:
        captured.clear()
        o = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                         use_tqdm=False)[0]
        logits.append(captured[0][0].float().cpu())
        tokens.append(o.outputs[0].token_ids)
    del llm, model, orig
    gc.collect()
    torch.cuda.empty_cache()
    return logits, tokens


def hf_logits(ckpt, prompts, dtype=torch.bfloat16):
    from transformers import GptOssForCausalLM, Mxfp4Config
    m = GptOssForCausalLM.from_pretrained(str(ckpt), quantization_config=Mxfp4Config(dequantize=True),
                                          dtype=dtype, device_map="cuda").eval()
    logits, tokens = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            logits.append(m(ids).logits[0, -1].float().cpu())
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
            tokens.append(g[0, len(p):].tolist())
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return logits, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--moe-backend", nargs="+", default=["torch"])
    ap.add_argument("--fp32", action="store_true", help="also run HF and ours in fp32 (needs an H200)")
    a = ap.parse_args()
    ckpt = Path(a.ckpt)
    if not (ckpt / "config.json").exists():
        from gptoss.testing import make_checkpoint
        t0 = time.perf_counter()
        make_checkpoint(ckpt, preset="gpt-oss-20b", seed=0, device="cuda")
        print(f"make-checkpoint gpt-oss-20b on {torch.cuda.get_device_name()}: {time.perf_counter() - t0:.1f}s")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 199998, (n,), generator=g).tolist() for n in (7, 200, 1500)]
    runs = {"hf bf16": hf_logits(ckpt, prompts)}
    if a.fp32:  # HF in fp32 needs ~85 GB: the H200
        runs["hf fp32"] = hf_logits(ckpt, prompts, torch.float32)
    # ours in fp32 (torch twins, no tf32): the same code that matches HF to 1e-6 in fp32 on CPU
    runs["ours fp32"] = our_logits(ckpt, "torch", prompts, "float32")
    for backend in a.moe_backend:
        runs[f"ours bf16 {backend}"] = our_logits(ckpt, backend, prompts)
    refs = ["hf bf16", "ours fp32"] + (["hf fp32"] if a.fp32 else [])
    print(f"\n{'run':22s} {'vs':8s} {'prompt':>6s} {'norm max err':>12s} {'norm rms err':>12s} {'same greedy':>11s}")
    for ref_name in refs:
        ref, ref_tok = runs[ref_name]
        for name, (ours, tok) in runs.items():
            if name == ref_name:
                continue
            for p, r, o, rt, t in zip(prompts, ref, ours, ref_tok, tok):
                err = ((o - r).abs().max() / r.abs().max()).item()
                rms = ((o - r).pow(2).mean().sqrt() / r.abs().max()).item()
                same = next((i for i, (x, y) in enumerate(zip(rt, t)) if x != y), len(t))
                print(f"{name:22s} {ref_name:8s} {len(p):6d} {err:12.2e} {rms:12.2e} {same:8d}/32")


if __name__ == "__main__":
    main()
