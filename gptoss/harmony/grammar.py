"""Constrained decoding for harmony turns with xgrammar structural tags.

One compiler per vocabulary (building it reads all 201,088 token strings); one matcher per
request. The grammar covers the assistant turn after `<|start|>assistant`:

    [analysis message, at most `reasoning_budget` tokens of text]
    then one of: a final message (JSON if a schema is given) | a tool call whose arguments
    follow the tool's schema (tool_choice "auto", "required" or one named function)

Control tokens are matched by id, never spelled out in text, so what the grammar lets through
is exactly what the parser reads.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from . import encoding as E

# free text and JSON may contain none of these; the grammar places them itself
_CONTROL = (E.START, E.END, E.MESSAGE, E.CHANNEL, E.CONSTRAIN, E.RETURN, E.CALL)


class GrammarError(ValueError):
    """A schema, tool or tool_choice that cannot be compiled; the message says which and why."""


@dataclass(frozen=True)
class GrammarLimits:
    compile_timeout_s: float = 10.0  # a pathological schema must not stall the engine
    max_schema_bytes: int = 64 * 1024  # the JSON text of one schema
    max_tools: int = 128
    # whitespace characters in a row inside JSON: `{"a": 1}` and single newlines pass, and a
    # model cannot pad its way past max_tokens
    max_json_whitespace: int = 1
    cache_size: int = 64  # compiled grammars kept for reuse (same schema, same tools)


def default_reasoning_budget(max_tokens: int) -> int:
    """Analysis tokens allowed under a constraint: half of max_tokens leaves the rest for the
    headers and the constrained JSON."""
    return max(0, int(max_tokens) // 2)


def reasoning_close_tokens() -> list[int]:
    """The tokens that close an analysis message and open the next assistant message."""
    return [E.END, E.START] + E.encode("assistant", allow_special=False)


def _vocab() -> list[bytes]:
    """Token strings as xgrammar sees them.

    Control tokens get a 0xFF prefix: no UTF-8 text contains that byte, so JSON strings can never
    absorb "<|end|>" (the grammar places control tokens by id). Other special tokens get b"",
    which xgrammar treats as never allowed.
    """
    vocab = []
    for tid in range(E.VOCAB_SIZE):
        data = E.token_bytes(tid) or b""
        if tid >= E.FIRST_SPECIAL:
            data = b"\xff" + data if tid in _CONTROL else b""
        vocab.append(data)
    return vocab


class GrammarCompiler:
    """xgrammar's compiler for the o200k_harmony vocabulary, built once (see `get()`)."""

    _instance: GrammarCompiler | None = None
    _lock = threading.Lock()

    def __init__(self, limits: GrammarLimits = GrammarLimits(), max_threads: int = 4):
        import xgrammar as xgr

        self._xgr = xgr
        self.limits = limits
        # <|endoftext|> is a stop token xgrammar will never see: termination comes from the
        # grammar itself ending on <|return|> or <|call|>
        info = xgr.TokenizerInfo(_vocab(), xgr.VocabType.RAW, vocab_size=E.VOCAB_SIZE,
                                 stop_token_ids=[E.FIRST_SPECIAL + 1])
        # xgrammar 0.2.8's own cache shares rule masks between grammars and mixes up the ids of
        # token rules (a grammar then allows <|return|> where it wants <|message|>), so we cache
        # whole compiled grammars ourselves
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        # compile off-thread so a slow schema can be abandoned after compile_timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                           thread_name_prefix="gptoss-grammar")

    @classmethod
    def get(cls) -> GrammarCompiler:
        if cls._instance is None:
            with cls._lock:
                if cls._instance is None:
                    cls._instance = cls()
        return cls._instance

    # -- building --------------------------------------------------------------------------

    def structural_tag(self, json_schema: Any = None, tools: Sequence[Any] | None = None,
                       tool_choice: Any = "auto", reasoning_budget: int | None = None):
        """The xgrammar StructuralTag for a request, or None when nothing is constrained."""
        from xgrammar import structural_tag as st

        calls = self._calls(tools, tool_choice)
        schema = self._schema(json_schema, "json_schema") if json_schema is not None else None
        if calls is None and schema is None:
            return None

        def tok(tid):
            return st.TokenFormat(token=tid)

        def seq(*elements):
            return st.SequenceFormat(elements=list(elements))

        def text(s):
            # header words as their canonical tokens, the ones the model was trained on; any
            # other spelling would let a sampler wander (a random model spells "to=functions"
            # one letter at a time and runs out of max_tokens)
            return seq(*[tok(t) for t in E.encode(s, allow_special=False)])

        def one_of(*elements):
            return st.OrFormat(elements=list(elements))

        free = dict(exclude_tokens=list(_CONTROL))
        choices = []
        for name, params in calls or []:
            to = f"to=functions.{name}"
            json_type = seq(tok(E.CONSTRAIN), text("json"))
            # both header orders and both ways of writing the content type occur
            headers = one_of(
                seq(tok(E.CHANNEL), text(f"commentary {to} "), json_type),
                seq(tok(E.CHANNEL), text(f"commentary {to}"), json_type),
                seq(tok(E.CHANNEL), text(f"commentary {to} json")),
                seq(text(f" {to}"), tok(E.CHANNEL), text("commentary "), json_type),
                seq(text(f" {to}"), tok(E.CHANNEL), text("commentary"), json_type),
                seq(text(f" {to}"), tok(E.CHANNEL), text("commentary json")),
            )
            choices.append(seq(headers, tok(E.MESSAGE), self._json(params), tok(E.CALL)))
        if calls is None or tool_choice in (None, "auto"):
            body = self._json(schema) if schema is not None else st.AnyTokensFormat(**free)
            choices.append(seq(tok(E.CHANNEL), text("final"), tok(E.MESSAGE), body, tok(E.RETURN)))
        answer = choices[0] if len(choices) == 1 else one_of(*choices)

        if reasoning_budget is not None and reasoning_budget <= 0:
            return st.StructuralTag(format=answer)
        analysis = seq(tok(E.CHANNEL), text("analysis"), tok(E.MESSAGE),
                       st.AnyTokensFormat(**free, max_tokens=reasoning_budget),
                       tok(E.END), tok(E.START), text("assistant"))
        return st.StructuralTag(format=seq(st.OptionalFormat(content=analysis), answer))

    def compile_request(self, json_schema: Any = None, tools: Sequence[Any] | None = None,
                        tool_choice: Any = "auto",
                        reasoning_budget: int | None = None) -> RequestGrammar | None:
        """A fresh matcher for one request, or None when the request is unconstrained.

        json_schema: a JSON schema (dict or JSON text) for the final answer.
        tools / tool_choice: OpenAI tool definitions; "auto" (call or answer), "none" (tools
          ignored), "required" (some call), or {"type": "function", "function": {"name": N}}.
        reasoning_budget: most analysis tokens before the grammar closes the message; None for
          no limit, 0 for no analysis. See default_reasoning_budget().
        Raises GrammarError for a schema xgrammar rejects, a bad tool_choice, or a limit hit.
        """
        tag = self.structural_tag(json_schema, tools, tool_choice, reasoning_budget)
        if tag is None:
            return None
        compiled = self._compile(tag)
        return RequestGrammar(self._xgr.GrammarMatcher(compiled, terminate_without_stop_token=True))

    def compile_json(self, json_schema: Any, end_token: int = E.RETURN) -> RequestGrammar:
        """A matcher for bare JSON (plain generate, no harmony turn): the schema, then
        `end_token` (the model's EOS), which the mask allows only once the JSON is complete."""
        from xgrammar import structural_tag as st

        tag = st.StructuralTag(format=self._json(self._schema(json_schema, "json_schema")))
        # the model, not the grammar, decides when "12" is done (it could go on to "123")
        return RequestGrammar(self._xgr.GrammarMatcher(self._compile(tag),
                                                       override_stop_tokens=[end_token]))

    def _compile(self, tag):
        key = tag.model_dump_json()
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        future = self._pool.submit(self._compiler.compile_structural_tag, tag)
        try:
            compiled = future.result(timeout=self.limits.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise GrammarError(f"grammar compilation took longer than "
                               f"{self.limits.compile_timeout_s:g} s; simplify the schema") from None
        except Exception as exc:  # xgrammar reports bad schemas as RuntimeError
            raise GrammarError(f"the schema cannot be compiled: {_xgr_message(exc)}") from None
        with self._cache_lock:
            self._cache[key] = compiled
            while len(self._cache) > self.limits.cache_size:
                self._cache.popitem(last=False)
        return compiled

    # -- validation ------------------------------------------------------------------------

    def _json(self, schema):
        from xgrammar import structural_tag as st

        return st.JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=self.limits.max_json_whitespace)

    def _schema(self, schema: Any, where: str) -> dict | bool:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"{where} is not valid JSON: {exc}") from None
        if isinstance(schema, Mapping):
            schema = dict(schema)
        elif not isinstance(schema, bool):
            raise GrammarError(f"{where} must be a JSON schema object, got {type(schema).__name__}")
        size = len(json.dumps(schema))
        if size > self.limits.max_schema_bytes:
            raise GrammarError(f"{where} is {size} bytes of JSON; the limit is "
                               f"{self.limits.max_schema_bytes}")
        return _strict_bounded_strings(schema)

    def _calls(self, tools, tool_choice) -> list[tuple[str, Any]] | None:
        """(name, parameters schema) of the functions the model may call, or None for no calls."""
        if tool_choice == "none" or not tools:
            if tool_choice not in (None, "auto", "none"):
                raise GrammarError(f"tool_choice {tool_choice!r} needs tools, and none were given")
            return None
        if len(tools) > self.limits.max_tools:
            raise GrammarError(f"{len(tools)} tools; the limit is {self.limits.max_tools}")
        try:
            descs = E._tool_descriptions(tools)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        calls = [(d.name, self._schema(d.parameters if d.parameters is not None else
                                       {"type": "object"}, f"tools[{i}].function.parameters"))
                 for i, d in enumerate(descs)]
        if tool_choice in (None, "auto", "required"):
            return calls
        name = _named_choice(tool_choice)
        chosen = [c for c in calls if c[0] == name]
        if not chosen:
            raise GrammarError(f"tool_choice names {name!r}, which is not among the tools "
                               f"({', '.join(c[0] for c in calls)})")
        return chosen


