"""The built-in problems of ``mtgrad compare``, by name."""

from __future__ import annotations

from collections.abc import Callable

from mtgrad._src.compare import qm9
from mtgrad._src.compare.multimnist import multimnist
from mtgrad._src.compare.problem import Problem
from mtgrad._src.compare.regression import regression2
from mtgrad._src.compare.regression import regression10
from mtgrad._src.compare.toy import toy

PROBLEMS: dict[str, Callable[[str, int], Problem]] = {
  "toy": toy,
  "regression2": regression2,
  "regression10": regression10,
  "multimnist": multimnist,
  "qm9": qm9.qm9,
}
"""``name -> (size, seed) -> Problem``."""

OPTIONAL = {"qm9": qm9.available}
"""Problems whose data come from an optional package: ``name -> installed?``."""

DEFAULT = ("toy", "regression2", "multimnist")
"""What ``mtgrad compare`` runs without ``--problem``."""


def available() -> tuple[str, ...]:
  """Every problem whose data are installed (``--problem all``)."""
  return tuple(name for name in PROBLEMS if OPTIONAL.get(name, lambda: True)())
