"""IMTL-L, IMTL, STCH and FAMO against float64 re-implementations of the references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtgrad

# ------------------------------------------------------------------ oracles


class _Adam:
  """torch.optim.Adam in float64: L2 weight decay added to the gradient."""

  def __init__(self, size, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
    self.m, self.v, self.k = np.zeros(size), np.zeros(size), 0

  def step(self, x, grad):
    grad = grad + self.wd * x
    self.k += 1
    self.m = self.b1 * self.m + (1 - self.b1) * grad
    self.v = self.b2 * self.v + (1 - self.b2) * grad**2
    m_hat = self.m / (1 - self.b1**self.k)
    v_hat = self.v / (1 - self.b2**self.k)
    return x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _imtl_closed_form(jac):
  """The paper's (and LibMTL's) IMTL-G closed form on a full-rank ``[T, D]``."""
  unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  d = jac[0] - jac[1:]
  u = unit[0] - unit[1:]
  rest = jac[0] @ u.T @ np.linalg.inv(d @ u.T)
  return np.concatenate([[1 - rest.sum()], rest])


def _stch_objective(losses, nadir, mu, warm):
  """The reference STCH weighting's scalar loss in float64."""
  if warm:
    return np.sum(np.log(losses + 1e-20))
  ratios = np.log(losses / nadir + 1e-20)
  top = ratios.max()
  return mu * (np.log(np.sum(np.exp((ratios - top) / mu))) + top / mu) * losses.size


def _central_gradient(f, x):
  grad = np.zeros_like(x)
  for t in range(x.size):
    h = 1e-6 * x[t]
    up, down = x.copy(), x.copy()
    up[t] += h
    down[t] -= h
    grad[t] = (f(up) - f(down)) / (2 * h)
  return grad


# ------------------------------------------------------------------ helpers


@functools.cache
def _weights_fn(name, **kwargs):
  """Jitted ``(state, losses) -> (weights, state)`` for a loss-only method."""
  tx = getattr(mtgrad, name)(**kwargs)
  return tx, jax.jit(lambda state, losses: mtgrad.weights_from_losses(tx, state, losses))


def _params():
  return {"w": jnp.zeros(2)}


def _regression(num_tasks=3, dim=4, batch=5, num_batches=4, seed=0):
  """A deterministic multi-task linear regression: batches, targets, loss scales."""
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((num_batches, batch, dim))
  ys = rng.standard_normal((num_batches, batch, num_tasks)) * 2
  scales = np.array([1.0, 10.0, 0.1])[:num_tasks]
  return xs, ys, scales


def _regression_losses(params, x, y, scales):
  residual = x @ params["w"][:, None] - y  # [B, T]
  return jnp.asarray(scales, jnp.float32) * jnp.mean(residual**2, axis=0)


def _numpy_losses_and_grads(theta, x, y, scales):
  residual = x @ theta[:, None] - y  # [B, T]
  losses = scales * np.mean(residual**2, axis=0)
  grads = scales[:, None] * (2 / x.shape[0]) * (residual.T @ x)  # [T, D]
  return losses, grads


# ------------------------------------------------------------------ IMTL-L


def test_imtl_l_matches_float64_oracle_step_by_step():
  rng = np.random.default_rng(1)
  tx, step = _weights_fn("imtl_l", learning_rate=0.05, num_tasks=3)
  state = tx.init(_params())
  s, adam = np.zeros(3), _Adam(3, 0.05)
  for _ in range(25):
    losses = rng.uniform(0.05, 20.0, size=3)
    weights, state = step(state, jnp.asarray(losses, jnp.float32))
    expected = np.exp(s)
    s = adam.step(s, np.exp(s) * losses - 1)
    np.testing.assert_allclose(weights, expected, rtol=1e-4)
    np.testing.assert_allclose(state.weighting_state.log_scales.value, s, rtol=1e-4, atol=1e-6)


