"""The block pool (prefix sharing, LRU eviction, ref counts) and the engine under KV pressure."""

import random

import pytest
import torch

from gptoss import LLM, SamplingParams
from gptoss.engine.kv_cache import KVCacheManager, plan_kv_layout
from gptoss.engine.request import Request


def _req(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams(), max_total_tokens=10 ** 6)


def _compute(pool, req, n=None):
    n = req.num_tokens - req.num_computed_tokens if n is None else n
    assert pool.allocate(req, n)
    req.num_computed_tokens += n
    pool.cache_full_blocks(req)


def test_prefix_blocks_are_shared_and_refcounted():
    pool = KVCacheManager(32, 4)
    a = _req(range(10), "a")
    _compute(pool, a)
    assert len(a.block_ids) == 3 and pool.num_free_blocks == 31 - 3
    b = _req(list(range(8)) + [99, 98, 97], "b")
    assert pool.match_prefix(b) == 8  # two full shared blocks
    assert b.block_ids == a.block_ids[:2]
    assert [pool.full.ref_cnt[x] for x in b.block_ids] == [2, 2]
    _compute(pool, b)
    pool.free(a)
    assert [pool.full.ref_cnt[x] for x in b.block_ids[:2]] == [1, 1]
    pool.free(b)
    assert pool.num_free_blocks == 31 and pool.all_free


def test_whole_prompt_cached_leaves_one_token():
    pool = KVCacheManager(16, 4)
    a = _req(range(8), "a")
    _compute(pool, a)
    pool.free(a)
    b = _req(range(8), "b")
    assert pool.match_prefix(b) == 4  # not 8: the last block is recomputed to get logits


def test_each_step_offers_only_the_blocks_it_completed():
    # decode at a long context: walking every block of every request each step was ~17 ms of host
    # time a step at 64 x 32k; each block is offered to the cache once, when it completes
    pool = KVCacheManager(64, 4, window=8, num_swa_blocks=32)
    offered = []
    register = pool.full.register
    pool.full.register = lambda bid, key: (offered.append(bid), register(bid, key))[1]
    a = _req(range(41), "a")
    _compute(pool, a, 30)  # a prefill chunk: 7 full blocks
    assert offered == a.block_ids[:7]
    for _ in range(11):  # decode steps: 41 tokens -> 10 full blocks
        _compute(pool, a, 1)
        pool.release_out_of_window(a)
    assert offered == a.block_ids[:10]
    # freed (finished or preempted): a request that finds those blocks in the cache counts them as
    # offered, and one that computes blocks afresh offers them
    old = list(a.block_ids)
    pool.free(a)
    assert a.num_registered_blocks == 0
    b = _req(range(41), "b")
    assert pool.match_prefix(b) == 40 and b.num_registered_blocks == 10 and b.block_ids == old[:10]
    _compute(pool, b)
    assert len(offered) == 10  # its last block is not full
    c = _req(range(100, 109), "c")
    _compute(pool, c)
    assert offered[10:] == c.block_ids[:2]


def test_a_request_repr_is_short():
    # repr used to spell out every token, block id and hash: a 32k prompt took ms per call (and
    # deque.remove formats the request into its ValueError)
    r = _req(range(32768))
    r.block_ids = list(range(2048))
    assert len(repr(r)) < 200 and "32768 prompt" in repr(r)


def test_lru_evicts_least_recently_freed_and_different_prefix_misses():
    pool = KVCacheManager(5, 2)  # 4 usable blocks
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
    pool = KVCacheManager(16, 2)
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
    # 200 requests whose tokens in flight are about ten times what the cache holds
    per_token = 2 * 4 * 2 * 16 * 4
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False,
              kv_cache_memory_bytes=24 * 16 * per_token, max_num_seqs=200, enable_prefix_caching=False)
    pool = llm.engine.pool
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(199998) for _ in range(rng.randint(4, 24))]} for _ in range(200)]
    sps = [SamplingParams(temperature=0, max_tokens=rng.randint(2, 12), ignore_eos=True) for _ in prompts]
    in_flight = sum(len(p["prompt_token_ids"]) + sp.max_tokens for p, sp in zip(prompts, sps))
    assert in_flight > 8 * pool.num_usable_blocks * 16
    outs = llm.generate(prompts, sps, use_tqdm=False)
    assert all(o.finished and len(o.outputs[0].token_ids) == sp.max_tokens for o, sp in zip(outs, sps))
    assert pool.all_free and not llm.engine.scheduler.requests
    assert llm.engine.num_preemptions > 0  # the test did put the cache under pressure
    # preempted requests recomputed to the same tokens as a run with room to spare
    roomy = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False)
    ref = roomy.generate(prompts, sps, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ref] == [o.outputs[0].token_ids for o in outs]


