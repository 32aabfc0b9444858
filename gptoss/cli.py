"""The `gptoss` command line: generate, chat, serve, make-checkpoint (and more as they land)."""

from __future__ import annotations

import argparse
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json + *.safetensors) or hub repo id")
    p.add_argument("--moe-backend", default="auto",
                   help="MoE backend name ('auto' picks the fastest supported one; see `gptoss backends`)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8"],
                   help="KV cache storage: 'auto' follows --dtype; 'fp8' stores e4m3 with per-token scales")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="activation/weight dtype; 'auto' is bfloat16 on GPU and float32 on CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs to split the model over (one worker process per extra GPU)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size N: whole experts per GPU instead of slices of each")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                   help="fraction of GPU memory for weights, activations and KV cache")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="fix the KV cache size in bytes (overrides --gpu-memory-utilization)")


def _engine_kwargs(a) -> dict:
    return dict(moe_backend=a.moe_backend, kv_cache_dtype=a.kv_cache_dtype, dtype=a.dtype, device=a.device,
                max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                gpu_memory_utilization=a.gpu_memory_utilization, kv_cache_memory_bytes=a.kv_cache_memory_bytes,
                tensor_parallel_size=a.tensor_parallel_size, enable_expert_parallel=a.enable_expert_parallel)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")


def cmd_generate(a) -> int:
    from . import LLM, SamplingParams
    llm = LLM(a.model, **_engine_kwargs(a))
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                        seed=a.seed)
    t0 = time.perf_counter()
    outs = llm.generate(a.prompt, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = 0
    for o in outs:
        c = o.outputs[0]
        n += len(c.token_ids)
        print(f"[prompt] {o.prompt!r}\n[output] {c.text!r}\n[finish] {c.finish_reason} "
              f"({len(c.token_ids)} tokens)")
    print(f"[stats] {n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s) on {llm.engine.device}, "
          f"moe_backend={llm.engine.moe_backend}", file=sys.stderr)
    return 0


def cmd_make_checkpoint(a) -> int:
    from .testing import make_checkpoint
    t0 = time.perf_counter()
    out = make_checkpoint(a.dir, preset=a.preset, seed=a.seed, device=a.device, progress=True)
    print(f"wrote a random {a.preset} checkpoint to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_backends(a) -> int:
    import torch

    from .config import ModelConfig
    from .moe.registry import _REGISTRY, list_moe_backends
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig()
    for name in list_moe_backends():
        ok, why = _REGISTRY[name].is_supported(dev, cfg)
        print(f"{name:16s} {'yes' if ok else 'no ':3s} {why}")
    return 0


def _load_tools(path: str) -> list:
    import json
    with open(path) as f:
        tools = json.load(f)
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise ValueError(f"{path} must hold a JSON list of OpenAI tool definitions")
    return tools


class _ChatPrinter:
    """Prints parser deltas: reasoning dimmed, the answer plain, tool calls as name(arguments)."""

    def __init__(self, color: bool, show_reasoning: bool):
        self.dim, self.reset = ("\033[2m", "\033[0m") if color else ("", "")
        self.show_reasoning = show_reasoning
        self.kind: str | None = None

    def _switch(self, kind: str) -> None:
        if self.kind == "call":
            print(")", end="")
        if self.kind is not None and (kind != self.kind or kind == "call"):
            print()
        self.kind = kind

    def show(self, d) -> None:
        from .harmony import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart
        if isinstance(d, ReasoningDelta):
            if not self.show_reasoning:
                return
            if self.kind != "reasoning":
                self._switch("reasoning")
                print(f"{self.dim}[thinking] ", end="")
            print(f"{self.dim}{d.text}{self.reset}", end="", flush=True)
        elif isinstance(d, ContentDelta):
            if self.kind != "content":
                self._switch("content")
            print(d.text, end="", flush=True)
        elif isinstance(d, ToolCallStart):
            self._switch("call")
            print(f"[tool call] {d.name}(", end="", flush=True)
        elif isinstance(d, ToolCallArguments):
            print(d.text, end="", flush=True)

    def end(self, note: str | None = None) -> None:
        self._switch("end")
        if note:
            print(f"{self.dim}[{note}]{self.reset}")
        self.kind = None


def _chat_turn(llm, history, sp, tools, tool_choice, effort, printer):
    """Generate one assistant turn, printing it as it streams; returns the parsed turn."""
    from .chat import prepare_chat
    from .harmony import StreamingParser
    ids, run_sp = prepare_chat(history, sp, tools, tool_choice, effort)
    parser, seen, c = StreamingParser(), 0, None
    for out in llm.generate_stream({"prompt_token_ids": ids}, run_sp):
        c = out.outputs[0]
        for t in c.token_ids[seen:]:
            for d in parser.feed(t):
                printer.show(d)
        seen = len(c.token_ids)
    for d in parser.finish():
        printer.show(d)
    turn = parser.result()
    printer.end("stopped at --max-tokens" if c is not None and c.finish_reason == "length" else None)
    return turn


class _DefaultsFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already speaks of its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


_CHAT_HELP = """commands: /reset (forget the conversation)  /effort low|medium|high  /system TEXT
          /exit or Ctrl-D (quit); Ctrl-C stops a reply"""


def cmd_chat(a) -> int:
    from . import LLM, SamplingParams
    from .chat import REASONING_EFFORTS
    tools = _load_tools(a.tools) if a.tools else None
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                        seed=a.seed)
    print(f"gptoss chat: loading {a.model} ...", file=sys.stderr, flush=True)
    llm = LLM(a.model, **_engine_kwargs(a))
    printer = _ChatPrinter(color=sys.stdout.isatty() and not a.no_color, show_reasoning=not a.hide_reasoning)
    system, effort = a.system, a.reasoning_effort
    history: list[dict] = []
    print(f"gptoss chat: ready on {llm.engine.device} (reasoning effort {effort}"
          f"{f', {len(tools)} tool' + ('s' if len(tools) > 1 else '') if tools else ''}).\n{_CHAT_HELP}")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text in ("/help", "/?"):
            print(_CHAT_HELP)
            continue
        if text == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if text.startswith("/effort"):
            value = text[len("/effort"):].strip()
            if value in REASONING_EFFORTS:
                effort = value
                print(f"(reasoning effort {effort})")
            else:
                print(f"(choose one of {', '.join(REASONING_EFFORTS)})")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"(system message {'set' if system else 'cleared'})")
            continue
        mark = len(history)
        history.append({"role": "user", "content": line})
        choice = a.tool_choice if a.tool_choice in ("auto", "none", "required") else \
            {"type": "function", "function": {"name": a.tool_choice}}
        try:
            while True:  # model turns until it answers without calling a tool
                head = [{"role": "system", "content": system}] if system else []
                turn = _chat_turn(llm, head + history, sp, tools, choice, effort, printer)
                calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                         for c in turn.tool_calls]
                history.append({"role": "assistant", "content": turn.content, "reasoning_content": turn.reasoning,
                                **({"tool_calls": calls} if calls else {})})
                if not calls:
                    break
                for c in turn.tool_calls:
                    result = input(f"result of {c.name}> ")
                    history.append({"role": "tool", "tool_call_id": c.id, "content": result})
                choice = "auto"  # after the results, the model may answer
        except KeyboardInterrupt:
            printer.end("interrupted")
            del history[mark:]
        except EOFError:
            print()
            return 0
        except ValueError as e:  # e.g. the conversation outgrew --max-model-len
            printer.end()
            print(f"gptoss chat: error: {e}", file=sys.stderr)
            del history[mark:]


