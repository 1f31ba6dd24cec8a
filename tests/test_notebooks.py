"""The notebooks run top to bottom on tiny settings (alignment on the tiny pipeline), so they never rot."""

import os

import jax
import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "sharding",
                                  # in the worker that builds pipeline_dir for its other users (tests/conftest.py
                                  # groups them by their fixturenames; this one asks for it by name)
                                  pytest.param("alignment", marks=pytest.mark.xdist_group("pipeline"))])
def test_notebook_executes(name, request, monkeypatch):
    if name == "alignment":
        monkeypatch.setenv("LLMJAX_PIPELINE", request.getfixturevalue("pipeline_dir"))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # a notebook sees the devices a user's machine has
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()  # raises at the first cell that fails (the quickstart asserts that its loss falls)
    assert all(cell.execution_count for cell in notebook.cells if cell.cell_type == "code")
