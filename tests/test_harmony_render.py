"""OpenAI chat messages rendered to harmony prompt tokens."""

from __future__ import annotations

import datetime

import pytest

from gptoss.harmony import decode, encode, get_encoding, parse_completion, render_chat, stop_token_ids
from gptoss.harmony import encoding as E

DATE = "2025-06-28"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                   "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}


def text(messages, **kw):
    kw.setdefault("current_date", DATE)
    return decode(render_chat(messages, **kw))


def test_ends_ready_for_generation():
    ids = render_chat([{"role": "user", "content": "Hi"}], current_date=DATE)
    assert ids[-2:] == [E.START] + encode("assistant")
    assert ids[0] == E.START


@pytest.mark.parametrize("effort", ["low", "medium", "high", "HIGH", None])
def test_system_message(effort):
    t = text([{"role": "user", "content": "Hi"}], reasoning_effort=effort)
    system = t.split("<|end|>")[0]
    assert system.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Knowledge cutoff: 2024-06" in system and f"Current date: {DATE}" in system
    assert f"Reasoning: {(effort or 'medium').lower()}" in system
    assert "# Valid channels: analysis, commentary, final." in system
    assert "developer" not in t  # no instructions, no tools: no developer message


def test_dates():
    assert "Current date" not in text([{"role": "user", "content": "Hi"}], current_date=None)
    today = datetime.date.today().isoformat()
    assert f"Current date: {today}" in decode(render_chat([{"role": "user", "content": "Hi"}]))
    assert "Current date: 2024-01-02" in text([{"role": "user", "content": "Hi"}],
                                              current_date=datetime.date(2024, 1, 2))