def cmd_serve(a) -> int:
    try:
        from .serve.app import run_server
    except ImportError as e:
        raise RuntimeError(f"serve needs the serve extra ({e}); install it with pip install 'gptoss[serve]'") from None
    import logging
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    run_server(a.model, host=a.host, port=a.port, api_key=a.api_key, served_model_name=a.served_model_name,
               max_queued_requests=a.max_queued_requests, max_request_bytes=a.max_request_bytes,
               allowed_origins=a.allowed_origins, log_requests=a.log_requests, log_level=a.log_level,
               max_header_bytes=a.max_header_bytes, **_engine_kwargs(a))
    return 0


def cmd_bench(a) -> int:
    from . import LLM
    from .bench import format_table, run_bench
    kw = _engine_kwargs(a)
    kw.update(max_num_seqs=max(a.max_num_seqs, max(a.concurrency)), enforce_eager=a.enforce_eager,
              enable_prefix_caching=False)  # every run's prompts are new anyway; no cache credit
    llm = LLM(a.model, **kw)
    modes = ("latency", "throughput") if a.mode == "all" else (a.mode,)
    res = run_bench(llm, output_len=a.output_len, ttft_prompt_len=a.ttft_prompt_len,
                    concurrencies=a.concurrency, input_len=a.input_len, throughput_output_len=a.output_len,
                    runs=a.runs, modes=modes, long_context=a.long_context, long_batch=a.long_batch)
    settings = {"model": a.model, "moe_backend": llm.engine.moe_backend, "dtype": str(llm.engine.dtype),
                "kv_cache_dtype": a.kv_cache_dtype, "cuda_graphs": getattr(llm.engine, "cuda_graphs", False),
                "runs": a.runs}
    print(format_table(llm, res, settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptoss", description="Run OpenAI's gpt-oss models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="complete one or more prompts and print the text",
                       description="Complete prompts with a gpt-oss checkpoint and print the outputs.")
    _add_engine_args(g)
    g.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    fmt = _DefaultsFormatter
    c = sub.add_parser("chat", help="chat with the model in the terminal (reasoning shown dimmed)",
                       formatter_class=fmt,
                       description="Interactive chat in the harmony format. The model's reasoning streams "
                                   "dimmed, the answer plain, and tool calls as name(arguments); with "
                                   "--tools you type each tool's result and the model continues. "
                                   "Commands: /reset, /effort LEVEL, /system TEXT, /exit.")
    _add_engine_args(c)
    _add_sampling_args(c)
    c.set_defaults(max_tokens=2048, temperature=1.0)  # gpt-oss is tuned for temperature 1
    c.add_argument("--reasoning-effort", default="medium", choices=["low", "medium", "high"],
                   help="how long the model thinks before answering (change it later with /effort)")
    c.add_argument("--system", default=None, help="system instructions for the conversation")
    c.add_argument("--tools", default=None, metavar="FILE",
                   help="JSON file with OpenAI tool definitions [{'type': 'function', 'function': {name, "
                        "description, parameters}}]; you answer each call with its result")
    c.add_argument("--tool-choice", default="auto",
                   help="'auto', 'none', 'required', or a function name to force; applies to the first reply "
                        "after each of your messages")
    c.add_argument("--hide-reasoning", action="store_true", help="do not print the model's reasoning")
    c.add_argument("--no-color", action="store_true", help="print reasoning without dimming (no ANSI codes)")
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                       formatter_class=fmt,
                       description="OpenAI-compatible server: /v1/chat/completions (streaming, tools, "
                                   "reasoning_effort, json_schema), /v1/completions, /v1/models, /health, "
                                   "/metrics. Needs the serve extra: pip install 'gptoss[serve]'.")
    _add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind: 127.0.0.1 only accepts local clients, 0.0.0.0 accepts everyone")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 route (compared in constant time)")
    s.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients send in 'model' and /v1/models lists (default: MODEL as given)")
    s.add_argument("--max-queued-requests", type=int, default=1024,
                   help="most sequences waiting for the engine; more requests get 503 until the queue drains")
    s.add_argument("--max-request-bytes", type=int, default=16 << 20,
                   help="largest request body accepted; bigger ones get 413")
    s.add_argument("--max-header-bytes", type=int, default=32 << 10,
                   help="largest total size of a request's headers; bigger ones get 431")
    s.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="enable CORS for these browser origins (e.g. http://localhost:3000); off by default")
    s.add_argument("--log-prompts", "--log-requests", dest="log_requests", action="store_true",
                   help="log each request's prompt and parameters (off by default: prompts are user data)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (uvicorn access log included)")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("make-checkpoint", help="write a random gpt-oss checkpoint in the HF layout",
                       description="Random weights in exactly the Hugging Face gpt-oss layout (MXFP4 "
                                   "experts, bf16 elsewhere), scaled so activations stay realistic.")
    m.add_argument("dir", help="output directory")
    m.add_argument("--preset", default="tiny", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"],
                   help="model shape: 'tiny' for CPU tests, or the published 20b/120b shapes")
    m.add_argument("--seed", type=int, default=0, help="random seed (same seed, same weights)")
    m.add_argument("--device", default=None, help="where to draw the weights (default: cuda if present)")
    m.set_defaults(func=cmd_make_checkpoint)

    be = sub.add_parser("bench", help="measure decode speed, TTFT and throughput; prints a table",
                        description="Latency (batch-1 decode tokens/s, time to first token) and throughput "
                                    "(output tokens/s at each concurrency) on random prompts, medians over "
                                    "--runs runs, as one table with the device and the settings.")
    _add_engine_args(be)
    be.add_argument("--mode", default="all", choices=["all", "latency", "throughput", "long_decode"],
                    help="which figures to measure (long_decode: decode speed of --long-batch sequences that "
                         "each hold --long-context tokens of KV; the context is allocated, not prefilled)")
    be.add_argument("--long-context", type=int, default=32768, help="KV tokens per sequence for long_decode")
    be.add_argument("--long-batch", type=int, default=64, help="sequences for long_decode")
    be.add_argument("--input-len", type=int, default=1024, help="prompt tokens per throughput request")
    be.add_argument("--output-len", type=int, default=1024,
                    help="tokens generated per request (EOS ignored), for decode and throughput")
    be.add_argument("--ttft-prompt-len", type=int, default=2048, help="prompt tokens for the TTFT figure")
    be.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256],
                    help="requests in flight for each throughput figure")
    be.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported")
    be.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (to compare)")
    be.set_defaults(func=cmd_bench)

    b = sub.add_parser("backends", help="list the MoE backends and whether they run here",
                       description="List registered MoE backends and whether each supports this machine.")
    b.set_defaults(func=cmd_backends)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        # user errors get one clear line, not a traceback
        print(f"gptoss {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
