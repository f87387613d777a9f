"""The README's method table and code are checked against the package."""

from __future__ import annotations

import pathlib
import re

import pytest

from mtgrad._src import registry

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_method_table_matches_registry():
  text = README.read_text()
  table = text.split("<!-- methods-table:start -->\n")[1].split("\n<!-- methods-table:end -->")[0]
  assert table == registry.markdown_table(), "regenerate with: python -m mtgrad._src.registry"


def test_first_lines_are_the_two_setup_commands():
  block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1).strip().splitlines()
  assert len(block) == 2
  assert "mtgrad compare" in block[0] and "pytest" in block[1]


SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_its_python_snippets():
  assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_python_snippets_run(index):
  exec(compile(SNIPPETS[index], f"README snippet {index}", "exec"), {})
