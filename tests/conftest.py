"""Shared fixtures: the harmony vocabulary offline, a tiny random checkpoint, a CPU engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_TOKENIZER = ROOT.parent / "shared" / "tokenizer"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and _TOKENIZER.is_dir():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_TOKENIZER)

# the tiny test models run many small ops: one intra-op thread beats two fighting over 2 cores
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from gptoss.testing import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0, device="cpu")


@pytest.fixture(scope="session")
def tiny_llm(tiny_ckpt):
    from gptoss import LLM
    return LLM(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=1024, progress=False)


# --- engine invariants ------------------------------------------------------------------------------
# Every engine (and AsyncLLM) built during the run is registered here, weakly, by wrapping the
# constructors from the test side; the library carries no test hook. After each test, every engine
# still alive must be idle: no request left in the scheduler, every KV block back in the free pool
# with a zero reference count, and no AsyncLLM stream left open. A test that deliberately leaves work
# behind must clean it up itself.

import time  # noqa: E402
import weakref  # noqa: E402

from gptoss.engine.async_engine import AsyncLLM  # noqa: E402
from gptoss.engine.llm_engine import LLMEngine  # noqa: E402

_ENGINES: "weakref.WeakSet[LLMEngine]" = weakref.WeakSet()
_ASYNC: "weakref.WeakSet[AsyncLLM]" = weakref.WeakSet()


def _registering(cls, registry):
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        registry.add(self)

    __init__.__wrapped__ = init
    cls.__init__ = __init__


_registering(LLMEngine, _ENGINES)
_registering(AsyncLLM, _ASYNC)


def engine_leaks(engine: LLMEngine) -> list[str]:
    """What an idle engine should not hold (empty when it is clean)."""
    s, pool = engine.scheduler, engine.pool
    problems = []
    if engine._inflight is not None:
        problems.append(f"a step in flight that was never read back ({len(engine._inflight[0])} tokens)")
    if s.waiting or s.running or s.requests:
        problems.append(f"{len(s.running)} running, {len(s.waiting)} waiting, {len(s.requests)} registered "
                        f"requests left: {sorted(s.requests)[:5]}")
    for name, p in (("full", pool.full), ("sliding", pool.swa)):
        if p is None:
            continue
        held = [b for b, c in enumerate(p.ref_cnt) if c]
        if held or p.num_free_blocks != p.num_usable_blocks:
            problems.append(f"{name} pool: {p.num_usable_blocks - p.num_free_blocks} blocks not free, ref counts "
                            f"nonzero on {held[:8]}{'...' if len(held) > 8 else ''}")
    return problems


def _check_engines() -> list[str]:
    drivers = {id(a.engine): a for a in list(_ASYNC) if a.is_running}
    problems = []
    for engine in list(_ENGINES):
        a = drivers.get(id(engine))
        if a is not None:
            with a._turn():  # read between two engine steps
                found = engine_leaks(engine) + ([f"AsyncLLM streams left open: {sorted(a._streams)[:5]}"]
                                                if a._streams else [])
        else:
            found = engine_leaks(engine)
        problems += [f"engine {id(engine):#x}: {p}" for p in found]
    return problems


@pytest.fixture(autouse=True)
def engine_invariants():
    """After each test: every live engine is idle with all of its KV blocks free (see above)."""
    yield
    # a server's handler may still be closing a stream the client just left: give it a moment
    deadline = time.monotonic() + 10
    while (problems := _check_engines()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not problems, "engine left unclean after the test:\n  " + "\n  ".join(problems)
