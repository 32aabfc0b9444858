"""Tensor and expert parallelism on CPU (gloo): the same greedy tokens as one process, and a dead
worker is a clear error rather than a hang."""

import os
import signal
import time

import pytest

from gptoss import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": [11, 22, 33, 44, 55, 66, 77]}, {"prompt_token_ids": list(range(500, 541))}]
SP = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llm):
    return [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, SP, use_tqdm=False)]


@pytest.mark.parametrize("tp,ep", [(2, False), (2, True), (4, True)])
def test_parallel_matches_single_process(tiny_ckpt, reference, tp, ep):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=256, progress=False,
              tensor_parallel_size=tp, enable_expert_parallel=ep)
    try:
        spec = llm.engine.model.moe_spec
        if ep:
            assert spec.local_experts == 4 // tp and spec.intermediate_size == 64
        else:
            assert spec.local_experts == 4 and spec.intermediate_size == 64 // tp
        assert llm.engine.model.layers[0].attn.num_heads == 4 // tp
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, use_tqdm=False)]
        assert got == reference
    finally:
        procs = list(llm.engine.workers.procs)
        llm.engine.shutdown()
    assert all(not p.is_alive() for p in procs)  # no orphans


def test_killed_worker_is_a_clear_error(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=256, progress=False,
              tensor_parallel_size=2)
    try:
        victim = llm.engine.workers.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="worker gptoss-tp1 exited"):
            llm.generate(PROMPTS, SP, use_tqdm=False)
        assert time.monotonic() - t0 < 30
        assert not llm.engine.has_unfinished()  # the failed call left nothing queued
    finally:
        llm.engine.shutdown()


def test_bad_parallel_sizes(tiny_ckpt):
    with pytest.raises(ValueError, match="4 attention heads do not split evenly over tensor_parallel_size=3"):
        LLM(str(tiny_ckpt), device="cpu", tensor_parallel_size=3, enable_expert_parallel=True, progress=False)
    from gptoss.config import ModelConfig
    from gptoss.distributed import check_parallel_sizes
    with pytest.raises(ValueError, match="32 experts do not split evenly over 64"):
        check_parallel_sizes(ModelConfig(num_attention_heads=64), 64, True)
