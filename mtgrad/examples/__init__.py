"""Worked examples on real data that ships with the package's extras (nothing downloaded).

Each module has ``run(...) -> dict`` for notebooks and a ``main()`` that prints
a table: ``python -m mtgrad.examples.primary_auxiliary``,
``python -m mtgrad.examples.noisy_labels``. They need the ``compare`` extra
(``pip install "mtgrad[compare]"``) for the bundled MNIST digits.
"""
