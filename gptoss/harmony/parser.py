"""Assistant tokens -> reasoning, content and tool calls, token by token.

One state machine serves streaming and non-streaming use (parse_completion folds the deltas), so
the two cannot disagree. It works on token ids: control tokens steer it, text tokens are decoded
bytewise, so a character split over several tokens comes out whole. It never raises: a message
it cannot place comes back as content, and the problem is logged.
"""

from __future__ import annotations

import codecs
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Union

from .encoding import (CALL, CHANNEL, CONSTRAIN, END, FIRST_SPECIAL, MESSAGE, RETURN, START,
                       token_bytes)

logger = logging.getLogger(__name__)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text the model wrote, unchanged


@dataclass
class ParsedTurn:
    reasoning: str | None = None  # None when the model wrote no reasoning
    content: str | None = None  # None when the model wrote no answer or preamble
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    text: str


Delta = Union[ReasoningDelta, ContentDelta, ToolCallStart, ToolCallArguments]

# a real header is a handful of tokens; this many without <|message|> means the model is writing
# text without one
MAX_HEADER_TOKENS = 64
# messages of the same kind are joined with this, so "Let me check." + "It is 20." stay apart
SEPARATOR = "\n"

_HEADER, _CONTENT, _BETWEEN = "header", "content", "between"
_MARK = {CHANNEL: "channel", CONSTRAIN: "constrain"}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class _Header:
    role_implied: bool  # the prompt's "<|start|>assistant" (or a missing <|start|>) named the role
    items: list = field(default_factory=list)  # bytes of text tokens, or "channel"/"constrain"
    num_tokens: int = 0

    def text(self) -> str:
        return b"".join(x for x in self.items if isinstance(x, bytes)).decode("utf-8", "replace")

    def parts(self) -> tuple[list[str], list[str], bool]:
        """(words before the first <|channel|>, words after it, whether <|channel|> was seen)."""
        role, chan, seen, buf = [], [], False, bytearray()

        def flush():
            (chan if seen else role).extend(buf.decode("utf-8", "replace").split())
            buf.clear()

        for x in self.items:
            if isinstance(x, bytes):
                buf += x
                continue
            flush()  # a marker separates words: "to=functions.f<|constrain|>json"
            if x == "channel" and not seen:
                seen = True
        flush()
        return role, chan, seen

    def looks_like_header(self) -> bool:
        """Could this be a header cut short (drop it), or is it text without one (keep it)?"""
        role, chan, seen = self.parts()

        def named(words, open_end):
            # a last word such as " to" may be a recipient cut short
            return [w for k, w in enumerate(words) if not w.startswith("to=")
                    and not (open_end and k == len(words) - 1 and "to=".startswith(w))]

        role_named = named(role, not seen)
        role_ok = role_named in ([], ["assistant"]) if self.role_implied else len(role_named) <= 1
        chan_ok = len(named(chan, True)) <= 2
        return role_ok and chan_ok and (seen or bool(role) or "constrain" in self.items)


