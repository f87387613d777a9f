"""Trainable quantities kept in a transform's state, with their own optimizer.

Uncertainty weighting, GradNorm, IMTL-L and FAMO learn a few scalars per task
(log-variances, weights, scales, logits). They live in the transform's state
together with the state of their own optax optimizer and learn from a
closed-form gradient inside ``update``, so users need no second optimizer and
no extra parameters in their model.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import optax


class Trainable(NamedTuple):
  """A trainable array and its optimizer's state.

  Attributes:
    value: the trainable array (e.g. ``[T]`` log-variances).
    opt_state: the state of the optimizer that updates it.
  """

  value: jax.Array
  opt_state: Any


def resolve_optimizer(
  optimizer: optax.GradientTransformation | None, default: optax.GradientTransformation
) -> optax.GradientTransformation:
  """``optimizer`` if given, else the paper's ``default``."""
  return default if optimizer is None else optimizer


def init(optimizer: optax.GradientTransformation, value: jax.Array) -> Trainable:
  """A :class:`Trainable` holding ``value`` and a fresh optimizer state."""
  return Trainable(value, optimizer.init(value))


def step(
  optimizer: optax.GradientTransformation, trainable: Trainable, grad: jax.Array
) -> Trainable:
  """One optimizer step on ``trainable.value`` along the gradient ``grad``."""
  updates, opt_state = optimizer.update(grad, trainable.opt_state, trainable.value)
  return Trainable(optax.apply_updates(trainable.value, updates), opt_state)
