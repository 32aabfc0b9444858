"""Measure a model with gptoss's bench API (what `gptoss bench` runs), and print its table.

    python examples/benchmark.py                                    # a tiny random model, CPU, seconds
    python examples/benchmark.py --model openai/gpt-oss-20b --output-len 1024 --input-len 1024 \\
        --ttft-prompt-len 2048 --concurrency 1 8 64 256 --runs 3

Figures: batch-1 decode tokens/s, time to first token, and output tokens/s at each concurrency
(random prompt ids, EOS ignored so every request makes exactly --output-len tokens; medians of
--runs). The defaults are sized for the tiny model so the example finishes quickly; its numbers
say nothing about a real model (docs/benchmarks.md has measured ones).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# offline: point openai-harmony at the vocabulary next to the repo, as tests/conftest.py does
_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizer"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and _TOKENIZER.is_dir():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_TOKENIZER)

from gptoss.bench import format_table, run_bench  # noqa: E402
from gptoss.testing import llm_or_tiny  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Latency and throughput of a gpt-oss checkpoint.")
    p.add_argument("--model", default=None,
                   help="hub repo id or local checkpoint directory (default: a tiny random checkpoint)")
    p.add_argument("--moe-backend", default="auto", help="a registered MoE backend name, or auto")
    p.add_argument("--output-len", type=int, default=16, help="generated tokens per request")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per throughput request")
    p.add_argument("--ttft-prompt-len", type=int, default=64, help="prompt tokens for the TTFT figure")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="requests in flight")
    p.add_argument("--runs", type=int, default=2, help="runs per figure; the median is reported")
    a = p.parse_args(argv)

    # every run's prompts are new, so the prefix cache would only add bookkeeping
    with llm_or_tiny(a.model, moe_backend=a.moe_backend, max_num_seqs=max(a.concurrency), enable_prefix_caching=False) as llm:
        results = run_bench(llm, output_len=a.output_len, ttft_prompt_len=a.ttft_prompt_len,
                            concurrencies=a.concurrency, input_len=a.input_len,
                            throughput_output_len=a.output_len, runs=a.runs)
        settings = {"model": a.model or "tiny (random)", "moe_backend": llm.engine.moe_backend,
                    "dtype": str(llm.engine.dtype), "runs": a.runs}
        print(format_table(llm, results, settings))
        # the same figures as data, e.g. to plot or to compare runs
        for r in results:
            print(f"[RESULT] {r.name} = {r.value:.1f} {r.unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
