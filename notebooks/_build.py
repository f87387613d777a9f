"""Builds ``notebooks/*.ipynb`` from their percent-format sources in ``notebooks/src/``.

The sources are plain Python (reviewable, linted by ruff); the notebooks are
generated from them with no outputs, so the two never drift apart
(``tests/test_notebooks.py`` checks it)::

  python notebooks/_build.py          # rewrite every notebook from its source
  python notebooks/_build.py --check  # exit 1 if a notebook is out of date

Format: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose
lines are comments (``# `` is stripped). Lines before the first marker (a
docstring, ruff directives) are not part of the notebook.
"""

from __future__ import annotations

import json
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = HERE / "src"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def _strip_blank(lines: list[str]) -> list[str]:
  while lines and not lines[0].strip():
    lines = lines[1:]
  while lines and not lines[-1].strip():
    lines = lines[:-1]
  return lines


def _uncomment(line: str) -> str:
  if line.strip() == "#":
    return ""
  if not line.startswith("# "):
    raise ValueError(f"markdown line does not start with '# ': {line!r}")
  return line[2:]


def cells(text: str) -> list[nbformat.NotebookNode]:
  """The notebook cells of a percent-format source."""
  chunks: list[tuple[str, list[str]]] = []
  for line in text.splitlines():
    if line.startswith("# %%"):
      kind = line[len("# %%") :].strip()
      if kind not in ("", "[markdown]"):
        raise ValueError(f"unknown cell marker: {line!r}")
      chunks.append(("markdown" if kind else "code", []))
    elif chunks:
      chunks[-1][1].append(line)
  result = []
  for index, (kind, lines) in enumerate(chunks):
    lines = _strip_blank(lines)
    if not lines:
      continue
    cell_id = f"cell-{index:02d}"
    if kind == "markdown":
      source = "\n".join(_uncomment(line) for line in lines)
      result.append(nbformat.v4.new_markdown_cell(source, id=cell_id))
    else:
      result.append(nbformat.v4.new_code_cell("\n".join(lines), id=cell_id))
  return result


def render(source: pathlib.Path) -> str:
  """The ``.ipynb`` text of one source, without outputs."""
  notebook = nbformat.v4.new_notebook(
    cells=cells(source.read_text()),
    metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}},
  )
  notebook.nbformat_minor = 5  # fixed, so a newer nbformat does not change the files
  nbformat.validate(notebook)
  return nbformat.writes(notebook) + "\n"


def is_current(source: pathlib.Path, notebook: pathlib.Path) -> bool:
  """Whether ``notebook`` holds exactly what ``source`` builds (compared as JSON)."""
  return notebook.exists() and json.loads(notebook.read_text()) == json.loads(render(source))


def targets() -> dict[pathlib.Path, pathlib.Path]:
  """``{source: notebook}`` for every source in ``notebooks/src``."""
  return {source: HERE / f"{source.stem}.ipynb" for source in sorted(SOURCES.glob("*.py"))}


def main(argv: list[str]) -> int:
  check = "--check" in argv
  stale = []
  for source, notebook in targets().items():
    if is_current(source, notebook):
      continue
    stale.append(notebook.name)
    if not check:
      notebook.write_text(render(source))
  if check and stale:
    print(f"out of date (run python notebooks/_build.py): {', '.join(stale)}")
    return 1
  if stale:
    print(f"wrote {', '.join(stale)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
