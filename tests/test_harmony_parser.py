"""The harmony parser on the shapes real gpt-oss output takes, streaming and not, plus fuzzing."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss.harmony import encoding as E
from gptoss.harmony.parser import (ContentDelta, ParsedTurn, ReasoningDelta, StreamingParser,
                                   ToolCallArguments, ToolCallStart, apply_delta,
                                   parse_completion)

PARROT = "\U0001f99c"  # three tokens in o200k: b"\xf0\x9f", b"\xa6", b"\x9c"
RESERVED = 200000
OUT_OF_VOCAB = 250000


def toks(*parts) -> list[int]:
    """Token ids from harmony text (special tokens allowed) and raw ids."""
    out: list[int] = []
    for p in parts:
        out.extend(E.encode(p) if isinstance(p, str) else [p] if isinstance(p, int) else p)
    return out


def call(name, args):
    return (name, args)


W = '{"city":"Paris"}'
W2 = '{"city":"Tokyo","unit":"c"}'
TOOL_CF = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"  # channel first
TOOL_RF = " to=functions.get_weather<|channel|>commentary json<|message|>"  # recipient first
A = "<|channel|>analysis<|message|>"
F = "<|channel|>final<|message|>"
N = "<|start|>assistant"

# (id, tokens, reasoning, content, [(name, arguments)], clean: no problem is logged)
CASES = [
    ("final_only", toks(F, "Hello!<|return|>"), None, "Hello!", [], True),
    ("analysis_final", toks(A, "Think.<|end|>", N, F, "Answer.<|return|>"), "Think.", "Answer.", [], True),
    ("call_channel_first", toks(A, "Need it.<|end|>", N, TOOL_CF, W, "<|call|>"),
     "Need it.", None, [call("get_weather", W)], True),
    ("call_recipient_first", toks(A, "Need it.<|end|>", N, TOOL_RF, W, "<|call|>"),
     "Need it.", None, [call("get_weather", W)], True),
    ("call_first_message", toks(TOOL_RF, W, "<|call|>"), None, None, [call("get_weather", W)], True),
    ("preamble_then_call", toks(A, "Plan.<|end|>", N, "<|channel|>commentary<|message|>Checking.<|end|>",
                                N, TOOL_CF, W, "<|call|>"),
     "Plan.", "Checking.", [call("get_weather", W)], True),
    ("two_calls", toks(A, "Two.<|end|>", N, TOOL_CF, W, "<|call|>", N, TOOL_RF, W2, "<|call|>"),
     "Two.", None, [call("get_weather", W), call("get_weather", W2)], True),
    ("three_calls_mixed", toks(N[len("<|start|>assistant"):], TOOL_CF, W, "<|call|>",
                               N, " to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
                               N, "<|channel|>commentary to=functions.lookup json<|message|>", '{"q":"x"}', "<|call|>"),
     None, None, [call("get_weather", W), call("get_time", "{}"), call("lookup", '{"q":"x"}')], True),
    ("call_closed_by_end", toks(TOOL_CF, W, "<|end|>"), None, None, [call("get_weather", W)], True),
    ("call_on_analysis", toks("<|channel|>analysis to=functions.get_weather code<|message|>", W, "<|call|>"),
     None, None, [call("get_weather", W)], True),
    ("call_without_namespace", toks("<|channel|>commentary to=get_weather <|constrain|>json<|message|>", W,
                                    "<|call|>"), None, None, [call("get_weather", W)], True),
    ("call_constrain_glued", toks(" to=functions.get_weather<|channel|>commentary<|constrain|>json<|message|>",
                                  W, "<|call|>"), None, None, [call("get_weather", W)], True),
    ("call_multibyte_args", toks(TOOL_CF, '{"city":"\u6771\u4eac ', PARROT, '"}<|call|>'),
     None, None, [call("get_weather", '{"city":"\u6771\u4eac ' + PARROT + '"}')], True),
    ("two_analysis", toks(A, "One.<|end|>", N, A, "Two.<|end|>", N, F, "Done.<|return|>"),
     "One.\nTwo.", "Done.", [], True),
    ("preamble_and_final", toks("<|channel|>commentary<|message|>Looking.<|end|>", N, F, "Found.<|return|>"),
     None, "Looking.\nFound.", [], True),
    ("missing_end_before_start", toks(A, "Think", N, F, "Answer<|return|>"), "Think", "Answer", [], False),
    ("missing_end_start", toks(A, "Think", F, "Answer<|return|>"), "Think", "Answer", [], False),
    ("missing_end_before_call", toks(A, "Think", N, TOOL_CF, W, "<|call|>"), "Think", None,
     [call("get_weather", W)], False),
    ("cut_mid_analysis", toks(A, "I am thinking about"), "I am thinking about", None, [], True),
    ("cut_mid_final", toks(A, "Ok.<|end|>", N, F, "The answer is"), "Ok.", "The answer is", [], True),
    ("cut_mid_args", toks(A, "Call.<|end|>", N, TOOL_CF, '{"city":"Pa'), "Call.", None,
     [call("get_weather", '{"city":"Pa')], True),
    ("cut_mid_header", toks(A, "x<|end|>", N, "<|channel|>fin"), "x", None, [], True),
    ("cut_mid_call_header", toks(A, "x<|end|>", N, " to=functions.get_weather<|channel|>comm"), "x", None, [], True),
    ("cut_after_start", toks(A, "x<|end|><|start|>"), "x", None, [], True),
    ("cut_mid_character", toks(F, "bird ", [4103]), None, "bird \ufffd", [], True),
    ("empty", [], None, None, [], True),
    ("only_return", toks("<|return|>"), None, None, [], True),
    ("empty_messages", toks(A, "<|end|>", N, F, "<|return|>"), None, None, [], True),
    ("no_header_text", toks("Just text.<|return|>"), None, "Just text.", [], False),
    ("no_header_cut", toks("Just text"), None, "Just text", [], False),
    ("no_header_long", toks("word " * 100), None, "word " * 100, [], False),
    ("stray_constrain_in_final", toks(F, "a", "<|constrain|>", "b<|return|>"), None, "ab", [], False),
    ("stray_message_in_final", toks(F, "a", "<|message|>", "b<|return|>"), None, "ab", [], False),
    ("reserved_in_analysis", toks(A, "a", [RESERVED], "b<|end|>", N, F, "c<|return|>"), "ab", "c", [], False),
    ("endoftext_after_return", toks(F, "done<|return|><|endoftext|>"), None, "done", [], False),
    ("out_of_vocab_id", toks(F, "a", [OUT_OF_VOCAB, -3], "b<|return|>"), None, "ab", [], False),
    ("startoftext_in_header", toks("<|startoftext|>", F, "hi<|return|>"), None, "hi", [], False),
    ("emoji_split_final", toks(F, "I like ", PARROT, "s.<|return|>"), None, "I like " + PARROT + "s.", [], True),
    ("cjk_reasoning", toks(A, "\u65e5\u672c\u8a9e\u306e\u5929\u6c17<|end|>", N, F, "ok<|return|>"),
     "\u65e5\u672c\u8a9e\u306e\u5929\u6c17", "ok", [], True),
    ("unknown_channel", toks("<|channel|>summary<|message|>S.<|return|>"), None, "S.", [], False),
    ("no_channel", toks("<|message|>Hi<|return|>"), None, "Hi", [], False),
    ("hallucinated_tool_result", toks(TOOL_CF, W, "<|call|>",
                                      "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>",
                                      '{"t":1}<|end|>'),
     None, '{"t":1}', [call("get_weather", W)], False),
    ("double_start", toks("<|start|>assistant<|start|>assistant", F, "x<|return|>"), None, "x", [], False),
    ("whitespace_between", toks(A, "a<|end|>", "\n\n", N, F, "b<|return|>"), "a", "b", [], True),
    ("tokens_after_call", toks(TOOL_CF, W, "<|call|>", N, F, "late<|return|>"), None, "late",
     [call("get_weather", W)], True),
]


def _counter_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _stream(ids):
    parser = StreamingParser(call_id_factory=_counter_ids())
    deltas = []
    for tid in ids:
        deltas.extend(parser.feed(tid))
    deltas.extend(parser.finish())
    return parser, deltas


def _fold(deltas) -> ParsedTurn:
    turn = ParsedTurn()
    for d in deltas:
        apply_delta(turn, d)
    return turn


def _check_deltas(deltas, turn: ParsedTurn) -> None:
    """Start before arguments, dense indexes, one start per call, no empty deltas."""
    started = []
    for d in deltas:
        if isinstance(d, ToolCallStart):
            assert d.index == len(started)
            started.append(d.id)
        elif isinstance(d, ToolCallArguments):
            assert d.index < len(started) and d.text
        else:
            assert isinstance(d, (ReasoningDelta, ContentDelta)) and d.text
    assert started == [c.id for c in turn.tool_calls]
    assert len(set(started)) == len(started)


@pytest.mark.parametrize("case_id,ids,reasoning,content,calls,clean", CASES,
                         ids=[c[0] for c in CASES])
def test_parse_table(case_id, ids, reasoning, content, calls, clean):
    turn = parse_completion(ids)
    assert (turn.reasoning, turn.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in turn.tool_calls] == calls
    assert all(c.id.startswith("call_") for c in turn.tool_calls)

    parser, deltas = _stream(ids)
    _check_deltas(deltas, parser.result())
    assert _fold(deltas) == parser.result()
    streamed = parser.result()
    assert (streamed.reasoning, streamed.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == calls
    assert parse_completion(ids, call_id_factory=_counter_ids()) == streamed
    assert (parser.problems == []) == clean, parser.problems


def test_table_is_large_enough():
    assert len(CASES) >= 30


def _harmony_view(ids):
    """What openai-harmony's own parser makes of well-formed output, in our terms."""
    from openai_harmony import Role

    msgs = E.get_encoding().parse_messages_from_completion_tokens(ids, Role.ASSISTANT, strict=False)
    reasoning, content, calls = [], [], []
    for m in msgs:
        text = "".join(c.text for c in m.content)
        if m.recipient and m.recipient != "assistant":
            calls.append((m.recipient.removeprefix("functions."), text))
        elif text:
            (reasoning if m.channel == "analysis" else content).append(text)
    return "\n".join(reasoning) or None, "\n".join(content) or None, calls