class StreamingParser:
    """Feed the tokens an assistant generates after `<|start|>assistant`; get typed deltas.

    Deltas: ReasoningDelta(text), ContentDelta(text), ToolCallStart(index, id, name) once per
    call as soon as its header is complete, then ToolCallArguments(index, text) fragments.
    Call finish() at the end of generation to flush what is held back. `result()` is the turn
    so far, the same as folding every delta.
    """

    def __init__(self, call_id_factory: Callable[[], str] | None = None,
                 max_header_tokens: int = MAX_HEADER_TOKENS):
        self._new_id = call_id_factory or new_call_id
        self._max_header = max_header_tokens
        self._state = _HEADER
        self._header = _Header(role_implied=True)
        self._kind: str | None = None  # "reasoning" | "content" | "tool" for the open message
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._started = False  # whether the open message has produced text yet
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self.problems: list[str] = []

    # -- public ----------------------------------------------------------------------------

    def feed(self, token_id: int) -> list[Delta]:
        out: list[Delta] = []
        try:
            tid = int(token_id)
        except (TypeError, ValueError, OverflowError):
            self._problem(f"token id {token_id!r} is not an integer; skipped")
            return out
        if tid >= FIRST_SPECIAL or tid < 0:
            self._special(tid, out)
        else:
            data = token_bytes(tid)
            if data is None:
                self._problem(f"token id {tid} is outside the vocabulary; skipped")
            elif self._state == _CONTENT:
                self._text(self._decoder.decode(data), out)
            else:
                if self._state == _BETWEEN:
                    # text with no <|start|> before it: a header missing its <|start|>, or text
                    # missing its header; _Header tells which once it ends
                    self._state, self._header = _HEADER, _Header(role_implied=True)
                self._header.items.append(data)
                self._header.num_tokens += 1
                if self._header.num_tokens > self._max_header:
                    self._problem("no <|message|> after %d header tokens; the text is content"
                                  % self._max_header)
                    data = b"".join(x for x in self._header.items if isinstance(x, bytes))
                    self._open("content")
                    self._text(self._decoder.decode(data), out)
        return out

    def feed_many(self, token_ids: Iterable[int]) -> list[Delta]:
        out: list[Delta] = []
        for tid in token_ids:
            out.extend(self.feed(tid))
        return out

    def finish(self) -> list[Delta]:
        """End of generation: flush held-back bytes and an unfinished header."""
        out: list[Delta] = []
        if self._state == _CONTENT:
            self._close(out)
        elif self._state == _HEADER:
            self._abandon_header("generation ended inside a message header", out, cut=True)
        self._state, self._header = _BETWEEN, _Header(role_implied=True)
        return out

    def result(self) -> ParsedTurn:
        return ParsedTurn(reasoning="".join(self._reasoning) or None,
                          content="".join(self._content) or None,
                          tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in self._calls])

    # -- states ----------------------------------------------------------------------------

    def _special(self, tid: int, out: list[Delta]) -> None:
        state = self._state
        if tid == START:
            if state == _CONTENT:
                self._problem("<|start|> inside a message (missing <|end|>)")
                self._close(out)
            elif state == _HEADER:
                self._abandon_header("<|start|> inside a message header", out)
            self._state, self._header = _HEADER, _Header(role_implied=False)
        elif tid in (END, RETURN, CALL):
            if state == _CONTENT:
                self._close(out)
            elif state == _HEADER:
                self._abandon_header("message ended inside its header", out)
            self._state = _BETWEEN
        elif tid == MESSAGE:
            if state == _HEADER:
                self._begin_message(out)
            elif state == _BETWEEN:
                self._problem("<|message|> without a header; its text is content")
                self._open("content")
            else:
                self._problem("stray <|message|> inside a message; skipped")
        elif tid in (CHANNEL, CONSTRAIN):
            if state == _HEADER:
                self._header.items.append(_MARK[tid])
                self._header.num_tokens += 1
            elif tid == CONSTRAIN:
                self._problem("stray <|constrain|> outside a header; skipped")
            else:
                # "...<|channel|>final<|message|>": a new message whose <|end|><|start|>assistant
                # the model skipped
                if state == _CONTENT:
                    self._problem("<|channel|> inside a message (missing <|end|><|start|>)")
                    self._close(out)
                self._state, self._header = _HEADER, _Header(role_implied=True)
                self._header.items.append("channel")
                self._header.num_tokens += 1
        else:
            self._problem(f"special token {tid} has no place in an assistant turn; skipped")

    def _begin_message(self, out: list[Delta]) -> None:
        role_words, chan_words, _ = self._header.parts()
        role, recipient = None, None
        for w in role_words + chan_words:
            if w.startswith("to="):
                recipient = recipient or w[3:]
        for w in role_words:
            if not w.startswith("to="):
                role = w
                break
        channel = next((w for w in chan_words if not w.startswith("to=")), None)
        if role not in (None, "assistant"):
            self._problem(f"a message from {role!r} inside an assistant turn; its text is content")
            self._open("content")
        elif recipient and recipient not in ("assistant", "user"):
            # any recipient is a call; "functions." is the namespace of the request's tools
            name = recipient[len("functions."):] if recipient.startswith("functions.") else recipient
            if not name:
                self._problem(f"tool call to {recipient!r} names no function; its text is content")
                self._open("content")
                return
            self._open("tool")
            call = ToolCall(self._new_id(), name, "")
            self._calls.append(call)
            out.append(ToolCallStart(len(self._calls) - 1, call.id, name))
        elif channel == "analysis":
            self._open("reasoning")
        else:
            if channel not in ("final", "commentary"):
                self._problem(f"message on channel {channel!r}; its text is content")
            self._open("content")

    def _abandon_header(self, why: str, out: list[Delta], cut: bool = False) -> None:
        """The header ended without <|message|>: drop it, or keep its text as content."""
        header = self._header
        if all(isinstance(x, bytes) for x in header.items) and not header.text().strip():
            return  # nothing, or the whitespace some models put between messages
        if header.looks_like_header():
            if cut:  # max_tokens fell inside a header: nothing was said yet
                logger.debug("harmony parse: %s; dropped %r", why, header.text())
            else:
                self._problem(f"{why}; dropped {header.text()!r}")
            return
        self._problem(f"{why}; {header.text()!r} has no header, so it is content")
        self._open("content")
        self._text(header.text(), out)
        self._close(out)

    # -- messages --------------------------------------------------------------------------

    def _open(self, kind: str) -> None:
        self._state, self._kind, self._started = _CONTENT, kind, False
        self._decoder.reset()

    def _close(self, out: list[Delta]) -> None:
        self._text(self._decoder.decode(b"", final=True), out)
        self._decoder.reset()
        self._state, self._kind = _BETWEEN, None

    def _text(self, text: str, out: list[Delta]) -> None:
        if not text:
            return
        kind = self._kind
        if kind == "tool":
            call = self._calls[-1]
            call.arguments += text
            out.append(ToolCallArguments(len(self._calls) - 1, text))
            return
        acc = self._reasoning if kind == "reasoning" else self._content
        if not self._started and acc:
            text = SEPARATOR + text
        self._started = True
        acc.append(text)
        out.append(ReasoningDelta(text) if kind == "reasoning" else ContentDelta(text))

    def _problem(self, what: str) -> None:
        # the first problem of a turn is a warning; the rest would only repeat the story
        (logger.debug if self.problems else logger.warning)("harmony parse: %s", what)
        self.problems.append(what)


def parse_completion(token_ids: Iterable[int],
                     call_id_factory: Callable[[], str] | None = None) -> ParsedTurn:
    """Reasoning, content and tool calls of the tokens generated after `<|start|>assistant`.

    Never raises on malformed output: what cannot be parsed comes back as content.
    """
    parser = StreamingParser(call_id_factory=call_id_factory)
    parser.feed_many(token_ids)
    parser.finish()
    return parser.result()


def apply_delta(turn: ParsedTurn, delta: Delta) -> None:
    """Fold one delta into `turn`, as a streaming client would."""
    if isinstance(delta, ReasoningDelta):
        turn.reasoning = (turn.reasoning or "") + delta.text
    elif isinstance(delta, ContentDelta):
        turn.content = (turn.content or "") + delta.text
    elif isinstance(delta, ToolCallStart):
        turn.tool_calls.append(ToolCall(delta.id, delta.name, ""))
    else:
        turn.tool_calls[delta.index].arguments += delta.text
