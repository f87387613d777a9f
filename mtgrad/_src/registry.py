"""The method registry: names, factories and declared properties.

Every method is one entry of :data:`METHODS`. The test harness checks every
declared property (and finds a counterexample to every undeclared one), the
README's method table is checked against it, and ``mtgrad compare`` runs
every entry. Adding a method is one module in ``_src/methods`` plus one
entry here.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from mtgrad._src import base
from mtgrad._src.methods.aligned_mtl import aligned_mtl
from mtgrad._src.methods.cagrad import cagrad
from mtgrad._src.methods.conflict_free import conflict_free
from mtgrad._src.methods.constant import constant
from mtgrad._src.methods.dualproj import dualproj
from mtgrad._src.methods.dwa import dwa
from mtgrad._src.methods.fairgrad import fairgrad
from mtgrad._src.methods.famo import famo
from mtgrad._src.methods.gcs import gcs
from mtgrad._src.methods.gls import gls
from mtgrad._src.methods.graddrop import graddrop
from mtgrad._src.methods.gradnorm import gradnorm
from mtgrad._src.methods.gradvac import gradvac
from mtgrad._src.methods.imtl import imtl
from mtgrad._src.methods.imtl_g import imtl_g
from mtgrad._src.methods.imtl_l import imtl_l
from mtgrad._src.methods.initial_loss import initial_loss
from mtgrad._src.methods.inverse_loss import inverse_loss
from mtgrad._src.methods.inverse_norm import inverse_norm
from mtgrad._src.methods.mean import mean
from mtgrad._src.methods.metabalance import metabalance
from mtgrad._src.methods.mgda import mgda
from mtgrad._src.methods.min_norm import min_norm
from mtgrad._src.methods.nash_mtl import nash_mtl
from mtgrad._src.methods.pcgrad import pcgrad
from mtgrad._src.methods.rlw import rlw
from mtgrad._src.methods.stch import stch
from mtgrad._src.methods.sum import sum as sum_
from mtgrad._src.methods.uncertainty import uncertainty
from mtgrad._src.methods.upgrad import upgrad

# Mathematical properties a method may declare. Each has a checker in the
# test harness (tests/harness.py) and a counterexample search for methods
# that do not declare it.
LINEAR = "linear"
"""The update is ``sum_t w_t g_t`` with ``w`` the state's ``weights``."""
NON_CONFLICTING = "non_conflicting"
"""``<d, g_t> >= 0`` for every task: no task's loss increases to first order."""
PERMUTATION_EQUIVARIANT = "permutation_equivariant"
"""Permuting the tasks (gradients and losses) leaves the update unchanged."""
HOMOGENEOUS = "homogeneous"
"""``d(c J) = c d(J)`` for ``c > 0`` (losses held fixed)."""
LOSS_SCALE_INVARIANT = "loss_scale_invariant"
"""Rescaling any task's loss, ``L_t -> c_t L_t`` (so ``g_t -> c_t g_t``),
leaves the update unchanged."""

PROPERTIES = (LINEAR, NON_CONFLICTING, PERMUTATION_EQUIVARIANT, HOMOGENEOUS, LOSS_SCALE_INVARIANT)


@dataclasses.dataclass(frozen=True)
class MethodInfo:
  """A registry entry.

  Attributes:
    name: public name, ``mtgrad.<name>`` and ``mtgrad.get(name)``.
    factory: the factory function.
    paper: short citation.
    needs_losses: ``update`` requires ``losses=``.
    stateful: the factory requires ``num_tasks`` (per-task state).
    stochastic: the factory takes a ``key``.
    properties: the declared mathematical properties (see ``PROPERTIES``).
    example_kwargs: ``(num_tasks) -> kwargs`` building a default instance for
      ``T`` tasks (used by the tests and by ``mtgrad compare``); the ``key``
      is added separately for stochastic methods.
  """

  name: str
  factory: Callable[..., base.BalancingTransformation]
  paper: str
  needs_losses: bool = False
  stateful: bool = False
  stochastic: bool = False
  properties: frozenset[str] = frozenset()
  example_kwargs: Callable[[int], Mapping[str, Any]] = lambda num_tasks: {}

  def make(self, num_tasks: int, key: Any = 0, **overrides) -> base.BalancingTransformation:
    """A default instance for ``num_tasks`` tasks (``num_tasks`` always given)."""
    kwargs = dict(self.example_kwargs(num_tasks))
    if "num_tasks" in inspect.signature(self.factory).parameters:
      kwargs["num_tasks"] = num_tasks
    if self.stochastic:
      kwargs["key"] = key
    kwargs.update(overrides)
    return self.factory(**kwargs)


_GEOMETRY_FREE = frozenset({LINEAR, PERMUTATION_EQUIVARIANT, HOMOGENEOUS})

