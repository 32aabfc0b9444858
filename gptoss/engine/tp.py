"""Tensor / expert parallel worker processes: ranks 1..N-1 of the group, started and stopped by rank 0.

Rank 0 (the engine's process) schedules and samples; every step it broadcasts the step's header
(host ints, over a gloo group: a worker learns of the step as soon as rank 0 launches it, not when
rank 0's GPU gets to it), its packed int64 tensor (on the device) and, when the step has pending
tokens (async scheduling), the tokens rank 0 sampled the step before, so that every rank fills the
placeholders the same way on its own device. All ranks run the forward in lockstep, all-reducing
after attention and after the MoE. Only tensors cross between processes (torch.distributed over
127.0.0.1: gloo on CPU, NCCL on GPUs); the spawn arguments travel over multiprocessing's local pipe.
Workers are daemons, so they end with the engine's process; a dead worker turns the next step into a
clear error instead of a hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..distributed import ParallelState
from .kv_cache import KVLayout
from .model_runner import HEADER

CMD_STEP, CMD_STOP = 1, 0
TIMEOUT = datetime.timedelta(seconds=120)
# the workers wait for the next step's header as long as the engine sits idle (a server between
# requests): no timeout there. A rank 0 that dies closes the sockets, which ends the wait at once.
IDLE_TIMEOUT = datetime.timedelta(days=365)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, device: torch.device, procs=()) -> None:
    """Joins the process group. Rank 0 first waits for every worker to check in at the store while
    watching its process, so a worker that dies while starting is an error at once, not a 120 s hang."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # rank 0's device may be plain "cuda": the current one, index 0
        torch.cuda.set_device(device.index if device.index is not None else 0)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=TIMEOUT, wait_for_workers=False)
    if rank:
        store.set(f"ready{rank}", "1")
    else:
        keys = [f"ready{r}" for r in range(1, world)]
        deadline = time.monotonic() + TIMEOUT.total_seconds()
        while not store.check(keys):
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(
                    f"tensor-parallel worker {dead[0].name} exited while starting (code {dead[0].exitcode}; its "
                    "error is printed above). If it is about bootstrapping: workers are spawned processes that "
                    "import the script creating the LLM, so guard its top level with "
                    "`if __name__ == \"__main__\":`")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within {TIMEOUT.total_seconds():.0f} s")
            time.sleep(0.05)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)


def _rank_device(base: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if base.type == "cuda" else base


class WorkerGroup:
    def __init__(self, config, device: torch.device):
        self.world = config.tensor_parallel_size
        if device.type == "cuda" and torch.cuda.device_count() < self.world:
            raise ValueError(f"tensor_parallel_size={self.world} needs {self.world} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        if dist.is_initialized():
            raise RuntimeError("another tensor-parallel engine is running in this process; shut it down "
                               "first (llm.engine.shutdown())")
        self.device = device
        port = _free_port()
        ctx = mp.get_context("spawn")
        cfg = dataclasses.asdict(config)
        self.procs = [ctx.Process(target=_worker_main, args=(r, self.world, port, cfg, device.type),
                                  daemon=True, name=f"gptoss-tp{r}") for r in range(1, self.world)]
        for p in self.procs:
            p.start()
        try:
            _init(0, self.world, port, device, self.procs)
        except BaseException:
            for p in self.procs:
                p.kill()
                p.join(timeout=5)
            raise
        # this group owns the process's torch.distributed state until its shutdown; a second shutdown
        # (the __del__ of an engine shut down before) must not destroy the state of a newer group
        self._live = True
        self._closed = False
        self.host_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)  # every rank creates it, in order
        self.parallel_state = ParallelState(self.world, 0, config.enable_expert_parallel, dist.group.WORLD)

    def _check_alive(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            self._closed = True
            raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited (code {dead[0].exitcode}); "
                               f"the engine cannot continue: create a new LLM")

    def agree_min(self, value: int) -> int:
        self._check_alive()
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def send_layout(self, layout) -> None:
        dist.broadcast(torch.tensor([layout.num_blocks, layout.num_swa_blocks, layout.window or 0,
                                     layout.max_chunk], dtype=torch.int64, device=self.device), src=0)

    def send_step(self, header: list[int], flat: torch.Tensor, prev_tokens: torch.Tensor | None) -> None:
        """The step to every worker; prev_tokens: the tokens sampled the step before, when this step
        has pending placeholders (header[7] > 0). Nothing here waits for rank 0's device."""
        self._check_alive()
        try:
            dist.broadcast(torch.tensor([CMD_STEP, flat.numel()] + header, dtype=torch.int64), src=0,
                           group=self.host_group)
            dist.broadcast(flat, src=0)
            if header[7]:
                dist.broadcast(prev_tokens, src=0)
        except RuntimeError as e:
            self._check_alive()
            raise RuntimeError(f"tensor-parallel broadcast failed: {e}") from None

    def shutdown(self) -> None:
        if not getattr(self, "_live", False):
            return
        self._live = False
        try:
            if not self._closed and all(p.is_alive() for p in self.procs):
                dist.broadcast(torch.tensor([CMD_STOP] + [0] * (HEADER + 1), dtype=torch.int64), src=0,
                               group=self.host_group)
        except RuntimeError:
            pass
        self._closed = True
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []
        if dist.is_initialized():
            dist.destroy_process_group()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


def _worker_main(rank: int, world: int, port: int, cfg: dict, device_type: str) -> None:
    # the rank's own process: build its slice of the model, then run forwards until told to stop
    from ..config import EngineConfig, ModelConfig
    from ..model.weights import resolve_model_path
    from .llm_engine import _DTYPES
    from .worker import Worker

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    config = EngineConfig(**cfg)
    device = _rank_device(torch.device(device_type), rank)
    try:
        _init(rank, world, port, device)
        host_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        root = resolve_model_path(config.model, config.revision)
        mc = ModelConfig.from_json(root / "config.json")
        dtype = _DTYPES.get(config.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        max_len = config.max_model_len or mc.max_position_embeddings
        par = ParallelState(world, rank, config.enable_expert_parallel, dist.group.WORLD)
        worker = Worker(config, root, mc, device, dtype, max_len, par, progress=False)
        # agree on the cache size with rank 0, then take the split rank 0 planned
        mine = worker.kv_budget_that_fits(config) if device.type == "cuda" else 2 ** 62
        t = torch.tensor([mine], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        layout = torch.zeros(4, dtype=torch.int64, device=device)
        dist.broadcast(layout, src=0)
        nb, nswa, window, chunk = layout.tolist()
        runner = worker.init_runner(KVLayout(nb, nswa, window or None, chunk), config)
        if worker.uses_cuda_graphs(config):  # in step with rank 0's capture: the all-reduces pair up
            runner.capture_cuda_graphs(config.max_num_seqs, max_len, window > 0, with_logits=False)
        prev_samplers = 0  # rows the step before sampled on rank 0
        while True:
            head = torch.zeros(HEADER + 2, dtype=torch.int64)
            dist.broadcast(head, src=0, group=host_group)
            cmd, n, *header = head.tolist()
            if cmd == CMD_STOP:
                break
            flat = torch.empty(n, dtype=torch.int64, device=device)
            dist.broadcast(flat, src=0)
            prev = None
            if header[7]:  # pending placeholders: rank 0's tokens of the step before
                prev = torch.empty(prev_samplers, dtype=torch.int64, device=device)
                dist.broadcast(prev, src=0)
            runner.forward(header, flat, prev)
            prev_samplers = header[3]
    except Exception:
        traceback.print_exc()
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
