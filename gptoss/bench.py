"""`gptoss bench`: latency (batch-1 decode, TTFT) and throughput (output tokens/s at a concurrency),
printed as one table with the device, the settings and every figure.

Prompts are random token ids, different for every run, so the prefix cache cannot help; outputs
ignore EOS so every request generates exactly its output length. Figures are medians over runs.
"""

from __future__ import annotations

import datetime
import random
import statistics
import time
from dataclasses import dataclass

import torch

from .engine.request import RequestStatus
from .sampling_params import SamplingParams


@dataclass
class BenchResult:
    name: str
    value: float
    unit: str
    detail: str = ""


def _prompts(rng: random.Random, n: int, length: int) -> list[dict]:
    return [{"prompt_token_ids": [rng.randrange(199998) for _ in range(length)]} for _ in range(n)]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_decode(llm, rng, output_len: int, runs: int, prompt_len: int = 64) -> tuple[float, float]:
    """Batch-1 decode: (median tokens/s after the first token, median ms per token), as a streaming
    client sees the tokens arrive. No device sync per token: a yielded token is already on the host,
    and a sync there would make the host wait for the step that async scheduling launched ahead
    (each token then cost the GPU's step plus the host's work, in series)."""
    rates = []
    for i in range(runs + 1):  # the first run warms up (kernel compilation) and is not counted
        sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        stamps = []
        _sync()
        for _out in llm.generate_stream(_prompts(rng, 1, prompt_len)[0], sp):
            stamps.append(time.perf_counter())
        if i:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    r = statistics.median(rates)
    return r, 1000 / r


def measure_ttft(llm, rng, prompt_len: int, runs: int) -> float:
    """Median ms from submitting a prompt to its first token (batch 1, cold prefix cache)."""
    times = []
    for _ in range(runs + 1):  # the first run warms up (kernel compilation) and is not counted
        sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        p = _prompts(rng, 1, prompt_len)[0]
        _sync()
        t0 = time.perf_counter()
        llm.generate(p, sp, use_tqdm=False)
        _sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[1:])


