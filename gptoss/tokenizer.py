"""The o200k_harmony tokenizer (from openai-harmony) and incremental detokenization."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The harmony encoding, loaded once. Offline it needs TIKTOKEN_ENCODINGS_BASE to point at a
    folder holding o200k_base.tiktoken."""
    try:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:
        raise RuntimeError(
            f"could not load the o200k_harmony tokenizer ({e}). Without internet, set "
            f"TIKTOKEN_ENCODINGS_BASE to a folder that holds o200k_base.tiktoken") from None


def encode(text: str) -> list[int]:
    # special tokens written in the text (e.g. "<|start|>") are kept as the special tokens,
    # as HF tokenizers do, so a rendered harmony prompt can be passed as a string
    return get_tokenizer().encode(text, allowed_special="all")


def decode(token_ids: list[int]) -> str:
    return get_tokenizer().decode(list(token_ids))


class IncrementalDetokenizer:
    """Text of a growing token list, emitted only once its UTF-8 is complete.

    Decodes a short window (the previous step's tokens as left context + the new ones) instead of the whole list,
    so each step costs O(new tokens); a multi-byte character split across tokens is held back until
    its last byte arrives.
    """

    def __init__(self):
        self.tokens: list[int] = []  # the text is the caller's to keep: the pieces add() returns, in order
        self._prefix = 0   # window start
        self._read = 0     # tokens whose text add() has already returned

    def add(self, token_ids: list[int]) -> str:
        clean = self._read == len(self.tokens)  # no bytes held back from an earlier step
        self.tokens.extend(token_ids)
        if clean:
            # the common case: the new tokens are whole characters by themselves, and with nothing
            # pending their text is the text of the whole list's tail (one decode instead of two)
            piece = decode(token_ids)
            if "\ufffd" not in piece:
                self._prefix, self._read = self._read, len(self.tokens)
                return piece
        prefix_text = decode(self.tokens[self._prefix:self._read])
        full = decode(self.tokens[self._prefix:])
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""  # an incomplete character: wait for more bytes
        new = full[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.tokens)
        return new
