"""The command line, run as a user would (python -m gptoss ...)."""

import os
import subprocess
import sys

from conftest import ROOT


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gptoss", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_make_checkpoint_then_generate(tmp_path):
    r = run("make-checkpoint", str(tmp_path / "m"), "--preset", "tiny", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "config.json").exists() and "wrote a random tiny checkpoint" in r.stdout
    r = run("generate", str(tmp_path / "m"), "Hello there", "--max-tokens", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "[output]" in r.stdout and "(5 tokens)" in r.stdout


def test_bench_prints_a_table(tiny_ckpt):
    r = run("bench", str(tiny_ckpt), "--device", "cpu", "--output-len", "4", "--input-len", "8",
            "--ttft-prompt-len", "16", "--concurrency", "1", "2", "--runs", "1", "--max-model-len", "256")
    assert r.returncode == 0, r.stderr
    for needle in ("device: CPU", "decode batch 1", "TTFT 16-token prompt", "throughput c=2", "tok/s",
                   "step packing"):
        assert needle in r.stdout, r.stdout


def test_user_errors_are_one_line(tmp_path):
    r = run("generate", str(tmp_path / "missing"), "hi")
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", str(tmp_path), "hi", "--moe-backend", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_every_command_has_help():
    for cmd in ("generate", "chat", "serve", "bench", "make-checkpoint", "backends"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "usage: gptoss" in r.stdout, cmd


def test_parallel_flags_reach_the_engine(tiny_ckpt):
    # 4 attention heads do not split over 3 ranks: refused before any worker starts, in one line
    r = run("generate", str(tiny_ckpt), "hi", "--device", "cpu", "--tensor-parallel-size", "3",
            "--enable-expert-parallel")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tensor_parallel_size=3" in r.stderr, r.stderr


def test_bench_long_decode_mode(tiny_ckpt):
    r = run("bench", str(tiny_ckpt), "--device", "cpu", "--mode", "long_decode", "--long-context", "200",
            "--long-batch", "3", "--output-len", "4", "--runs", "1", "--concurrency", "3", "--max-model-len", "512",
            "--kv-cache-dtype", "fp8")
    assert r.returncode == 0, r.stderr
    assert "decode 3 x 200 ctx" in r.stdout and "kv fp8, 4 steps" in r.stdout, r.stdout