def test_imtl_l_default_converges_to_inverse_losses_at_fixed_losses():
  losses = jnp.array([0.01, 0.3, 1.0, 7.0, 100.0])
  tx = mtgrad.imtl_l(num_tasks=5)

  @jax.jit
  def run(state):
    def body(state, _):
      weights, state = mtgrad.weights_from_losses(tx, state, losses)
      return state, weights

    return jax.lax.scan(body, state, length=3000)[1]

  history = np.asarray(run(tx.init(_params())), np.float64)
  relative = np.abs(history * np.asarray(losses, np.float64) - 1)  # w L - 1
  assert relative[0].max() > 50  # starts far away (w = 1)
  assert relative[1999].max() < 0.02  # the docstring's figures
  assert relative[2999].max() < 1e-4


# ------------------------------------------------------------------ IMTL


def test_imtl_matches_closed_form_on_scaled_gradients():
  rng = np.random.default_rng(2)
  tx = mtgrad.imtl(learning_rate=0.1, num_tasks=3)
  update = jax.jit(lambda g, s, loss: tx.update(g, s, losses=loss))
  state = tx.init({"w": jnp.zeros(6)})
  s, adam = np.zeros(3), _Adam(3, 0.1)
  for _ in range(6):
    jac = rng.standard_normal((3, 6)) * np.array([[0.1], [1.0], [30.0]])
    jac = np.asarray(np.asarray(jac, np.float32), np.float64)
    losses = rng.uniform(0.1, 10.0, size=3)
    updates, state = update({"w": jnp.asarray(jac, jnp.float32)}, state, jnp.asarray(losses))
    scales = np.exp(s)
    alpha = _imtl_closed_form(scales[:, None] * jac)
    expected_weights = alpha * scales
    s = adam.step(s, scales * losses - 1)
    np.testing.assert_allclose(state.weights, expected_weights, rtol=2e-4)
    np.testing.assert_allclose(updates["w"], expected_weights @ jac, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(state.weighting_state.log_scales.value, s, rtol=1e-4, atol=1e-6)
    # The scales change the length only: the direction is IMTL-G's.
    raw = _imtl_closed_form(jac) @ jac
    cosine = raw @ np.asarray(updates["w"]) / np.linalg.norm(raw) / np.linalg.norm(updates["w"])
    assert cosine == pytest.approx(1.0, abs=1e-5)
  assert np.abs(s).max() > 0.3  # the scales did move


def test_imtl_first_step_is_imtl_g():
  grads = {"w": jnp.array([[1.0, 0.5, 0.0], [0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])}
  params = {"w": jnp.zeros(3)}
  hybrid_tx, plain_tx = mtgrad.imtl(num_tasks=3), mtgrad.imtl_g()
  hybrid, state = jax.jit(hybrid_tx.update)(
    grads, hybrid_tx.init(params), params, losses=jnp.array([5.0, 0.2, 1.0])
  )
  plain, _ = jax.jit(plain_tx.update)(grads, plain_tx.init(params), params)
  np.testing.assert_allclose(hybrid["w"], plain["w"], rtol=1e-6)
  assert int(state.weighting_state.rank) == 3


# ------------------------------------------------------------------ STCH


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_stch_matches_reference_gradient_step_by_step(mu):
  rng = np.random.default_rng(3)
  warmup, window = 4, 2
  tx, step = _weights_fn("stch", mu=mu, warmup_steps=warmup, nadir_steps=window, num_tasks=3)
  state = tx.init(_params())
  seen = []
  for k in range(9):
    losses = np.asarray(rng.uniform(0.05, 5.0, size=3) * [1.0, 100.0, 0.01], np.float32)
    losses = losses.astype(np.float64)
    weights, state = step(state, jnp.asarray(losses, jnp.float32))
    warm = k < warmup
    if warm and k >= warmup - window:
      seen.append(losses)
    nadir = np.mean(seen, axis=0) if seen else None
    expected = _central_gradient(lambda x, n=nadir, w=warm: _stch_objective(x, n, mu, w), losses)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    if k >= warmup - 1:
      np.testing.assert_allclose(state.weighting_state.nadir, nadir, rtol=1e-6)
  assert int(state.weighting_state.step) == 9


def test_stch_defaults_and_bad_arguments():
  state = mtgrad.stch(num_tasks=2).init(_params())
  assert state.weighting_state.nadir.dtype == jnp.float32
  with pytest.raises(ValueError, match="warmup_steps"):
    mtgrad.stch(warmup_steps=0, num_tasks=2)
  with pytest.raises(ValueError, match="nadir_steps"):
    mtgrad.stch(warmup_steps=3, nadir_steps=4, num_tasks=2)
  with pytest.raises(ValueError, match="mu"):
    mtgrad.stch(mu=0.0, num_tasks=2)
  with pytest.raises(ValueError, match="num_tasks"):
    mtgrad.stch()


def test_stch_default_nadir_window_is_the_last_fifth_of_warmup():
  tx, step = _weights_fn("stch", warmup_steps=10, num_tasks=2)
  state = tx.init(_params())
  for k in range(10):
    _, state = step(state, jnp.array([1.0 + k, 2.0]))
  # Steps 8 and 9 (losses 9 and 10) form the default window of 10 // 5 = 2.
  np.testing.assert_allclose(state.weighting_state.nadir, [9.5, 2.0])


# ------------------------------------------------------------------ FAMO


def _famo_reference(xs, ys, scales, steps, model_lr, w_lr, gamma, min_losses):
  """The reference FAMO loop (famo.py's usage) in float64: weights and logits per step."""
  theta = np.zeros(xs.shape[-1])
  xi, adam = np.zeros(len(scales)), _Adam(len(scales), w_lr, gamma)
  weights, logits = [], []
  for k in range(steps):
    x, y = xs[k % len(xs)], ys[k % len(ys)]
    losses, grads = _numpy_losses_and_grads(theta, x, y, scales)
    z = _softmax(xi)
    gap = losses - min_losses + 1e-8
    w = (z / gap) / np.sum(z / gap)
    weights.append(w)
    logits.append(xi.copy())
    theta = theta - model_lr * (w @ grads)  # SGD step on the weighted loss
    after, _ = _numpy_losses_and_grads(theta, x, y, scales)  # same batch, new params
    delta = np.log(gap) - np.log(after - min_losses + 1e-8)
    xi = adam.step(xi, z * delta - z * (z @ delta))
  return np.array(weights), np.array(logits)


@pytest.mark.parametrize(
  "w_lr,gamma,min_losses",
  [(0.025, 1e-3, (0.0, 0.0, 0.0)), (0.1, 1e-2, (0.05, 0.0, 0.002))],
)
def test_famo_exact_protocol_reproduces_reference_step_by_step(w_lr, gamma, min_losses):
  xs, ys, scales = _regression()
  steps, model_lr = 12, 0.05
  expected_weights, expected_logits = _famo_reference(
    xs, ys, scales, steps, model_lr, w_lr, gamma, np.asarray(min_losses)
  )
  famo = mtgrad.famo(w_lr, gamma, num_tasks=3, protocol="exact", min_losses=jnp.asarray(min_losses))
  tx = optax.chain(famo, optax.sgd(model_lr))
  task_losses = functools.partial(_regression_losses, scales=scales)

  @jax.jit
  def step(params, state, x, y, prev_x, prev_y):
    post = task_losses(params, prev_x, prev_y)  # last step's batch at the new params
    losses, grads = mtgrad.value_and_jacobian(task_losses)(params, x, y)
    updates, state = tx.update(grads, state, params, losses=losses, post_step_losses=post)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.zeros(xs.shape[-1])}
  state = tx.init(params)
  prev = (xs[0], ys[0])  # ignored at the first update
  for k in range(steps):
    batch = (xs[k % len(xs)], ys[k % len(ys)])
    params, state = step(params, state, *batch, *prev)
    prev = batch
    np.testing.assert_allclose(state[0].weights, expected_weights[k], rtol=1e-4)
    logits = state[0].weighting_state.logits.value  # the logits these weights used
    np.testing.assert_allclose(logits, expected_logits[k], rtol=1e-4, atol=1e-6)
  assert np.abs(expected_logits[-1]).max() > 0.1  # the logits did learn


def test_famo_lagged_is_exact_fed_with_the_next_losses():
  rng = np.random.default_rng(4)
  lagged = mtgrad.famo(num_tasks=3, protocol="lagged")
  exact = mtgrad.famo(num_tasks=3, protocol="exact")
  grads = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}
  lag_update = jax.jit(lambda s, loss: lagged.update(grads, s, losses=loss))
  exact_update = jax.jit(
    lambda s, loss, post: exact.update(grads, s, losses=loss, post_step_losses=post)
  )
  lag_state = lagged.init(_params())
  exact_state = exact.init(_params())
  for _ in range(6):
    losses = jnp.asarray(rng.uniform(0.1, 3.0, size=3), jnp.float32)
    a, lag_state = lag_update(lag_state, losses)
    b, exact_state = exact_update(exact_state, losses, losses)
    np.testing.assert_array_equal(a["w"], b["w"])
  jax.tree.map(np.testing.assert_array_equal, lag_state, exact_state)
  assert not np.allclose(lag_state.weighting_state.logits.value, 0)