METHODS: tuple[MethodInfo, ...] = (
  MethodInfo("sum", sum_, "LibMTL (Lin & Zhang 2023), equal weighting", properties=_GEOMETRY_FREE),
  MethodInfo("mean", mean, "LibMTL (Lin & Zhang 2023)", properties=_GEOMETRY_FREE),
  MethodInfo(
    "constant",
    constant,
    "fixed hand-tuned weights",
    properties=frozenset({LINEAR, HOMOGENEOUS}),
    example_kwargs=lambda num_tasks: {
      "weights": jnp.linspace(1.0, 0.25, num_tasks, dtype=jnp.float32)
    },
  ),
  MethodInfo(
    "rlw",
    rlw,
    "Lin et al., TMLR 2022 (Random Loss Weighting)",
    stochastic=True,
    properties=frozenset({LINEAR, HOMOGENEOUS}),
  ),
  MethodInfo(
    "inverse_norm",
    inverse_norm,
    "Su, MTL part 1 (kexue.fm 2022): sum of unit gradients",
    properties=frozenset({LINEAR, PERMUTATION_EQUIVARIANT, LOSS_SCALE_INVARIANT}),
  ),
  MethodInfo(
    "inverse_loss",
    inverse_loss,
    "Su, MTL part 1 (kexue.fm 2022): gradient of sum log L",
    needs_losses=True,
    properties=frozenset({LINEAR, PERMUTATION_EQUIVARIANT, HOMOGENEOUS, LOSS_SCALE_INVARIANT}),
  ),
  MethodInfo(
    "initial_loss",
    initial_loss,
    "Su, MTL part 1 (kexue.fm 2022): losses relative to L(0)",
    needs_losses=True,
    stateful=True,
    properties=frozenset({LINEAR, PERMUTATION_EQUIVARIANT, HOMOGENEOUS, LOSS_SCALE_INVARIANT}),
  ),
  MethodInfo(
    "mgda",
    mgda,
    "Sener & Koltun, NeurIPS 2018 (MGDA-UB min-norm); Su, MTL part 2 (kexue.fm 2022)",
    properties=frozenset({LINEAR, NON_CONFLICTING, PERMUTATION_EQUIVARIANT, HOMOGENEOUS}),
  ),
  MethodInfo(
    "min_norm",
    min_norm,
    "Su, MTL part 3 (kexue.fm 8907, 2022): primary/auxiliary min-norm",
    properties=frozenset({LINEAR, NON_CONFLICTING, HOMOGENEOUS}),
  ),
  MethodInfo(
    "pcgrad",
    pcgrad,
    "Yu et al., NeurIPS 2020 (PCGrad, gradient surgery)",
    stochastic=True,
    properties=frozenset({LINEAR, HOMOGENEOUS}),
  ),
  MethodInfo(
    "gradvac",
    gradvac,
    "Wang et al., ICLR 2021 (Gradient Vaccine)",
    stateful=True,
    stochastic=True,
    properties=frozenset({LINEAR, HOMOGENEOUS}),
  ),
  MethodInfo(
    "cagrad",
    cagrad,
    "Liu et al., NeurIPS 2021 (Conflict-Averse Gradient descent)",
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "imtl_g",
    imtl_g,
    "Liu et al., ICLR 2021 (Impartial MTL, gradient part)",
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "graddrop",
    graddrop,
    "Chen et al., NeurIPS 2020 (Gradient Sign Dropout)",
    stochastic=True,
    properties=frozenset({PERMUTATION_EQUIVARIANT, HOMOGENEOUS}),
  ),
  MethodInfo(
    "nash_mtl",
    nash_mtl,
    "Navon et al., ICML 2022 (Multi-Task Learning as a Bargaining Game)",
    stateful=True,
    properties=frozenset({LINEAR, NON_CONFLICTING, PERMUTATION_EQUIVARIANT, LOSS_SCALE_INVARIANT}),
  ),
  MethodInfo(
    "fairgrad",
    fairgrad,
    "Ban & Ji, ICML 2024 (Fair Resource Allocation in Multi-Task Learning)",
    properties=frozenset({LINEAR, NON_CONFLICTING, PERMUTATION_EQUIVARIANT, LOSS_SCALE_INVARIANT}),
  ),
  MethodInfo(
    "upgrad",
    upgrad,
    "Quinton & Rey 2024 (torchjd, Jacobian descent: UPGrad)",
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "dualproj",
    dualproj,
    "Quinton & Rey 2024 (torchjd: DualProj)",
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "aligned_mtl",
    aligned_mtl,
    "Senushkin et al., CVPR 2023 (Aligned-MTL)",
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "conflict_free",
    conflict_free,
    "Liu, Chu & Thuerey 2024 (ConFIG, conflict-free inverse gradients)",
    properties=_GEOMETRY_FREE,
  ),
  # Loss-driven weightings I: gradnorm, uncertainty, dwa, gls.
  MethodInfo(
    "gradnorm",
    gradnorm,
    "Chen et al., ICML 2018 (GradNorm)",
    needs_losses=True,
    stateful=True,
    properties=frozenset({LINEAR, PERMUTATION_EQUIVARIANT}),
  ),
  MethodInfo(
    "uncertainty",
    uncertainty,
    "Kendall, Gal & Cipolla, CVPR 2018 (uncertainty weighting)",
    needs_losses=True,
    stateful=True,
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "dwa",
    dwa,
    "Liu, Johns & Davison, CVPR 2019 (MTAN: Dynamic Weight Average)",
    needs_losses=True,
    stateful=True,
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "gls",
    gls,
    "Chennupati et al., CVPR-W 2019 (MultiNet++: Geometric Loss Strategy)",
    needs_losses=True,
    properties=_GEOMETRY_FREE,
  ),
  # Loss-driven weightings II: imtl_l, imtl, stch, famo.
  MethodInfo(
    "imtl_l",
    imtl_l,
    "Liu et al., ICLR 2021 (Impartial MTL, loss part)",
    needs_losses=True,
    stateful=True,
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "imtl",
    imtl,
    "Liu et al., ICLR 2021 (Impartial MTL, hybrid IMTL-L + IMTL-G)",
    needs_losses=True,
    stateful=True,
    properties=_GEOMETRY_FREE,
  ),
  MethodInfo(
    "stch",
    stch,
    "Lin et al., ICML 2024 (Smooth Tchebycheff scalarization)",
    needs_losses=True,
    stateful=True,
    properties=_GEOMETRY_FREE | {LOSS_SCALE_INVARIANT},
    # One warm-up step (which sets the nadir) so that the harness's two
    # updates cover both phases.
    example_kwargs=lambda num_tasks: {"warmup_steps": 1},
  ),
  MethodInfo(
    "famo",
    famo,
    "Liu et al., NeurIPS 2023 (FAMO: Fast Adaptive Multitask Optimization)",
    needs_losses=True,
    stateful=True,
    # Called with losses= alone (harness, compare), the default protocol="auto"
    # runs the one-step-lag variant; post_step_losses= selects the exact one.
    properties=_GEOMETRY_FREE,
  ),
  # Primary and auxiliary tasks: metabalance, gcs.
  MethodInfo(
    "metabalance",
    metabalance,
    "He et al., WWW 2022 (MetaBalance: auxiliary gradient magnitudes)",
    stateful=True,
    properties=frozenset({HOMOGENEOUS}),
  ),
  MethodInfo(
    "gcs",
    gcs,
    "Du et al., arXiv 2018 (auxiliary losses gated by gradient cosine similarity)",
    properties=frozenset({LINEAR, HOMOGENEOUS}),
  ),
)

