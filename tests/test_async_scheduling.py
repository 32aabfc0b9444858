"""Async scheduling (step N+1 launched before step N's tokens reach the host) is invisible in the
output: the same tokens, text, finish reasons and logprobs as the synchronous engine, through
stop strings, EOS, seeds, n > 1, preemption, aborts and requests that force synchronous steps."""

import random

import pytest

from gptoss import LLM, SamplingParams


@pytest.fixture(scope="module")
def sync_llm(tiny_ckpt):
    return LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=1024, progress=False,
               async_scheduling=False)


def _launches(llm):
    """Counts the engine's async launches (runner.launch calls) from here on."""
    runner = llm.engine.runner
    counter = {"n": 0}
    launch = runner.launch

    def counting(*a, **k):
        counter["n"] += 1
        return launch(*a, **k)

    runner.launch = counting
    return counter, lambda: setattr(runner, "launch", launch)


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for cx, cy in zip(x.outputs, y.outputs, strict=True):
            assert (cx.token_ids, cx.text, cx.finish_reason, cx.stop_reason) == \
                   (cy.token_ids, cy.text, cy.finish_reason, cy.stop_reason)
            assert cx.logprobs == cy.logprobs


def _prompts(rng, n):
    return [{"prompt_token_ids": [rng.randrange(199998) for _ in range(rng.randint(1, 60))]} for _ in range(n)]


def test_async_equals_sync(tiny_llm, sync_llm):
    rng = random.Random(7)
    prompts = _prompts(rng, 12)
    # a stop string the greedy output of prompt 0 really contains, a few tokens in
    probe = sync_llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].text
    stop = probe[len(probe) // 2:len(probe) // 2 + 2]
    sps = [SamplingParams(temperature=0, max_tokens=12, stop=[stop] if stop.strip() else None)]
    sps += [SamplingParams(temperature=0, max_tokens=rng.randint(1, 20), ignore_eos=True) for _ in range(5)]
    sps += [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i, max_tokens=16) for i in range(4)]
    sps += [SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=9), SamplingParams(temperature=0, max_tokens=30)]
    counter, restore = _launches(tiny_llm)
    try:
        got = tiny_llm.generate(prompts, sps, use_tqdm=False)
    finally:
        restore()
    want = sync_llm.generate(prompts, sps, use_tqdm=False)
    _same(got, want)
    assert counter["n"] >= 20  # the steps really went through the async path
    if stop.strip():
        assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].stop_reason == stop


def test_requests_that_need_sync_steps_mix_with_async_ones(tiny_llm, sync_llm):
    """Logprobs, penalties, min_tokens: the engine steps synchronously while one of them is queued
    and goes back to async after; the output is the synchronous engine's."""
    rng = random.Random(8)
    prompts = _prompts(rng, 6)
    sps = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) for _ in range(3)]
    sps += [SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
            SamplingParams(temperature=0.7, seed=1, max_tokens=8, repetition_penalty=1.3, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=10, min_tokens=4)]
    counter, restore = _launches(tiny_llm)
    try:
        got = tiny_llm.generate(prompts, sps, use_tqdm=False)
    finally:
        restore()
    _same(got, sync_llm.generate(prompts, sps, use_tqdm=False))
    assert len(got[3].outputs[0].logprobs) == 6
    assert counter["n"] >= 10  # async again once the short sync-needing requests were done


def test_preemption_with_tokens_in_flight(tiny_ckpt, sync_llm):
    """A KV cache too small for the batch: requests are preempted while their newest token is still
    on the device, recomputed later, and end with the tokens they would have had."""
    per_token = 2 * 4 * 2 * 16 * 4  # the tiny model's K and V bytes per token and layer group
    small = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=1024, progress=False,
                kv_cache_memory_bytes=16 * 16 * per_token, enable_prefix_caching=False)
    sch = small.engine.scheduler
    pending_at_preemption = []
    preempt = sch._preempt

    def recording(req, out):
        pending_at_preemption.append(req.num_pending)
        preempt(req, out)

    sch._preempt = recording
    rng = random.Random(9)
    prompts = _prompts(rng, 10)
    sps = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    got = small.generate(prompts, sps, use_tqdm=False)
    assert any(pending_at_preemption), pending_at_preemption  # preempted with a token in flight
    _same(got, sync_llm.generate(prompts, sps, use_tqdm=False))


def test_abort_while_a_step_is_in_flight(tiny_llm):
    eng = tiny_llm.engine
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    reqs = [r for p in _prompts(random.Random(10), 3) for r in eng.add_request(p["prompt_token_ids"], sp)]
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None and reqs[1] in eng._inflight[0]
    n = len(reqs[1].output_token_ids)
    eng.abort([reqs[1].request_id])  # its token in flight is dropped, its blocks are free at once
    assert reqs[1].finished and not reqs[1].block_ids
    while eng.has_unfinished():
        eng.step()
    assert len(reqs[1].output_token_ids) == n and reqs[1].num_pending == 0
    assert [len(r.output_token_ids) for r in (reqs[0], reqs[2])] == [50, 50]
    assert eng._inflight is None and eng.pool.all_free


def test_async_scheduling_off_under_the_flag(sync_llm):
    counter, restore = _launches(sync_llm)
    try:
        sync_llm.generate(_prompts(random.Random(11), 2), SamplingParams(max_tokens=5), use_tqdm=False)
    finally:
        restore()
    assert counter["n"] == 0 and not sync_llm.engine.async_scheduling
