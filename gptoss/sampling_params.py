"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's names)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
# every generated token is checked against the list: a huge one would slow the whole batch
MAX_STOP_TOKEN_IDS = 1024
MAX_SEED = 2 ** 63 - 1
# nesting of objects / arrays in a JSON schema; real schemas stay far below, and deeper ones
# overflow the recursion of the JSON encoder and the grammar compiler
MAX_SCHEMA_DEPTH = 64


class SamplingParamsError(ValueError):
    pass


def _num(name, v, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    kind = "an integer" if integer else "a number"
    ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
    if ok and not integer and not math.isfinite(v):
        ok = False
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        hi_s = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        rng = f" in {lo_s}, {hi_s}" if lo is not None and hi is not None else (
            f" {'>' if lo_open else '>='} {lo}" if lo is not None else "")
        raise SamplingParamsError(f"{name}={v!r} must be {kind}{rng}")


def _depth(value) -> int:
    """Nesting depth of dicts and lists, without recursion (so any depth is measured safely)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, Mapping):
            items = v.values()
        elif isinstance(v, (list, tuple)):
            items = v
        else:
            continue
        deepest = max(deepest, d)
        if deepest > MAX_SCHEMA_DEPTH:
            break  # the answer is "too deep" already
        stack.extend((x, d + 1) for x in items)
    return deepest


def check_json_schema(schema, what: str = "json_schema") -> None:
    """A JSON schema (dict, bool, or its JSON text) no deeper than MAX_SCHEMA_DEPTH; raises
    SamplingParamsError naming `what` otherwise. Shared by SamplingParams and the server's tool and
    response_format schemas."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise SamplingParamsError(f"{what} is nested more than {MAX_SCHEMA_DEPTH} levels deep; at most "
                                      f"{MAX_SCHEMA_DEPTH} are allowed") from None
        except ValueError as e:
            raise SamplingParamsError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(schema, (Mapping, bool)):
        raise SamplingParamsError(f"{what} must be a JSON schema object (a dict, or its JSON text), got "
                                  f"{type(schema).__name__}")
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise SamplingParamsError(f"{what} is nested more than {MAX_SCHEMA_DEPTH} levels deep (objects and "
                                  f"arrays); at most {MAX_SCHEMA_DEPTH} are allowed")


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    json_schema: dict | str | None = None
    skip_special_tokens: bool = True
    # harmony: analysis tokens allowed before a constrained answer must start (None: max_tokens // 2)
    reasoning_budget: int | None = None
    # filled by LLM.chat: the grammar that constrains this request (tools / json on the final channel)
    structured: object = field(default=None, repr=False)

    def __post_init__(self):
        _num("n", self.n, 1, MAX_N, integer=True)
        _num("temperature", self.temperature, 0)
        _num("top_p", self.top_p, 0, 1, lo_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise SamplingParamsError(f"top_k={self.top_k!r} must be -1 (off) or an integer >= 1")
        _num("min_p", self.min_p, 0, 1)
        if self.seed is not None:
            _num("seed", self.seed, -MAX_SEED, MAX_SEED, integer=True)
        if self.max_tokens is not None:
            _num("max_tokens", self.max_tokens, 1, integer=True)
        _num("min_tokens", self.min_tokens, 0, integer=True)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most "
                                      f"{MAX_STOP_TOKEN_IDS} are allowed")
        for t in self.stop_token_ids:
            _num("stop_token_ids entry", t, 0, integer=True)
        if self.logprobs is not None:
            _num("logprobs", self.logprobs, 0, MAX_LOGPROBS, integer=True)
        _num("presence_penalty", self.presence_penalty, -2, 2)
        _num("frequency_penalty", self.frequency_penalty, -2, 2)
        _num("repetition_penalty", self.repetition_penalty, 0, lo_open=True)
        if self.json_schema is not None:
            check_json_schema(self.json_schema)
        if self.reasoning_budget is not None:
            _num("reasoning_budget", self.reasoning_budget, 0, integer=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def clone(self, **changes) -> "SamplingParams":
        d = {f: getattr(self, f) for f in self.__slots__}
        d.update(changes)
        return SamplingParams(**d)