def test_famo_default_protocol_is_exact_with_post_step_losses_and_lagged_without():
  rng = np.random.default_rng(5)
  grads = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}
  auto = mtgrad.famo(num_tasks=3)
  for other, with_post in (
    (mtgrad.famo(num_tasks=3, protocol="exact"), True),
    (mtgrad.famo(num_tasks=3, protocol="lagged"), False),
  ):
    a_state, b_state = auto.init(_params()), other.init(_params())
    for _ in range(4):
      losses = jnp.asarray(rng.uniform(0.1, 3.0, size=3), jnp.float32)
      more = {"post_step_losses": 0.9 * losses} if with_post else {}
      a, a_state = auto.update(grads, a_state, losses=losses, **more)
      b, b_state = other.update(grads, b_state, losses=losses, **more)
      np.testing.assert_array_equal(a["w"], b["w"])
    jax.tree.map(np.testing.assert_array_equal, a_state, b_state)


def test_famo_first_weights_are_normalised_inverse_losses():
  tx = mtgrad.famo(num_tasks=3, protocol="lagged")
  weights, _ = mtgrad.weights_from_losses(tx, tx.init(_params()), jnp.array([1.0, 4.0, 0.5]))
  np.testing.assert_allclose(weights, np.array([1.0, 0.25, 2.0]) / 3.25, rtol=1e-6)


