"""LLM.generate on a tiny random checkpoint on CPU: every SamplingParams knob does what it says."""

import pytest
import torch

from gptoss import LLM, SamplingParams
from gptoss.config import ConfigError
from gptoss.tokenizer import decode, encode

P = [{"prompt_token_ids": [11, 22, 33, 44, 55, 66]}, {"prompt_token_ids": list(range(1000, 1030))}]


def greedy(llm, prompts, **kw):
    return llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, **kw), use_tqdm=False)


def test_order_lengths_and_text(tiny_llm):
    prompts = ["Hello there", {"prompt_token_ids": [5, 6, 7]}, "A third, longer prompt to keep things honest"]
    outs = tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello there", None, prompts[2]]
    assert outs[0].prompt_token_ids == encode("Hello there")
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.finish_reason == "length" and len(c.token_ids) == 7
        assert c.text == decode([t for t in c.token_ids if t < 199998])


def test_batch_equals_alone_fp32(tiny_llm):
    batch = greedy(tiny_llm, P, max_tokens=12)
    for p, b in zip(P, batch):
        alone = greedy(tiny_llm, [p], max_tokens=12)[0]
        assert alone.outputs[0].token_ids == b.outputs[0].token_ids


def test_seed_reproducible_and_n(tiny_llm):
    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=10, n=3, ignore_eos=True)
    a = tiny_llm.generate(P[:1], sp, use_tqdm=False)[0]
    b = tiny_llm.generate(P[:1], sp, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # the n samples differ
    # a seeded request samples the same tokens whatever else is in the batch
    mixed = tiny_llm.generate([P[1], P[0]], [SamplingParams(temperature=1.0, max_tokens=10), sp.clone(n=1)],
                              use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == a.outputs[0].token_ids


def test_top_k_1_is_greedy(tiny_llm):
    g = greedy(tiny_llm, P[:1], max_tokens=8)[0].outputs[0].token_ids
    k1 = tiny_llm.generate(P[:1], SamplingParams(top_k=1, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert k1[0].outputs[0].token_ids == g


def test_stop_token_ids_and_min_tokens(tiny_llm):
    ref = greedy(tiny_llm, P[:1], max_tokens=10)[0].outputs[0].token_ids
    stop_tok = ref[3]
    first = ref.index(stop_tok)
    o = greedy(tiny_llm, P[:1], max_tokens=10, stop_token_ids=[stop_tok])[0].outputs[0]
    assert o.token_ids == ref[:first + 1] and o.finish_reason == "stop" and o.stop_reason == stop_tok
    # min_tokens bans the stop token until reached, so the output runs past it
    o2 = greedy(tiny_llm, P[:1], max_tokens=10, stop_token_ids=[stop_tok], min_tokens=first + 2)[0].outputs[0]
    assert len(o2.token_ids) >= first + 2
    assert stop_tok not in o2.token_ids[:first + 2]


def test_stop_string_not_in_text(tiny_llm):
    ref = greedy(tiny_llm, P[:1], max_tokens=12)[0].outputs[0]
    text = ref.text
    assert len(text) > 6
    stop = text[4:7]
    o = greedy(tiny_llm, P[:1], max_tokens=12, stop=[stop, "never-appears"])[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == text[:text.index(stop)]


def test_stop_strings_across_pieces(tiny_llm):
    # the engine keeps the text in per-token pieces and looks for stop strings in the tail a new piece
    # could complete one in: stops that start the text, straddle pieces or end it
    text = greedy(tiny_llm, P[:1], max_tokens=12)[0].outputs[0].text
    assert len(text) > 12
    for start, n in [(0, 1), (0, 3), (1, 4), (3, 2), (5, 6), (len(text) - 3, 3), (len(text) - 1, 1)]:
        stop = text[start:start + n]
        o = greedy(tiny_llm, P[:1], max_tokens=12, stop=["never-appears", stop])[0].outputs[0]
        assert (o.finish_reason, o.stop_reason, o.text) == ("stop", stop, text[:text.index(stop)]), (start, n)


def test_request_text_pieces():
    from gptoss.engine.request import Request
    r = Request("r", [1], SamplingParams())
    assert r.text == "" and r.text_tail(3) == ""
    r.text_parts += ["ab", "cde", "f"]
    assert [r.text_tail(k) for k in (0, 1, 2, 4, 5, 99)] == ["", "f", "ef", "cdef", "bcdef", "abcdef"]
    assert r.text == "abcdef" and r.text_parts == ["abcdef"]  # joined once, on read
    r.text = "xy"
    assert r.text == "xy" and r.text_tail(1) == "y"
    r.text = ""
    assert r.text_parts == [] and r.text == ""


def test_eos_stops_unless_ignored(tiny_llm):
    eos = tiny_llm.engine.eos_token_ids
    assert 200002 in eos and 200012 in eos  # <|return|> and <|call|> from generation_config.json
    ref = greedy(tiny_llm, P[:1], max_tokens=6)[0].outputs[0].token_ids
    # make the model's 3rd greedy token an EOS by declaring it one for this engine
    eng = tiny_llm.engine
    saved = eng.eos_token_ids
    try:
        eng.eos_token_ids = saved + (ref[2],)
        o = tiny_llm.generate(P[:1], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0]
        assert o.token_ids == ref[:3] and o.finish_reason == "stop" and o.stop_reason is None
        o = tiny_llm.generate(P[:1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
        assert o.token_ids == ref
    finally:
        eng.eos_token_ids = saved


def test_logprobs_shape_and_consistency(tiny_llm):
    o = greedy(tiny_llm, P[:1], max_tokens=4, logprobs=3)[0].outputs[0]
    assert len(o.logprobs) == 4
    for tok, lps in zip(o.token_ids, o.logprobs):
        assert tok in lps and lps[tok].rank == 1  # greedy picks the top token
        assert 3 <= len(lps) <= 4
        vals = sorted((lp.logprob for lp in lps.values()), reverse=True)
        assert all(v <= 0 for v in vals) and lps[tok].logprob == pytest.approx(vals[0])


def test_top_p_min_p_restrict_choices(tiny_llm):
    ref = greedy(tiny_llm, P[:1], max_tokens=1, logprobs=2)[0].outputs[0]
    top = ref.token_ids[0]
    # a tiny top_p or a min_p of 1 leaves only the most likely token
    for sp in (SamplingParams(top_p=1e-6, max_tokens=1, seed=3), SamplingParams(min_p=1.0, max_tokens=1, seed=3)):
        for _ in range(3):
            assert tiny_llm.generate(P[:1], sp, use_tqdm=False)[0].outputs[0].token_ids == [top]


def test_penalties_change_repeats(tiny_llm):
    prompt = [{"prompt_token_ids": [7] * 12}]
    plain = greedy(tiny_llm, prompt, max_tokens=24)[0].outputs[0].token_ids
    pen = greedy(tiny_llm, prompt, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)[0].outputs[0].token_ids
    assert len(set(pen)) >= len(set(plain))
    rep = greedy(tiny_llm, prompt, max_tokens=24, repetition_penalty=50.0)[0].outputs[0].token_ids
    assert 7 not in rep  # a prompt token is heavily penalised
    assert len(set(rep)) == len(rep)


def test_max_model_len_caps_output(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=20, progress=False)
    o = llm.generate([{"prompt_token_ids": list(range(1, 16))}], SamplingParams(max_tokens=100, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert len(o.token_ids) == 5 and o.finish_reason == "length"
    with pytest.raises(ValueError, match=r"20 tokens; max_model_len=20"):
        llm.generate([{"prompt_token_ids": list(range(1, 21))}], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_bad_inputs_are_clear(tiny_llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [10 ** 7]}], use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished()  # the good prompt before it was not left queued
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(TypeError, match="prompts"):
        tiny_llm.generate(123, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p=0 must be a number in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="logprobs=21"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="n=0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="a list of 2"):
        tiny_llm.generate(P, [SamplingParams()], use_tqdm=False)


def test_unknown_backend_and_kwargs(tiny_ckpt):
    with pytest.raises(ValueError, match=r"unknown moe_backend 'nope'.*'torch'"):
        LLM(str(tiny_ckpt), moe_backend="nope", device="cpu", progress=False)
    with pytest.raises(TypeError, match="unknown argument.*tensor_paralel_size"):
        LLM(str(tiny_ckpt), tensor_paralel_size=2)
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        LLM(str(tiny_ckpt), kv_cache_dtype="int8")


def test_streaming_yields_growing_output(tiny_llm):
    seen = []
    for out in tiny_llm.generate_stream(P[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)):
        seen.append(list(out.outputs[0].token_ids))
    assert [len(s) for s in seen] == [1, 2, 3, 4, 5]
    assert seen[-1] == greedy(tiny_llm, P[:1], max_tokens=5)[0].outputs[0].token_ids


def test_streamed_outputs_share_one_prompt_copy(tiny_llm):
    # one copy of the prompt a request, not one a streamed token (a 32k prompt: ~50 us a copy, per
    # stream and step); the copy is the outputs', not the engine's
    prompt = {"prompt_token_ids": list(range(1, 40))}
    outs = list(tiny_llm.generate_stream(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    assert len(outs) == 4 and all(o.prompt_token_ids is outs[0].prompt_token_ids for o in outs)
    assert outs[0].prompt_token_ids == prompt["prompt_token_ids"]
    outs[0].prompt_token_ids.append(7)  # a caller's edit reaches neither the engine nor a new request
    again = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert again[0].prompt_token_ids == prompt["prompt_token_ids"]
    assert again[0].outputs[0].token_ids == outs[-1].outputs[0].token_ids


def test_bfloat16_on_cpu_runs(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="bfloat16", device="cpu", max_model_len=256, progress=False)
    o = llm.generate(P[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(o[0].outputs[0].token_ids) == 4
    assert llm.engine.model.embedding.dtype == torch.bfloat16


def test_engine_freezes_its_startup_objects(tiny_ckpt):
    # the startup objects go to the permanent generation (no full collection walks them later), and
    # a dropped LLM is still freed without a collection (its model and caches hold no cycle)
    import gc
    import weakref
    gc.unfreeze()
    llm = LLM(tiny_ckpt, max_model_len=256, max_num_seqs=2)
    assert gc.get_freeze_count() > 1000
    assert llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2),
                        use_tqdm=False)[0].outputs[0].token_ids
    model = weakref.ref(llm.engine.model)
    gc.disable()
    try:
        del llm
        assert model() is None, "a dropped engine waits for the cyclic collector"
    finally:
        gc.enable()


def test_stage_ranges_only_under_a_profiler(tiny_llm):
    # the forward's named ranges (scripts/profile_*.py read them) appear in a profiler's trace, and
    # without a profiler stage() enters nothing
    from torch.profiler import ProfilerActivity, profile

    from gptoss.profiling import stage
    assert type(stage("x")).__name__ == "nullcontext"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tiny_llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1), use_tqdm=False)
    names = {e.name for e in prof.events()}
    assert {"attn.qkv", "attn.core", "moe.router", "moe.experts", "unembed"} <= names, sorted(names)[:40]
