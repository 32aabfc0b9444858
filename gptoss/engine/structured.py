"""Constrained decoding in the engine: each request gets its own grammar matcher, whose bitmask
masks the logits before sampling and which then accepts the sampled token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StructuredSpec:
    """What a request is constrained to; every sample (n > 1) gets a fresh matcher from it."""
    json_schema: Any = None
    tools: tuple | None = None
    tool_choice: Any = "auto"
    reasoning_budget: int | None = None
    harmony: bool = True  # a harmony assistant turn (chat), or bare JSON (plain generate)

    def new_matcher(self):
        from ..harmony.grammar import GrammarCompiler
        comp = GrammarCompiler.get()
        if self.harmony:
            return comp.compile_request(self.json_schema, list(self.tools) if self.tools else None,
                                        self.tool_choice, self.reasoning_budget)
        return comp.compile_json(self.json_schema)


def apply_grammars(logits: torch.Tensor, reqs) -> None:
    """Mask, in place, the logits of tokens the rows' grammars do not allow (rows without one
    are left alone)."""
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.grammar.is_terminated()]
    if not rows:
        return
    from ..harmony.grammar import allocate_bitmask, apply_bitmask
    bitmask = allocate_bitmask(len(reqs))
    used = [i for i in rows if reqs[i].grammar.fill_bitmask(bitmask, i)]
    if used:
        apply_bitmask(logits, bitmask, used)
