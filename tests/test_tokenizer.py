"""Incremental detokenization: the streamed text is the whole list's text, characters never split."""

import random

import pytest

from gptoss.tokenizer import IncrementalDetokenizer, decode, encode

TEXT = "Plain words, then 東京は日本の首都です, émigré façade naïve, emoji 😀👍🏽 and ‰ — done."


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streamed_text_equals_the_whole_decode(chunk):
    ids = encode(TEXT * 3)
    d = IncrementalDetokenizer()
    pieces = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    assert "".join(pieces) == decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # a character split over tokens waits for its bytes


def test_random_ids_stream_a_prefix_of_the_decode():
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(199998) for _ in range(rng.randint(1, 30))]
        d = IncrementalDetokenizer()
        out = "".join(d.add([t]) for t in ids)
        full = decode(ids)
        # bytes that never complete a character stay held back; everything emitted is the decode's
        assert full.startswith(out), (ids, out, full)


def test_a_split_character_is_held_until_complete():
    ids = encode("a𝄞b")  # the clef is three tokens, none of them a character alone
    assert any(decode([t]) == "\ufffd" for t in ids)
    d = IncrementalDetokenizer()
    pieces = [d.add([t]) for t in ids]
    assert "".join(pieces) == "a𝄞b" and "𝄞" in pieces[-2] + pieces[-1]
    assert all(p == "" for p in pieces[1:-2])  # the clef's first bytes emit nothing
