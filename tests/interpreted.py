"""Runs test code in a child Python with TRITON_INTERPRET=1, which must be set before triton
decorates a kernel (one process cannot hold both compiled and interpreted kernels)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python *args` from the project root with TRITON_INTERPRET=1 and the project importable."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def check_interpreted(code: str, timeout: int = 300) -> None:
    """Runs `code`, which must print exactly 'ok' when its checks pass."""
    r = run_interpreted(["-c", code], timeout)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-3000:] + r.stderr[-3000:]
