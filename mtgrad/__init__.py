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
from mtgrad._src.methods.dwa import DWAState
from mtgrad._src.methods.dwa import dwa
from mtgrad._src.methods.fairgrad import FairGradState
from mtgrad._src.methods.fairgrad import fairgrad
from mtgrad._src.methods.famo import FAMOState
from mtgrad._src.methods.famo import famo
from mtgrad._src.methods.gcs import gcs
from mtgrad._src.methods.gls import gls
from mtgrad._src.methods.graddrop import GradDropState
from mtgrad._src.methods.graddrop import graddrop
from mtgrad._src.methods.gradnorm import GradNormState
from mtgrad._src.methods.gradnorm import gradnorm
from mtgrad._src.methods.gradvac import GradVacState
from mtgrad._src.methods.gradvac import gradvac
from mtgrad._src.methods.imtl import IMTLState
from mtgrad._src.methods.imtl import imtl
from mtgrad._src.methods.imtl_g import IMTLGState
from mtgrad._src.methods.imtl_g import imtl_g
from mtgrad._src.methods.imtl_l import IMTLLState
from mtgrad._src.methods.imtl_l import imtl_l
from mtgrad._src.methods.initial_loss import InitialLossState
from mtgrad._src.methods.initial_loss import initial_loss
from mtgrad._src.methods.inverse_loss import inverse_loss
from mtgrad._src.methods.inverse_norm import inverse_norm
from mtgrad._src.methods.mean import mean
from mtgrad._src.methods.metabalance import MetaBalanceState
from mtgrad._src.methods.metabalance import metabalance
from mtgrad._src.methods.mgda import mgda
from mtgrad._src.methods.min_norm import min_norm
from mtgrad._src.methods.nash_mtl import NashMTLState
from mtgrad._src.methods.nash_mtl import nash_mtl
from mtgrad._src.methods.pcgrad import pcgrad
from mtgrad._src.methods.rlw import rlw
from mtgrad._src.methods.stch import STCHState
from mtgrad._src.methods.stch import stch
from mtgrad._src.methods.sum import sum  # noqa: A004
from mtgrad._src.methods.uncertainty import UncertaintyState
from mtgrad._src.methods.uncertainty import uncertainty
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
from mtgrad._src.tree import select_leaves
from mtgrad._src.tree import sq_norms
from mtgrad._src.tuning_free_decay import tuning_free_decay

__version__ = "0.1.0"

__all__ = (
  "AlignedMTLState",
  "BalancingState",
  "BalancingTransformation",
  "DWAState",
  "FAMOState",
  "FairGradState",
  "GradDropState",
  "GradNormState",
  "GradVacState",
  "IMTLGState",
  "IMTLLState",
  "IMTLState",
  "InitialLossState",
  "MetaBalanceState",
  "MethodInfo",
  "NashMTLState",
  "STCHState",
  "SolverInfo",
  "SolverState",
  "UncertaintyState",
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
  "dwa",
  "fairgrad",
  "famo",
  "from_weighting",
  "gcs",
  "get",
  "gls",
  "graddrop",
  "gradnorm",
  "gradvac",
  "gram",
  "imtl",
  "imtl_g",
  "imtl_l",
  "info",
  "initial_loss",
  "inverse_loss",
  "inverse_norm",
  "mean",
  "metabalance",
  "mgda",
  "min_norm",
  "names",
  "nash_mtl",
  "num_tasks",
  "pcgrad",
  "require_num_tasks",
  "rlw",
  "safe_reciprocal",
  "select_leaves",
  "sq_norms",
  "stch",
  "sum",
  "tuning_free_decay",
  "uncertainty",
  "upgrad",
  "value_and_jacobian",
  "weights_from_losses",
)
