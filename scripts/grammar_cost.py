"""Cost of constrained decoding per step: the time the sampler spends filling and applying grammar
bitmasks, against the whole step, at batch 1 and 64 (json_schema on the final channel).

    python scripts/grammar_cost.py [--model DIR] [--device cpu|cuda]
"""

import argparse
import time

import gptoss.engine.sampler as sampler_mod
from gptoss import LLM, SamplingParams

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["answer", "score"], "additionalProperties": False}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint (default: a fresh tiny one)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    model = a.model
    if model is None:
        from gptoss.testing import make_checkpoint
        model = str(make_checkpoint("/tmp/gptoss-grammar-cost", preset="tiny"))
    llm = LLM(model, device=a.device, max_model_len=1024, progress=False)
    spent = {"t": 0.0}
    orig = sampler_mod.apply_grammars

    def timed(logits, reqs):
        t0 = time.perf_counter()
        orig(logits, reqs)
        spent["t"] += time.perf_counter() - t0

    sampler_mod.apply_grammars = timed
    msgs = [{"role": "user", "content": "Rate this."}]
    print(f"{'batch':>5s} {'steps':>5s} {'step ms':>8s} {'grammar ms':>10s} {'% of step':>9s}")
    for batch in (1, 64):
        sps = [SamplingParams(temperature=1.0, seed=i, max_tokens=80, json_schema=SCHEMA) for i in range(batch)]
        llm.chat([msgs] * batch, sps)  # warm up: compile the grammar
        st = llm.engine.step_times
        before, spent["t"] = dict(st), 0.0
        llm.chat([msgs] * batch, sps)
        steps = st["steps"] - before["steps"]
        total = sum(st[k] - before[k] for k in ("schedule", "execute", "update"))
        print(f"{batch:5d} {steps:5d} {1000 * total / steps:8.2f} {1000 * spent['t'] / steps:10.2f} "
              f"{100 * spent['t'] / total:8.1f}%")


if __name__ == "__main__":
    main()