# openai-harmony's parser raises on text between messages, so that case is ours alone
HARMONY_COMPARABLE = [c[:5] for c in CASES
                      if c[5] and not c[0].startswith("cut_") and c[0] not in ("empty", "whitespace_between")]


@pytest.mark.parametrize("case_id,ids,reasoning,content,calls", HARMONY_COMPARABLE,
                         ids=[c[0] for c in HARMONY_COMPARABLE])
def test_agrees_with_openai_harmony(case_id, ids, reasoning, content, calls):
    assert _harmony_view(ids) == (reasoning, content, calls)


def test_problems_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="gptoss.harmony.parser"):
        turn = parse_completion(toks(A, "a<|channel|>final<|message|>b<|return|>"))
    assert turn.content == "b"
    assert any("missing <|end|>" in r.getMessage() for r in caplog.records)


def test_streaming_name_before_arguments_and_stable_ids():
    parser = StreamingParser()
    deltas = parser.feed_many(toks(TOOL_CF, W, "<|call|>", N, TOOL_RF, W2, "<|call|>"))
    starts = [d for d in deltas if isinstance(d, ToolCallStart)]
    assert [s.index for s in starts] == [0, 1] and starts[0].id != starts[1].id
    first_args = next(i for i, d in enumerate(deltas) if isinstance(d, ToolCallArguments))
    assert isinstance(deltas[first_args - 1], ToolCallStart)
    assert [c.id for c in parser.result().tool_calls] == [s.id for s in starts]
    assert "".join(d.text for d in deltas if isinstance(d, ToolCallArguments) and d.index == 1) == W2


