"""Constrained decoding: the grammar admits real gpt-oss output, and drives a random model to a
complete, parseable tool call or JSON answer within max_tokens."""

from __future__ import annotations

import json

import pytest

xgr = pytest.importorskip("xgrammar")
torch = pytest.importorskip("torch")

from gptoss.harmony import encoding as E  # noqa: E402
from gptoss.harmony.grammar import (GrammarCompiler, GrammarError, GrammarLimits,  # noqa: E402
                                    allocate_bitmask, apply_bitmask, default_reasoning_budget,
                                    reasoning_close_tokens, _strict_bounded_strings)
from gptoss.harmony.parser import StreamingParser, parse_completion  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 8},
                   "unit": {"type": "string", "enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}
ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer", "score"],
          "properties": {"answer": {"type": "string", "maxLength": 8},
                         "score": {"type": "integer", "minimum": 0, "maximum": 100}}}


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler.get()


def _allowed(bitmask, tid: int) -> bool:
    return bool((int(bitmask[0, tid // 32]) >> (tid % 32)) & 1)


def feed(grammar, text: str) -> bool:
    """Feed `text` the way a sampler does: fill the mask, check the token is in it, accept it."""
    bitmask = allocate_bitmask(1)
    for tid in E.encode(text):
        grammar.fill_bitmask(bitmask, 0)
        matched = grammar.accept_token(tid)
        # the mask and the matcher must agree (xgrammar's shared cache once broke this)
        assert matched == _allowed(bitmask, tid), (text, E.decode([tid]))
        if not matched:
            return False
    return True


def accepts(grammar, text: str) -> bool:
    return feed(grammar, text) and grammar.is_terminated()


def test_singleton(compiler):
    assert GrammarCompiler.get() is compiler


def test_unconstrained_requests_get_no_grammar(compiler):
    assert compiler.compile_request() is None
    assert compiler.compile_request(tools=[WEATHER], tool_choice="none") is None


@pytest.mark.parametrize("text", [
    '<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary '
    'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>',
    '<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather'
    '<|channel|>commentary json<|message|>{"city": "Paris", "unit": "c"}<|call|>',
    ' to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>{"zone": -5}<|call|>',
    '<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>{"city":"Oslo"}<|call|>',
    '<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>',
])
def test_auto_admits_real_output(compiler, text):
    assert accepts(compiler.compile_request(tools=[WEATHER, TIME]), text)


@pytest.mark.parametrize("text", [
    '<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>commentary '
    'to=functions.get_weather <|constrain|>json<|message|>{"town":"Paris"}<|call|>',  # schema
    '<|channel|>commentary to=functions.nope <|constrain|>json<|message|>{}<|call|>',  # no such tool
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"<|end|>"}<|call|>',
])
def test_auto_rejects(compiler, text):
    assert not accepts(compiler.compile_request(tools=[WEATHER, TIME]), text)


def test_required_and_named_force_a_call(compiler):
    final = '<|channel|>final<|message|>No tools needed.<|return|>'
    assert not accepts(compiler.compile_request(tools=[WEATHER, TIME], tool_choice="required"), final)
    named = {"type": "function", "function": {"name": "get_time"}}
    g = compiler.compile_request(tools=[WEATHER, TIME], tool_choice=named)
    assert not accepts(g, '<|channel|>commentary to=functions.get_weather <|constrain|>json'
                          '<|message|>{"city":"Rome"}<|call|>')
    g = compiler.compile_request(tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_time"})
    assert accepts(g, '<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>'
                      '{"zone":3}<|call|>')


def test_json_schema_on_final_after_free_analysis(compiler):
    ok = ('<|channel|>analysis<|message|>Think {not json} freely.<|end|><|start|>assistant'
          '<|channel|>final<|message|>{"answer": "yes", "score": 7}<|return|>')
    assert accepts(compiler.compile_request(json_schema=ANSWER), ok)
    assert accepts(compiler.compile_request(json_schema=json.dumps(ANSWER)),
                   '<|channel|>final<|message|>{"answer":"no","score":0}<|return|>')
    bad = '<|channel|>final<|message|>{"answer": "yes"}<|return|>'
    assert not accepts(compiler.compile_request(json_schema=ANSWER), bad)


def test_reasoning_budget_closes_analysis_and_forces_what_follows(compiler):
    g = compiler.compile_request(json_schema=ANSWER, reasoning_budget=3)
    bitmask = allocate_bitmask(1)
    for tid in E.encode("<|channel|>analysis<|message|>a b c"):
        g.fill_bitmask(bitmask, 0)  # xgrammar counts the budget on the mask-driven path
        assert g.accept_token(tid)
    forced = g.forced_tokens()
    # everything up to the JSON is forced, header words as their canonical tokens
    assert forced == reasoning_close_tokens() + E.encode("<|channel|>final<|message|>")
    assert g.forced_tokens() == forced  # forced_tokens leaves the state alone
    g.fill_bitmask(bitmask, 0)
    assert not g.accept_token(E.encode(" d")[0])
    assert default_reasoning_budget(100) == 50


def test_bare_json_for_plain_generate(compiler):
    g = compiler.compile_json({"type": "integer"})
    assert feed(g, "12") and not g.is_terminated()  # the model may go on to "123"
    assert feed(g, "3<|return|>") and g.is_terminated()
    g = compiler.compile_json(ANSWER)
    assert not feed(g, '{"answer": "x"}<|return|>')  # "score" is required
    with pytest.raises(GrammarError, match="Unsupported type"):
        compiler.compile_json({"type": "foo"})


def test_zero_budget_means_no_analysis(compiler):
    assert not feed(compiler.compile_request(json_schema=ANSWER, reasoning_budget=0),
                    "<|channel|>analysis")
    assert accepts(compiler.compile_request(json_schema=ANSWER, reasoning_budget=0),
                   '<|channel|>final<|message|>{"answer": "", "score": 1}<|return|>')


def _random_turn(grammar, max_tokens: int, seed: int, prefix: str = "") -> list[int]:
    """A model with random logits, held to the grammar, after `prefix`."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1)
    assert feed(grammar, prefix)
    out = E.encode(prefix)
    while not grammar.is_terminated() and len(out) < max_tokens:
        logits = torch.randn(1, E.VOCAB_SIZE, generator=gen)
        grammar.fill_bitmask(bitmask, 0)
        apply_bitmask(logits, bitmask)
        tid = int(torch.argmax(logits[0]))
        assert grammar.accept_token(tid)
        out.append(tid)
    return out


def _parse_cleanly(ids):
    """What the grammar lets through, the parser reads without a single complaint."""
    parser = StreamingParser()
    parser.feed_many(ids)
    parser.finish()
    assert parser.problems == []
    assert parser.result() == parse_completion(ids, call_id_factory=lambda: parser.result().tool_calls[0].id)
    return parser.result()


@pytest.mark.parametrize("seed,prefix", [(0, ""), (1, "<|channel|>analysis<|message|>")])
def test_random_model_ends_in_a_complete_call(compiler, seed, prefix):
    jsonschema = pytest.importorskip("jsonschema")
    max_tokens = 160
    g = compiler.compile_request(tools=[WEATHER, TIME], tool_choice="required",
                                 reasoning_budget=default_reasoning_budget(max_tokens))
    ids = _random_turn(g, max_tokens, seed, prefix)
    assert g.is_terminated() and ids[-1] == E.CALL
    turn = _parse_cleanly(ids)
    assert len(turn.tool_calls) == 1
    call = turn.tool_calls[0]
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)


def test_random_model_ends_in_complete_json(compiler):
    jsonschema = pytest.importorskip("jsonschema")
    max_tokens = 160
    g = compiler.compile_request(json_schema=ANSWER, reasoning_budget=default_reasoning_budget(max_tokens))
    ids = _random_turn(g, max_tokens, seed=3, prefix="<|channel|>analysis<|message|>")
    assert g.is_terminated() and ids[-1] == E.RETURN
    turn = _parse_cleanly(ids)
    # a random model never ends its reasoning by itself: the budget did
    assert turn.tool_calls == [] and len(E.encode(turn.reasoning)) >= max_tokens // 4
    jsonschema.validate(json.loads(turn.content), ANSWER)


@pytest.mark.parametrize("kwargs,match", [
    (dict(json_schema={"type": "foo"}), "cannot be compiled: Unsupported type"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema=[1]), "must be a JSON schema object"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}),
     "names 'x', which is not among the tools \\(get_weather\\)"),
    (dict(tools=[WEATHER], tool_choice="any"), "allowed: 'auto', 'none', 'required'"),
    (dict(tool_choice="required"), "needs tools"),
    (dict(tools=[{"name": "bad name"}]), r"tools\[0\]\.function\.name"),
])
def test_clear_errors(compiler, kwargs, match):
    with pytest.raises(GrammarError, match=match):
        compiler.compile_request(**kwargs)


def test_size_limits(compiler):
    small = GrammarCompiler.__new__(GrammarCompiler)  # the limits only, no second vocabulary
    small.__dict__.update(compiler.__dict__, limits=GrammarLimits(max_schema_bytes=100, max_tools=1))
    with pytest.raises(GrammarError, match="the limit is 100"):
        small.compile_request(json_schema={"type": "object", "description": "x" * 200})
    with pytest.raises(GrammarError, match="2 tools; the limit is 1"):
        small.compile_request(tools=[WEATHER, TIME])
    assert isinstance(GrammarError("x"), ValueError)


@pytest.mark.parametrize("text,ok", [
    (b"ab", True), ("\u05e9\u05e8".encode(), True), ("\u0800".encode(), True), ("\U0001f600".encode(), True),
    (b"\x7f", True), (b"abcd", False),  # maxLength 3
    (b"\xe0\x83\x93", False),            # an overlong encoding (it decodes to three U+FFFD)
    (b"\xed\xa0\x80", False),            # a UTF-16 surrogate
    (b"\xf0\x80\x80\x80", False), (b"\xf4\x90\x80\x80", False), (b"\t", False), (b'\\"', False)])
def test_bounded_strings_admit_only_well_formed_utf8(text, ok):
    import xgrammar as xgr
    schema = _strict_bounded_strings({"type": "object", "properties": {"c": {"type": "string", "maxLength": 3}},
                                      "required": ["c"]})
    g = xgr.GrammarCompiler(xgr.TokenizerInfo([b"a"])).compile_json_schema(json.dumps(schema), any_whitespace=False)
    assert xgr.GrammarMatcher(g).accept_string(b'{"c": "' + text + b'"}') is ok
