"""The step packing (ModelRunner._pack / unpack) against a plain per-token reference, and the decode
graphs' own unpacking (kernels.decode_inputs) against unpack."""

import random

import pytest
import torch

from gptoss.engine.model_runner import HEADER, ModelRunner, _HostBuffers
from gptoss.engine.request import Request
from gptoss.engine.scheduler import SchedulerOutput
from gptoss.sampling_params import SamplingParams
from interpreted import check_interpreted


def _step(rng, swa: bool, bs: int = 4):
    """A mixed step: a prefill chunk, a chunk that finishes its prompt, decodes, a sequence of one."""
    out = SchedulerOutput()
    for i, (n_prompt, n_out, computed, n) in enumerate([(30, 0, 8, 12), (9, 0, 4, 5), (7, 6, 12, 1),
                                                         (50, 20, 69, 1), (1, 0, 0, 1)]):
        r = Request(str(i), [rng.randrange(1000) for _ in range(n_prompt)], SamplingParams())
        r.output_token_ids = [rng.randrange(1000) for _ in range(n_out)]
        r.num_computed_tokens = computed
        nb = -(-(computed + n) // bs)
        r.block_ids = rng.sample(range(1, 500), nb)
        if swa:
            r.swa_block_ids = [0] * max(0, nb - 3) + rng.sample(range(1, 100), min(nb, 3))
        out.requests.append(r)
        out.num_scheduled_tokens[r.request_id] = n
    return out


@pytest.mark.parametrize("swa,pending", [(False, False), (True, False), (False, True)])
def test_pack_matches_a_per_token_reference(swa, pending):
    rng = random.Random(int(swa))
    runner = object.__new__(ModelRunner)  # _pack / unpack need only these four
    runner.block_size, runner.device, runner.kv_caches, runner.graphs = 4, torch.device("cpu"), [], None
    out = _step(rng, swa)
    all_ids = {r.request_id: r.all_token_ids for r in out.requests}
    prev = None
    if pending:
        # async scheduling: the two decoding requests' newest tokens are still on the device, in
        # rows 5 and 2 of the step before's sampled tokens
        prev = torch.tensor([rng.randrange(1000) for _ in range(6)])
        for i, row in ((2, 5), (3, 2)):
            r = out.requests[i]
            r.output_token_ids.pop()
            r.num_pending, r.pending_row = 1, row
            all_ids[r.request_id] = r.all_token_ids + [int(prev[row])]
    header, flat, samplers = runner._pack(out)
    ids, pos, ctx = runner.unpack(header, flat, prev)
    want_ids, want_pos, want_slots, want_swa, qsl, rows = [], [], [], [], [0], []
    for r in out.requests:
        n, a = out.num_scheduled_tokens[r.request_id], r.num_computed_tokens
        for p in range(a, a + n):
            want_ids.append(all_ids[r.request_id][p])
            want_pos.append(p)
            want_slots.append(r.block_ids[p // 4] * 4 + p % 4)
            if swa:
                want_swa.append(r.swa_block_ids[p // 4] * 4 + p % 4)
        qsl.append(qsl[-1] + n)
        if a + n == r.num_tokens:
            rows.append(qsl[-1] - 1)
    assert ids.tolist() == want_ids and pos.tolist() == want_pos
    assert ctx.slot_mapping.tolist() == want_slots
    assert ctx.query_start_loc.tolist() == qsl and ctx.logits_indices.tolist() == rows
    assert [r.request_id for r in samplers] == ["1", "2", "3", "4"]  # request 0 is mid-prompt
    assert ctx.seq_lens.tolist() == [r.num_computed_tokens + out.num_scheduled_tokens[r.request_id]
                                     for r in out.requests]
    W = max(len(r.block_ids) for r in out.requests)
    assert header[:HEADER] == [len(want_ids), 5, W, 4, 12, 70, int(swa), 2 if pending else 0]
    for i, r in enumerate(out.requests):
        assert ctx.block_tables[i].tolist() == r.block_ids + [0] * (W - len(r.block_ids))
        if swa:
            assert ctx.swa_block_tables[i].tolist() == r.swa_block_ids + [0] * (W - len(r.swa_block_ids))
            assert ctx.swa_slot_mapping.tolist() == want_swa
    assert (ctx.swa_block_tables is None) == (not swa)


def test_cached_tables_follow_every_change_the_kv_manager_makes():
    from gptoss.engine.kv_cache import KVCacheManager
    runner = object.__new__(ModelRunner)
    runner.block_size, runner.device, runner.kv_caches, runner.graphs = 4, torch.device("cpu"), [], None
    pool = KVCacheManager(256, 4, enable_prefix_caching=True, window=8, num_swa_blocks=32)
    r = Request("r", list(range(100, 130)), SamplingParams())

    def tables_match():
        out = SchedulerOutput()
        out.requests.append(r)
        out.num_scheduled_tokens[r.request_id] = 1
        _, _, ctx = runner.unpack(*runner._pack(out)[:2])
        W = len(r.block_ids)
        assert ctx.block_tables[0].tolist() == r.block_ids
        assert ctx.swa_block_tables[0].tolist() == r.swa_block_ids + [0] * (W - len(r.swa_block_ids))

    assert pool.allocate(r, 21)
    r.num_computed_tokens = 20
    tables_match()
    pool.release_out_of_window(r)  # zeroes the sliding blocks before the window, in place
    assert 0 in r.swa_block_ids
    tables_match()
    assert pool.allocate(r, 9)  # grows both tables
    r.num_computed_tokens = 28
    tables_match()
    r.num_computed_tokens = 29
    pool.cache_full_blocks(r)
    pool.free(r)  # preempted: all blocks back, then the prefix found again
    r.num_computed_tokens = 0
    assert pool.match_prefix(r) > 0 and pool.allocate(r, r.num_tokens - r.num_computed_tokens)
    r.num_computed_tokens = r.num_tokens - 1
    tables_match()
    # decode: a block every 4 tokens, a sliding block zeroed as the window moves on, and the arrays
    # outgrowing their first capacity (64 entries) on the way; each step updates a few entries only
    for _ in range(300):
        r.output_token_ids.append(7)
        assert pool.allocate(r, 1)
        pool.release_out_of_window(r)
        tables_match()
        r.num_computed_tokens += 1
    assert len(r.block_ids) > 64
    pool.free(r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_step_buffers_are_not_refilled_under_a_pending_copy():
    # on CUDA the packed step goes through two pinned buffers taken in turn; a step packed while the
    # copy out of the other one may still run must leave that step's device tensor as it was packed
    rng = random.Random(3)
    cpu = object.__new__(ModelRunner)
    cpu.block_size, cpu.device, cpu.kv_caches, cpu.graphs = 4, torch.device("cpu"), [], None
    gpu = ModelRunner.__new__(ModelRunner)
    gpu.block_size, gpu.device, gpu.kv_caches = 4, torch.device("cuda"), []
    gpu._host_steps, gpu.graphs = _HostBuffers(gpu.device), None
    steps = [_step(rng, swa=i % 2 == 1) for i in range(5)]
    torch.cuda._sleep(50_000_000)  # keep the stream busy: the copies queue behind it
    got = [gpu._upload(*gpu._pack(out)[:2]) for out in steps]
    torch.cuda.synchronize()
    for out, dev in zip(steps, got):
        assert torch.equal(dev.cpu(), cpu._pack(out)[1])
    assert len(gpu._host_steps.bufs) == 2 and all(b[0].is_pinned() for b in gpu._host_steps.bufs)


def _decode_step(rng, B: int, swa: bool, pending: bool, bs: int = 4) -> tuple[SchedulerOutput, int]:
    """B decoding sequences of mixed lengths (tables of different widths); pending: every other one's
    newest token is still on the device, at a shuffled row of the step before's S_prev tokens."""
    out, s_prev = SchedulerOutput(), B + 3
    rows = rng.sample(range(s_prev), B)
    for i in range(B):
        r = Request(str(i), [rng.randrange(1000) for _ in range(rng.randrange(1, 40))], SamplingParams())
        r.output_token_ids = [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
        r.num_computed_tokens = r.num_tokens - 1
        nb = -(-r.num_tokens // bs)
        r.block_ids = rng.sample(range(1, 500), nb)
        if swa:
            r.swa_block_ids = [0] * max(0, nb - 3) + rng.sample(range(1, 100), min(nb, 3))
        if pending and i % 2:
            r.output_token_ids.pop()  # num_tokens counts it still, as pending
            r.num_pending, r.pending_row = 1, rows[i]
        out.requests.append(r)
        out.num_scheduled_tokens[r.request_id] = 1
    return out, s_prev


@pytest.mark.parametrize("swa,pending", [(False, True), (True, True), (True, False)])
def test_decode_graph_unpacking_matches_unpack(swa, pending):
    # the graph's first kernel fills its static buffers from the packed step on the device; rows past
    # B are padding (slot -1, null block, one key) and table columns past W keep what they held
    check_interpreted(f"""
import random, sys, torch
sys.path.insert(0, "tests")
from gptoss.engine.model_runner import ModelRunner
from gptoss.kernels.decode_inputs import decode_inputs
from test_model_runner import _decode_step
rng = random.Random({int(swa) * 2 + int(pending)})
runner = object.__new__(ModelRunner)
runner.block_size, runner.device, runner.kv_caches, runner.graphs = 4, torch.device("cpu"), [], None
import gptoss.kernels.decode_inputs as D
rows, width = 8, 16
i64 = dict(dtype=torch.int64)
# BLOCK_F 512: the step unpacked from its first load (in a buffer of 512, as the graphs' are at least);
# 16: read in parts (BLOCK_W 4: tables over several blocks)
for bf, bw, B in ((512, 256, 1), (512, 256, 5), (512, 256, 8), (16, 256, 1), (16, 256, 5), (16, 4, 5), (16, 4, 8)):
    D.BLOCK_W, D.BLOCK_F = bw, bf
    out, s_prev = _decode_step(rng, B, {swa}, {pending})
    header, packed, _ = runner._pack(out)
    flat = torch.cat([packed, torch.randint(-99, 99, (max(0, 512 - packed.numel()),))])  # junk past the step
    assert bf == 16 or packed.numel() <= 512
    assert header[0] == header[1] == header[3] == B and header[4] == 1
    prev = torch.tensor([rng.randrange(1000) for _ in range(s_prev)])
    ids_ref, pos_ref, ctx = runner.unpack(header, packed.clone(), prev)
    tokens = torch.cat([prev, torch.full((rows,), -7, **i64)])
    junk = lambda *shape, dt=torch.int64: torch.randint(-99, 99, shape, dtype=dt)
    ids, pos, slots, swa_slots = junk(rows), junk(rows), junk(rows), junk(rows)
    seq_lens, tables, swa_tables = junk(rows, dt=torch.int32), junk(rows, width, dt=torch.int32), junk(rows, width, dt=torch.int32)
    t0, s0 = tables.clone(), swa_tables.clone()
    decode_inputs(flat, tokens, ids, pos, slots, seq_lens, tables, swa_slots if {swa} else None,
                  swa_tables if {swa} else None)
    W = header[2]
    assert torch.equal(ids[:B], ids_ref) and torch.equal(pos[:B], pos_ref), (ids, ids_ref)
    assert torch.equal(slots[:B], ctx.slot_mapping) and torch.equal(seq_lens[:B], ctx.seq_lens)
    assert torch.equal(tables[:B, :W], ctx.block_tables) and torch.equal(tables[:B, W:], t0[:B, W:])
    pad = slice(B, rows)
    assert (slots[pad] == -1).all() and (seq_lens[pad] == 1).all() and (tables[pad, 0] == 0).all()
    assert (ids[pad] == 0).all() and (pos[pad] == 0).all() and torch.equal(tables[pad, 1:], t0[pad, 1:])
    if {swa}:
        assert torch.equal(swa_slots[:B], ctx.swa_slot_mapping) and (swa_slots[pad] == -1).all()
        assert torch.equal(swa_tables[:B, :W], ctx.swa_block_tables) and (swa_tables[pad, 0] == 0).all()
        assert torch.equal(swa_tables[:B, W:], s0[:B, W:])
print("ok")
""")


def test_profile_run_keeps_each_sequence_within_max_model_len(tiny_llm, monkeypatch):
    # the engine measures activations with max_num_batched_tokens split over max_num_seqs; with a short
    # max_model_len that split made sequences longer than the rope table (an index error on CPU, an
    # out-of-bounds gather on the GPU). The scheduler never schedules more than max_num_seqs x max_len.
    runner, L = tiny_llm.engine.runner, tiny_llm.engine.max_model_len
    seen = []
    forward = runner.model.forward
    monkeypatch.setattr(runner.model, "forward",
                        lambda ids, pos, **kw: seen.append((ids.numel(), int(pos.max()))) or forward(ids, pos, **kw))
    runner.profile_run(4 * L + 5, 2, L)   # more tokens than two sequences can hold
    runner.profile_run(2 * L - 1, 2, L)   # one short of full: the remainder spread, none past L
    assert seen == [(2 * L, L - 1), (2 * L - 1, L - 1)]


class _TwinGraphs:
    """DecodeGraphs' contract with the runner, on CPU: the step arrives where upload puts it (`flat`,
    or in place: the host half staging handed out, halves taken in turn), pending tokens are read
    from `tokens` (copied in unless they are its own), and a replay leaves every row's argmax in
    `tokens` (in place, also in its half of the host tokens, handed on as `written`). The model runs
    eagerly, as the graph's kernels would."""

    def __init__(self, runner, max_batch: int, in_place: bool = False):
        self.runner, self.sizes, self.replays, self.copies = runner, [max_batch], 0, 0
        self.in_place, self.turn, self.written = in_place, 0, None
        self.flat = torch.zeros(1 << 16, dtype=torch.int64)
        self.host_flat = torch.full((2, 1 << 16), -7, dtype=torch.int64)  # stale until packed
        self.host_tokens = torch.full((2, max_batch), -1, dtype=torch.int64)
        self.tokens = torch.full((max_batch,), -1, dtype=torch.int64)

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    def holds(self, tokens) -> bool:
        return tokens is not None and tokens.data_ptr() == self.tokens.data_ptr()

    def staging(self, num_seqs, n):
        return self.host_flat[self.turn, :n] if self.in_place else None

    def upload(self, host):
        if self.in_place:
            assert host.data_ptr() == self.host_flat[self.turn].data_ptr(), "packed where the replay reads"
            return host
        self.flat[:host.numel()].copy_(host)
        return self.flat[:host.numel()]

    def run(self, header, flat, prev=None):
        from gptoss.engine.forward_context import set_forward_context
        src = self.host_flat[self.turn] if self.in_place else self.flat
        assert flat.data_ptr() == src.data_ptr(), "rank 0 uploads a replayed step where the graph reads it"
        if header[7] and not self.holds(prev):
            self.tokens[:prev.numel()].copy_(prev)
            self.copies += 1
        ids, pos, ctx = self.runner.unpack(header, flat.clone(), self.tokens)
        with set_forward_context(ctx):
            logits = self.runner.model(ids, pos, logits=True)
        self.tokens[:header[1]] = logits.argmax(-1)
        self.written = None
        if self.in_place:
            self.host_tokens[self.turn, :header[1]] = logits.argmax(-1)
            self.written = self.host_tokens[self.turn, :header[1]]
            self.host_flat[self.turn] = -7  # the half is free again: what the runner reads must be packed anew
            self.turn ^= 1
        self.replays += 1
        return logits


@pytest.mark.parametrize("greedy,in_place", [(True, False), (False, False), (True, True), (False, True)])
def test_replayed_steps_take_their_inputs_and_argmax_from_the_graphs(tiny_ckpt, greedy, in_place):
    # async scheduling hands each replay the step before's tokens: the graphs' own argmax when every
    # row was greedy (read in place), else the sampler's (copied in); the tokens must be the eager ones.
    # in_place: steps packed straight into the host half the replay reads, greedy tokens read back
    # from the host tokens the replay wrote (the twin clobbers a half once replayed)
    from gptoss import LLM
    sp = SamplingParams(temperature=0 if greedy else 0.8, seed=None if greedy else 5, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [3 + i, 50, 7 * i + 1, 90]} for i in range(3)]
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4, progress=False)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    runner = llm.engine.runner
    runner.graphs = twin = _TwinGraphs(runner, 4, in_place)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    one = llm.generate(prompts[1], sp, use_tqdm=False)[0].outputs[0].token_ids
    runner.graphs = None
    assert twin.replays >= 2 * 10 and got == want and one == want[1]
    # greedy: only a replay after an eager (prefill) step copies its pending tokens in, one a generate
    assert twin.copies <= 2 if greedy else twin.copies >= twin.replays - 2, (twin.copies, twin.replays)
