"""LLM.chat: harmony rendering + parsing, and constrained decoding that holds even on random weights."""

import json

import jsonschema
import pytest

from gptoss import SamplingParams

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 0, "maximum": 7},
            "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time now",
                                         "parameters": {"type": "object", "properties": {}}}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["answer", "score"], "additionalProperties": False}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_plain_chat_parses_into_parts(tiny_llm):
    out = tiny_llm.chat(MSGS, SamplingParams(temperature=1.0, seed=1, max_tokens=40))[0]
    assert out.finish_reason in ("stop", "length", "tool_calls")
    assert out.prompt_token_ids[-2:] == [200006, 173781]  # ends with <|start|>assistant
    assert len(out.token_ids) <= 40


def test_required_tool_call_valid_100_of_100(tiny_llm):
    convs = [MSGS] * 100
    sps = [SamplingParams(temperature=1.0, seed=i, max_tokens=120) for i in range(100)]
    outs = tiny_llm.chat(convs, sps, tools=[WEATHER, TIME], tool_choice="required")
    for o in outs:
        assert o.finish_reason == "tool_calls", o
        assert len(o.tool_calls) == 1 and o.tool_calls[0].name in ("get_weather", "get_time")
        args = json.loads(o.tool_calls[0].arguments)
        schema = WEATHER if o.tool_calls[0].name == "get_weather" else TIME
        jsonschema.validate(args, schema["function"]["parameters"])
        assert o.token_ids[-1] == 200012  # <|call|>


def test_named_tool_forces_that_function(tiny_llm):
    outs = tiny_llm.chat([MSGS] * 5, [SamplingParams(temperature=1.0, seed=i, max_tokens=100) for i in range(5)],
                         tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert all(o.tool_calls and o.tool_calls[0].name == "get_time" for o in outs)


def test_json_schema_valid_100_of_100(tiny_llm):
    sps = [SamplingParams(temperature=1.0, seed=i, max_tokens=120, json_schema=ANSWER) for i in range(100)]
    outs = tiny_llm.chat([MSGS] * 100, sps)
    for o in outs:
        assert o.finish_reason == "stop", o
        jsonschema.validate(json.loads(o.content), ANSWER)


def test_plain_generate_json_schema(tiny_llm):
    sp = SamplingParams(temperature=1.0, seed=3, max_tokens=60, json_schema=ANSWER)
    outs = tiny_llm.generate(["Give me JSON:"] * 10, sp, use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), ANSWER)


@pytest.mark.parametrize("kw,needle", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "'nope'"),
    ({"tool_choice": "required"}, "at least one tool"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice='sometimes'"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort='extreme'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strnig"}}}}}],
      "tool_choice": "required"}, "schema"),
])
def test_bad_chat_requests(tiny_llm, kw, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_llm.chat(MSGS, SamplingParams(max_tokens=8), **kw)
    assert not tiny_llm.engine.has_unfinished()


def test_too_deep_tool_schema_is_refused_by_the_library(tiny_llm):
    deep = {"type": "object"}
    for _ in range(80):
        deep = {"type": "object", "properties": {"x": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.parameters is nested more than"):
        tiny_llm.chat(MSGS, SamplingParams(max_tokens=4), tools=[tool])
    assert not tiny_llm.engine.has_unfinished()