def measure_throughput(llm, rng, concurrency: int, input_len: int, output_len: int, runs: int
                       ) -> tuple[float, float, float]:
    """(median output tokens/s with `concurrency` requests in flight, % of step time spent in the
    scheduler and the per-token bookkeeping, % spent packing the steps' inputs: the host's share
    outside the model and sampler, in two parts)."""
    rates = []
    # a short warm-up at this concurrency compiles the kernels for its shapes
    llm.generate(_prompts(rng, concurrency, input_len), SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    st, runner = llm.engine.step_times, llm.engine.runner
    before, pack_before = dict(st), runner.pack_seconds
    for _ in range(runs):
        sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        prompts = _prompts(rng, concurrency, input_len)
        _sync()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        _sync()
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    host = st["schedule"] - before["schedule"] + st["update"] - before["update"]
    total = max(host + st["execute"] - before["execute"], 1e-9)
    return statistics.median(rates), 100 * host / total, 100 * (runner.pack_seconds - pack_before) / total


def start_long_decode(llm, rng, batch: int, context: int, steps: int) -> list:
    """Give `batch` new requests `context` tokens of KV each, as if their prompts had been computed
    (all but the last prompt token), and put them in the running queue -> the requests.

    Prefilling batch x 32k tokens would take minutes and measures prefill; decode speed does not
    depend on the cached values, so the sequences are given their blocks directly (the cache holds
    whatever its memory holds). The next engine step runs their last prompt tokens."""
    eng = llm.engine
    sch, pool = eng.scheduler, eng.pool
    if eng.has_unfinished():
        raise RuntimeError("long_decode needs an idle engine")
    sp = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    reqs = [r for p in _prompts(rng, batch, context) for r in eng.add_request(p["prompt_token_ids"], sp)]
    for r in reqs:
        sch.waiting.remove(r)
        # chunk by chunk, as a prefill would go, so the sliding group only ever holds the window
        while r.num_computed_tokens < context - 1:
            n = min(eng.max_num_batched_tokens, context - 1 - r.num_computed_tokens)
            if not pool.allocate(r, n):
                for q in reqs:
                    sch.finish(q, "abort")
                raise ValueError(f"the KV cache holds {pool.num_usable_blocks * pool.block_size} tokens; "
                                 f"{batch} x {context} do not fit (lower --long-batch or --long-context)")
            r.num_computed_tokens += n
            pool.release_out_of_window(r)
        r.status = RequestStatus.RUNNING
        sch.running.append(r)
    return reqs


def measure_long_decode(llm, rng, batch: int, context: int, steps: int, runs: int) -> float:
    """Decode tokens/s of `batch` sequences that each already hold `context` tokens of KV
    (start_long_decode), over their `steps` decode steps. Each step reads every sequence's whole
    context in the full-attention layers, which is what the figure is about."""
    eng = llm.engine
    rates = []
    for i in range(runs + 1):  # the first run warms up and is not counted
        start_long_decode(llm, rng, batch, context, steps)
        eng.step()  # the last prompt token of every sequence: their first sampled token
        _sync()
        t0 = time.perf_counter()
        n = 0
        while eng.has_unfinished():
            n += len(eng.step())
        _sync()
        if i:
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def copy_bandwidth_tbs() -> float | None:
    """Device-to-device copy bandwidth in TB/s (bytes read + written), the roofline's denominator."""
    if not torch.cuda.is_available():
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        _sync()
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() / statistics.median(times) / 1e12


def decode_bytes_per_token(llm) -> int:
    """Weights one batch-1 decode step must read: attention + router + top-k experts + unembedding."""
    mc = llm.model_config
    H, E, k, I = mc.hidden_size, mc.num_local_experts, mc.num_experts_per_tok, mc.intermediate_size
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    el = llm.engine.dtype.itemsize
    attn = (H * (q + 2 * kv) + q * H) * el + E * H * el
    # MXFP4: half a byte per weight plus one scale byte per 32 weights
    expert = (2 * I * H + H * I) * (0.5 + 1 / 32) + (2 * I + H) * el
    return int(mc.num_hidden_layers * (attn + k * expert) + mc.vocab_size * H * el)


def _say(r: BenchResult) -> BenchResult:
    # progress on stderr, so a long run shows where it is; the table comes at the end
    import sys
    print(f"  {r.name}: {r.value:.1f} {r.unit} {r.detail}", file=sys.stderr, flush=True)
    return r


def run_bench(llm, *, output_len: int, ttft_prompt_len: int, concurrencies: list[int], input_len: int,
              throughput_output_len: int, runs: int, seed: int = 0, modes=("latency", "throughput"),
              long_context: int = 32768, long_batch: int = 64) -> list[BenchResult]:
    rng = random.Random(seed)
    # warm up: compiles kernels and captures graphs outside the timings
    llm.generate(_prompts(rng, 2, 16), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    res: list[BenchResult] = []
    if "latency" in modes:
        rate, ms = measure_decode(llm, rng, output_len, runs)
        bw = copy_bandwidth_tbs()
        detail = f"{ms:.2f} ms/token"
        if bw:
            floor_ms = decode_bytes_per_token(llm) / (bw * 1e12) * 1000
            detail += f", floor {floor_ms:.2f} ms ({100 * floor_ms / ms:.0f}% of roofline, copy {bw:.2f} TB/s)"
        res.append(_say(BenchResult("decode batch 1", rate, "tok/s", detail)))
        res.append(_say(BenchResult(f"TTFT {ttft_prompt_len}-token prompt",
                                    measure_ttft(llm, rng, ttft_prompt_len, runs), "ms", "batch 1, cold cache")))
    if "throughput" in modes:
        for c in concurrencies:
            tps, host, pack = measure_throughput(llm, rng, c, input_len, throughput_output_len, runs)
            hidden = " (hidden behind the GPU: async scheduling)" if llm.engine.async_scheduling else ""
            res.append(_say(BenchResult(f"throughput c={c}", tps, "out tok/s",
                                        f"{input_len} in / {throughput_output_len} out, host: scheduler + "
                                        f"bookkeeping {host:.1f}%, step packing {pack:.1f}% of step time{hidden}")))
    if "long_decode" in modes:
        steps = min(output_len, 64)
        res.append(_say(BenchResult(f"decode {long_batch} x {long_context} ctx",
                                    measure_long_decode(llm, rng, long_batch, long_context, steps, runs),
                                    "out tok/s", f"kv {'fp8' if llm.engine.kv_fp8 else llm.engine.kv_dtype}, {steps} steps")))
    return res


def format_table(llm, results: list[BenchResult], settings: dict) -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    head = [f"gptoss bench  {datetime.date.today()}  device: {dev}",
            "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items())]
    w = max(len(r.name) for r in results)
    rows = [f"{'figure':{w}s}  {'value':>12s}  unit       detail", "-" * (w + 60)]
    rows += [f"{r.name:{w}s}  {r.value:12.1f}  {r.unit:9s}  {r.detail}" for r in results]
    return "\n".join(head + rows)
