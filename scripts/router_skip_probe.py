"""Upper bound of folding the router into the kernel before it: the batch-1 step with the MLP's
norm + router kernel left out (gate_up and down route by logits computed once, at the first call;
the outputs are wrong, the timing is what the step would take with no router kernel), against the
default, alternated in one process.

    python scripts/router_skip_probe.py [--rounds 6]
"""

import argparse
import statistics

import torch

import ab_decode
from gptoss.model import gpt_oss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    a.batch = [1]
    a.max_model_len = 4096
    gpt_oss.ROUTER_IN_O = False  # both variants through the router kernel's MLPBlock.forward
    llm = ab_decode._llm(a)
    eng = llm.engine
    orig = gpt_oss.MLPBlock.forward

    def skip(self, x, delta):
        if x.shape[0] != 1:
            return orig(self, x, delta)
        c = getattr(self, "_probe", None)
        if c is None:
            t, _, logits = gpt_oss.rms_norm_linear_rows(x, delta, self.norm.weight, self.norm.eps,
                                                        self.router_weight, self.router_bias, gpt_oss.ROUTER_GEMV,
                                                        t_chunk_order=True)
            c = self._probe = (t.clone(), logits.clone())
        return x, self.experts.forward_sum(c[0], c[1], x_chunk_order=True)

    res = {}
    for _ in range(a.rounds):
        for name, fwd in (("default", orig), ("no router kernel", skip)):
            gpt_oss.MLPBlock.forward = fwd
            eng.runner.capture_cuda_graphs(1, eng.max_model_len, eng.kv_layout.window is not None)
            res.setdefault((name, 1), []).append(ab_decode.replay_ms(llm, 1))
    gpt_oss.MLPBlock.forward = orig
    ab_decode._table("variant", res)
    print("median saving:", f"{statistics.median(res[('default', 1)]) - statistics.median(res[('no router kernel', 1)]):.3f} ms")


if __name__ == "__main__":
    main()
