"""Chat requests, shared by LLM.chat and the server: messages -> prompt + sampling params, and
generated tokens -> ChatOutput (reasoning, content, tool calls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .harmony import ToolCall, parse_completion, render_chat, stop_token_ids
from .outputs import CompletionOutput
from .sampling_params import SamplingParams, check_json_schema

REASONING_EFFORTS = ("low", "medium", "high")


@dataclass
class ChatOutput:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "abort"
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None


def _tool_names(tools) -> list[str]:
    names = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                             f"'parameters': {{...}}}}}}")
        if fn.get("parameters") is not None:  # the server checks the same; the library must too
            check_json_schema(fn["parameters"], f"tools[{i}].function.parameters")
        names.append(fn["name"])
    return names


def normalize_tool_choice(tool_choice: Any, tools) -> str | dict:
    """'auto' | 'none' | 'required' | {"type": "function", "function": {"name": NAME}}, checked
    against the tools."""
    names = _tool_names(tools)
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError(f"tool_choice {tool_choice!r} must be 'auto', 'none', 'required' or "
                             f"{{'type': 'function', 'function': {{'name': NAME}}}}")
        if name not in names:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools {names}")
        return {"type": "function", "function": {"name": name}}
    if tool_choice not in ("auto", "none", "required"):
        raise ValueError(f"tool_choice={tool_choice!r} is not allowed; use 'auto', 'none', 'required' or a "
                         f"named function")
    if tool_choice == "required" and not names:
        raise ValueError("tool_choice='required' needs at least one tool")
    return tool_choice


def prepare_chat(messages, sampling_params: SamplingParams | None = None, tools=None, tool_choice="auto",
                 reasoning_effort: str = "medium") -> tuple[list[int], SamplingParams]:
    """Render the conversation and return (prompt token ids, the sampling params to run it with)."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort={reasoning_effort!r} is not allowed; choose one of "
                         f"{list(REASONING_EFFORTS)}")
    choice = normalize_tool_choice(tool_choice, tools)
    rendered_tools = None if choice == "none" else (tools or None)
    prompt = render_chat(messages, rendered_tools, reasoning_effort)
    sp = sampling_params or SamplingParams(max_tokens=1024)
    stops = sorted(set(sp.stop_token_ids) | set(stop_token_ids()))
    spec = None
    constrained = sp.json_schema is not None or choice not in ("auto", "none")
    if constrained or rendered_tools:
        from .engine.structured import StructuredSpec
        from .harmony.grammar import default_reasoning_budget
        budget = sp.reasoning_budget
        if budget is None and constrained and sp.max_tokens is not None:
            # close the analysis in time for a complete call / JSON within max_tokens
            budget = default_reasoning_budget(sp.max_tokens)
        # tool_choice "auto" with tools: the model may answer or call, and a call follows its schema
        spec = StructuredSpec(sp.json_schema, tuple(rendered_tools) if rendered_tools else None, choice, budget)
        spec.new_matcher()  # compile now: a bad schema or tool fails here, with its message
    return prompt, sp.clone(stop_token_ids=stops, structured=spec)


def chat_output(c: CompletionOutput, prompt_token_ids: list[int]) -> ChatOutput:
    turn = parse_completion(c.token_ids)
    if c.finish_reason == "abort":
        reason = "abort"
    elif turn.tool_calls:
        reason = "tool_calls"
    else:
        reason = c.finish_reason
    return ChatOutput(turn.reasoning, turn.content, turn.tool_calls, reason, list(c.token_ids),
                      list(prompt_token_ids), c.logprobs)
