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
