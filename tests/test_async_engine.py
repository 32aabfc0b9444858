"""The asyncio engine: streaming outputs, cancellation frees blocks, bad input fails alone."""

import asyncio
import random

import pytest

from gptoss import LLM, SamplingParams
from gptoss.engine.async_engine import AsyncLLM
from gptoss.outputs import TokenPrefix


@pytest.fixture(scope="module")
def async_llm(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False, max_num_seqs=64)
    ref = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512, progress=False)
    a = AsyncLLM(llm.engine)
    yield llm, a, ref
    a.shutdown()


def test_stream_matches_offline(async_llm):
    llm, a, ref_llm = async_llm
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def run():
        return [o async for o in a.generate(prompt, sp)]

    outs = asyncio.run(run())
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 7))
    # each streamed output shares the request's token list (no copy a token) and still reads as the
    # snapshot it was: the final list's first k ids
    final = list(outs[-1].outputs[0].token_ids)
    assert all(isinstance(o.outputs[0].token_ids, TokenPrefix) for o in outs)
    assert all(o.outputs[0].token_ids == final[:k + 1] for k, o in enumerate(outs))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].token_ids == ref_llm.generate({"prompt_token_ids": prompt}, sp,
                                                          use_tqdm=False)[0].outputs[0].token_ids


def test_token_prefix_reads_as_the_snapshot_list():
    ids = [11, 12, 13, 14]
    p = TokenPrefix(ids, 3)
    ids += [15, 16]  # the engine appends after the output was made
    snap = [11, 12, 13]
    assert len(p) == 3 and list(p) == snap and p == snap and p == tuple(snap) and p != ids
    assert [p[i] for i in range(-3, 3)] == [snap[i] for i in range(-3, 3)]
    for sl in (slice(None), slice(1, None), slice(None, -1), slice(0, 10), slice(None, None, 2), slice(5, 9),
               slice(None, None, -1)):
        assert p[sl] == snap[sl], sl
    for bad in (3, -4, 100):
        with pytest.raises(IndexError, match=f"token index {bad} out of range for 3 tokens"):
            p[bad]
    assert repr(p) == repr(snap) and TokenPrefix(ids) == ids


def test_cancel_half_of_100_streams(async_llm):
    llm, a, ref_llm = async_llm
    rng = random.Random(1)
    prompts = [[rng.randrange(199998) for _ in range(rng.randint(4, 30))] for _ in range(100)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def consume(i, p):
        n = 0
        async for o in a.generate(p, sp, request_id=f"c{i}"):
            n = len(o.outputs[0].token_ids)
            if i % 2 and n >= 3:
                return ("cancelled", n, None)  # leaving the loop closes the generator: an abort
        return ("done", n, o.outputs[0].token_ids)

    async def run():
        return await asyncio.gather(*(consume(i, p) for i, p in enumerate(prompts)))

    results = asyncio.run(run())
    assert all(r[0] == "done" and r[1] == 12 for r in results[::2])
    assert all(r[0] == "cancelled" for r in results[1::2])
    pool = llm.engine.pool
    assert pool.all_free
    assert not llm.engine.has_unfinished() and not llm.engine.scheduler.requests
    # the survivors are right: same tokens as offline
    ref = ref_llm.generate([{"prompt_token_ids": p} for p in prompts[:10:2]], sp, use_tqdm=False)
    assert [r.outputs[0].token_ids for r in ref] == [r[2] for r in results[:10:2]]


def test_bad_request_fails_alone(async_llm):
    llm, a, ref_llm = async_llm
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def good():
        return [o async for o in a.generate([1, 2, 3], sp)][-1]

    async def bad():
        async for _ in a.generate([10 ** 8], sp):
            pass

    async def run():
        return await asyncio.gather(good(), bad(), return_exceptions=True)

    ok, err = asyncio.run(run())
    assert ok.finished and len(ok.outputs[0].token_ids) == 4
    assert isinstance(err, ValueError) and "outside the vocabulary" in str(err)
    assert a.is_running


def test_sync_generate_refuses_an_async_driven_engine(async_llm):
    llm, a, _ = async_llm
    with pytest.raises(RuntimeError, match="AsyncLLM"):
        llm.generate({"prompt_token_ids": [1, 2]}, use_tqdm=False)
