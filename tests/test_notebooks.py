"""The committed notebooks: built from their sources, without outputs.

The notebooks themselves run under ``--nbmake`` (``pyproject.toml``), at the
small sizes ``notebooks/conftest.py`` selects.
"""

from __future__ import annotations

import importlib.util
import pathlib

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _build_module():
  spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "_build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


build = _build_module()
COMMITTED = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_has_a_source_and_every_source_a_notebook():
  assert {p.name for p in COMMITTED} == {p.name for p in build.targets().values()}
  assert {"quickstart.ipynb", "custom_method.ipynb"} <= {p.name for p in COMMITTED}


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_notebook_is_built_from_its_source(path):
  source = build.SOURCES / f"{path.stem}.py"
  assert build.is_current(source, path), "rebuild with: python notebooks/_build.py"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_notebook_has_no_outputs_and_the_python3_kernel(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  assert notebook.metadata.kernelspec.name == "python3"
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code, "a notebook without code"
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_notebook_shrinks_under_the_ci_flag(path):
  # CI executes every notebook with MTGRAD_NOTEBOOK_SMALL=1 (notebooks/conftest.py).
  code = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)
  assert 'os.environ.get("MTGRAD_NOTEBOOK_SMALL") == "1"' in code


def test_build_parses_cells_and_rejects_unknown_markers():
  cells = build.cells("header\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\n")
  assert [(c.cell_type, c.source) for c in cells] == [
    ("markdown", "# Title\n\ntext"),
    ("code", "x = 1"),
  ]
  with pytest.raises(ValueError, match="unknown cell marker"):
    build.cells("# %% [raw]\n")
  with pytest.raises(ValueError, match="does not start with"):
    build.cells("# %% [markdown]\nnot a comment\n")
