"""What generate() returns (vLLM's shapes: RequestOutput holding CompletionOutputs)."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


class TokenPrefix(Sequence):
    """The first n ids of a list that only ever grows at its end: a snapshot that shares the list
    instead of copying it. The server's streams take one output a generated token, and copying the
    whole list for each made a long stream quadratic (~19 us a token at 32k on the 2-core machine).
    Reads like a list: len, indexing, slices (lists), iteration, == against lists."""

    __slots__ = ("_ids", "_n")

    def __init__(self, ids: list[int], n: int | None = None):
        self._ids = ids
        self._n = len(ids) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if step > 0:  # bounds in 0..n: the list's own slice
                return self._ids[start:stop:step]
            return [self._ids[k] for k in range(start, stop, step)]  # a stop of -1 means "before 0" here
        k = operator.index(i)
        if not -self._n <= k < self._n:
            raise IndexError(f"token index {i} out of range for {self._n} tokens")
        return self._ids[k % self._n]

    def __iter__(self):
        return itertools.islice(self._ids, self._n)

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, TokenPrefix)):
            return len(other) == self._n and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int] | TokenPrefix  # a list, or in the server's streams a TokenPrefix
    finish_reason: str | None = None      # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
