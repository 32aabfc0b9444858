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


def test_async_scheduling_under_tp_matches_single_process(tiny_llm, tiny_ckpt):
    """Async steps under TP: rank 0 broadcasts the tokens a step's placeholders need, and every rank
    fills them on its own device. Requests of different lengths, one whose penalty makes some steps
    synchronous, and one that stops on a token string: the same tokens, text and finish reasons as
    one process, with placeholders really sent."""
    prompts = PROMPTS + [{"prompt_token_ids": list(range(900, 913))}, {"prompt_token_ids": [5, 6, 7, 8]}]
    sps = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3),
           SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)]
    single = tiny_llm.generate(prompts, sps, use_tqdm=False)
    # a stop string taken from the single-process text, so that the stop really happens mid-way
    text = single[3].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    sps[3] = SamplingParams(temperature=0, max_tokens=11, ignore_eos=True, stop=[stop])
    single = tiny_llm.generate(prompts, sps, use_tqdm=False)
    assert single[3].outputs[0].finish_reason == "stop"
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=256, progress=False,
              tensor_parallel_size=2)
    try:
        assert llm.engine.async_scheduling
        runner, pending_steps = llm.engine.runner, []
        pack = runner._pack

        def counting_pack(out):
            header, flat, samplers = pack(out)
            pending_steps.append(header[7])
            return header, flat, samplers

        runner._pack = counting_pack
        got = llm.generate(prompts, sps, use_tqdm=False)
        assert sum(1 for p in pending_steps if p) >= 3
        assert pending_steps[1:].count(0) >= 3  # decode steps made synchronous by the penalty
        for a, b in zip(got, single):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].text == b.outputs[0].text
            assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    finally:
        llm.engine.shutdown()


def test_workers_outlive_an_idle_engine(tiny_ckpt):
    """A server with TP sits idle between requests: the workers wait for the next step longer than
    the collectives' 120 s timeout (they used to exit with a gloo recv timeout, and the next request
    failed), and the engine still answers afterwards."""
    from gptoss.engine.tp import TIMEOUT
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=256, progress=False,
              tensor_parallel_size=2)
    try:
        before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, use_tqdm=False)]
        time.sleep(TIMEOUT.total_seconds() + 5)
        assert all(p.is_alive() for p in llm.engine.workers.procs)
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, use_tqdm=False)] == before
    finally:
        llm.engine.shutdown()


def test_unguarded_script_is_a_clear_error(tiny_ckpt, tmp_path):
    """Workers are spawned and re-import the script that creates the LLM: without the
    `if __name__ == "__main__":` guard each dies while starting. Rank 0 says so at once instead of
    waiting 120 s for them and failing with a store timeout."""
    import subprocess
    import sys
    script = tmp_path / "unguarded.py"
    script.write_text("from gptoss import LLM\n"
                      f"LLM({str(tiny_ckpt)!r}, dtype='float32', device='cpu', max_model_len=256, progress=False, "
                      "tensor_parallel_size=2)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert r.returncode != 0
    assert "exited while starting" in r.stderr and 'if __name__ == "__main__":' in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 60


def test_second_shutdown_leaves_a_newer_engine_alone(tiny_ckpt):
    """An engine shut down before may be shut down again (its __del__ does, whenever the garbage
    collector gets to it): that must not destroy the process group a newer TP engine is using."""
    kw = dict(dtype="float32", device="cpu", max_model_len=256, progress=False, tensor_parallel_size=2)
    old = LLM(str(tiny_ckpt), **kw)
    old.engine.shutdown()
    llm = LLM(str(tiny_ckpt), **kw)
    try:
        old.engine.shutdown()
        old.engine.workers.__del__()
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, use_tqdm=False)]
        assert all(len(t) == SP.max_tokens for t in got)
    finally:
        llm.engine.shutdown()
