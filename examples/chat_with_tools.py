"""LLM.chat with a tool: the model reasons, calls the function, reads its result and answers.

    python examples/chat_with_tools.py                              # a tiny random model, offline, CPU
    python examples/chat_with_tools.py --model openai/gpt-oss-20b --tool-choice auto

Each turn comes back split by the harmony parser into .reasoning (the analysis channel),
.tool_calls (ToolCall(id, name, arguments) with arguments as JSON text) and .content (the final
answer). The call's arguments follow the tool's JSON schema: the grammar enforces it, so even the
tiny random model's call parses (its strings are random tokens, bounded by maxLength).

The first turn uses tool_choice="required" by default so that a call always happens (a trained
model decides by itself with --tool-choice auto); the turn after the tool's result uses
tool_choice="none", which asks for the final answer rather than another call.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# offline: point openai-harmony at the vocabulary next to the repo, as tests/conftest.py does
_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizer"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and _TOKENIZER.is_dir():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_TOKENIZER)

from gptoss import SamplingParams  # noqa: E402
from gptoss.testing import llm_or_tiny  # noqa: E402

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                # bounded strings keep a constrained call short even from an untrained model
                "city": {"type": "string", "maxLength": 24, "description": "e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}


def get_weather(city: str, unit: str = "celsius") -> dict:
    return {"city": city, "sky": "sunny", "temperature": 21 if unit == "celsius" else 70, "unit": unit}


FUNCTIONS = {"get_weather": get_weather}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Chat with a tool through LLM.chat.")
    p.add_argument("--model", default=None,
                   help="hub repo id or local checkpoint directory (default: a tiny random checkpoint)")
    p.add_argument("--prompt", default="What is the weather in Paris?", help="the user's question")
    p.add_argument("--tool-choice", default="required", choices=["auto", "required", "none"],
                   help="for the first turn (the answer turn after the tool result uses 'none')")
    p.add_argument("--reasoning-effort", default="low", choices=["low", "medium", "high"])
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per turn")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (a reproducible run)")
    a = p.parse_args(argv)

    messages = [{"role": "user", "content": a.prompt}]
    print(f"[USER] {a.prompt}")
    with llm_or_tiny(a.model) as llm:
        # turn 1: the model reasons, then calls get_weather (or, with --tool-choice auto, may answer)
        sp = SamplingParams(temperature=1.0, max_tokens=a.max_tokens, seed=a.seed)
        reply = llm.chat(messages, sp, tools=[WEATHER_TOOL], tool_choice=a.tool_choice,
                         reasoning_effort=a.reasoning_effort)[0]
        show(reply)
        if reply.tool_calls:
            # the assistant turn goes back into the conversation with its reasoning: harmony keeps
            # the reasoning of a turn still in progress (between a call and its answer)
            messages.append({"role": "assistant", "content": reply.content, "reasoning_content": reply.reasoning,
                             "tool_calls": [{"id": c.id, "type": "function",
                                             "function": {"name": c.name, "arguments": c.arguments}}
                                            for c in reply.tool_calls]})
            for call in reply.tool_calls:
                fn = FUNCTIONS.get(call.name)
                result = fn(**json.loads(call.arguments)) if fn else {"error": f"no function named {call.name}"}
                print(f"[TOOL RESULT] {result}")
                messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
            # turn 2: answer from the result; tool_choice="none" asks for the final answer, not another call
            reply = llm.chat(messages, sp.clone(seed=a.seed + 1), tools=[WEATHER_TOOL], tool_choice="none",
                             reasoning_effort=a.reasoning_effort)[0]
            show(reply)
    return 0


def show(reply) -> None:
    if reply.reasoning:
        print(f"[REASONING] {reply.reasoning}")
    for call in reply.tool_calls:
        print(f"[TOOL CALL] {call.name}({json.loads(call.arguments)})")
    if not reply.tool_calls:
        print(f"[FINAL] {reply.content}")
    print(f"[FINISH] {reply.finish_reason}")


if __name__ == "__main__":
    raise SystemExit(main())