_BY_NAME = {info.name: info for info in METHODS}


def names() -> tuple[str, ...]:
  """The registered method names, in registry order."""
  return tuple(_BY_NAME)


def info(name: str) -> MethodInfo:
  """The registry entry of ``name``."""
  try:
    return _BY_NAME[name]
  except KeyError:
    close = difflib.get_close_matches(name, _BY_NAME, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
      f"mtgrad: unknown method {name!r}.{hint} Known: {', '.join(_BY_NAME)}."
    ) from None


def get(name: str, **kwargs: Any) -> base.BalancingTransformation:
  """Builds the method registered as ``name`` with ``kwargs``.

  For config-driven experiments: ``mtgrad.get("rlw", key=0)`` is
  ``mtgrad.rlw(key=0)``.

  Args:
    name: a registered name (see :func:`mtgrad.names`).
    **kwargs: the factory's arguments.

  Returns:
    The method's :class:`mtgrad.BalancingTransformation`.

  Example:
    >>> import mtgrad
    >>> tx = mtgrad.get("mean")
  """
  return info(name).factory(**kwargs)


def markdown_table() -> str:
  """The README's method table, generated from the registry.

  Regenerate with ``python -m mtgrad._src.registry``; a test checks that the
  README holds exactly this text between its ``methods-table`` markers.
  """
  short = {
    LINEAR: "linear",
    NON_CONFLICTING: "non-conflicting",
    PERMUTATION_EQUIVARIANT: "permutation-equivariant",
    HOMOGENEOUS: "homogeneous",
    LOSS_SCALE_INVARIANT: "loss-scale-invariant",
  }
  yes = lambda flag: "yes" if flag else ""
  lines = [
    "| method | paper | needs losses | stateful | stochastic | properties |",
    "|---|---|---|---|---|---|",
  ]
  for m in METHODS:
    props = ", ".join(short[p] for p in PROPERTIES if p in m.properties)
    lines.append(
      f"| `{m.name}` | {m.paper} | {yes(m.needs_losses)} | {yes(m.stateful)} "
      f"| {yes(m.stochastic)} | {props} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  print(markdown_table())