def test_famo_misuse_is_a_trace_time_error():
  grads = {"w": jnp.ones((2, 2))}
  losses = jnp.array([1.0, 2.0])
  exact = mtgrad.famo(num_tasks=2, protocol="exact")
  state = exact.init(_params())
  with pytest.raises(ValueError, match="post_step_losses"):
    jax.jit(lambda s: exact.update(grads, s, losses=losses))(state)
  chain = optax.chain(exact, optax.sgd(1.0))
  with pytest.raises(ValueError, match="lagged"):
    chain.update(grads, chain.init(_params()), losses=losses)
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    exact.update(grads, state, losses=losses, post_step_losses=jnp.ones(3))
  with pytest.raises(ValueError, match="floating"):
    exact.update(grads, state, losses=losses, post_step_losses=jnp.ones(2, jnp.int32))
  lagged = mtgrad.famo(num_tasks=2, protocol="lagged")
  with pytest.raises(ValueError, match="protocol='exact'"):
    lagged.update(grads, lagged.init(_params()), losses=losses, post_step_losses=losses)
  with pytest.raises(ValueError, match="protocol"):
    mtgrad.famo(num_tasks=2, protocol="next")
  with pytest.raises(ValueError, match="min_losses"):
    mtgrad.famo(num_tasks=2, min_losses=jnp.zeros(3))
  with pytest.raises(ValueError, match="learning_rate"):
    mtgrad.famo(0.0, num_tasks=2)