def test_instructions_and_tools_go_to_the_developer_message():
    t = text([{"role": "system", "content": "Be brief."},
              {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
              {"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert "Calls to these tools must go to the commentary channel: 'functions'." in t
    dev = t.split("<|start|>developer<|message|>")[1].split("<|end|>")[0]
    assert dev.startswith("# Instructions\n\nBe brief.\n\nUse metric.")
    assert "namespace functions {" in dev and "// Current weather in a city" in dev
    assert "type get_weather = (_: {\n// City\ncity: string,\n}) => any;" in dev
    assert t.endswith("<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant")


def test_tool_call_and_result_round_trip():
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "reasoning_content": "Need the tool.", "content": "Checking.",
             "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    t = text(msgs, tools=[WEATHER])
    tail = t.split("<|start|>user<|message|>Weather in Paris?<|end|>")[1]
    assert tail == (
        "<|start|>assistant<|channel|>analysis<|message|>Need the tool.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 21}<|end|>'
        "<|start|>assistant")
    # what we render for an earlier turn parses back to that turn
    ids = encode(tail.split("<|start|>functions.")[0])[2:]  # drop the first <|start|>assistant
    turn = parse_completion(ids)
    assert (turn.reasoning, turn.content) == ("Need the tool.", "Checking.")
    assert [(c.name, c.arguments) for c in turn.tool_calls] == [("get_weather", '{"city":"Paris"}')]


def test_analysis_dropped_for_finished_turns_only():
    q1 = [{"role": "user", "content": "Q1"},
          {"role": "assistant", "reasoning_content": "old thoughts", "content": "A1"},
          {"role": "user", "content": "Q2"},
          {"role": "assistant", "reasoning": "new thoughts", "content": None, "tool_calls": [CALL]},
          {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    t = text(q1, tools=[WEATHER])
    # the first turn ended in a final answer; the second is still working on its tool call
    assert "old thoughts" not in t and "<|channel|>final<|message|>A1<|end|>" in t
    assert "<|channel|>analysis<|message|>new thoughts<|end|>" in t
    assert "old thoughts" in text(q1, tools=[WEATHER], auto_drop_analysis=False)
    # once the second turn has its answer, all of its reasoning goes too
    q2 = q1 + [{"role": "assistant", "reasoning": "more thoughts", "content": "A2"},
               {"role": "user", "content": "Q3"}]
    t = text(q2, tools=[WEATHER])
    assert "thoughts" not in t and "<|message|>A2<|end|><|start|>user<|message|>Q3" in t


def test_several_calls_dict_arguments_and_name_fallback():
    msgs = [{"role": "user", "content": "Two cities"},
            {"role": "assistant", "tool_calls": [
                CALL, {"id": "call_2", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
            {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
            {"role": "tool", "name": "get_weather", "content": [{"type": "text", "text": "sun"}]}]
    t = text(msgs, tools=[WEATHER])
    assert t.count("<|start|>assistant to=functions.get_weather") == 2
    assert '<|message|>{"city": "Rome"}<|call|>' in t
    assert "to=assistant<|channel|>commentary<|message|>rain<|end|>" in t
    assert "to=assistant<|channel|>commentary<|message|>sun<|end|>" in t


def test_flat_tool_definition_and_no_parameters():
    t = text([{"role": "user", "content": "x"}], tools=[{"name": "ping"}])
    assert "type ping = () => any;" in t


def test_later_system_message_becomes_developer():
    t = text([{"role": "user", "content": "a"}, {"role": "system", "content": "Now be formal."},
              {"role": "user", "content": "b"}])
    assert "<|start|>user<|message|>a<|end|><|start|>developer<|message|># Instructions\n\nNow be formal." in t


class _Model:  # what pydantic request models from the server look like
    def __init__(self, **kw):
        self.kw = kw

    def model_dump(self, exclude_none=False):
        return dict(self.kw)


def test_accepts_pydantic_style_messages():
    assert "<|message|>Hi<|end|>" in text([_Model(role="user", content="Hi")])


@pytest.mark.parametrize("messages,tools,match", [
    ([], None, "non-empty list"),
    ("hello", None, "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], None, r"messages\[1\]\.role"),
    ([{"role": "user"}], None, r"messages\[0\]\.content is missing"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None,
     r"messages\[0\]\.content\[0\] has type 'image_url'"),
    ([{"role": "user", "content": 5}], None, r"messages\[0\]\.content must be"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "nope", "content": "x"}], None,
     r"messages\[1\]\.tool_call_id 'nope' matches no earlier"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {}}]}], None,
     r"messages\[1\]\.tool_calls\[0\]\.function\.name"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}], None,
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
    ([{"role": "user", "content": "a"}], [{"type": "function", "function": {"name": "bad name"}}],
     r"tools\[0\]\.function\.name"),
    ([{"role": "user", "content": "a"}], [{"name": "f"}, {"name": "f"}], r"tools\[1\].*defined twice"),
    ([{"role": "user", "content": "a"}], [{"type": "retrieval"}], r"tools\[0\]\.type"),
    ([{"role": "user", "content": "a"}], [{"name": "f", "parameters": "x"}], r"tools\[0\]\.function\.parameters"),
    ([{"role": "user", "content": "a"}, 7], None, r"messages\[1\] must be a dict"),
])
def test_validation_errors(messages, tools, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages, tools=tools, current_date=DATE)


def test_bad_reasoning_effort():
    with pytest.raises(ValueError, match="reasoning_effort is 'max'; allowed: 'low', 'medium', 'high'"):
        render_chat([{"role": "user", "content": "a"}], reasoning_effort="max")


def test_stop_tokens_encoding_and_decode():
    assert stop_token_ids() == [200002, 200012]
    assert get_encoding() is get_encoding()
    ids = encode("<|channel|>final<|message|>h\u00e9llo \U0001f99c<|return|>")
    assert ids[0] == E.CHANNEL and ids[-1] == E.RETURN
    assert decode(ids) == "<|channel|>final<|message|>h\u00e9llo \U0001f99c<|return|>"
    assert decode(ids, skip_special_tokens=True) == "finalh\u00e9llo \U0001f99c"
    assert encode("<|end|>", allow_special=False) != [E.END]
    assert decode([E.encode("\U0001f99c")[0]]) == "\ufffd"  # half a character
    assert decode([10**6, -1] + encode("ok")) == "ok"
