"""The block pool (prefix sharing, LRU eviction, ref counts) and the engine under KV pressure."""

import random

import pytest

from gptoss import LLM, SamplingParams
from gptoss.engine.kv_cache import BlockPool
from gptoss.engine.request import Request


def _req(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams(), max_total_tokens=10 ** 6)


def _compute(pool, req, n=None):
    n = req.num_tokens - req.num_computed_tokens if n is None else n
    assert pool.allocate(req, n)
    req.num_computed_tokens += n
    pool.cache_full_blocks(req)


def test_prefix_blocks_are_shared_and_refcounted():
    pool = BlockPool(32, 4)
    a = _req(range(10), "a")
    _compute(pool, a)
    assert len(a.block_ids) == 3 and pool.num_free_blocks == 31 - 3
    b = _req(list(range(8)) + [99, 98, 97], "b")
    assert pool.match_prefix(b) == 8  # two full shared blocks
    assert b.block_ids == a.block_ids[:2]
    assert [pool.ref_cnt[x] for x in b.block_ids] == [2, 2]
    _compute(pool, b)
    pool.free(a)
    assert [pool.ref_cnt[x] for x in b.block_ids[:2]] == [1, 1]
    pool.free(b)
    assert pool.num_free_blocks == 31 and all(c == 0 for c in pool.ref_cnt)


def test_whole_prompt_cached_leaves_one_token():
    pool = BlockPool(16, 4)
    a = _req(range(8), "a")
    _compute(pool, a)
    pool.free(a)
    b = _req(range(8), "b")
    assert pool.match_prefix(b) == 4  # not 8: the last block is recomputed to get logits


def test_lru_evicts_least_recently_freed_and_different_prefix_misses():
    pool = BlockPool(5, 2)  # 4 usable blocks
    a = _req([1, 2, 3, 4], "a")
    _compute(pool, a)
    pool.free(a)
    c = _req([9, 9, 9, 9, 9], "c")  # needs 3 blocks: evicts the 2 free uncached + 1 of a's
    _compute(pool, c)
    a2 = _req([1, 2, 3, 4, 5], "a2")
    got = pool.match_prefix(a2)
    assert got in (0, 2)  # a's first block may survive; its second was freed first and evicted
    x = _req([1, 7, 3, 4, 5], "x")
    assert pool.match_prefix(x) == 0


def test_hash_depends_on_everything_before():
    pool = BlockPool(16, 2)
    a = _req([1, 2, 3, 4, 5], "a")
    _compute(pool, a)
    b = _req([0, 0, 3, 4, 5], "b")  # same second block, different first
    assert pool.match_prefix(b) == 0


def test_prefix_cache_skips_shared_prompt(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=2048, progress=False)
    cold = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=2048, progress=False,
               enable_prefix_caching=False)
    rng = random.Random(5)
    prefix = [rng.randrange(199998) for _ in range(1000)]
    p1, p2 = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate({"prompt_token_ids": p1}, sp, use_tqdm=False)
    before = llm.engine.num_computed_tokens_total
    out = llm.generate({"prompt_token_ids": p2}, sp, use_tqdm=False)[0]
    computed = llm.engine.num_computed_tokens_total - before
    bs = llm.engine.block_size
    assert out.num_cached_tokens == (1000 // bs) * bs
    # only the tokens after the cached blocks, plus the 3 decode steps after the first token
    assert computed == len(p2) - out.num_cached_tokens + 3
    assert out.outputs[0].token_ids == cold.generate({"prompt_token_ids": p2}, sp, use_tqdm=False)[0].outputs[0].token_ids


def test_pressure_preempts_and_everything_finishes(tiny_ckpt):
    # a cache of 24 blocks x 16 tokens for 40 requests of ~30-60 tokens each: far less than in flight
    per_token = 2 * 4 * 2 * 16 * 4
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False,
              kv_cache_memory_bytes=24 * 16 * per_token, max_num_seqs=32, enable_prefix_caching=False)
    pool = llm.engine.pool
    assert pool.num_usable_blocks == 24
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(199998) for _ in range(rng.randint(10, 40))]} for _ in range(40)]
    sps = [SamplingParams(temperature=0, max_tokens=rng.randint(5, 30), ignore_eos=True) for _ in prompts]
    outs = llm.generate(prompts, sps, use_tqdm=False)
    assert all(o.finished and len(o.outputs[0].token_ids) == sp.max_tokens for o, sp in zip(outs, sps))
    assert pool.num_free_blocks == pool.num_usable_blocks and not any(pool.ref_cnt)
    assert not llm.engine.scheduler.requests
    # preempted requests recomputed to the same tokens as a run with room to spare
    roomy = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False)
    ref = roomy.generate(prompts[:8], sps[:8], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ref] == [o.outputs[0].token_ids for o in outs[:8]]


def test_prompt_larger_than_cache_is_an_error(tiny_ckpt):
    per_token = 2 * 4 * 2 * 16 * 4
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False,
              kv_cache_memory_bytes=4 * 16 * per_token)
    with pytest.raises(ValueError, match="KV cache holds only 64"):
        llm.generate({"prompt_token_ids": list(range(100))}, use_tqdm=False)
