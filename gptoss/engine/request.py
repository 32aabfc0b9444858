"""One sequence being generated: its tokens, progress counters, KV blocks and stop state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


TABLES_CLEAN = 1 << 62  # Request.kv_dirty_from when the runner's copies match the block lists


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    parent_id: str = ""       # the user's request id (n > 1 makes one Request per sample)
    index: int = 0            # which of the n samples
    eos_token_ids: tuple[int, ...] = ()
    max_total_tokens: int = 0  # max_model_len
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)        # full-attention layers' blocks
    swa_block_ids: list[int] = field(default_factory=list)    # sliding layers' (0 once out of window)
    block_hashes: list = field(default_factory=list)  # (hash, tokens) of each full block, by the pool
    num_registered_blocks: int = 0  # leading blocks the pool has offered to the prefix cache
    # the first index of either block list that the KV cache manager changed since the runner last
    # brought its int64 copies (kv_tables) up to date; TABLES_CLEAN when it changed none
    kv_dirty_from: int = 0
    kv_tables: tuple | None = field(default=None, repr=False)  # (full, sliding) int64 arrays, for the runner
    output_prompt: list[int] | None = None  # the prompt's copy that this request's outputs share
    generator: torch.Generator | None = None
    grammar: object | None = None  # a RequestGrammar when the output is constrained
    detok: IncrementalDetokenizer = field(default_factory=IncrementalDetokenizer)
    # the output text in pieces, joined when read (`text`): a += on the whole string copied it for
    # every token, ~24 us a token at 128k characters on the 2-core machine
    text_parts: list[str] = field(default_factory=list, repr=False)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # async scheduling: tokens sampled on the device and not yet appended (0-2: the step being read
    # back and the one just launched), and the row of the newest one in its step's sampled tokens
    num_pending: int = 0
    pending_row: int = 0

    @property
    def text(self) -> str:
        """The output text so far."""
        if len(self.text_parts) > 1:
            self.text_parts[:] = ["".join(self.text_parts)]
        return self.text_parts[0] if self.text_parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self.text_parts[:] = [value] if value else []

    def text_tail(self, k: int) -> str:
        """The last k characters of the text (all of it when shorter), joining only the pieces they span."""
        if k <= 0:
            return ""
        span, n = [], 0
        for piece in reversed(self.text_parts):
            span.append(piece)
            n += len(piece)
            if n >= k:
                break
        return "".join(reversed(span))[-k:]

    def __repr__(self) -> str:
        # short: the generated repr spelled out every token and block id (a 32k prompt: ~6 ms a call)
        return (f"Request({self.request_id!r}, {self.status.value}, {self.num_prompt_tokens} prompt + "
                f"{len(self.output_token_ids)} output tokens, {self.num_computed_tokens} computed)")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens: what the scheduler plans with."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def needs_sync(self) -> bool:
        """Its next step depends on the values of its newest token (grammar mask, penalties, the
        min_tokens ban) or it returns logprobs: its steps cannot be scheduled ahead of the readback."""
        p = self.params
        return (self.grammar is not None or p.logprobs is not None or p.min_tokens > 0
                or p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty))

    @property
    def length_reached_with_pending(self) -> bool:
        """Its pending tokens bring it to its length limit: it needs no further step."""
        return self.num_pending > 0 and len(self.output_token_ids) + self.num_pending >= self.max_output_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a step needs a few tokens of
        sequences thousands long)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def max_output_tokens(self) -> int:
        room = self.max_total_tokens - self.num_prompt_tokens
        mt = self.params.max_tokens
        return room if mt is None else min(mt, room)
