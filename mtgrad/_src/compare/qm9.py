"""QM9's 11 regression targets from the ``qm9pack`` package (optional, offline)."""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtgrad import models
from mtgrad._src.compare.problem import Problem

# Nash-MTL's and FAMO's 11 targets, in their order, as qm9pack names them.
TARGETS = (
  ("mu", "Dipole_debye"),
  ("alpha", "Polarizability_bohr3"),
  ("homo", "HOMO_au"),
  ("lumo", "LUMO_au"),
  ("r2", "R2_bohr2"),
  ("zpve", "ZPVE_au"),
  ("U0", "InternalEnergy_0K_au"),
  ("U", "InternalEnergy_298K_au"),
  ("H", "Enthalphy_298K_au"),
  ("G", "GibbsFreeEnergy_298K_au"),
  ("cv", "Heatcapacity_Cv_cal_mol_K"),
)
MOLECULES = 130_831  # rows of qm9pack's tables
MAX_ATOMS = 29
_CHARGE = {"H": 1.0, "C": 6.0, "N": 7.0, "O": 8.0, "F": 9.0}
_BOHR_PER_ANGSTROM = 1.8897261


def available() -> bool:
  """Whether qm9pack is installed."""
  return importlib.util.find_spec("qm9pack") is not None


def data_dir() -> pathlib.Path:
  """qm9pack's data folder, found without importing qm9pack (whose import
  needs pandas and setuptools' deprecated ``pkg_resources``)."""
  spec = importlib.util.find_spec("qm9pack")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
      "mtgrad compare: the qm9 problem reads QM9 from the qm9pack package (about 100 MB, "
      "the data ship inside it): pip install qm9pack"
    )
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


def coulomb_features(elements: list[str], xyz: np.ndarray) -> np.ndarray:
  """Sorted Coulomb-matrix eigenvalues (Rupp et al., PRL 2012), zero-padded
  to 29, followed by the counts of H, C, N, O, F: ``[34]``."""
  z = np.array([_CHARGE[e] for e in elements])
  r = np.asarray(xyz, np.float64) * _BOHR_PER_ANGSTROM
  distance = np.linalg.norm(r[:, None] - r[None], axis=-1)
  np.fill_diagonal(distance, 1.0)
  matrix = np.outer(z, z) / distance
  np.fill_diagonal(matrix, 0.5 * z**2.4)
  eig = np.linalg.eigvalsh(matrix)
  eig = eig[np.argsort(-np.abs(eig))]
  counts = [sum(e == s for e in elements) for s in "HCNOF"]
  return np.concatenate([np.pad(eig, (0, MAX_ATOMS - eig.size)), counts])


def load(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``count`` molecules drawn uniformly at random (seeded) from qm9pack's
  tables: features ``[count, 34]`` and the 11 targets ``[count, 11]``."""
  rng = np.random.default_rng(seed)
  keep = set(rng.choice(MOLECULES, size=count, replace=False).tolist())
  csv.field_size_limit(1 << 26)
  features, targets, index = [], [], 0
  for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
    with open(data_dir() / part, newline="") as f:
      for row in csv.DictReader(f):
        if index in keep:
          elements = json.loads(row["Elements"].replace("'", '"'))
          features.append(coulomb_features(elements, json.loads(row["XYZ_Ang"])))
          targets.append([float(row[column]) for _, column in TARGETS])
        index += 1
  if len(features) != count:
    raise ValueError(
      f"mtgrad compare: qm9pack holds fewer than the {MOLECULES} molecules expected."
    )
  order = rng.permutation(len(features))
  return np.asarray(features)[order], np.asarray(targets)[order]


def qm9(size: str, seed: int) -> Problem:
  """QM9 (Ramakrishnan et al. 2014): 11 molecular properties, one task each.

  Molecules are described by their sorted Coulomb-matrix eigenvalues and
  atom counts (a fixed descriptor, not the graph network of Nash-MTL and
  FAMO), fed to a :class:`mtgrad.models.SharedBottom` MLP with one linear
  head per target. Features and targets are standardised on the training
  set; the training losses are the standardised MSEs and the metric is each
  target's test mean absolute error in qm9pack's units (energies in
  Hartree: totals, where Nash-MTL uses atomization energies in eV).
  """
  tiny = size == "tiny"
  num_train, num_test = (512, 256) if tiny else (10_000, 2_000)
  batch = 32 if tiny else 256
  steps = {"tiny": 20, "default": 300, "paper": 1200}[size]
  features, targets = load(num_train + num_test, seed)
  mean, std = features[:num_train].mean(0), features[:num_train].std(0)
  std = np.where(std > 1e-6, std, 1.0)  # e.g. padding that no training molecule fills
  y_mean, y_std = targets[:num_train].mean(0), targets[:num_train].std(0)
  x = jnp.asarray((features - mean) / std, jnp.float32)
  y = jnp.asarray((targets - y_mean) / y_std, jnp.float32)
  x_train, y_train, x_test, y_test = x[:num_train], y[:num_train], x[num_train:], y[num_train:]
  scale = jnp.asarray(y_std, jnp.float32)
  hidden = (32,) if tiny else (256, 128)
  num_tasks = len(TARGETS)

  def build(key):
    heads = (1,) * num_tasks
    return models.SharedBottom(x.shape[1], hidden, (), heads, rngs=nnx.Rngs(key))

  graphdef, _ = nnx.split(build(jax.random.key(0)), nnx.Param)

  def predict(params, x):
    return jnp.concatenate(nnx.merge(graphdef, params)(x), axis=-1)  # [N, 11]

  def train_losses(params, key):
    idx = jax.random.randint(key, (batch,), 0, num_train)
    return jnp.mean((predict(params, x_train[idx]) - y_train[idx]) ** 2, axis=0)

  def evaluate(params):
    return jnp.mean(jnp.abs(predict(params, x_test) - y_test), axis=0) * scale

  return Problem(
    name="qm9",
    description=(
      f"QM9 (qm9pack), 11 targets, {num_train} molecules, Coulomb-matrix features, "
      f"shared-bottom MLP, Adam 1e-3, batch {batch}, {steps} steps"
    ),
    task_names=tuple(name for name, _ in TARGETS),
    metric="test MAE in qm9pack's units",
    higher_is_better=(False,) * num_tasks,
    init=lambda key: nnx.split(build(key), nnx.Param)[1],
    train_losses=train_losses,
    evaluate=evaluate,
    learning_rate=1e-3,
    steps=steps,
  )
