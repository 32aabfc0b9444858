"""Write notebooks/*.ipynb from the cell sources below, run them, and save them with their outputs.

    python scripts/build_notebooks.py                  # every notebook
    python scripts/build_notebooks.py quickstart       # one
    python scripts/build_notebooks.py --no-execute     # sources only (outputs left empty)

The notebooks are committed executed, so they read well on GitHub without a kernel; this script is
their source of truth (tests/test_notebooks.py checks that the committed cells match it, and runs
them again). Needs the notebooks extra: pip install -e ".[notebooks]".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
KERNEL = "python3"
CELL_TIMEOUT_S = 180

# the first code cell of every notebook: the offline vocabulary (same rule as tests/conftest.py)
SETUP = '''\
import os
from pathlib import Path

import torch

# openai-harmony downloads its vocabulary unless TIKTOKEN_ENCODINGS_BASE names a folder holding it;
# offline, use the copy next to the repository when there is one and nothing else was set
repo = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
tokenizer_dir = repo.parent / "shared" / "tokenizer"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and tokenizer_dir.is_dir():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(tokenizer_dir)

import warnings

# tqdm (imported by gptoss for its progress bars, off here) warns when ipywidgets is missing
warnings.filterwarnings("ignore", message="IProgress not found")
torch.manual_seed(0)
torch.set_num_threads(1)  # the tiny model runs many small ops: one thread beats several fighting'''

LOAD_TINY = '''\
import tempfile

from gptoss import LLM, SamplingParams
from gptoss.testing import make_checkpoint

# a random checkpoint in the HF gpt-oss layout: the real 201,088-token vocabulary, everything else tiny
workdir = tempfile.TemporaryDirectory(prefix="gptoss-notebook-")
ckpt = make_checkpoint(workdir.name, preset="tiny", seed=0, device="cpu")
print("checkpoint files:", sorted(p.name for p in ckpt.iterdir()))

llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=1024, progress=False)
mc = llm.model_config
print(f"{mc.num_hidden_layers} layers, hidden size {mc.hidden_size}, {mc.num_local_experts} experts "
      f"(top-{mc.num_experts_per_tok}), sliding window {mc.sliding_window}, vocabulary {mc.vocab_size}")
print(f"MoE backend {llm.engine.moe_backend!r}, dtype {llm.engine.dtype}, device {llm.engine.device}")'''

QUICKSTART = [
    ("markdown", '''\
# gptoss quickstart

`gptoss` runs OpenAI's gpt-oss models: `LLM.generate` completes prompts, `LLM.generate_stream` yields
tokens as they come, and `LLM.chat` speaks the harmony chat format, splitting each reply into
reasoning, answer and tool calls.

This notebook runs on a CPU in well under a minute with a **tiny random checkpoint**: the real
vocabulary and layout, random weights. Its words are random tokens, but every call below is the
one you would make with `LLM("openai/gpt-oss-20b")` on a GPU.'''),
    ("code", SETUP),
    ("code", LOAD_TINY),
    ("markdown", '''\
## Generate

`generate` takes one prompt or a list (text, or `{"prompt_token_ids": [...]}`) and returns one
`RequestOutput` per prompt, in order. `SamplingParams` has vLLM's fields (`temperature=0` is greedy).'''),
    ("code", '''\
outs = llm.generate(["The capital of France is", "def fibonacci(n):"],
                    SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
for out in outs:
    c = out.outputs[0]
    print(f"{out.prompt!r} -> {c.text!r}")
    print(f"    {len(out.prompt_token_ids)} prompt tokens, {len(c.token_ids)} generated, "
          f"finish_reason={c.finish_reason!r}")'''),
    ("markdown", '''\
Sampling: `n` samples per prompt, a `seed` for reproducible draws, and `logprobs` (the sampled token
and the top alternatives, with their rank).'''),
    ("code", '''\
sp = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=0, max_tokens=8, logprobs=2)
out = llm.generate("Once upon a time", sp, use_tqdm=False)[0]
for c in out.outputs:
    print(c.index, repr(c.text))
print("first token of sample 0:")
for token_id, lp in out.outputs[0].logprobs[0].items():
    print(f"    {token_id:>6d} {lp.decoded_token!r:16s} logprob {lp.logprob:7.3f}  rank {lp.rank}")'''),
    ("markdown", '''\
## Chat, with the reasoning shown

gpt-oss writes its reasoning on the `analysis` channel and its answer on the `final` channel.
`LLM.chat` renders the messages into harmony tokens and parses the reply back; this is what the
parser makes of a turn a trained model could write:'''),
    ("code", '''\
from gptoss.harmony import encode, parse_completion

turn_text = ("<|channel|>analysis<|message|>The user asks for the capital of France. It is Paris.<|end|>"
             "<|start|>assistant<|channel|>final<|message|>The capital of France is Paris.<|return|>")
turn = parse_completion(encode(turn_text))
print("reasoning:", turn.reasoning)
print("content:  ", turn.content)'''),
    ("markdown", '''\
Now the live model. A random model seldom opens the analysis channel by itself, so we also ask for
a JSON answer: the grammar behind `json_schema` lets the model reason first (at most
`reasoning_budget` tokens), then forces a final message that matches the schema. Each
`ChatOutput` has `.reasoning`, `.content`, `.tool_calls` and `.finish_reason`. When the random model
writes no harmony header at all, the parser logs a warning (shown in red below) and keeps the text
as content: it never raises on malformed output.'''),
    ("code", '''\
import json

def clip(text, width=160):
    return text if text is None else text[:width]

def show(reply):
    print(f"reasoning : {clip(reply.reasoning)!r}")
    print(f"content   : {clip(reply.content)!r}")
    print(f"tool_calls: {reply.tool_calls}   finish_reason: {reply.finish_reason!r}")

question = [{"role": "user", "content": "What is the capital of France?"}]
show(llm.chat(question, SamplingParams(temperature=1.0, seed=0, max_tokens=24), reasoning_effort="low")[0])
print()

answer_schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                 "required": ["city"], "additionalProperties": False}
sp = SamplingParams(temperature=1.0, seed=0, max_tokens=64, reasoning_budget=16, json_schema=answer_schema)
reply = llm.chat(question, sp, reasoning_effort="low")[0]
show(reply)
print("parsed answer:", json.loads(reply.content))'''),
    ("markdown", '''\
## Streaming

`generate_stream` yields the request's output after every new token; the last one is finished.'''),
    ("code", '''\
pieces, seen = [], 0
for out in llm.generate_stream("The capital of France is", SamplingParams(temperature=0, max_tokens=10)):
    text = out.outputs[0].text
    pieces.append(text[seen:])
    seen = len(text)
print(f"{len(pieces)} updates: {pieces}")
print("finished:", out.finished, "| finish_reason:", out.outputs[0].finish_reason)'''),
    ("markdown", '''\
A chat turn streams the same way: render the conversation with `render_chat`, stream its tokens, and
feed them to a `StreamingParser`, which emits reasoning, content and tool-call deltas as soon as
they are known (this is what the server sends as `delta.reasoning_content` / `delta.content`).'''),
    ("code", '''\
from gptoss.harmony import StreamingParser, render_chat, stop_token_ids

prompt_ids = render_chat([{"role": "user", "content": "Say hello."}], reasoning_effort="low")
sp = SamplingParams(temperature=1.0, seed=0, max_tokens=12, stop_token_ids=stop_token_ids())
parser, seen = StreamingParser(), 0
for out in llm.generate_stream({"prompt_token_ids": prompt_ids}, sp):
    ids = out.outputs[0].token_ids
    for token_id in ids[seen:]:
        for delta in parser.feed(token_id):
            print(type(delta).__name__, repr(getattr(delta, "text", delta)))
    seen = len(ids)
for delta in parser.finish():
    print(type(delta).__name__, repr(getattr(delta, "text", delta)))
print("whole turn:", parser.result())'''),
    ("markdown", '''\
Next: `examples/chat_with_tools.py` (tool calls), `examples/structured_output.py`,
`notebooks/moe_and_quantization.ipynb`, and the docs in `docs/`.'''),
    ("code", '''\
workdir.cleanup()'''),
]

MOE_QUANT = [
    ("markdown", '''\
# MoE backends and quantization

gpt-oss keeps its expert weights in **MXFP4** (4-bit e2m1 values, one power-of-two scale per 32).
The Triton MoE backends multiply them with bf16, **FP8** (e4m3, one float scale per token) or
**MXFP8** (e4m3, a power-of-two scale per 32) activations. This notebook, on a CPU with a tiny
random checkpoint:

1. lists the MoE backends and whether each runs here;
2. checks the `torch` backend against an independent float64 computation of the same layer, and
   measures what quantizing its activations (as `triton_fp8` / `triton_mxfp8` do) costs;
3. measures the error of the three formats on real-ish tensors (the checkpoint's weights,
   activations captured from a forward pass, Gaussian and heavy-tailed samples) and plots it.

Every number is computed by the cells below (`gptoss.quant` holds the reference quantizers that the
kernels are tested against; `docs/quantization.md` derives the error bounds).'''),
    ("code", SETUP + '''

import matplotlib.pyplot as plt

plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (10, 3.2), "font.size": 9})'''),
    ("code", LOAD_TINY),
    ("markdown", '''\
## 1. The backends

A backend says why it cannot run rather than falling back silently. `"auto"` takes the first of
`triton`, `triton_fp8`, `torch` that runs. On a CPU only `torch` runs (the Triton backends run on CPU
only under Triton's interpreter, `TRITON_INTERPRET=1`, which the tests use on tiny shapes).'''),
    ("code", '''\
import textwrap

from gptoss.moe import get_moe_backend, list_moe_backends

print(f"CUDA available: {torch.cuda.is_available()}")
runs_here = {}
for name in list_moe_backends():
    try:
        get_moe_backend(name, "cpu", llm.config)
        runs_here[name], why = True, ""
    except ValueError as e:
        runs_here[name], why = False, str(e)
    print(f"{name:14s} {'runs here' if runs_here[name] else 'not here'}")
    if why:
        print(textwrap.indent(textwrap.fill(why, 96), "    "))
print("auto picks:", get_moe_backend("auto", "cpu", llm.config).name)'''),
    ("markdown", '''\
## 2. Activations from a forward pass, and the torch backend checked

We record what every MoE layer receives (the normalised hidden states `x` and the router logits)
while the model reads a few prompts, by wrapping each layer's backend `forward`.'''),
    ("code", '''\
model = llm.engine.model
captured = {i: [] for i in range(len(model.layers))}
for i, layer in enumerate(model.layers):
    backend = layer.mlp.experts
    def record(x, logits, i=i, forward=backend.forward):
        captured[i].append((x.detach().clone(), logits.detach().clone()))
        return forward(x, logits)
    backend.forward = record  # an instance attribute shadows the method until deleted
prompts = ["The quick brown fox jumps over the lazy dog. " * 3,
           "Mixture-of-experts layers route every token to a few experts.",
           "def quantize(x):\\n    return round(x / scale) * scale"]
try:
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
finally:
    for layer in model.layers:
        del layer.mlp.experts.forward
acts = {i: (torch.cat([x for x, _ in v]), torch.cat([g for _, g in v])) for i, v in captured.items()}
print({i: tuple(x.shape) for i, (x, _) in acts.items()}, "(tokens, hidden) per layer")'''),
    ("markdown", '''\
An independent reference for one layer: the experts dequantized from MXFP4 to float64, every token
through its top-k experts with dense einsums. `act_quant` quantizes the activations at both GEMM
inputs, which is what `triton_fp8` (per-token e4m3) and `triton_mxfp8` (e4m3 per 32) compute.'''),
    ("code", '''\
from gptoss.moe import MoEWeights, route_torch, swiglu_torch
from gptoss.quant import (dequantize_fp8, dequantize_mxfp4, dequantize_mxfp8, quantize_fp8,
                          quantize_mxfp4, quantize_mxfp8)

def fp8_per_token(t):
    return dequantize_fp8(*quantize_fp8(t, per_token=True), dtype=torch.float64)

def mxfp8(t):
    return dequantize_mxfp8(*quantize_mxfp8(t), dtype=torch.float64)

def moe_reference(mlp, x, logits, act_quant=None):
    """[T, H] float64; act_quant(t) -> t is applied to x and to the SwiGLU output, as a kernel would."""
    q = act_quant or (lambda t: t)
    spec = mlp.spec
    w1 = dequantize_mxfp4(mlp.gate_up_blocks, mlp.gate_up_scales, torch.float64)  # [E, 2I, H]
    w2 = dequantize_mxfp4(mlp.down_blocks, mlp.down_scales, torch.float64)        # [E, H, I]
    weights, ids = route_torch(logits, spec.top_k)                                # [T, k]
    x = x.double()
    h = torch.einsum("th,tkoh->tko", q(x), w1[ids]) + mlp.gate_up_bias.double()[ids]  # [T, k, 2I]
    a = swiglu_torch(h, spec.swiglu_alpha, spec.swiglu_limit)                           # [T, k, I]
    y = torch.einsum("tki,tkhi->tkh", q(a), w2[ids]) + mlp.down_bias.double()[ids]     # [T, k, H]
    return (weights.double().unsqueeze(-1) * y).sum(1), a

def compare(got, ref):
    err = (got.double() - ref).abs()
    return err.max().item() / ref.abs().max().item(), (err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()

mlp = model.layers[0].mlp
x0, logits0 = acts[0]
ref, _ = moe_reference(mlp, x0, logits0)
TorchMoE = get_moe_backend("torch", "cpu", llm.config)
weights = MoEWeights(mlp.gate_up_blocks, mlp.gate_up_scales, mlp.gate_up_bias, mlp.down_blocks,
                     mlp.down_scales, mlp.down_bias)
rows = {
    "torch backend, float32": TorchMoE(weights, mlp.spec, torch.float32).forward(x0, logits0),
    "torch backend, bfloat16": TorchMoE(weights, mlp.spec, torch.bfloat16).forward(x0.bfloat16(),
                                                                                 logits0.bfloat16()),
    "fp8 per-token activations (triton_fp8's math)": moe_reference(mlp, x0, logits0, fp8_per_token)[0],
    "mxfp8 activations (triton_mxfp8's math)": moe_reference(mlp, x0, logits0, mxfp8)[0],
}
print(f"layer 0, {x0.shape[0]} tokens; error against the float64 reference, normalised as in the tests")
print(f"{'variant':48s} {'max/max|ref|':>12s} {'RMS/RMS(ref)':>13s}")
backend_errors = {}
for name, out in rows.items():
    backend_errors[name] = compare(out, ref)
    print(f"{name:48s} {backend_errors[name][0]:12.2e} {backend_errors[name][1]:13.2e}")'''),
    ("markdown", '''\
The float32 backend agrees with float64 to rounding; bfloat16 costs about 2-3 significant digits;
e4m3 activations (3 mantissa bits) cost a few percent, which is why the tests hold the fp8 backends
to looser bounds than the bf16 ones (`docs/moe.md`). The Triton kernels themselves are compared
with the `torch` backend in `tests/test_moe_backends.py`, under the interpreter on CPU and natively
on a GPU.

## 3. Quantization error on real-ish tensors

For each tensor and format: quantize with `gptoss.quant`, dequantize, and compare with the
original. `rel RMS` is RMS(error) / RMS(x); `max/amax` is max|error| / max|x|.'''),
    ("code", '''\
gen = torch.Generator().manual_seed(0)
H = 256
gauss = torch.randn(4096, H, generator=gen)
student_t = torch.distributions.StudentT(3.0).sample((4096, H))  # heavy tails
outliers = torch.randn(4096, H, generator=gen)
outliers[:, :4] *= 20  # a few channels much larger than the rest, as in real hidden states

all_x = torch.cat([x for x, _ in acts.values()])
_, swiglu_out = moe_reference(mlp, x0, logits0)
rows_idx = torch.randint(0, mc.vocab_size, (4096,), generator=gen)
tensors = {
    "embedding rows (ckpt, bf16)": model.embedding[rows_idx].float(),
    "qkv weight, layer 0 (ckpt, bf16)": model.layers[0].attn.qkv_weight.float(),
    "experts gate_up (ckpt, MXFP4)": dequantize_mxfp4(mlp.gate_up_blocks, mlp.gate_up_scales, torch.float32).flatten(0, 1),
    "MoE input x (forward pass)": all_x.float(),
    "SwiGLU output (forward pass)": swiglu_out.float().flatten(0, 1),
    "gaussian": gauss,
    "student-t, 3 dof": student_t,
    "gaussian + outlier channels": outliers,
}

FORMATS = {
    "mxfp4": lambda t: dequantize_mxfp4(*quantize_mxfp4(t), dtype=torch.float32),
    "mxfp8": lambda t: dequantize_mxfp8(*quantize_mxfp8(t), dtype=torch.float32),
    "fp8 per-tensor": lambda t: dequantize_fp8(*quantize_fp8(t), dtype=torch.float32),
    "fp8 per-token": lambda t: dequantize_fp8(*quantize_fp8(t, per_token=True), dtype=torch.float32),
}

errors = {}
print(f"{'tensor':34s} {'shape':>12s} | " + " | ".join(f"{f:>19s}" for f in FORMATS))
print(f"{'':34s} {'':>12s} | " + " | ".join(f"{'rel RMS  max/amax':>19s}" for _ in FORMATS))
for tname, t in tensors.items():
    cells = []
    for fname, roundtrip in FORMATS.items():
        err = roundtrip(t) - t
        rel_rms = (err.pow(2).mean().sqrt() / t.pow(2).mean().sqrt()).item()
        rel_max = (err.abs().max() / t.abs().max()).item()
        errors[tname, fname] = (rel_rms, rel_max)
        cells.append(f"{rel_rms:8.4f} {rel_max:9.4f} ")
    print(f"{tname:34s} {str(tuple(t.shape)):>12s} | " + " | ".join(cells))'''),
    ("markdown", '''\
What the table shows (the test suite re-runs this notebook and checks these ranges):

- **MXFP4** loses about an eighth of the signal (relative RMS 0.11-0.12) on Gaussian-like tensors,
  weights and activations alike, and 0.15 where a block mixes large and small values (heavy tails,
  outlier channels, the SwiGLU output): one mantissa bit, and the small values of a block share its
  large values' scale. The largest error stays under a fifth of the largest value, the `amax/5`
  bound of `docs/quantization.md`.
- The checkpoint's experts are already MXFP4, so quantizing them again is exact, and so is MXFP8:
  its per-32 power-of-two scale and three mantissa bits hold every e2m1 value.
- **MXFP8** and **FP8** sit at 2-3% RMS whatever the scale granularity: e4m3's three mantissa bits
  set the floor, and its range (2^-9 to 448 around the scale) is wide enough that one scale per
  tensor loses little even on these heavy tails. A scale per token is a little better: each row's
  largest value lands exactly on 448.'''),
    ("code", '''\
# error histograms: signed error in units of the tensor's RMS, per format (log counts)
fig, axes = plt.subplots(1, 3, sharey=True)
for ax, tname in zip(axes, ["gaussian", "MoE input x (forward pass)", "student-t, 3 dof"]):
    t = tensors[tname]
    rms = t.pow(2).mean().sqrt()
    for fname, roundtrip in FORMATS.items():
        e = ((roundtrip(t) - t) / rms).flatten()
        ax.hist(e.clamp(-0.6, 0.6).numpy(), bins=121, range=(-0.6, 0.6), histtype="step", label=fname)
    ax.set_yscale("log")
    ax.set_title(tname)
    ax.set_xlabel("error / RMS(x)")
axes[0].set_ylabel("elements")
axes[-1].legend(fontsize=8)
fig.tight_layout()
plt.show()'''),
    ("markdown", '''\
Error against the block scale: every MX block of 32 shares one power of two `s`, and its error scales
with `s`. The lines are the worst cases derived in `docs/quantization.md`: MXFP4 at most `amax/5`
with `amax <= 6s`, i.e. `1.2 s`; e4m3 at most `2^-4 |x| <= 28 s`. For FP8 per token the "block" is a
row and `s = amax/448` (not a power of two).'''),
    ("code", '''\
def block_errors(t, fmt):
    """(scale, max |error|) per MX block of 32, or per row for FP8 per token."""
    if fmt == "mxfp4":
        blocks, scales = quantize_mxfp4(t)
        deq = dequantize_mxfp4(blocks, scales, torch.float32)
    elif fmt == "mxfp8":
        values, scales = quantize_mxfp8(t)
        deq = dequantize_mxfp8(values, scales, torch.float32)
    else:
        q, scale = quantize_fp8(t, per_token=True)
        return scale.flatten(), (dequantize_fp8(q, scale, torch.float32) - t).abs().amax(-1)
    err = (deq - t).abs().unflatten(-1, (-1, 32)).amax(-1)
    return torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.int() - 127).flatten(), err.flatten()

sample = torch.cat([tensors["student-t, 3 dof"][:512], tensors["MoE input x (forward pass)"].repeat(1, 4)[:512]])
fig, axes = plt.subplots(1, 3)
for ax, fmt, bound, label in [(axes[0], "mxfp4", 1.2, "1.2 s"), (axes[1], "mxfp8", 28.0, "28 s"),
                              (axes[2], "fp8 per-token", 28.0, "28 s")]:
    s, e = block_errors(sample, fmt)
    keep = e > 0
    ax.loglog(s[keep].numpy(), e[keep].numpy(), ".", ms=2, alpha=0.4)
    grid = torch.tensor([s[keep].min().item(), s[keep].max().item()])
    ax.loglog(grid.numpy(), (bound * grid).numpy(), "r-", lw=1, label=f"bound {label}")
    ax.set_title(f"{fmt}: {keep.sum().item()} blocks" if fmt != "fp8 per-token" else f"{fmt}: {keep.sum().item()} rows")
    ax.set_xlabel("scale s")
    ax.legend(fontsize=8)
    assert bool((e <= bound * s * (1 + 2 ** -20)).all()), fmt  # the bound holds on every block
axes[0].set_ylabel("max |error| in the block")
fig.tight_layout()
plt.show()'''),
    ("code", '''\
workdir.cleanup()'''),
]

NOTEBOOKS = {"quickstart": QUICKSTART, "moe_and_quantization": MOE_QUANT}


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        cell = make[kind](source)
        cell["id"] = f"{name[:12]}-{i:02d}"  # stable ids: rebuilding leaves an unchanged notebook's diff empty
        nb.cells.append(cell)
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    from nbclient import NotebookClient
    # run from notebooks/, where a reader's Jupyter would start; no per-cell timestamps in the file
    NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", choices=[[], *NOTEBOOKS], help="notebooks to build (default: all)")
    p.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    a = p.parse_args(argv)
    NOTEBOOK_DIR.mkdir(exist_ok=True)
    for name in a.names or list(NOTEBOOKS):
        nb = build(name)
        if not a.no_execute:
            t0 = time.perf_counter()
            execute(nb)
            print(f"{name}: executed in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        nbformat.validate(nb)
        nbformat.write(nb, NOTEBOOK_DIR / f"{name}.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