# one JSON string character that needs no escape, as well-formed UTF-8: a range per encoded length,
# because xgrammar expands one wide class ([^...] or \u0080-\uffff) into byte ranges that also
# admit overlong forms and surrogates (E0 83 93 passed), which decode to three U+FFFD characters
_JSON_CHAR = r"(?:[ !#-\[\]-\x7f]|[\u0080-\u07ff]|[\u0800-\ud7ff]|[\ue000-\uffff]|[\u{10000}-\u{10ffff}])"


def _strict_bounded_strings(schema: Any) -> Any:
    r"""xgrammar 0.2.8 spells a string with minLength/maxLength as `[^"\\\r\n]{m,n}`, which lets raw
    control characters (a tab, say) and malformed UTF-8 into the string: not JSON that strict parsers
    accept, and a length the decoded text can exceed. The same bound over well-formed characters that
    JSON allows unescaped keeps the output valid."""
    if isinstance(schema, list):
        return [_strict_bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict_bounded_strings(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & out.keys():
        lo, hi = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = "^%s{%d,%s}$" % (_JSON_CHAR, lo, "" if hi is None else int(hi))
    return out


def _named_choice(tool_choice: Any) -> str:
    name = None
    if isinstance(tool_choice, Mapping):  # Chat Completions nests the name, Responses does not
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else tool_choice.get("name")
    if not isinstance(name, str):
        raise GrammarError(f"tool_choice is {tool_choice!r}; allowed: 'auto', 'none', 'required', "
                           "or {'type': 'function', 'function': {'name': ...}}")
    return name


def _xgr_message(exc: Exception) -> str:
    # xgrammar prefixes "[time] /path/file.cc:line: "; the rest is the useful part
    text = str(exc).strip()
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


class RequestGrammar:
    """One request's grammar state: fill the next-token bitmask, then accept the sampled token."""

    def __init__(self, matcher):
        self._matcher = matcher
        self._scratch: torch.Tensor | None = None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> bool:
        """Write the allowed tokens into bitmask[row] (int32, CPU; see allocate_bitmask).
        Returns False when every token is allowed, so applying it can be skipped."""
        return self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one generated token; False if the grammar does not allow it."""
        return self._matcher.accept_token(int(token_id))

    def is_terminated(self) -> bool:
        """True once the turn is complete (after its <|return|> or <|call|>)."""
        return self._matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def forced_tokens(self, limit: int = 32) -> list[int]:
        """The tokens the grammar allows one at a time from here (e.g. what follows a closed
        analysis message); the state is left unchanged. An engine may append them unsampled."""
        if self._scratch is None:
            self._scratch = allocate_bitmask(1)
        out: list[int] = []
        while len(out) < limit and not self._matcher.is_terminated():
            self._matcher.fill_next_token_bitmask(self._scratch, 0)
            tid = _single_token(self._scratch[0])
            if tid is None or not self._matcher.accept_token(tid):
                break
            out.append(tid)
        if out:
            self._matcher.rollback(len(out))
        return out


def _single_token(row: torch.Tensor) -> int | None:
    """The one token a bitmask row allows, or None if it allows none or several."""
    words = torch.nonzero(row).flatten()
    if words.numel() != 1:
        return None
    word = int(words[0])
    bits = int(row[word]) & 0xFFFFFFFF
    if bits & (bits - 1):
        return None
    return word * 32 + bits.bit_length() - 1


def allocate_bitmask(batch_size: int) -> torch.Tensor:
    """An int32 CPU bitmask for `batch_size` rows over the whole vocabulary."""
    return torch.full((batch_size, (E.VOCAB_SIZE + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                  indices: list[int] | None = None) -> None:
    """Set the logits of disallowed tokens to -inf, in place (bitmask moved to logits' device)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=E.VOCAB_SIZE, indices=indices)
