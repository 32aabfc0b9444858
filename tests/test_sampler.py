"""The sampler's batched penalties against a per-row reference on fresh random logits."""

from types import SimpleNamespace

import torch

from gptoss.engine.sampler import _penalize
from gptoss.sampling_params import SamplingParams


def _reference(row: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    row = row.clone()
    if p.repetition_penalty != 1.0:
        for t in set(prompt + output):
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return row


def test_batched_penalties_match_per_row_reference():
    g = torch.Generator().manual_seed(7)
    V = 50
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.7),
              SamplingParams(frequency_penalty=0.6, presence_penalty=0.3),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.1),
              SamplingParams(presence_penalty=2.0)]
    reqs = []
    for i, p in enumerate(params):
        prompt = torch.randint(0, V, (5 + 3 * i,), generator=g).tolist()
        output = torch.randint(0, V, (i * 4,), generator=g).tolist()  # row 0: no output yet
        reqs.append(SimpleNamespace(params=p, all_token_ids=prompt + output, output_token_ids=output,
                                    prompt=prompt))
    logits = torch.randn(len(reqs), V, generator=g) * 3
    want = torch.stack([_reference(logits[i], r.prompt, r.output_token_ids, r.params) for i, r in enumerate(reqs)])
    before = logits.clone()
    _penalize(logits, reqs)
    assert torch.allclose(logits, want, atol=1e-5)
    assert torch.equal(logits[0], before[0])  # no penalty asked: the row is untouched
    assert all(not torch.equal(logits[i], before[i]) for i in range(1, len(reqs)))
