"""The OpenAI wire format: request models (validated, OpenAI field names), the error body, and the
response / stream-chunk builders.

Requests are parsed strictly from the raw JSON (no "1" for 1, no NaN), and a request that does not
fit comes back as RequestError naming the parameter, e.g. `messages[0].role: Input should be ...`.
Unknown top-level fields are ignored with a warning, as vLLM does, so clients that send extra
vLLM or OpenAI fields keep working.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..sampling_params import MAX_LOGPROBS, SamplingParamsError, check_json_schema

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
# OpenAI's rule for function and schema names
_NAME = r"^[A-Za-z0-9_-]{1,64}$"
# sequences one /v1/completions request may start (prompts x n): a batch larger than the default
# running batch would hold the queue for everyone else
MAX_SEQUENCES_PER_REQUEST = 256


class RequestError(ValueError):
    """A request that cannot be served as sent: answered 4xx with the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- requests ---------------------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = _STRICT


class FunctionCall(_Model):
    name: str = Field(min_length=1)
    arguments: str | dict = "{}"


class MessageToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # a string, a list of text parts, or null (checked below)
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if v is not None and not isinstance(v, (str, list)):
            raise ValueError("must be a string, a list of text parts, or null")
        return v


def _schema_depth(v):
    """The schema depth limit of SamplingParams, reported at the field that holds the schema."""
    if v is not None:
        try:
            check_json_schema(v, "the schema")
        except SamplingParamsError as e:
            raise ValueError(str(e)) from None
    return v


class FunctionDefinition(_Model):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v):
        return _schema_depth(v)


class ToolDefinition(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class JsonSchemaFormat(_Model):
    name: str | None = Field(default=None, pattern=_NAME)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v):
        return _schema_depth(v)


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema (a JSON schema object)")
        return self


class StreamOptions(_Model):
    include_usage: bool = False


class _Request(_Model):
    # unknown top-level fields are kept aside (and logged), not rejected
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    model: str | None = None  # None: the (first) served model
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Any = None  # a string or a list of strings (checked below)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None
    # vLLM's extra sampling parameters (sent by the OpenAI client through extra_body)
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v
        raise ValueError("must be a string or a list of strings")

    @model_validator(mode="after")
    def _common(self):
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", "logit_bias")
        return self

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v is None or v in ("auto", "none", "required"):
            return v
        if (isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict)
                and isinstance(v["function"].get("name"), str)):
            return v
        raise ValueError("must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                         "{'name': NAME}}")

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise RequestError(f"top_logprobs={self.top_logprobs} must be in [0, {MAX_LOGPROBS}]",
                                   "top_logprobs")
        return self

    @property
    def requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def json_schema(self) -> dict | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return {"type": "object"}
        return rf.json_schema.schema_


class CompletionRequest(_Request):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        def ids(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or ids(v):
            return v
        if isinstance(v, list) and v and all(isinstance(p, str) or ids(p) for p in v):
            return v
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists of "
                         "token ids (none of them empty)")

    @model_validator(mode="after")
    def _completion(self):
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of={self.best_of} is not supported; leave it out or make it equal n",
                               "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]", "logprobs")
        if self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs needs prompt logprobs, which gptoss does not compute",
                               "echo")
        n_prompts = len(self.prompts())
        if n_prompts > 1 and n_prompts * max(self.n, 1) > MAX_SEQUENCES_PER_REQUEST:
            raise RequestError(f"{n_prompts} prompts x n={self.n} ask for {n_prompts * self.n} sequences; one "
                               f"request may ask for at most {MAX_SEQUENCES_PER_REQUEST} (send several requests)",
                               "prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)


def parse_request(cls: type[_Request], body: bytes) -> _Request:
    """The request model for `body`, or RequestError naming what is wrong (and where)."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise _request_error(e) from None


def _loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _request_error(e: ValidationError) -> RequestError:
    errors = e.errors(include_url=False)
    err = errors[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, RequestError):  # raised by a model validator with its own param
        return cause
    if err["type"] == "json_invalid":
        return RequestError(f"the request body is not valid JSON ({err['ctx']['error']})", code="invalid_json")
    if not err["loc"]:
        return RequestError("the request body must be a JSON object" if err["type"] == "model_type"
                            else err["msg"].removeprefix("Value error, "))
    param = _loc(err["loc"])
    msg = "field required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return RequestError(f"{param}: {msg}{more}", param)


_PARAM = re.compile(r"^([A-Za-z_]+)((?:\[\d+\]|\.[A-Za-z_]+)*)")


def param_of(message: str, request: _Request) -> str | None:
    """The request parameter a ValueError's message starts with ("tools[0].function.name is ..."),
    if it names one."""
    m = _PARAM.match(message)
    if m and m.group(1) in type(request).model_fields:
        return m.group(0)
    return None


# --- responses --------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _top(entries: dict, k: int) -> list:
    return sorted(((tid, lp) for tid, lp in entries.items() if lp.rank <= k), key=lambda x: x[1].rank)[:k]


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], logprobs: list[dict], k: int) -> list[dict]:
    """OpenAI's choices[].logprobs.content for generated tokens: the sampled token and its top k."""
    from ..harmony import decode
    out = []
    for tid, entries in zip(token_ids, logprobs):
        chosen = entries.get(tid)
        text = chosen.decoded_token if chosen and chosen.decoded_token is not None else decode([tid])
        item = _token_entry(text, chosen.logprob if chosen else float("-inf"))
        item["top_logprobs"] = [_token_entry(lp.decoded_token or "", lp.logprob) for _, lp in _top(entries, k)]
        out.append(item)
    return out


def completion_logprobs(token_ids: list[int], logprobs: list[dict], k: int, text_offset: int = 0) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_offset
    for item in chat_logprobs(token_ids, logprobs, k):
        tokens.append(item["token"])
        token_lps.append(item["logprob"])
        tops.append({t["token"]: t["logprob"] for t in item["top_logprobs"]})
        offsets.append(pos)
        pos += len(item["token"])
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_message(reasoning: str | None, content: str | None, tool_calls) -> dict:
    msg: dict = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    if tool_calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}} for c in tool_calls]
    return msg


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if with_usage:
        chunk["usage"] = None
    return chunk


def now() -> int:
    return int(time.time())
