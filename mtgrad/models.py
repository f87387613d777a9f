"""Multi-task models in Flax NNX: hard sharing (shared-bottom) and MMoE.

Both models map a batch ``x`` (``[..., in_features]``) to a tuple of ``T``
per-task outputs. They are ordinary :class:`flax.nnx.Module` s; to balance
their task gradients with mtgrad, split them into a graph definition and a
parameter pytree, take the per-task Jacobian of the ``[T]`` losses with
respect to that pytree (:func:`mtgrad.value_and_jacobian`, or
:func:`jax.jacrev`), and hand it to any mtgrad transform::

    graphdef, params = nnx.split(model, nnx.Param)

    def task_losses(params, x, labels):
      outputs = nnx.merge(graphdef, params)(x)  # a tuple of T outputs
      return jnp.stack([loss(y, t) for y, t in zip(outputs, labels)])

    losses, task_grads = mtgrad.value_and_jacobian(task_losses)(params, x, labels)
    updates, opt_state = tx.update(task_grads, opt_state, params, losses=losses)
    params = optax.apply_updates(params, updates)
    nnx.update(model, params)  # when the module itself is used afterwards

``flax.nnx.Optimizer(model, tx, wrt=nnx.Param)`` works the same way:
``optimizer.update(model, task_grads, losses=losses)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# flax >= 0.12 needs lists of submodules wrapped; older releases take a list.
_ModuleList = getattr(nnx, "List", list)


class MLP(nnx.Module):
  """A ReLU multilayer perceptron.

  Args:
    in_features: size of the input's last axis.
    features: output size of each :class:`flax.nnx.Linear` layer.
    activate_last: apply the ReLU after the last layer too (hidden
      representations) or not (outputs such as logits).
    rngs: the :class:`flax.nnx.Rngs` that initialise the layers.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from mtgrad.models import MLP
    >>> MLP(3, (8, 2), activate_last=False, rngs=nnx.Rngs(0))(jnp.ones((5, 3))).shape
    (5, 2)
  """

  def __init__(
    self,
    in_features: int,
    features: Sequence[int],
    *,
    activate_last: bool = True,
    rngs: nnx.Rngs,
  ):
    sizes = (in_features, *features)
    self.layers = _ModuleList([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
    self.activate_last = activate_last

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if self.activate_last or i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class SharedBottom(nnx.Module):
  r"""Hard parameter sharing: one shared trunk, one tower per task.

  .. math::

     h = f_{\text{shared}}(x), \qquad y_t = f_t(h), \quad t = 1, \dots, T

  The setting of most gradient-balancing papers (Caruana 1997; Ruder 2017):
  every task's gradient reaches the shared trunk, where balancing acts; a
  tower only receives its own task's gradient.

  Args:
    in_features: size of the input's last axis.
    shared_features: hidden sizes of the shared ReLU trunk.
    tower_features: hidden sizes of each task's tower (may be empty: linear
      heads).
    out_features: output size of each task's tower; its length is ``T``.
    rngs: the :class:`flax.nnx.Rngs` that initialise the layers.

  Example:
    One mtgrad step on the model's parameters (the pattern of the module
    docstring):

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import mtgrad
    >>> from mtgrad.models import SharedBottom
    >>> model = SharedBottom(4, (8,), (8,), out_features=(1, 3), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((5, 4))
    >>> [y.shape for y in model(x)]
    [(5, 1), (5, 3)]
    >>> graphdef, params = nnx.split(model, nnx.Param)
    >>> def task_losses(params, x):
    ...   outputs = nnx.merge(graphdef, params)(x)
    ...   return jnp.stack([jnp.mean(y**2) for y in outputs])
    >>> losses, task_grads = mtgrad.value_and_jacobian(task_losses)(params, x)
    >>> task_grads["shared"]["layers"][0]["kernel"].shape  # leading task axis
    (2, 4, 8)
    >>> tx = optax.chain(mtgrad.mgda(), optax.adam(1e-2))
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(task_grads, opt_state, params, losses=losses)
    >>> nnx.update(model, optax.apply_updates(params, updates))
  """

  def __init__(
    self,
    in_features: int,
    shared_features: Sequence[int],
    tower_features: Sequence[int],
    out_features: Sequence[int],
    *,
    rngs: nnx.Rngs,
  ):
    if not shared_features:
      raise ValueError("mtgrad.models.SharedBottom: shared_features must not be empty.")
    if not out_features:
      raise ValueError("mtgrad.models.SharedBottom: out_features needs one entry per task.")
    self.shared = MLP(in_features, shared_features, rngs=rngs)
    self.towers = _ModuleList(
      [
        MLP(shared_features[-1], (*tower_features, out), activate_last=False, rngs=rngs)
        for out in out_features
      ]
    )

  @property
  def num_tasks(self) -> int:
    return len(self.towers)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    h = self.shared(x)
    return tuple(tower(h) for tower in self.towers)


class MMoE(nnx.Module):
  r"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

  ``E`` expert networks are shared by all tasks; each task mixes them with
  its own softmax gate and feeds the mixture to its tower:

  .. math::

     g_t(x) = \operatorname{softmax}(W_t x + b_t) \in \Delta^{E}, \qquad
     y_t = f_t\Big(\sum_{e=1}^{E} g_t(x)_e\, \phi_e(x)\Big)

  The soft-sharing counterpart of :class:`SharedBottom`: the experts and
  gates receive every task's gradient.

  Args:
    in_features: size of the input's last axis.
    num_experts: number of experts ``E``.
    expert_features: hidden sizes of each expert (ReLU MLPs, the last size
      is the size of the mixture).
    tower_features: hidden sizes of each task's tower (may be empty).
    out_features: output size of each task's tower; its length is ``T``.
    rngs: the :class:`flax.nnx.Rngs` that initialise the layers.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from mtgrad.models import MMoE
    >>> model = MMoE(4, 3, (8,), (8,), out_features=(1, 1), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((5, 4))
    >>> [y.shape for y in model(x)]
    [(5, 1), (5, 1)]
    >>> model.gates(x).shape  # [T, ..., E], each row on the simplex
    (2, 5, 3)

  References:
    Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in
    Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018.
  """

  def __init__(
    self,
    in_features: int,
    num_experts: int,
    expert_features: Sequence[int],
    tower_features: Sequence[int],
    out_features: Sequence[int],
    *,
    rngs: nnx.Rngs,
  ):
    if num_experts < 1 or not expert_features:
      raise ValueError(
        "mtgrad.models.MMoE: needs num_experts >= 1 and non-empty expert_features, got "
        f"{num_experts} and {tuple(expert_features)}."
      )
    if not out_features:
      raise ValueError("mtgrad.models.MMoE: out_features needs one entry per task.")
    self.experts = _ModuleList(
      [MLP(in_features, expert_features, rngs=rngs) for _ in range(num_experts)]
    )
    self.gate_layers = _ModuleList(
      [nnx.Linear(in_features, num_experts, rngs=rngs) for _ in out_features]
    )
    self.towers = _ModuleList(
      [
        MLP(expert_features[-1], (*tower_features, out), activate_last=False, rngs=rngs)
        for out in out_features
      ]
    )

  @property
  def num_tasks(self) -> int:
    return len(self.towers)

  def gates(self, x: jax.Array) -> jax.Array:
    """The task gates, ``[T, ..., E]``: softmax weights over the experts."""
    return jnp.stack([jax.nn.softmax(gate(x), axis=-1) for gate in self.gate_layers])

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    experts = jnp.stack([expert(x) for expert in self.experts], axis=-2)  # [..., E, H]
    mixtures = jnp.einsum("t...e,...eh->t...h", self.gates(x), experts)
    return tuple(tower(m) for tower, m in zip(self.towers, mixtures, strict=True))
