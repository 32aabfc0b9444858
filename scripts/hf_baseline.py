"""The baseline beside `gptoss bench`: transformers' GptOssForCausalLM (MXFP4 experts dequantized to
bf16, eager attention) on the same checkpoint and GPU.

    python scripts/hf_baseline.py [--ckpt /tmp/gptoss-20b]

Prints batch-1 decode tokens/s, TTFT of a 2,048-token prompt and batched decode tokens/s (HF's
generate at batch 64 pads nothing: every prompt has the same length). Medians over --runs.
"""

import argparse
import statistics
import time

import torch


def timed_generate(m, ids, new_tokens):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
               do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    from transformers import GptOssForCausalLM, Mxfp4Config
    m = GptOssForCausalLM.from_pretrained(a.ckpt, quantization_config=Mxfp4Config(dequantize=True),
                                          dtype=torch.bfloat16, device_map="cuda",
                                          attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)

    def prompt(b, n):
        return torch.randint(0, 199998, (b, n), generator=g).cuda()

    rows = []
    with torch.no_grad():
        timed_generate(m, prompt(1, 16), 4)  # warm up
        # decode rate: (time for 65 tokens - time for 1 token) / 64, so the prefill is not counted
        dec = [64 / (timed_generate(m, prompt(1, 64), 65) - timed_generate(m, prompt(1, 64), 1))
               for _ in range(a.runs)]
        rows.append(("decode batch 1", statistics.median(dec), "tok/s"))
        ttft = [timed_generate(m, prompt(1, 2048), 1) * 1000 for _ in range(a.runs)]
        rows.append(("TTFT 2048-token prompt", statistics.median(ttft), "ms"))
        b = a.batch
        tput = [b * 32 / (timed_generate(m, prompt(b, 128), 33) - timed_generate(m, prompt(b, 128), 1))
                for _ in range(a.runs)]
        rows.append((f"decode batch {b} (128-token prompts)", statistics.median(tput), "out tok/s"))
    print(f"transformers GptOssForCausalLM bf16 eager on {torch.cuda.get_device_name()}")
    for name, v, unit in rows:
        print(f"  {name:36s} {v:10.1f} {unit}")


if __name__ == "__main__":
    main()