def test_split_character_is_held_back_until_complete():
    parser = StreamingParser()
    parser.feed_many(toks(F))
    emitted = [parser.feed(t) for t in E.encode(PARROT)]
    assert emitted[:2] == [[], []] and emitted[2] == [ContentDelta(PARROT)]


# ---------------------------------------------------------------------------------------------
# fuzzing

CONTROL = [E.START, E.END, E.MESSAGE, E.CHANNEL, E.CONSTRAIN, E.RETURN, E.CALL]
ODD = [199998, 199999, RESERVED, 200004, 201087, 201088, OUT_OF_VOCAB, -1]
WORDS = ["analysis", "final", "commentary", "assistant", " to", "=", "functions", ".get", "_weather",
         " json", " ", "\n", "{", '"', "}", "hello", PARROT, "\u6771\u4eac", " to=functions.f"]
WORD_IDS = sorted({t for w in WORDS for t in E.encode(w, allow_special=False)})

token = st.one_of(st.sampled_from(CONTROL), st.sampled_from(WORD_IDS), st.sampled_from(ODD),
                  st.integers(0, E.VOCAB_SIZE - 1))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(token, max_size=120))
def test_fuzz_random_tokens_never_raise(ids):
    logging.getLogger("gptoss.harmony.parser").setLevel(logging.ERROR)
    try:
        parser, deltas = _stream(ids)
    finally:
        logging.getLogger("gptoss.harmony.parser").setLevel(logging.NOTSET)
    turn = parser.result()
    _check_deltas(deltas, turn)
    assert _fold(deltas) == turn
    assert parse_completion(ids, call_id_factory=_counter_ids()) == turn
    for text in (turn.reasoning, turn.content):
        assert text is None or (isinstance(text, str) and text)


