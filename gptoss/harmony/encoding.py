"""OpenAI chat messages -> harmony prompt tokens, with openai-harmony doing the rendering.

The o200k_harmony encoding is loaded once, on first use: loading reads the BPE file (from
TIKTOKEN_ENCODINGS_BASE when set, else a download), which we do not want at import time.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

# Control tokens of o200k_harmony. Fixed by the vocabulary; get_encoding() checks them.
START = 200006
END = 200007
MESSAGE = 200008
CHANNEL = 200005
CONSTRAIN = 200003
RETURN = 200002
CALL = 200012
# every id from here up is a special token (reserved ones included)
FIRST_SPECIAL = 199998
VOCAB_SIZE = 201088

_CONTROL = {"<|start|>": START, "<|end|>": END, "<|message|>": MESSAGE, "<|channel|>": CHANNEL,
            "<|constrain|>": CONSTRAIN, "<|return|>": RETURN, "<|call|>": CALL}

_encoding: HarmonyEncoding | None = None
_lock = threading.Lock()
_token_bytes: dict[int, bytes | None] = {}

_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
# OpenAI's rule for function names; it also keeps "to=functions.NAME" unambiguous to parse
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ROLES = ("system", "developer", "user", "assistant", "tool")


def get_encoding() -> HarmonyEncoding:
    """The HARMONY_GPT_OSS encoding, loaded on first call and shared afterwards."""
    global _encoding
    if _encoding is None:
        with _lock:
            if _encoding is None:
                enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
                for text, tid in _CONTROL.items():
                    got = enc.encode(text, allowed_special="all")
                    if got != [tid]:
                        raise RuntimeError(f"harmony encoding maps {text} to {got}, expected [{tid}]")
                _encoding = enc
    return _encoding


def stop_token_ids() -> list[int]:
    """Tokens that end an assistant turn: <|return|> (answer done) and <|call|> (tool call)."""
    return [RETURN, CALL]


def token_bytes(token_id: int) -> bytes | None:
    """The raw bytes of one token, or None for an id outside the vocabulary. Cached."""
    try:
        return _token_bytes[token_id]
    except KeyError:
        pass
    data: bytes | None
    if not 0 <= token_id <= VOCAB_SIZE:
        data = None
    else:
        try:
            data = bytes(get_encoding()._inner.decode_bytes([token_id]))
        except Exception:  # the Rust side rejects ids it does not know
            data = None
    _token_bytes[token_id] = data
    return data


def decode(token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Plain text of `token_ids`; invalid UTF-8 becomes U+FFFD and unknown ids are skipped."""
    out = bytearray()
    for tid in token_ids:
        tid = int(tid)
        if skip_special_tokens and tid >= FIRST_SPECIAL:
            continue
        data = token_bytes(tid)
        if data is not None:
            out += data
    return out.decode("utf-8", errors="replace")


def encode(text: str, allow_special: bool = True) -> list[int]:
    """Token ids of `text`; with allow_special, "<|start|>" and friends become control tokens."""
    enc = get_encoding()
    if allow_special:
        return enc.encode(text, allowed_special="all")
    return enc.encode(text, disallowed_special=())


# ---------------------------------------------------------------------------------------------
# messages -> harmony


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _as_dict(obj: Any, where: str) -> Mapping:
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "model_dump"):  # pydantic request models from the server
        return obj.model_dump(exclude_none=True)
    raise ValueError(f"{where} must be a dict, got {type(obj).__name__}")


