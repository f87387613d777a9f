"""Smooth Tchebycheff scalarisation (Lin et al. 2024)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtgrad._src import base

# The reference's offset inside every logarithm (log(L + eps), log(L/z + eps)).
_EPS = 1e-20


class STCHState(NamedTuple):
  """Weighting state of :func:`stch` (``state.weighting_state``).

  Attributes:
    step: updates so far (int32, saturating).
    nadir: ``[T]`` the reference point ``z``: the running mean of the losses
      over the last ``nadir_steps`` warm-up steps (zeros before them; final
      from step ``warmup_steps`` on).
  """

  step: jax.Array  # [] int32
  nadir: jax.Array  # [T]


def _check_int(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"mtgrad.stch: {name} must be an int >= {low}, got {value!r}.")


def stch(
  mu: float | jax.Array = 1.0,
  warmup_steps: int = 500,
  *,
  nadir_steps: int | None = None,
  num_tasks: int | None = None,
) -> base.BalancingTransformation:
  r"""Smooth Tchebycheff scalarisation with a nadir point learned in warm-up.

  The smooth Tchebycheff scalarisation of the log-losses relative to a
  reference point ``z`` is

  .. math::

     S_\mu(L) = T \mu \log \sum_t \exp\!\left(\frac{1}{\mu}
       \log\left(\frac{L_t}{z_t} + \epsilon\right)\right),
     \qquad
     w_t = \frac{\partial S_\mu}{\partial L_t}
         = \frac{T\, \operatorname{softmax}\!\left(\frac{1}{\mu}
           \log(L / z + \epsilon)\right)_t}{L_t + \epsilon z_t}
         \approx \frac{T\, \operatorname{softmax}(\log(L/z)/\mu)_t}{L_t},

  a smooth maximum of the log-loss ratios: as :math:`\mu \to 0` all the
  weight goes to the task furthest above its reference (Tchebycheff), and
  for :math:`\mu = 1` the weights are :math:`w_t = T / (z_t \sum_j L_j/z_j)`.
  ``z`` is estimated from the losses themselves, as the paper's multi-task
  code does: for the first ``warmup_steps`` updates the weights are those
  of :math:`\sum_t \log(L_t + \epsilon)`, i.e. :math:`1 / (L_t + \epsilon)`
  (:func:`mtgrad.inverse_loss`), and ``z`` is the mean of the losses over
  the last ``nadir_steps`` of them; from update ``warmup_steps`` on, ``z``
  is fixed and the weights are :math:`w_t` above. :math:`\epsilon = 10^{-20}`
  as in the reference.

  The reference (the authors' LibMTL weighting ``STCH``) counts in epochs:
  log-loss weighting for ``STCH_warmup_epoch = 4`` epochs, then one more
  epoch of log-loss weighting over which the losses are averaged into ``z``,
  then STCH with ``mu = 1``. Here the warm-up counts updates (state, jit-
  friendly): the defaults ``warmup_steps=500``, ``nadir_steps=100`` are that
  schedule at 100 updates per epoch (NYUv2's 795 training images in batches
  of 8); set them to your epoch length.

  Scale behaviour: rescaling a loss, :math:`L_t \to c_t L_t`, rescales its
  nadir by the same :math:`c_t`, so the update is unchanged (up to
  :math:`\epsilon`) in both phases.

  Args:
    mu: smoothing parameter :math:`\mu > 0` (may be traced).
    warmup_steps: number of log-loss updates before the STCH weights (int
      >= 1; counts the nadir window).
    nadir_steps: the last ``nadir_steps`` warm-up updates average their
      losses into ``z`` (int in ``[1, warmup_steps]``); default
      ``max(1, warmup_steps // 5)``, the reference's one epoch in five.
    num_tasks: ``T`` (required: ``z`` is kept in the state).

  Returns:
    A :class:`mtgrad.BalancingTransformation` that needs ``losses=`` (``[T]``)
    in ``update``; its ``weighting_state`` is an :class:`STCHState`. The
    weights depend on the losses only, so :func:`mtgrad.weights_from_losses`
    gives them without the stacked task gradients.

  Example:
    >>> import jax.numpy as jnp, mtgrad
    >>> tx = mtgrad.stch(mu=1.0, warmup_steps=1, num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> weights, state = mtgrad.weights_from_losses(tx, state, jnp.array([4.0, 0.5]))
    >>> weights, state.weighting_state.nadir  # warm-up: 1 / L; z = L
    (Array([0.25, 2.  ], dtype=float32), Array([4. , 0.5], dtype=float32))
    >>> weights, state = mtgrad.weights_from_losses(tx, state, jnp.array([2.0, 0.5]))
    >>> weights  # T softmax(log(L / z)) / L = T / (z sum(L / z)) with L / z = (0.5, 1)
    Array([0.33333334, 2.6666667 ], dtype=float32)

  References:
    Lin, Zhang, Yang, Liu, Wang & Zhang, *Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization*, ICML 2024 (arXiv:2402.19078); its
    multi-task code: github.com/Xi-L/STCH (``STCH_MTL``).

  Warning:
    The reference's warm-up and nadir window are epochs; here they are
    updates (see above). The losses must be positive (the method takes
    their logarithm): a zero loss gets the reference's weight
    :math:`1/\epsilon = 10^{20}` in warm-up (finite; its gradient is usually
    zero too), and a task whose nadir is exactly 0 gets weight 0 afterwards
    instead of the reference's division by zero.
  """
  base.require_num_tasks(num_tasks, "stch")
  _check_int("warmup_steps", warmup_steps, 1)
  if nadir_steps is None:
    nadir_steps = max(1, warmup_steps // 5)
  _check_int("nadir_steps", nadir_steps, 1)
  if nadir_steps > warmup_steps:
    raise ValueError(
      f"mtgrad.stch: nadir_steps={nadir_steps} must not exceed warmup_steps={warmup_steps}."
    )
  if isinstance(mu, (int, float)) and not isinstance(mu, bool) and not mu > 0:
    raise ValueError(f"mtgrad.stch: mu must be > 0, got {mu!r}.")
  window_start = warmup_steps - nadir_steps

  def init_state(num_tasks):
    return STCHState(step=jnp.zeros([], jnp.int32), nadir=jnp.zeros(num_tasks, jnp.float32))

  def weighting(gram, losses, state, key, *, num_tasks):
    del gram, key
    losses = losses.astype(jnp.promote_types(losses.dtype, jnp.float32))
    nadir = state.nadir.astype(losses.dtype)
    warmup_weights = 1 / (losses + _EPS)

    ratio = losses * base.safe_reciprocal(nadir)
    shares = jax.nn.softmax(jnp.log(ratio + _EPS) / jnp.asarray(mu, losses.dtype))
    # dS/dL_t = T share_t / (z_t (L_t / z_t + eps)); 0 for a task whose nadir is 0.
    stch_weights = num_tasks * shares * base.safe_reciprocal(nadir * (ratio + _EPS))

    in_warmup = state.step < warmup_steps
    in_window = in_warmup & (state.step >= window_start)
    seen = (state.step - window_start + 1).astype(losses.dtype)  # losses in the mean so far
    new_nadir = jnp.where(in_window, nadir + (losses - nadir) / seen, nadir)
    weights = jnp.where(in_warmup, warmup_weights, stch_weights)
    return weights, STCHState(step=optax.safe_int32_increment(state.step), nadir=new_nadir)

  return base.from_weighting(
    weighting,
    name="stch",
    needs="nothing",
    needs_losses=True,
    num_tasks=num_tasks,
    init_state=init_state,
  )