# well-formed turns built from random messages: the parse gives back exactly what went in, and a
# turn cut anywhere gives back a prefix of it
TEXT = st.text(alphabet=st.sampled_from(list("ab {}\":,.\n") + [PARROT, "\u00e9", "\u6771"]), max_size=12)
MESSAGE = st.one_of(
    st.tuples(st.just("analysis"), TEXT),
    st.tuples(st.just("commentary"), TEXT),
    st.tuples(st.just("final"), TEXT),
    st.tuples(st.sampled_from(["tool_cf", "tool_rf", "tool_plain"]), TEXT,
              st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)),
)


def _render(messages) -> tuple[list[int], tuple]:
    ids: list[int] = []
    reasoning, content, calls = [], [], []
    for i, m in enumerate(messages):
        kind, text = m[0], m[1]
        head = [] if i == 0 else E.encode(N)
        if kind.startswith("tool"):
            name = m[2]
            header = {"tool_cf": f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>",
                      "tool_rf": f" to=functions.{name}<|channel|>commentary json<|message|>",
                      "tool_plain": f" to=functions.{name}<|channel|>commentary<|message|>"}[kind]
            end, calls = "<|call|>", calls + [(name, text)]
        else:
            header = f"<|channel|>{kind}<|message|>"
            end = "<|end|>" if kind != "final" else "<|return|>"
            if text:
                (reasoning if kind == "analysis" else content).append(text)
        ids += head + E.encode(header) + E.encode(text, allow_special=False) + E.encode(end)
    return ids, ("\n".join(reasoning) or None, "\n".join(content) or None, calls)


def _view(turn):
    return turn.reasoning, turn.content, [(c.name, c.arguments) for c in turn.tool_calls]


@FUZZ
@given(st.lists(MESSAGE, max_size=6), st.data())
def test_fuzz_well_formed_round_trip_and_prefixes(messages, data):
    ids, expected = _render(messages)
    parser, deltas = _stream(ids)
    assert parser.problems == []
    assert _view(parser.result()) == expected
    cut = data.draw(st.integers(0, len(ids)))
    cut_parser = StreamingParser()
    cut_parser.feed_many(ids[:cut])
    cut_parser.finish()
    assert cut_parser.problems == []  # running out of tokens is no parse problem
    r, c, calls = _view(cut_parser.result())
    strip = lambda s: (s or "").rstrip("\ufffd")  # a cut character decodes as U+FFFD
    assert (expected[0] or "").startswith(strip(r))
    assert (expected[1] or "").startswith(strip(c))
    assert len(calls) <= len(expected[2])
    for (name, args), (ename, eargs) in zip(calls, expected[2]):
        assert name == ename and eargs.startswith(strip(args))
