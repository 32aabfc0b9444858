"""What a batch-1 decode step would take without the router kernel or the attention kernel: timings
only (each left-out kernel's output is frozen at its first value, so the tokens are meaningless), an
upper bound on what fusing that kernel into a neighbour could save. Alternated in one process.

    python scripts/what_if_decode.py [--ckpt /tmp/gptoss-20b] [--rounds 3]
"""

import argparse
import statistics

import torch

from ab_decode import decode_ms
from gptoss import LLM
from gptoss.model import gpt_oss as G


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    llm = LLM(a.ckpt, moe_backend="triton", max_model_len=1024, max_num_seqs=1, progress=False,
              enable_prefix_caching=False, kv_cache_memory_bytes=2 << 30)
    eng = llm.engine
    mlp, attn = G.MLPBlock.forward, G.rope_kv_attention
    frozen = {}

    def mlp_without_router(self, x, delta):  # the MoE on its layer's first normed input and logits
        if x.shape[0] != 1:
            return mlp(self, x, delta)
        if id(self) not in frozen:
            t, _, logits = G.rms_norm_linear_rows(x, delta, self.norm.weight, self.norm.eps, self.router_weight,
                                                  self.router_bias, G.ROUTER_GEMV, t_chunk_order=True)
            frozen[id(self)] = (t.clone(), logits.clone())
        t, logits = frozen[id(self)]
        return x, self.experts.forward_sum(t, logits, x_chunk_order=True)

    def attention_frozen(q, *args, **kw):
        if ("attn", q.shape) not in frozen:
            frozen[("attn", q.shape)] = attn(q, *args, **kw).clone()
        return frozen[("attn", q.shape)]

    variants = {"every kernel": (mlp, attn), "no router": (mlp_without_router, attn),
                "no attention": (mlp, attention_frozen), "neither": (mlp_without_router, attention_frozen)}
    res = {}
    try:
        for _ in range(a.rounds):
            for name, (m, f) in variants.items():
                G.MLPBlock.forward, G.rope_kv_attention = m, f
                frozen.clear()
                eng.runner.capture_cuda_graphs(1, eng.max_model_len, eng.kv_layout.window is not None)
                res.setdefault(name, []).append(decode_ms(llm, 1))
    finally:
        G.MLPBlock.forward, G.rope_kv_attention = mlp, attn
    print(f"GPU: {torch.cuda.get_device_name()}")
    print("| batch-1 step | ms/token (median) | rounds |")
    print("|---|---|---|")
    for name, v in res.items():
        print(f"| {name} | {statistics.median(v):.3f} | {' '.join(f'{x:.3f}' for x in v)} |")


if __name__ == "__main__":
    main()
