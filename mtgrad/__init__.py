"""mtgrad: multi-task gradient balancing as composable optax transforms."""

from mtgrad._src.base import BalancingState
from mtgrad._src.base import BalancingTransformation
from mtgrad._src.base import WeightingFn
from mtgrad._src.base import from_weighting
from mtgrad._src.base import require_num_tasks
from mtgrad._src.base import safe_reciprocal
from mtgrad._src.base import weights_from_losses
from mtgrad._src.jacobian import value_and_jacobian
from mtgrad._src.methods.aligned_mtl import AlignedMTLState
from mtgrad._src.methods.aligned_mtl import aligned_mtl
from mtgrad._src.methods.cagrad import cagrad
from mtgrad._src.methods.conflict_free import conflict_free
from mtgrad._src.methods.constant import constant
from mtgrad._src.methods.dualproj import dualproj
from mtgrad._src.methods.fairgrad import FairGradState
from mtgrad._src.methods.fairgrad import fairgrad
from mtgrad._src.methods.graddrop import GradDropState
from mtgrad._src.methods.graddrop import graddrop
from mtgrad._src.methods.gradvac import GradVacState
from mtgrad._src.methods.gradvac import gradvac
from mtgrad._src.methods.imtl_g import IMTLGState
from mtgrad._src.methods.imtl_g import imtl_g
from mtgrad._src.methods.initial_loss import InitialLossState
from mtgrad._src.methods.initial_loss import initial_loss
from mtgrad._src.methods.inverse_loss import inverse_loss
from mtgrad._src.methods.inverse_norm import inverse_norm
from mtgrad._src.methods.mean import mean
from mtgrad._src.methods.mgda import mgda
from mtgrad._src.methods.min_norm import min_norm
from mtgrad._src.methods.nash_mtl import NashMTLState
from mtgrad._src.methods.nash_mtl import nash_mtl
from mtgrad._src.methods.pcgrad import pcgrad
from mtgrad._src.methods.rlw import rlw
from mtgrad._src.methods.sum import sum  # noqa: A004
from mtgrad._src.methods.upgrad import upgrad
from mtgrad._src.registry import MethodInfo
from mtgrad._src.registry import get
from mtgrad._src.registry import info
from mtgrad._src.registry import names
from mtgrad._src.solvers.info import SolverInfo
from mtgrad._src.solvers.info import SolverState
from mtgrad._src.tree import block_gram
from mtgrad._src.tree import block_ids
from mtgrad._src.tree import block_sq_norms
from mtgrad._src.tree import combine
from mtgrad._src.tree import gram
from mtgrad._src.tree import num_tasks
from mtgrad._src.tree import sq_norms

__version__ = "0.1.0"

__all__ = (
  "AlignedMTLState",
  "BalancingState",
  "BalancingTransformation",
  "FairGradState",
  "GradDropState",
  "GradVacState",
  "IMTLGState",
  "InitialLossState",
  "MethodInfo",
  "NashMTLState",
  "SolverInfo",
  "SolverState",
  "WeightingFn",
  "aligned_mtl",
  "block_gram",
  "block_ids",
  "block_sq_norms",
  "cagrad",
  "combine",
  "conflict_free",
  "constant",
  "dualproj",
  "fairgrad",
  "from_weighting",
  "get",
  "graddrop",
  "gradvac",
  "gram",
  "imtl_g",
  "info",
  "initial_loss",
  "inverse_loss",
  "inverse_norm",
  "mean",
  "mgda",
  "min_norm",
  "names",
  "nash_mtl",
  "num_tasks",
  "pcgrad",
  "require_num_tasks",
  "rlw",
  "safe_reciprocal",
  "sq_norms",
  "sum",
  "upgrad",
  "value_and_jacobian",
  "weights_from_losses",
)
