"""The problems of `mtgrad compare`: toy oracles, Pareto front, data, runner, scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtgrad._src import data
from mtgrad._src import registry
from mtgrad._src.compare import multimnist
from mtgrad._src.compare import problems
from mtgrad._src.compare import qm9
from mtgrad._src.compare import regression
from mtgrad._src.compare import report
from mtgrad._src.compare import runner
from mtgrad._src.compare import toy


def cagrad_toy_reference(x1: float, x2: float) -> tuple[float, float]:
  """The toy transcribed term by term from CAGrad's ``toy.py`` (float64,
  Python scalars), with Nash-MTL's 0.1 scale and FAMO's offsets."""
  import math

  lower = 0.000005
  f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), lower)) + 6
  f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), lower)) + 6
  c1 = max(math.tanh(x2 * 0.5), 0)
  f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  c2 = max(math.tanh(-x2 * 0.5), 0)
  return 0.1 * (f1 * c1 + f1_sq * c2) + 21 * 0.1, (f2 * c1 + f2_sq * c2) + 21


@pytest.fixture(scope="module")
def tiny_toy():
  return toy.toy("tiny", 0)


def test_toy_matches_the_reference_formula_and_starts():
  rng = np.random.default_rng(0)
  points = np.concatenate([rng.uniform(-10, 10, (200, 2)), np.asarray(toy.STARTS)])
  got = toy.landscape(points)
  want = np.array([cagrad_toy_reference(*p) for p in points])
  np.testing.assert_allclose(got, want, rtol=1e-12)
  got32 = np.stack(toy.losses(jnp.asarray(points[:, 0]), jnp.asarray(points[:, 1])), -1)
  np.testing.assert_allclose(got32, want, rtol=2e-5, atol=2e-5)
  assert toy.STARTS == ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def test_toy_losses_are_positive_on_the_box():
  axis = np.linspace(-12, 12, 601)
  grid = np.stack([g.ravel() for g in np.meshgrid(axis, axis)], axis=1)
  assert toy.landscape(grid).min() > 0.09  # l1 >= ~0.1, l2 >= ~1


def test_nondominated_matches_brute_force():
  values = np.random.default_rng(1).normal(size=(300, 2))
  keep = toy.nondominated(values)
  brute = [
    i
    for i, v in enumerate(values)
    if not any(np.all(w <= v) and np.any(w < v) for j, w in enumerate(values) if j != i)
  ]
  assert sorted(keep.tolist()) == brute
  assert np.all(np.diff(values[keep, 0]) > 0)  # ordered by the first objective


def test_pareto_front_is_the_front_of_the_pareto_set(tiny_toy):
  front = toy.pareto_front()
  assert np.all(np.diff(front[:, 0]) > 0) and np.all(np.diff(front[:, 1]) < 0)
  # the analytic Pareto set of the papers: x2 = -8.3552 for -7 <= x1 <= 7
  x1 = np.linspace(-7, 7, 200)
  on_set = toy.landscape(np.stack([x1, np.full_like(x1, -8.3552)], axis=1))
  assert toy.distance_to_front(on_set, front).max() < 0.03
  # no sampled point dominates the front by more than the grid resolution
  samples = toy.landscape(np.random.default_rng(2).uniform(-10, 10, (20_000, 2)))
  margin = np.min(front[None, :, :] - samples[:, None, :], axis=-1)  # > 0: dominated front point
  assert margin.max() < 0.01
  # the tiny problem's coarse front is close to the fine one
  assert toy.distance_to_front(tiny_toy.pareto_front, front).max() < 0.2


def test_distance_to_front_is_point_to_polyline_distance():
  front = np.array([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
  points = np.array([[1.0, 1.0], [0.5, 1.5], [2.0, 2.0], [3.0, -1.0], [-1.0, 2.0]])
  np.testing.assert_allclose(
    toy.distance_to_front(points, front), [0.0, 0.0, np.sqrt(2.0), np.sqrt(2.0), 1.0]
  )


def test_first_adam_step_on_the_toy_moves_by_the_learning_rate(tiny_toy):
  row = runner.train(tiny_toy, "sum", steps=1, seed=0)
  assert row["error"] is None and row["finite"]
  paths = np.asarray(row["trajectories"])  # [S, points, 2]: the start and the final point
  starts = np.asarray(toy.STARTS)
  np.testing.assert_allclose(paths[:, 0], starts)
  grads = np.stack(
    [jax.grad(lambda x: jnp.sum(jnp.stack(toy.losses(x[0], x[1]))))(jnp.asarray(s)) for s in starts]
  )
  # Adam's first update is -lr * g / (|g| + eps): -lr * sign(g) wherever |g| >> eps
  expected = starts - 1e-3 * grads / (np.abs(grads) + 1e-8)
  np.testing.assert_allclose(paths[:, -1], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(row["metrics"], toy.landscape(paths[:, -1]).mean(0), rtol=1e-5)
  np.testing.assert_allclose(
    row["front_distance"],
    toy.distance_to_front(toy.landscape(paths[:, -1]), tiny_toy.pareto_front),
    rtol=1e-4,
  )


def test_runs_are_deterministic_for_a_seed(tiny_toy):
  mnist = _tiny("multimnist")
  for problem, method, steps in ((tiny_toy, "pcgrad", 50), (mnist, "rlw", 3)):
    first, second = (runner.train(problem, method, steps, seed=3) for _ in range(2))
    assert first["error"] is None
    for key in ("metrics", "final_train_losses", "final_weights"):
      assert first[key] == second[key], (method, key)


def test_a_failing_method_is_a_row_with_its_error(tiny_toy):
  def update(task_grads, state, params=None, **extra):
    raise ValueError("boom")

  broken = optax.GradientTransformationExtraArgs(lambda params: (), update)
  row = runner.train(tiny_toy, "broken", steps=2, seed=0, transform=broken)
  assert row["error"] == "ValueError: boom" and not row["finite"]


def test_regression_is_deterministic_for_a_seed():
  a, b, c = (regression.regression2("tiny", s) for s in (0, 0, 1))
  params = a.init(jax.random.key(0))
  np.testing.assert_array_equal(a.evaluate(params), b.evaluate(params))
  assert not np.array_equal(a.evaluate(params), c.evaluate(params))
  assert a.train_losses(params, jax.random.key(1)).shape == (2,)
  assert regression.regression10("tiny", 0).num_tasks == 10


def test_overlay_places_both_digits():
  images, _ = data.mnist_digits()
  left, right = images[:3], images[-3:]
  merged = multimnist.overlay(left, right)
  assert merged.shape == (3, 18, 18)
  pool = lambda im: im.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
  # where only one digit lies, the image is that digit (pooled)
  np.testing.assert_allclose(merged[:, :4, :4], pool(left)[:, :4, :4])
  np.testing.assert_allclose(merged[:, 14:, 14:], pool(right)[:, 10:, 10:])
  canvas = np.zeros((3, 36, 36), np.float32)
  canvas[:, :28, :28] = left
  canvas[:, 8:, 8:] = np.maximum(canvas[:, 8:, 8:], right)
  np.testing.assert_allclose(merged, canvas.reshape(3, 18, 2, 18, 2).mean(axis=(2, 4)))


def test_multimnist_problem_evaluates_accuracy():
  problem = multimnist.multimnist("tiny", 0)
  params = problem.init(jax.random.key(0))
  accuracy = np.asarray(problem.evaluate(params))
  assert accuracy.shape == (2,) and np.all((accuracy >= 0) & (accuracy <= 1))
  losses = problem.train_losses(params, jax.random.key(0))
  np.testing.assert_allclose(losses, np.log(10.0), rtol=0.5)  # near-uniform logits at init
  assert problem.higher_is_better == (True, True) and problem.single_task


def test_delta_m_signs_and_scores():
  assert report.delta_m([2.0, 1.0], [1.0, 1.0], [False, False]) == pytest.approx(50.0)
  assert report.delta_m([0.9, 0.8], [0.8, 0.8], [True, True]) == pytest.approx(-6.25)
  problem = toy.toy("tiny", 0)
  rows = [
    {"method": "sum", "error": None, "metrics": [1.0, 2.0]},
    {"method": "m", "error": None, "metrics": [0.5, 2.0]},
    {"method": "bad", "error": "ValueError: x"},
  ]
  stl = {"method": "single-task", "error": None, "metrics": [0.5, 1.0]}
  report.add_scores(problem, rows, stl)
  assert rows[1]["delta_m_sum"] == pytest.approx(-25.0)
  assert rows[0]["delta_m_stl"] == pytest.approx(100.0)
  assert "delta_m_sum" not in rows[2]


def test_every_available_problem_builds_at_tiny_size(monkeypatch):
  for name in problems.available():
    problem = problems.PROBLEMS[name]("tiny", 0)
    assert problem.name == name and len(problem.higher_is_better) == problem.num_tasks
  assert set(problems.DEFAULT) <= set(problems.available())
  monkeypatch.setitem(problems.OPTIONAL, "qm9", lambda: False)
  assert "qm9" not in problems.available()


def test_coulomb_features_of_h2():
  bond = 0.74  # Angstrom
  features = qm9.coulomb_features(["H", "H"], np.array([[0.0, 0.0, 0.0], [0.0, 0.0, bond]]))
  inverse = 1.0 / (bond * 1.8897261)  # bohr
  # [[0.5, 1/d], [1/d, 0.5]] has eigenvalues 0.5 +- 1/d, sorted by magnitude
  np.testing.assert_allclose(features[:2], [0.5 + inverse, 0.5 - inverse], rtol=1e-12)
  assert features.shape == (34,) and np.all(features[2:29] == 0)
  assert features[29:].tolist() == [2, 0, 0, 0, 0]


@pytest.mark.skipif(not qm9.available(), reason="qm9pack is not installed")
def test_qm9_reads_the_molecules_offline():
  features, targets = qm9.load(30, seed=0)
  assert features.shape == (30, 34) and targets.shape == (30, 11)
  assert np.all(np.isfinite(targets)) and np.all(targets[:, 0] >= 0)  # dipole moments
  assert np.all(targets[:, 6] < 0)  # total energies U0 (Hartree)
  again, _ = qm9.load(30, seed=0)
  np.testing.assert_array_equal(features, again)


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.names())
def test_every_registry_method_trains_on_the_default_problems(name):
  for problem_name in problems.DEFAULT:
    problem = _tiny(problem_name)
    row = runner.train(problem, name, steps=3, seed=0)
    assert row["error"] is None, f"{name} on {problem_name}: {row['error']}"
    assert row["finite"], f"{name} on {problem_name}: non-finite"


_TINY: dict = {}


def _tiny(name):
  """Each tiny problem built once per process (its data and Pareto front)."""
  if name not in _TINY:
    _TINY[name] = problems.PROBLEMS[name]("tiny", 0)
  return _TINY[name]
