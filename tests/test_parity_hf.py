"""The model against transformers' GptOssForCausalLM on the same checkpoint (MXFP4 dequantized), CPU fp32."""

import pytest
import torch

from gptoss import SamplingParams

transformers = pytest.importorskip("transformers")

STEPS = 16


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    from transformers import GptOssForCausalLM, Mxfp4Config
    m = GptOssForCausalLM.from_pretrained(str(tiny_ckpt), quantization_config=Mxfp4Config(dequantize=True),
                                          dtype=torch.float32)
    return m.eval()


def _prompts():
    g = torch.Generator().manual_seed(1234)
    # short, longer than the sliding window (8) and than a KV block (16), and one with harmony tokens
    return [torch.randint(0, 199998, (5,), generator=g).tolist(),
            torch.randint(0, 199998, (41,), generator=g).tolist(),
            [200006, 1428, 200008] + torch.randint(0, 199998, (20,), generator=g).tolist() + [200007, 200006]]


def test_greedy_tokens_and_logprobs_match_transformers(hf_model, tiny_llm):
    prompts = _prompts()
    sp = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
    outs = tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
            ref_lp = torch.log_softmax(hf_model(ids).logits[0, -1].float(), -1)
        c = o.outputs[0]
        assert c.token_ids == ref[0, len(p):].tolist()
        first = c.logprobs[0]
        assert len(first) >= 5
        for tok, lp in first.items():
            assert abs(lp.logprob - float(ref_lp[tok])) < 1e-4, tok
        # the top-5 we report are transformers' top-5
        assert set(ref_lp.topk(5).indices.tolist()) <= set(first)