def _text(content: Any, where: str) -> str | None:
    """OpenAI content (a string, None, or a list of text parts) as one string."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
                continue
            kind = _get(part, "type")
            if kind not in ("text", "input_text", "output_text"):
                raise ValueError(f"{where}[{j}] has type {kind!r}; only text parts are supported")
            text = _get(part, "text")
            if not isinstance(text, str):
                raise ValueError(f"{where}[{j}].text must be a string")
            parts.append(text)
        return "".join(parts)
    raise ValueError(f"{where} must be a string, a list of text parts or null, "
                     f"got {type(content).__name__}")


def _tool_descriptions(tools: Sequence[Any]) -> list[ToolDescription]:
    out, seen = [], set()
    for i, tool in enumerate(tools):
        tool = _as_dict(tool, f"tools[{i}]")
        kind = tool.get("type", "function")
        if kind != "function":
            raise ValueError(f"tools[{i}].type is {kind!r}; only 'function' tools are supported")
        fn = tool.get("function", tool)  # also accept the flat {"name", "parameters"} form
        fn = _as_dict(fn, f"tools[{i}].function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise ValueError(f"tools[{i}].function.name is {name!r}; it must match "
                             f"{_TOOL_NAME.pattern}")
        if name in seen:
            raise ValueError(f"tools[{i}].function.name {name!r} is defined twice")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        out.append(ToolDescription.new(name, desc, dict(params) if params is not None else None))
    return out


def _arguments(args: Any, where: str) -> str:
    if args is None:
        return "{}"
    if isinstance(args, str):
        return args
    if isinstance(args, Mapping):
        return json.dumps(args, ensure_ascii=False)
    raise ValueError(f"{where} must be a JSON string or an object, got {type(args).__name__}")


def _assistant(msg: Mapping, i: int, call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        reasoning = _text(reasoning, f"messages[{i}].reasoning")
        out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
    content = _text(msg.get("content"), f"messages[{i}].content")
    calls = msg.get("tool_calls") or []
    if calls:
        if content:  # text before a call is a preamble, which harmony puts on commentary
            out.append(Message.from_role_and_content(Role.ASSISTANT, content)
                       .with_channel("commentary"))
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            call = _as_dict(call, where)
            fn = _as_dict(call.get("function") or {}, f"{where}.function")
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}.function.name must be a non-empty string")
            if call.get("id"):
                call_names[str(call["id"])] = name
            args = _arguments(fn.get("arguments"), f"{where}.function.arguments")
            out.append(Message.from_role_and_content(Role.ASSISTANT, args)
                       .with_channel("commentary").with_recipient(f"functions.{name}")
                       .with_content_type("<|constrain|>json"))
    elif content is not None:
        out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("final"))
    return out


def _tool_result(msg: Mapping, i: int, call_names: dict[str, str]) -> Message:
    call_id = msg.get("tool_call_id")
    name = call_names.get(str(call_id)) if call_id is not None else None
    if name is None:
        name = msg.get("name")
    if not name:
        known = ", ".join(repr(k) for k in call_names) or "none"
        raise ValueError(f"messages[{i}].tool_call_id {call_id!r} matches no earlier assistant "
                         f"tool call (known ids: {known}) and the message has no 'name'")
    content = _text(msg.get("content"), f"messages[{i}].content")
    return (Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), content or "")
            .with_channel("commentary").with_recipient("assistant"))


def _effort(reasoning_effort: Any) -> ReasoningEffort:
    if reasoning_effort is None:
        return ReasoningEffort.MEDIUM
    if isinstance(reasoning_effort, ReasoningEffort):
        return reasoning_effort
    key = str(reasoning_effort).strip().lower()
    if key not in _EFFORTS:
        raise ValueError(f"reasoning_effort is {reasoning_effort!r}; allowed: 'low', 'medium', 'high'")
    return _EFFORTS[key]


def build_conversation(messages: Sequence[Any], tools: Sequence[Any] | None = None,
                       reasoning_effort: str = "medium", *,
                       current_date: str | datetime.date | None = "today",
                       knowledge_cutoff: str | None = "2024-06",
                       model_identity: str | None = None) -> Conversation:
    """The harmony Conversation for OpenAI-format `messages` (see render_chat)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    msgs = [_as_dict(m, f"messages[{i}]") for i, m in enumerate(messages)]
    for i, m in enumerate(msgs):
        if m.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}].role is {m.get('role')!r}; allowed: {', '.join(_ROLES)}")

    system = SystemContent.new().with_reasoning_effort(_effort(reasoning_effort))
    if model_identity is not None:
        system = system.with_model_identity(model_identity)
    system.knowledge_cutoff = knowledge_cutoff
    if current_date == "today":
        current_date = datetime.date.today()
    if isinstance(current_date, datetime.date):
        current_date = current_date.isoformat()
    if current_date:
        system = system.with_conversation_start_date(str(current_date))

    # gpt-oss's system message is fixed metadata; the user's system and developer texts are the
    # developer message's instructions, as in the model's own chat template
    head = 0
    instructions = []
    while head < len(msgs) and msgs[head]["role"] in ("system", "developer"):
        text = _text(msgs[head].get("content"), f"messages[{head}].content")
        if text:
            instructions.append(text)
        head += 1
    tool_descs = _tool_descriptions(tools) if tools else []
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    if instructions or tool_descs:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if tool_descs:
            dev = dev.with_function_tools(tool_descs)
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))

    call_names: dict[str, str] = {}
    for i in range(head, len(msgs)):
        m, role = msgs[i], msgs[i]["role"]
        if role in ("system", "developer"):
            text = _text(m.get("content"), f"messages[{i}].content") or ""
            out.append(Message.from_role_and_content(
                Role.DEVELOPER, DeveloperContent.new().with_instructions(text)))
        elif role == "user":
            text = _text(m.get("content"), f"messages[{i}].content")
            if text is None:
                raise ValueError(f"messages[{i}].content is missing; a user message needs text")
            out.append(Message.from_role_and_content(Role.USER, text))
        elif role == "assistant":
            out.extend(_assistant(m, i, call_names))
        else:
            out.append(_tool_result(m, i, call_names))
    return Conversation.from_messages(out)


