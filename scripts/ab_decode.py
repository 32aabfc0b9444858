"""A/B of MoE kernel configs in the whole model: batch-1 (and small-batch) decode ms/token with each
config, alternated in one process on one GPU so clocks and the machine are the same for both.

    python scripts/ab_decode.py [--ckpt /tmp/gptoss-20b] [--rounds 3]
    python scripts/ab_decode.py --upcasts asm fragments    # the "triton" weight layouts instead
    python scripts/ab_decode.py --o-gemv --batch 1         # batch-1 output projection: gemv vs cuBLAS
    python scripts/ab_decode.py --switch GEMV_ROUTER       # any on/off switch of gptoss.model.gpt_oss
    python scripts/ab_decode.py --set "ROUTER_GEMV=GemvOptions(2, 2048)"   # module values, each against the default
    python scripts/ab_decode.py --set "NORM_QKV=False; CHUNK_ORDER_T=False"  # several in one variant
    python scripts/ab_decode.py --replay --batch 1 --set ...   # the graph replayed back to back: steadier
"""

import argparse
import dataclasses
import statistics
import time

import torch

from gptoss import LLM, SamplingParams
from gptoss.moe.triton_backends import fragments_config


def variants(spec):
    """name -> tokens -> MoEKernelConfig (None: the library default, the fragments layout's tiles)."""
    def split(up=None, down=None):
        def cfg(n):
            c = fragments_config(n, spec)
            if c.block_m != 16:  # only decode's tiles take these splits
                return c
            return dataclasses.replace(c, gate_up=dataclasses.replace(c.gate_up, split_k=up or c.gate_up.split_k),
                                       down=dataclasses.replace(c.down, split_k=down or c.down.split_k))
        return cfg
    def down64(n):  # below one row per expert: the earlier down tiles, 64 rows capped at 80 registers
        c = fragments_config(n, spec)
        if n * spec.top_k / spec.local_experts >= 1:
            return c
        return dataclasses.replace(c, down=dataclasses.replace(c.down, block_n=64, maxnreg=80))
    return {"default": None, "gate_up split_k=1": split(up=1), "gate_up split_k=2": split(up=2),
            "down split_k=2": split(down=2), "down 64-row tiles": down64}


def decode_ms(llm, batch: int, n: int = 129) -> float:
    p = [{"prompt_token_ids": list(range(100 + i, 164 + i))} for i in range(batch)]
    sp = lambda k: SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)  # noqa: E731
    llm.generate(p, sp(2), use_tqdm=False)
    times = []
    for k in (1, n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(p, sp(k), use_tqdm=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / (n - 1) * 1e3


def replay_ms(llm, batch: int, n: int = 200) -> float:
    """The captured decode graph of `batch` replayed back to back after a generate has filled its inputs
    (context about 64 + 129 tokens): the GPU's time a step with no host in between, steadier than
    decode_ms's difference of two generates."""
    decode_ms(llm, batch)
    graphs = llm.engine.runner.graphs
    gs = [g for g, _ in graphs.graphs[next(s for s in graphs.sizes if s >= batch)]]  # in place: a graph a half
    gs[0].replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        gs[i % len(gs)].replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


_timer = decode_ms  # what the comparisons time a variant with (main sets it)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/gptoss-20b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=1024, help="the graphs' context bound (the "
                    "attention's splits follow it; gptoss bench --mode latency runs 4096)")
    ap.add_argument("--replay", action="store_true", help="time the captured graph replayed back to back "
                    "(replay_ms) instead of generate calls (decode_ms)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--upcasts", nargs="+", help="compare these TritonMoE upcasts (one LLM each) at the "
                    "default tiles instead of the tile variants")
    ap.add_argument("--o-gemv", action="store_true", help="compare the attention output projection of "
                    "one-row steps through gemv.linear_rows (the default) with cuBLAS")
    ap.add_argument("--switch", nargs="+", help="module switches of gptoss.model.gpt_oss to compare on / off "
                    "(e.g. GEMV_O_PROJ GEMV_ROUTER; others as a dotted path under gptoss, e.g. "
                    "engine.cuda_graphs.PDL), each alone against all on")
    ap.add_argument("--set", nargs="+", help="NAME=EXPR assignments (NAME as for --switch, EXPR evaluated in "
                    "that module), each alone against the module's own value; 'A=x; B=y' sets both in one variant")
    a = ap.parse_args()
    global _timer
    _timer = replay_ms if a.replay else decode_ms
    if a.set:
        return compare_settings(a, a.set)
    if a.upcasts:
        return compare_upcasts(a)
    if a.o_gemv or a.switch:
        return compare_switches(a, a.switch or ["GEMV_O_PROJ"])
    llm = _llm(a)
    eng = llm.engine
    layers = eng.model.layers
    spec = layers[0].mlp.experts.spec
    res = {}
    for _ in range(a.rounds):
        for name, cfg in variants(spec).items():
            for layer in layers:
                layer.mlp.experts._config = cfg
            eng.runner.capture_cuda_graphs(max(a.batch), eng.max_model_len, eng.kv_layout.window is not None)
            for b in a.batch:
                res.setdefault((name, b), []).append(_timer(llm, b))
    _table("variant", res)


def _llm(a):
    return LLM(a.ckpt, moe_backend="triton", max_model_len=a.max_model_len, max_num_seqs=max(a.batch), progress=False,
               enable_prefix_caching=False, kv_cache_memory_bytes=2 << 30)


def _table(what: str, res: dict) -> None:
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"| {what} | batch | ms/token (median) | runs | tok/s |")
    print("|---|---|---|---|---|")
    for (name, b), v in res.items():
        m = statistics.median(v)
        print(f"| {name} | {b} | {m:.3f} | {' '.join(f'{x:.3f}' for x in v)} | {b / m * 1e3:,.0f} |")


