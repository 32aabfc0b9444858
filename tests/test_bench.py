"""gptoss.bench pieces that the end-to-end table does not show on CPU."""

import random

import pytest

from gptoss.bench import measure_long_decode


def test_long_decode_runs_only_the_decode_and_frees_everything(tiny_llm):
    eng = tiny_llm.engine
    before = eng.num_computed_tokens_total
    rate = measure_long_decode(tiny_llm, random.Random(0), batch=3, context=40, steps=5, runs=2)
    assert rate > 0
    # per sequence: the last prompt token, then 4 decode steps (5 sampled tokens); no prefill of 39
    assert eng.num_computed_tokens_total - before == 3 * 3 * 5
    assert not eng.has_unfinished() and eng.pool.all_free


def test_long_decode_sliding_group_holds_only_the_window(tiny_llm):
    # more sequences x context than the sliding group's blocks: fine, since it keeps only the window
    eng = tiny_llm.engine
    batch, context = 16, 1000
    assert batch * -(-context // eng.block_size) > eng.pool.swa.num_usable_blocks
    assert measure_long_decode(tiny_llm, random.Random(1), batch=batch, context=context, steps=2, runs=1) > 0
    assert not eng.has_unfinished() and eng.pool.all_free


def test_long_decode_that_does_not_fit_says_so_and_leaks_nothing(tiny_llm):
    eng = tiny_llm.engine
    cap = eng.pool.num_usable_blocks * eng.pool.block_size
    batch = cap // 500 + 2
    with pytest.raises(ValueError, match="do not fit"):
        measure_long_decode(tiny_llm, random.Random(0), batch=batch, context=500, steps=2, runs=0)
    assert not eng.has_unfinished() and eng.pool.all_free