def render_chat(messages: Sequence[Any], tools: Sequence[Any] | None = None,
                reasoning_effort: str = "medium", *,
                current_date: str | datetime.date | None = "today",
                knowledge_cutoff: str | None = "2024-06",
                model_identity: str | None = None,
                auto_drop_analysis: bool = True) -> list[int]:
    """Prompt token ids for OpenAI-format chat `messages`, ending with `<|start|>assistant`.

    messages: dicts (or pydantic models) with role system/developer/user/assistant/tool.
      Leading system/developer texts become the developer instructions; an assistant message may
      carry `reasoning_content` (or `reasoning`) and `tool_calls`; a tool message names its call by
      `tool_call_id` (or `name`).
    tools: OpenAI tool definitions, [{"type": "function", "function": {name, description,
      parameters}}]. reasoning_effort: "low" | "medium" | "high".
    current_date: "today" (default), a date / "YYYY-MM-DD", or None to leave it out.
    auto_drop_analysis: drop reasoning of turns that ended in a final answer, as harmony expects.
    Raises ValueError naming the message index and field that is wrong.
    """
    conv = build_conversation(messages, tools, reasoning_effort, current_date=current_date,
                              knowledge_cutoff=knowledge_cutoff, model_identity=model_identity)
    if auto_drop_analysis:
        conv = Conversation.from_messages(drop_finished_reasoning(conv.messages))
    # harmony's own dropping (0.0.8) only looks before the *first* final message and does nothing
    # while a tool call is pending, so we apply the documented rule ourselves
    config = RenderConversationConfig(auto_drop_analysis=False)
    return get_encoding().render_conversation_for_completion(conv, Role.ASSISTANT, config)


def drop_finished_reasoning(messages: Sequence[Message]) -> list[Message]:
    """Drop the analysis of turns that ended in a final answer; keep the ongoing turn's.

    The harmony guide: reasoning of earlier turns is dropped once the assistant answered on the
    final channel, but kept while the assistant is still working (e.g. between tool calls).
    """
    last_final = max((i for i, m in enumerate(messages)
                      if m.author.role == Role.ASSISTANT and m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]
