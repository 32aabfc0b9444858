"""Property fuzzing (hypothesis, bounded and fast) beyond the per-module fuzz tests:

- quant: re-quantizing dequantized values is a fixed point (mxfp4, mxfp8: the same values; fp8: the
  same codes), negation commutes with quantization, and any bytes dequantize without raising to
  values inside the scale's range (NaN exactly where the scale byte says so);
- harmony: the streaming parser's running result always equals the fold of the deltas it gave so
  far, it takes any Python value as a token without raising, and the server's SSE chat stream, cut
  into random increments, carries the same reasoning, content and tool calls as the whole response;
- the request models: any bytes, any JSON, and near-valid requests either validate or fail with
  RequestError naming the parameter; through the app, no input gives a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gptoss.harmony import encoding as E
from gptoss.harmony.parser import ParsedTurn, StreamingParser, apply_delta
from gptoss.quant.fp8 import dequantize_fp8, quantize_fp8
from gptoss.quant.mxfp4 import dequantize_mxfp4, pack_fp4, quantize_mxfp4, unpack_fp4
from gptoss.quant.mxfp8 import dequantize_mxfp8, quantize_mxfp8

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)


@pytest.fixture(autouse=True)
def _quiet_parser():
    # malformed turns are the point here; the parser's one warning per turn is noise
    logger = logging.getLogger("gptoss.harmony.parser")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


# --- quant ------------------------------------------------------------------------------------------

def _float32s(allow_special: bool):
    # below 2^127: a block max in (2^127, float32 max] can round up to 2^128 in e4m3 (248 * 2^120 ties
    # to 256 * 2^120), which float32 holds only as inf; found by this test, no real activation is there
    finite = st.one_of(st.floats(-2.0 ** 100, 2.0 ** 100, width=32),
                       st.sampled_from([0.0, -0.0, 6.0, -448.0, 2.0 ** -126, 2.0 ** -140, -(2.0 ** 127)]),
                       st.floats(-(2.0 ** 127), 2.0 ** 127, width=32))
    special = st.sampled_from([math.nan, math.inf, -math.inf])
    return st.one_of(finite, special) if allow_special else finite


def _blocks(allow_special=True, width=32):
    """float32 tensors [rows, blocks * width]."""
    return st.tuples(st.integers(1, 3), st.integers(1, 3)).flatmap(
        lambda s: st.lists(_float32s(allow_special), min_size=s[0] * s[1] * width, max_size=s[0] * s[1] * width)
        .map(lambda v: torch.tensor(v, dtype=torch.float32).reshape(s[0], s[1] * width)))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


# the two block formats share their properties: one test each, run on both
MX_FORMATS = [pytest.param(quantize_mxfp4, dequantize_mxfp4, id="mxfp4"),
              pytest.param(quantize_mxfp8, dequantize_mxfp8, id="mxfp8")]


@pytest.mark.parametrize("quant,dequant", MX_FORMATS)
@FUZZ
@given(_blocks())
def test_requantize_is_a_fixed_point(quant, dequant, x):
    once = dequant(*quant(x), dtype=torch.float32)
    twice = dequant(*quant(once), dtype=torch.float32)
    assert _same(once, twice)


@pytest.mark.parametrize("quant,dequant", MX_FORMATS)
@FUZZ
@given(_blocks(allow_special=False))
def test_negation_commutes(quant, dequant, x):
    pos = dequant(*quant(x), dtype=torch.float32)
    neg = dequant(*quant(-x), dtype=torch.float32)
    assert torch.equal(neg, -pos)  # 0.0 == -0.0: a value rounded to zero is +0 both ways


@FUZZ
@given(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 8)).flatmap(
    lambda s: st.lists(st.integers(0, 15), min_size=s[0] * s[1] * 2 * s[2], max_size=s[0] * s[1] * 2 * s[2])
    .map(lambda v: torch.tensor(v, dtype=torch.uint8).reshape(s[0], s[1], 2 * s[2]))))
def test_fp4_pack_unpack_round_trip(codes):
    packed = pack_fp4(codes)
    assert packed.shape == (*codes.shape[:-1], codes.shape[-1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fp4(packed), codes)


@FUZZ
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.binary(min_size=n * 16, max_size=n * 16),
                                                      st.binary(min_size=n, max_size=n))))
def test_mxfp4_any_bytes_dequantize_inside_their_scale(data):
    raw_blocks, raw_scales = data
    blocks = torch.frombuffer(bytearray(raw_blocks), dtype=torch.uint8).reshape(1, -1, 16)
    scales = torch.frombuffer(bytearray(raw_scales), dtype=torch.uint8).reshape(1, -1)
    out = dequantize_mxfp4(blocks, scales, dtype=torch.float32).reshape(1, -1, 32)
    for b, s in enumerate(scales[0].tolist()):
        vals = out[0, b]
        if s == 255:
            assert torch.isnan(vals).all()
        else:
            assert torch.isfinite(vals).all() and vals.abs().max() <= 6 * 2.0 ** (s - 127)



def _moderate():
    """Values whose fp8 scale stays a normal float32 (the scale floor is its own documented case)."""
    mag = st.tuples(st.floats(1.0, 2.0, exclude_max=True), st.integers(-60, 60)).map(lambda t: t[0] * 2.0 ** t[1])
    return st.one_of(st.just(0.0), mag, mag.map(lambda v: -v))


@FUZZ
@given(st.tuples(st.integers(1, 4), st.integers(1, 40)).flatmap(
    lambda s: st.lists(_moderate(), min_size=s[0] * s[1], max_size=s[0] * s[1])
    .map(lambda v: torch.tensor(v, dtype=torch.float32).reshape(s))), st.booleans())
def test_fp8_requantize_keeps_the_codes(x, per_token):
    assume(x.abs().amax() > 0)
    q1, s1 = quantize_fp8(x, per_token=per_token)
    q2, _ = quantize_fp8(dequantize_fp8(q1, s1, dtype=torch.float32), per_token=per_token)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))
    neg, _ = quantize_fp8(-x, per_token=per_token)
    assert torch.equal(neg.float(), -q1.float())


# --- harmony ----------------------------------------------------------------------------------------

CONTROL = [E.START, E.END, E.MESSAGE, E.CHANNEL, E.CONSTRAIN, E.RETURN, E.CALL]
PIECES = ["analysis", "final", "commentary", "assistant", " to=functions.get_weather", " json", "{", '"a"', ":",
          "1", "}", "Hello", " world", "\n", "\U0001f99c"]
PIECE_IDS = sorted({t for p in PIECES for t in E.encode(p, allow_special=False)})
TOKEN = st.one_of(st.sampled_from(CONTROL), st.sampled_from(PIECE_IDS), st.integers(0, E.VOCAB_SIZE - 1),
                  st.sampled_from([-1, E.VOCAB_SIZE, 200_000]))
TOKENS = st.lists(TOKEN, max_size=80)


def _fold(deltas) -> ParsedTurn:
    turn = ParsedTurn()
    for d in deltas:
        apply_delta(turn, d)
    return turn


def _strip(turn: ParsedTurn) -> tuple:
    return turn.reasoning, turn.content, [(c.id, c.name, c.arguments) for c in turn.tool_calls]


@FUZZ
@given(TOKENS)
def test_running_result_is_always_the_fold_of_the_deltas(ids):
    parser = StreamingParser()
    deltas = []
    for tid in ids:
        deltas += parser.feed(tid)
        assert _strip(parser.result()) == _strip(_fold(deltas))
    deltas += parser.finish()
    assert _strip(parser.result()) == _strip(_fold(deltas))


@FUZZ
@given(st.lists(st.one_of(TOKEN, st.none(), st.text(max_size=3), st.floats(), st.integers(-2 ** 80, 2 ** 80),
                          st.binary(max_size=2)), max_size=40))
def test_parser_takes_any_value_as_a_token(values):
    parser = StreamingParser()
    for v in values:
        parser.feed(v)  # anything that is not a token id is a logged problem, never an exception
    parser.finish()
    turn = parser.result()
    assert all(t is None or isinstance(t, str) for t in (turn.reasoning, turn.content))


def _server():
    from gptoss.serve import build_app
    return build_app(StubEngine(), "m").state.server


@FUZZ
@given(TOKENS, st.lists(st.integers(1, 6), min_size=1, max_size=20))
def test_sse_chat_stream_carries_the_whole_response(ids, steps):
    """What a streaming client folds from the SSE chunks equals the non-streaming message."""
    from gptoss import SamplingParams
    from gptoss.outputs import CompletionOutput, RequestOutput
    pytest.importorskip("fastapi")
    srv = _server()
    cuts, pos = [], 0
    for s in steps:
        pos = min(pos + s, len(ids))
        cuts.append(pos)
    cuts[-1] = len(ids)
    outs = [RequestOutput("r", None, [1], [CompletionOutput(0, "", list(ids[:c]), "stop" if k == len(cuts) - 1
                                                            else None)], k == len(cuts) - 1)
            for k, c in enumerate(cuts)]

    async def agen():
        for o in outs[1:]:
            yield o

    ctx = dict(rid="r", model="m", created=0, ids=[1], sp=SamplingParams(), top=None, t0=0.0, t1=0.0)

    async def stream():
        return [line async for line in srv.chat_stream(outs[0], agen(), False, **ctx)]

    lines = asyncio.run(stream())
    assert lines[-1] == "data: [DONE]\n\n"
    reasoning, content, calls, finish = "", "", {}, []
    for line in lines[:-1]:
        choice = json.loads(line[len("data: "):])["choices"][0]
        delta = choice["delta"]
        reasoning += delta.get("reasoning_content") or ""
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls", []):
            entry = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            entry["name"] += tc["function"].get("name", "")
            entry["arguments"] += tc["function"]["arguments"]
        if choice["finish_reason"]:
            finish.append(choice["finish_reason"])
    whole = srv.chat_response(outs[-1], **ctx)["choices"][0]
    msg = whole["message"]
    assert reasoning == (msg.get("reasoning_content") or "")
    assert content == (msg["content"] or "")
    assert [calls[i] for i in sorted(calls)] == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                                 for c in msg.get("tool_calls", [])]
    assert finish == [whole["finish_reason"]]


# --- request models ---------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["model", "messages", "prompt", "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
          "stream_options", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
          "tool_choice", "reasoning_effort", "response_format", "stop_token_ids", "min_tokens", "echo", "best_of",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "logit_bias", "suffix"]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# plausible values for each field (some out of range), with JSON junk mixed in: part of the requests
# are served, so the success paths are fuzzed as well as the error paths
PLAUSIBLE = {
    "model": st.sampled_from(["m", "other"]), "n": st.integers(0, 2), "temperature": st.floats(-0.5, 2.0),
    "top_p": st.floats(0.0, 1.0), "top_k": st.integers(-1, 3), "min_p": st.floats(0.0, 1.0),
    "seed": st.integers(-2 ** 64, 2 ** 64), "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "stream": st.booleans(), "stream_options": st.just({"include_usage": True}), "max_tokens": st.integers(-1, 4),
    "max_completion_tokens": st.integers(0, 4), "logprobs": st.one_of(st.booleans(), st.integers(-1, 21)),
    "top_logprobs": st.integers(-1, 21), "tools": st.just([TOOL]),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]),
    "reasoning_effort": st.sampled_from(["low", "medium", "high", "max"]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                        {"type": "json_schema", "json_schema": {"name": "a", "schema": TOOL["function"]["parameters"]}}]),
    "stop_token_ids": st.lists(st.integers(-1, 300_000), max_size=3), "min_tokens": st.integers(0, 5),
    "echo": st.booleans(), "ignore_eos": st.booleans(), "presence_penalty": st.floats(-3, 3),
}


def _mostly(plausible):
    """A plausible value nine times in ten, else any JSON."""
    return st.integers(0, 9).flatmap(lambda k: JSON if k == 0 else plausible)


MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": st.text(max_size=12)}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "x"])},
                          optional={"content": st.one_of(st.text(max_size=10), JSON), "tool_call_id": st.text(max_size=4),
                                    "tool_calls": JSON}))
NEAR_VALID = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=3),
     "prompt": st.one_of(st.text(min_size=1, max_size=10), st.lists(st.integers(0, 300_000), min_size=1, max_size=4),
                         JSON)},
    optional={f: _mostly(PLAUSIBLE[f]) if f in PLAUSIBLE else JSON for f in FIELDS if f not in ("messages", "prompt")})


@FUZZ
@given(st.one_of(st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode()),
                 NEAR_VALID.map(lambda v: json.dumps(v).encode())))
def test_request_models_validate_or_name_the_problem(body):
    from gptoss.serve import protocol as P
    for cls in (P.ChatCompletionRequest, P.CompletionRequest):
        try:
            req = P.parse_request(cls, body)
        except P.RequestError as e:
            assert e.status == 400 and e.message and "Traceback" not in e.message
            assert e.param is None or isinstance(e.param, str)
        else:
            assert isinstance(req, cls)


@pytest.fixture(scope="module")
def app_client():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gptoss.serve import build_app
    with TestClient(build_app(StubEngine(), "m", max_request_bytes=4096), raise_server_exceptions=False) as c:
        yield c


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       st.one_of(st.binary(max_size=64), NEAR_VALID.map(lambda v: json.dumps(v).encode()),
                 JSON.map(lambda v: json.dumps(v).encode())))
def test_the_app_never_answers_500(app_client, path, body):
    r = app_client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404, 413, 503), (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers["content-type"].startswith("application/json"):
        assert r.json()["choices"]
    else:
        assert r.text.rstrip().endswith("data: [DONE]")


class StubEngine:
    """Answers every request at once with a few tokens; drives the app's whole request path without
    a model."""
    is_running = True
    error = None
    max_queued_requests = None

    class engine:
        max_model_len = 1024

    def stats(self):
        return {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0.0}

    async def generate(self, prompt_token_ids, params, request_id=None, prompt=None):
        from gptoss.outputs import CompletionOutput, RequestOutput
        ids = E.encode("<|channel|>final<|message|>ok<|return|>")
        outs = [CompletionOutput(i, "ok", ids, "stop", None, [] if params.logprobs is not None else None)
                for i in range(params.n)]
        yield RequestOutput(request_id, prompt, list(prompt_token_ids), outs, True, 0)
