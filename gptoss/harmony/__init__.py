"""The harmony chat layer: messages -> prompt tokens, generated tokens -> reasoning/content/tools,
and grammars that constrain what the model may generate."""

from .encoding import (build_conversation, decode, encode, get_encoding, render_chat,
                       stop_token_ids)
from .parser import (ContentDelta, Delta, ParsedTurn, ReasoningDelta, StreamingParser, ToolCall,
                     ToolCallArguments, ToolCallStart, apply_delta, parse_completion)

# xgrammar is heavy to import and only needed for constrained requests
_GRAMMAR_NAMES = ("GrammarCompiler", "RequestGrammar", "GrammarError", "GrammarLimits",
                  "allocate_bitmask", "apply_bitmask", "default_reasoning_budget",
                  "reasoning_close_tokens")

__all__ = ["render_chat", "build_conversation", "get_encoding", "stop_token_ids", "decode", "encode",
           "parse_completion", "StreamingParser", "ParsedTurn", "ToolCall", "Delta",
           "ReasoningDelta", "ContentDelta", "ToolCallStart", "ToolCallArguments", "apply_delta",
           *_GRAMMAR_NAMES]


def __getattr__(name):
    if name in _GRAMMAR_NAMES:
        from . import grammar

        return getattr(grammar, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
