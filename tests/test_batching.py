"""Continuous batching is invisible in the output: a batch gives each prompt's tokens as if alone."""

import random

from gptoss import SamplingParams


def test_64_mixed_prompts_batch_equals_alone(tiny_llm):
    rng = random.Random(64)
    prompts = [{"prompt_token_ids": [rng.randrange(199998) for _ in range(rng.randint(1, 500))]} for _ in range(64)]
    sps = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 32), ignore_eos=True) for _ in prompts]
    eng = tiny_llm.engine
    saved = eng.scheduler.max_num_batched_tokens
    try:
        # a small token budget forces chunked prefill mixed with decodes in the same steps
        eng.scheduler.max_num_batched_tokens = 256
        batch = tiny_llm.generate(prompts, sps, use_tqdm=False)
    finally:
        eng.scheduler.max_num_batched_tokens = saved
    for p, sp, b in zip(prompts, sps, batch):
        alone = tiny_llm.generate(p, sp, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(b.outputs[0].token_ids) == sp.max_tokens
