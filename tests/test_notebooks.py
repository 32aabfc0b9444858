"""The notebooks: committed with outputs, built from scripts/build_notebooks.py, and they run.

Each notebook is executed again here with nbclient (kernel python3, from notebooks/), and its key
outputs are checked: the quickstart's chat and streaming, and the MoE/quantization notebook's error
tables, whose numbers must be finite and in the ranges its text claims.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks need nbformat (pip install -e '.[notebooks]')")
nbclient = pytest.importorskip("nbclient", reason="the notebooks need nbclient (pip install -e '.[notebooks]')")
pytest.importorskip("ipykernel", reason="the notebooks need ipykernel (pip install -e '.[notebooks]')")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT_S = 180
MAX_NOTEBOOK_BYTES = 400_000  # committed outputs stay modest: small plots, no vocabularies


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "scripts" / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILDER = _builder()
NAMES = sorted(BUILDER.NOTEBOOKS)


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _cell_with(nb, needle: str):
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in _text(c)]
    assert cells, f"no cell printed {needle!r}"
    return cells[0]


def test_every_notebook_file_is_built():
    assert {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_builder_and_has_outputs(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path} is {path.stat().st_size} bytes"
    committed = nbformat.read(path, as_version=4)
    nbformat.validate(committed)
    built = BUILDER.build(name)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], \
        f"{path} is out of date: run python scripts/build_notebooks.py {name}"
    assert committed.metadata.kernelspec.name == "python3"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "committed without running every cell"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    # every cell shows its result, except the first (setup) and the last (clean-up)
    assert all(c.outputs for c in code[1:-1]), [c.id for c in code[1:-1] if not c.outputs]


def _execute(name: str):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:  # run from the sources alone: no committed output can leak into the checks
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # raises CellExecutionError, with the cell and its traceback, if any cell fails
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    return nb


@pytest.mark.slow
def test_quickstart_notebook_runs():
    nb = _execute("quickstart")
    out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "MoE backend 'torch', dtype torch.float32, device cpu" in out
    assert re.search(r"5 prompt tokens, 12 generated, finish_reason='length'", out)
    assert "reasoning: The user asks for the capital of France. It is Paris." in out
    assert "content:   The capital of France is Paris." in out
    assert "parsed answer: {'city':" in out  # the JSON answer parsed
    m = re.search(r"(\d+) updates: \[", out)
    assert m and int(m.group(1)) == 10  # one streamed update per token
    assert "whole turn: ParsedTurn(" in out


def _parse_error_table(text: str) -> dict[tuple[str, str], tuple[float, float]]:
    lines = text.splitlines()
    formats = [f.strip() for f in lines[0].split("|")[1:]]
    table = {}
    for line in lines[2:]:
        if not line.strip():
            continue
        name, *cells = line.split("|")
        tensor = re.sub(r"\s+\(\d+, \d+\)\s*$", "", name).strip()
        for fmt, cell in zip(formats, cells):
            rel_rms, rel_max = (float(v) for v in cell.split())
            table[tensor, fmt] = (rel_rms, rel_max)
    return table


@pytest.mark.slow
def test_moe_and_quantization_notebook_runs():
    nb = _execute("moe_and_quantization")

    backends = _text(_cell_with(nb, "auto picks:"))
    assert re.search(r"^torch\s+runs here$", backends, re.M)
    assert "auto picks: torch" in backends

    lines = _text(_cell_with(nb, "torch backend, float32")).splitlines()
    errs = {}
    for line in lines[2:]:
        name, max_err, rms_err = re.match(r"^(.*?)\s+(\S+)\s+(\S+)$", line).groups()
        errs[name] = (float(max_err), float(rms_err))
    assert all(math.isfinite(v) for pair in errs.values() for v in pair)
    assert errs["torch backend, float32"][0] < 1e-5  # float32 vs float64: rounding only
    assert 1e-4 < errs["torch backend, bfloat16"][0] < 2e-2  # the tests' bf16 bound
    for name in ("fp8 per-token activations (triton_fp8's math)", "mxfp8 activations (triton_mxfp8's math)"):
        assert 5e-3 < errs[name][0] < 0.1 and 5e-3 < errs[name][1] < 0.075, (name, errs[name])

    table = _parse_error_table(_text(_cell_with(nb, "rel RMS  max/amax")))
    assert len(table) == 8 * 4, sorted(table)
    assert all(math.isfinite(v) and v >= 0 for pair in table.values() for v in pair)
    exact = "experts gate_up (ckpt, MXFP4)"
    assert table[exact, "mxfp4"] == (0.0, 0.0) and table[exact, "mxfp8"] == (0.0, 0.0)
    for (tensor, fmt), (rel_rms, rel_max) in table.items():
        if tensor == exact and fmt in ("mxfp4", "mxfp8"):
            continue
        if fmt == "mxfp4":
            assert 0.09 <= rel_rms <= 0.2 and rel_max <= 0.2, (tensor, fmt, rel_rms, rel_max)
        else:  # e4m3: |error| <= 2^-4 |x|
            assert 0.01 <= rel_rms <= 0.04 and rel_max <= 2 ** -4 * (1 + 1e-5), (tensor, fmt, rel_rms, rel_max)
    for tensor in ("gaussian", "embedding rows (ckpt, bf16)", "MoE input x (forward pass)"):
        assert 0.1 <= table[tensor, "mxfp4"][0] <= 0.13  # "about an eighth", as the notebook says

    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the error histograms and the error-vs-scale plot