def _switch(name: str):
    """(module, attribute) of a switch: NAME in gptoss.model.gpt_oss, or a dotted path under gptoss
    (engine.cuda_graphs.PDL)."""
    import importlib
    mod, _, attr = name.rpartition(".")
    return importlib.import_module("gptoss." + (mod or "model.gpt_oss")), attr


def compare_switches(a, names):
    llm = _llm(a)
    eng = llm.engine
    res = {}
    for _ in range(a.rounds):
        for off in [None, *names]:
            for n in names:
                setattr(*_switch(n), n != off)
            eng.runner.capture_cuda_graphs(max(a.batch), eng.max_model_len, eng.kv_layout.window is not None)
            for b in a.batch:
                res.setdefault(("all on" if off is None else f"{off} off", b), []).append(_timer(llm, b))
    for n in names:
        setattr(*_switch(n), True)
    _table("variant", res)


def compare_settings(a, assignments):
    llm = _llm(a)
    eng = llm.engine
    parsed = []  # (label, [(module, attribute, default, value)]): "A=x; B=y" sets both in one variant
    for item in assignments:
        sets = []
        for one in item.split(";"):
            name, _, expr = one.partition("=")
            mod, attr = _switch(name.strip())
            sets.append((mod, attr, getattr(mod, attr), eval(expr, vars(mod))))  # noqa: S307 (a dev tool)
        parsed.append((item, sets))
    res = {}
    for _ in range(a.rounds):
        for label, sets in [("default", []), *parsed]:
            for mod, attr, _, value in sets:
                setattr(mod, attr, value)
            eng.runner.capture_cuda_graphs(max(a.batch), eng.max_model_len, eng.kv_layout.window is not None)
            for b in a.batch:
                res.setdefault((label, b), []).append(_timer(llm, b))
            for mod, attr, default, _ in sets:
                setattr(mod, attr, default)
    _table("setting", res)


def compare_upcasts(a):
    """One LLM per TritonMoE upcast (weight layout), default tiles, alternated."""
    from gptoss.moe.triton_backends import TritonMoE
    llms = {}
    for u in a.upcasts:
        TritonMoE.default_upcast = u  # the backend built at load takes its weight layout from here
        llms[u] = _llm(a)
        assert llms[u].engine.model.layers[0].mlp.experts.upcast == u
    res = {}
    for _ in range(a.rounds):
        for u, llm in llms.items():
            for b in a.batch:
                res.setdefault((u, b), []).append(_timer(llm, b))
    _table("upcast", res)


if __name__ == "__main__":
    main()
