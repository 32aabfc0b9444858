"""Function calling against `gptoss serve`, in two steps (as TensorRT-LLM's gpt-oss example):

  1. the client sends the tools and the user's question; the model answers with a function call,
     whose arguments the server's grammar keeps to the function's JSON schema;
  2. the client runs the function and sends the result back as a role "tool" message; the model
     answers from it.

    gptoss serve openai/gpt-oss-20b &
    python examples/openai_chat_client_function_calling.py --base-url http://127.0.0.1:8000/v1 \
        --prompt "What is the weather like in SF?"

Without --base-url the example serves a model itself, in this process (gptoss.serve.build_app on a
free local port): --model names it, and without --model it is a tiny random checkpoint written to
a temporary directory, so `python examples/openai_chat_client_function_calling.py --tool-choice
required` runs offline on a CPU in seconds (the random model's words are random; the protocol is
the real one). The in-process server needs the serve extra (pip install -e ".[serve]").

With gpt-oss-20b it prints:

    [USER PROMPT] What is the weather like in SF?
    [RESPONSE 1] [COT] Need to call get_current_weather.
    [RESPONSE 1] [FUNCTION CALL] get_current_weather(**{'location': 'San Francisco, CA'})
    [RESPONSE 2] It's a bright, sunny day in San Francisco, around 20°C (68°F).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

# offline: point openai-harmony at the vocabulary next to the repo, as tests/conftest.py does (only
# the in-process server reads it)
_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizer"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and _TOKENIZER.is_dir():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_TOKENIZER)

from openai import OpenAI  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Gets the current weather in the provided location.",
            "parameters": {
                "type": "object",
                "properties": {
                    # maxLength keeps a call short even from a model that has not learnt to stop
                    "location": {"type": "string", "maxLength": 32,
                                 "description": "The city and state, e.g. San Francisco, CA"},
                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"],
                               "description": "default: celsius"},
                },
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_multiple_weathers",
            "description": "Gets the current weather in each of the provided locations.",
            "parameters": {
                "type": "object",
                "properties": {
                    "locations": {"type": "array", "maxItems": 4,
                                  "items": {"type": "string", "maxLength": 32},
                                  "description": 'e.g. ["San Francisco, CA", "New York, NY"]'},
                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"],
                               "description": "default: celsius"},
                },
                "required": ["locations"],
            },
        },
    },
]


def get_current_weather(location: str, format: str = "celsius") -> dict:
    return {"location": location, "sunny": True,
            "temperature": 20 if format == "celsius" else 68, "unit": format}


def get_multiple_weathers(locations: list[str], format: str = "celsius") -> list[dict]:
    return [get_current_weather(loc, format) for loc in locations]


FUNCTIONS = {"get_current_weather": get_current_weather, "get_multiple_weathers": get_multiple_weathers}


def tool_choice_arg(value: str):
    if value in ("auto", "required", "none"):
        return value
    if value not in FUNCTIONS:
        raise argparse.ArgumentTypeError(f"--tool-choice must be auto, required, none or one of {list(FUNCTIONS)}")
    return {"type": "function", "function": {"name": value}}


@contextlib.contextmanager
def local_server(model: str | None):
    """Serve `model` (or a tiny random checkpoint) from this process; yields the /v1 base URL."""
    from gptoss.engine.async_engine import AsyncLLM
    from gptoss.serve import build_app, serve_in_thread
    from gptoss.testing import llm_or_tiny
    with contextlib.ExitStack() as stack:
        llm = stack.enter_context(llm_or_tiny(model))
        engine = AsyncLLM(llm.engine)  # steps the engine in a background thread, as `gptoss serve` does
        stack.callback(engine.shutdown)
        url = stack.enter_context(serve_in_thread(build_app(engine, model or "gpt-oss-tiny")))
        yield f"{url}/v1"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Two-step function calling with a gptoss (or any OpenAI-compatible) "
                                            "server.")
    p.add_argument("--base-url", default=None,
                   help="a running server's /v1 URL, e.g. http://127.0.0.1:8000/v1 (default: serve --model "
                        "in this process)")
    p.add_argument("--model", default=None,
                   help="with --base-url: the model name (default: the first one the server lists); without: "
                        "the checkpoint to serve here (default: a tiny random one)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                   help="the server's --api-key (default: $OPENAI_API_KEY, else 'EMPTY')")
    p.add_argument("--prompt", default="What is the weather like in SF?", help="the user's question")
    p.add_argument("--tool-choice", default="auto", type=tool_choice_arg,
                   help="'auto' (the model decides), 'required' (it must call a function), 'none', or a "
                        "function name to force")
    p.add_argument("--reasoning-effort", default="low", choices=["low", "medium", "high"])
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens per response (default: 1024; 192 for the tiny random model)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for a reproducible run")
    a = p.parse_args(argv)
    if a.max_tokens is None:
        a.max_tokens = 192 if a.base_url is None and a.model is None else 1024
    if a.base_url is not None:
        return run(a, a.base_url, a.model)
    with local_server(a.model) as base_url:
        return run(a, base_url, None)


def run(a, base_url: str, model: str | None) -> int:
    client = OpenAI(base_url=base_url, api_key=a.api_key)
    model = model or client.models.list().data[0].id
    messages = [{"role": "user", "content": a.prompt}]
    print(f"[USER PROMPT] {a.prompt}")

    # step 1: the model picks a function and its arguments
    r1 = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=a.tool_choice,
                                        max_tokens=a.max_tokens, reasoning_effort=a.reasoning_effort, seed=a.seed)
    msg = r1.choices[0].message
    cot = getattr(msg, "reasoning_content", None)
    if cot:
        print(f"[RESPONSE 1] [COT] {cot}")
    if not msg.tool_calls:
        print(f"[RESPONSE 1] {msg.content}")
        print(f"(the model answered without calling a function; finish_reason={r1.choices[0].finish_reason})")
        return 0

    # step 2: run the functions, send their results back, and let the model answer
    messages.append({"role": "assistant", "content": msg.content, "reasoning_content": cot,
                     "tool_calls": [c.model_dump() for c in msg.tool_calls]})
    for call in msg.tool_calls:
        try:
            args = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError as e:
            print(f"[RESPONSE 1] [FUNCTION CALL] {call.function.name} with unreadable arguments "
                  f"{call.function.arguments!r} ({e})", file=sys.stderr)
            return 1
        print(f"[RESPONSE 1] [FUNCTION CALL] {call.function.name}(**{args})")
        fn = FUNCTIONS.get(call.function.name)
        result = fn(**args) if fn else {"error": f"no function named {call.function.name}"}
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})

    r2 = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=a.max_tokens,
                                        reasoning_effort=a.reasoning_effort, seed=a.seed)
    answer = r2.choices[0].message
    print(f"[RESPONSE 2] {answer.content if answer.content is not None else ''}")
    if r2.choices[0].finish_reason != "stop":
        print(f"(finish_reason={r2.choices[0].finish_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
