"""Every examples/*.py runs, offline on CPU, with the tiny random checkpoint it makes for itself.

A new example gets a test case automatically (the parametrisation globs the folder) and fails until
it has an entry in EXPECT, so no example goes untested.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 180

# example -> (arguments, substrings its stdout must contain, modules it needs beyond the core install)
# The substrings are what holds for any weights: the grammar forces a tool call under
# tool_choice="required" and schema-valid JSON under json_schema, even from a random model.
EXPECT: dict[str, tuple[list[str], list[str], list[str]]] = {
    "quickstart.py": ([], ["[PROMPT] 'The capital of France is'", "[OUTPUT]", "[STREAM FINISH] length",
                           "[REASONING]", "[ANSWER]", "[FINISH]"], []),
    "chat_with_tools.py": ([], ["[USER] What is the weather in Paris?", "[TOOL CALL] get_weather({",
                                "[FINISH] tool_calls", "[TOOL RESULT] {'city':", "[FINAL]"], []),
    "structured_output.py": ([], ["[GENERATE PARSED] {'name':", "(finish_reason=stop)",
                                  "[CHAT PARSED] {'name':"], []),
    "benchmark.py": ([], ["device: CPU", "decode batch 1", "TTFT 64-token prompt", "throughput c=4",
                          "[RESULT] decode batch 1 ="], []),
    # without --base-url it serves the tiny model in-process; seed 1 gives a complete call in 192 tokens
    "openai_chat_client_function_calling.py": (
        ["--tool-choice", "required", "--seed", "1"],
        ["[USER PROMPT] What is the weather like in SF?", "[RESPONSE 1] [FUNCTION CALL] get_", "(**{",
         "\n[RESPONSE 2]"],
        ["openai", "fastapi", "uvicorn"]),
}


def _env() -> dict:
    env = dict(os.environ)  # TIKTOKEN_ENCODINGS_BASE comes from conftest.py when the repo has a copy
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # the tiny model runs many small ops: one thread per process beats threads fighting over 2 cores
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_every_example_has_an_expectation():
    found = {p.name for p in EXAMPLES.glob("*.py")}
    assert found, "no examples found"
    assert not set(EXPECT) - found, f"EXPECT names examples that do not exist: {sorted(set(EXPECT) - found)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(name):
    if name not in EXPECT:
        pytest.fail(f"examples/{name} has no entry in tests/test_examples.py EXPECT (arguments, expected output)")
    args, needles, modules = EXPECT[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"examples/{name} needs {missing} (pip install -e '.[test,serve]')")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stdout, f"{needle!r} missing from the output of examples/{name}:\n{proc.stdout}"
