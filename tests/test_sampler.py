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


def test_bf16_logits_sample_as_their_fp32_copy():
    """The model hands the sampler logits in its own dtype: greedy rows that nothing edits take the
    argmax as they are, the rest work on an fp32 copy; the tokens and logprobs are those of the fp32
    copy, and the caller's bf16 tensor is left as it was."""
    from gptoss.engine.request import Request
    from gptoss.engine.sampler import sample

    g = torch.Generator().manual_seed(11)
    V = 300

    def reqs(params, tokens):
        out = []
        for i, (p, (prompt, output)) in enumerate(zip(params, tokens)):
            r = Request(f"r{i}", prompt, p, output_token_ids=list(output))
            if p.seed is not None:
                r.generator = torch.Generator().manual_seed(p.seed)
            out.append(r)
        return out

    for params in ([SamplingParams(temperature=0)] * 3,
                   [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3),
                    SamplingParams(temperature=0.8, top_k=20, seed=5), SamplingParams(temperature=0, logprobs=2)]):
        logits = (torch.randn(len(params), V, generator=g) * 4).bfloat16()
        kept = logits.clone()
        tokens = [(torch.randint(0, V, (6,), generator=g).tolist(), torch.randint(0, V, (3,), generator=g).tolist())
                  for _ in params]
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        got = sample(logits, reqs(params, tokens), torch.Generator().manual_seed(seed))
        assert torch.equal(logits, kept)
        ref = sample(logits.float(), reqs(params, tokens), torch.Generator().manual_seed(seed))
        assert got.token_ids == ref.token_ids
        assert got.logprobs == ref.logprobs
        greedy = [i for i, p in enumerate(params) if p.temperature == 0 and p.repetition_penalty == 1.0]
        assert [got.token_ids[i] for i in greedy] == logits[greedy].float().argmax(-1).tolist()
