"""Running the notebooks in the test suite (``--nbmake``, see ``pyproject.toml``)."""

import os

# Each notebook shrinks its runs under this flag; the kernels nbmake starts inherit it.
os.environ.setdefault("MTGRAD_NOTEBOOK_SMALL", "1")

# The percent-format sources would run a whole notebook on import under --doctest-modules;
# the notebooks built from them are what runs.
collect_ignore_glob = ["src/*.py"]
