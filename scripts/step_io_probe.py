"""What a batch-1 decode step's host traffic costs the GPU: the captured decode graph replayed back to
back, then with the copies around it that the engine made before the small buckets read their steps in
place (the packed step up, the sampled token down, an event), against the in-place graphs replayed in
turn (engine.cuda_graphs.IN_PLACE_MAX_BATCH); and the engine's generate with each.

    python scripts/step_io_probe.py [--ckpt /tmp/gptoss-20b] [--rounds 3]
"""

import argparse
import statistics
import time

import torch

import ab_decode
from gptoss import LLM
from gptoss.engine import cuda_graphs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    in_place = cuda_graphs.IN_PLACE_MAX_BATCH
    llm = LLM(a.ckpt, moe_backend="triton", max_model_len=4096, max_num_seqs=1, progress=False,
              enable_prefix_caching=False, kv_cache_memory_bytes=2 << 30)
    eng = llm.engine

    def capture(limit):
        cuda_graphs.IN_PLACE_MAX_BATCH = limit
        eng.runner.capture_cuda_graphs(1, eng.max_model_len, eng.kv_layout.window is not None)
        ab_decode.decode_ms(llm, 1)  # fills the step buffers (both halves in place)
        return eng.runner.graphs

    host_tok = [torch.zeros(8, dtype=torch.int64, pin_memory=True) for _ in range(2)]
    events = [torch.cuda.Event() for _ in range(2)]

    def copies(graphs, lockstep):
        g, _ = graphs.graphs[1][0]
        n = 8 + 3 + 2 + 1 + 1 + 2 * 256 + 1 + 2  # a batch-1 step at a 4,096 bound, sliding tables on
        host_flat = graphs.flat[:n].cpu().pin_memory()

        def step(i):
            graphs.flat[:n].copy_(host_flat, non_blocking=True)
            g.replay()
            host_tok[i % 2][:1].copy_(graphs.tokens[:1], non_blocking=True)
            events[i % 2].record()
            if lockstep and i:
                events[(i - 1) % 2].synchronize()
        return step

    def halves(graphs, lockstep):
        gs = [g for g, _ in graphs.graphs[1]]

        def step(i):
            gs[i % len(gs)].replay()
            events[i % 2].record()
            if lockstep and i:
                events[(i - 1) % 2].synchronize()
        return step

    def replay(graphs):
        g, _ = graphs.graphs[1][0]
        return lambda i: g.replay()

    res = {}

    def timed(name, f):
        for i in range(5):
            f(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(a.steps):
            f(i)
        torch.cuda.synchronize()
        res.setdefault(name, []).append((time.perf_counter() - t0) / a.steps * 1e3)

    for _ in range(a.rounds):
        graphs = capture(0)
        timed("copied: replay alone", replay(graphs))
        timed("copied: step up + replay + token down + event", copies(graphs, False))
        timed("copied: the same, the host one step ahead at most (the engine's way)", copies(graphs, True))
        res.setdefault("copied: engine generate", []).append(ab_decode.decode_ms(llm, 1))
        graphs = capture(max(in_place, 1))
        timed("in place: the two graphs in turn + event", halves(graphs, False))
        timed("in place: the same, the host one step ahead at most", halves(graphs, True))
        res.setdefault("in place: engine generate", []).append(ab_decode.decode_ms(llm, 1))
    cuda_graphs.IN_PLACE_MAX_BATCH = in_place
    print(f"GPU: {torch.cuda.get_device_name()}; batch 1, context ~190, {a.steps} steps a run")
    print("| stream a step | ms a step (median) | runs |\n|---|---|---|")
    for name, v in res.items():
        print(f"| {name} | {statistics.median(v):.4f} | {' '.join(f'{x:.4f}' for x in v)} |")


if __name__ == "__main__":
    main()
