"""What one more call of a decode-step stage costs inside the graphed batch-1 step: each named stage
runs twice per layer (same inputs, same outputs; the second call's time is the stage's cost in the
PDL chain, launch and ramp included), alternated with the plain step in one process.

    python scripts/marginal_cost.py [--ckpt /tmp/gptoss-20b] [--stages routing attention norm gemv]

Prints ms per token and the difference per layer against the plain step. With "routing" among the
stages the step runs the routing kernel (backends.INLINE_ROUTING off), as it did before one-token
routing moved into gate_up. "attention" is rope + KV write + attention, one kernel at decode since
the fourth session (it was two stages, kv_write and attention, before).
"""
import argparse
import statistics

import torch

import gptoss.model.gpt_oss as model
import gptoss.moe.triton_backends as backends
from ab_decode import _llm, decode_ms

STAGES = {"routing": (backends, "moe_routing"), "attention": (model, "rope_kv_attention"),
          "norm": (model, "rms_norm"), "gemv": (model, "linear_rows")}


def twice(f):
    def g(*a, **k):
        f(*a, **k)
        return f(*a, **k)
    return g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    a = ap.parse_args()
    a.batch = [1]
    backends.INLINE_ROUTING = "routing" not in a.stages  # one token routes inside gate_up otherwise
    llm = _llm(a)
    eng = llm.engine
    orig = {s: (m, n, getattr(m, n)) for s, (m, n) in STAGES.items()}
    res = {}
    for _ in range(a.rounds):
        for doubled in [None, *a.stages]:
            for s, (m, n, f) in orig.items():
                setattr(m, n, twice(f) if s == doubled else f)
            eng.runner.capture_cuda_graphs(1, eng.max_model_len, eng.kv_layout.window is not None)
            res.setdefault(doubled, []).append(decode_ms(llm, 1))
    for m, n, f in orig.values():
        setattr(m, n, f)
    layers = len(eng.model.layers)
    base = statistics.median(res[None])
    print(f"GPU: {torch.cuda.get_device_name()}, batch 1, {layers} layers")
    print("| stage run twice | ms/token (median) | runs | extra us a layer |")
    print("|---|---|---|---|")
    for k, v in res.items():
        m = statistics.median(v)
        print(f"| {k or 'none (plain step)'} | {m:.3f} | {' '.join(f'{x:.3f}' for x in v)} | "
              f"{(m - base) * 1e3 / layers:+.2f} |")


if __name__ == "__main__":
    main()