def test_sliding_group_holds_only_the_window():
    m = KVCacheManager(64, 4, window=8, num_swa_blocks=16)
    r = _req(range(40), "r")
    _compute(m, r)
    m.release_out_of_window(r)
    # the next query is at 40: it sees keys 33..40, so blocks 0..7 (positions 0..31) are given back
    assert r.swa_block_ids[:8] == [0] * 8 and all(r.swa_block_ids[8:])
    assert len(r.block_ids) == 10 and all(r.block_ids)  # full-attention layers keep everything
    assert m.swa.num_free_blocks == 15 - 2
    m.free(r)
    assert m.all_free


def test_prefix_hit_needs_the_window_in_the_sliding_group():
    m = KVCacheManager(64, 4, window=8, num_swa_blocks=40)
    a = _req(range(40), "a")
    _compute(m, a)
    m.release_out_of_window(a)
    b = _req(list(range(40)) + [7, 7], "b")
    got = m.match_prefix(b)
    # all 10 blocks are cached in the full group, and blocks 8, 9 (the window before 40) in the sliding one
    assert got == 40 and b.swa_block_ids[:8] == [0] * 8 and b.swa_block_ids[8:] == a.swa_block_ids[8:]
    # a prefix whose window was given back (and reused) is not a hit
    m2 = KVCacheManager(64, 4, window=8, num_swa_blocks=5)
    c = _req(range(16), "c")
    _compute(m2, c)
    m2.release_out_of_window(c)
    m2.free(c)
    filler = _req([9] * 16, "f")
    _compute(m2, filler)  # takes the sliding blocks c left behind
    d = _req(list(range(16)) + [1], "d")
    assert m2.match_prefix(d) < 16


def test_layout_splits_the_budget():
    sliding = [True, False] * 12
    lay = plan_kv_layout(10 << 30, sliding, 128, 8, 64, False, 2, 16, 256, 8192)
    layer_block = 2 * 8 * 64 * 2 * 16
    # the sliding group holds 256 windows plus one step, the full group the rest of 10 GiB
    assert lay.num_swa_blocks - 1 == 256 * (8 + 2) + 512
    assert (lay.num_blocks - 1 + lay.num_swa_blocks - 1) * 12 * layer_block <= 10 << 30
    assert lay.num_blocks > 1.7 * (10 << 30) // (24 * layer_block)  # nearly twice the tokens of one group
    with pytest.raises(ValueError, match="too small"):
        plan_kv_layout(1000, sliding, 128, 8, 64, False, 2, 16, 256, 8192)


def test_long_generation_through_sliding_group_matches_shared_tables(tiny_ckpt):
    """Sliding layers reading their own (window-only) blocks give the tokens of shared tables."""
    a = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False)
    assert a.engine.kv_layout.window == 8
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(199998) for _ in range(n)]} for n in (3, 30, 100)]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in a.generate(prompts, sp, use_tqdm=False)]
    import gptoss.engine.llm_engine as le
    orig = le.plan_kv_layout
    try:  # the same model with one block group for every layer
        le.plan_kv_layout = lambda budget, sliding, *args: orig(budget, [False] * len(sliding), *args)
        b = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False)
    finally:
        le.plan_kv_layout = orig
    assert b.engine.kv_layout.window is None
    assert got == [o.outputs[0].token_ids for o in b.generate(prompts, sp, use_tqdm=False)]


def test_prompt_larger_than_cache_is_an_error(tiny_ckpt):
    per_token = 2 * 4 * 2 * 16 * 4
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False,
              kv_cache_memory_bytes=4 * 16 * per_token)
    cap = llm.engine.pool.num_usable_blocks * 16
    with pytest.raises(ValueError, match=f"KV cache holds only {cap}"):
        llm.generate({"prompt_token_ids": list(range(cap + 5))}, use_tqdm=False)


def test_bfloat16_cache_for_a_float32_model(tiny_ckpt, tiny_llm):
    # kv_cache_dtype="bfloat16" is honoured whatever the model's dtype (it was silently ignored)
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=1024, progress=False,
              kv_cache_dtype="bfloat16")
    caches = llm.engine.runner.kv_caches
    assert {c.k.dtype for c in caches} == {torch.bfloat16} and llm.engine.kv_dtype == torch.bfloat16
    assert tiny_llm.engine.runner.kv_caches[0].k.dtype == torch.float32  # "auto" follows the model
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    a = llm.generate({"prompt_token_ids": list(range(100, 140))}, sp, use_tqdm=False)[0].outputs[0]
    b = tiny_llm.generate({"prompt_token_ids": list(range(100, 140))}, sp, use_tqdm=False)[0].outputs[0]
    # the first token comes from the prompt's K/V, rounded to bf16 in one cache and not the other
    (ta, la), = a.logprobs[0].items()
    (tb, lb), = b.logprobs[0].items()
    assert ta == tb and abs(la.logprob - lb.logprob) < 0.05 and la.logprob != lb.logprob