# ------------------------------------------------------------ shared checks


def _single_backward_cases():
  return [
    ("imtl_l", {"learning_rate": 0.2}, {}),
    ("stch", {"warmup_steps": 2, "nadir_steps": 1}, {}),
    ("famo", {"protocol": "lagged"}, {}),
    ("famo", {}, {"post_step_losses": True}),
  ]


@pytest.mark.parametrize("name,kwargs,extra", _single_backward_cases())
def test_single_backward_path_equals_stacked_update(name, kwargs, extra):
  xs, ys, scales = _regression()
  task_losses = functools.partial(_regression_losses, scales=scales)
  tx = getattr(mtgrad, name)(num_tasks=3, **kwargs)

  @jax.jit
  def both(params, state, x, y, post):
    more = {"post_step_losses": post} if extra else {}
    losses, pullback = jax.vjp(lambda p: task_losses(p, x, y), params)
    weights, single_state = mtgrad.weights_from_losses(tx, state, losses, **more)
    (single,) = pullback(weights.astype(losses.dtype))
    _, grads = mtgrad.value_and_jacobian(task_losses)(params, x, y)
    stacked, stacked_state = tx.update(grads, state, params, losses=losses, **more)
    return single, stacked, single_state, stacked_state

  params = {"w": jnp.asarray(np.linspace(-1, 1, xs.shape[-1]), jnp.float32)}
  state = tx.init(params)
  for k in range(5):
    x, y = xs[k % len(xs)], ys[k % len(ys)]
    post = task_losses(params, xs[(k - 1) % len(xs)], ys[(k - 1) % len(ys)])
    single, stacked, single_state, state = both(params, state, x, y, post)
    np.testing.assert_allclose(single["w"], stacked["w"], rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, single_state, state)
    params = jax.tree.map(lambda p, u: p - 0.05 * u, params, stacked)


_METHODS = [
  ("imtl_l", {}),
  ("imtl", {}),
  ("stch", {"warmup_steps": 1}),
  ("famo", {"protocol": "lagged"}),
]


@pytest.mark.parametrize("name,kwargs", _METHODS)
def test_zero_losses_and_gradients_stay_finite(name, kwargs):
  tx = getattr(mtgrad, name)(num_tasks=3, **kwargs)
  params = {"w": jnp.zeros(4)}
  update = jax.jit(lambda g, s, loss: tx.update(g, s, params, losses=loss))
  state = tx.init(params)
  for grads in ({"w": jnp.zeros((3, 4))}, {"w": jnp.eye(3, 4)}):
    for _ in range(3):
      updates, state = update(grads, state, jnp.zeros(3))
      assert np.all(np.isfinite(updates["w"]))
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name,kwargs", _METHODS)
def test_nan_loss_gives_nan_update(name, kwargs):
  tx = getattr(mtgrad, name)(num_tasks=3, **kwargs)
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.eye(3, 4)}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, losses=jnp.array([1.0, jnp.nan, 2.0]))
  assert np.isnan(updates["w"]).any()


@pytest.mark.parametrize("name,kwargs", _METHODS)
def test_bfloat16_inputs_keep_float32_state(name, kwargs):
  tx = getattr(mtgrad, name)(num_tasks=3, **kwargs)
  params = {"w": jnp.zeros(4, jnp.bfloat16)}
  grads = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((3, 4)), jnp.bfloat16)}
  state = tx.init(params)
  before = jax.tree.map(lambda x: x.dtype, state)
  for _ in range(2):
    updates, state = tx.update(
      grads, state, params, losses=jnp.array([1.0, 0.5, 2.0], jnp.bfloat16)
    )
  assert updates["w"].dtype == jnp.bfloat16
  assert jax.tree.map(lambda x: x.dtype, state) == before
  assert state.weights.dtype == jnp.float32
