"""``python -m mtgrad``: the same command line as the ``mtgrad`` console script."""

from mtgrad.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
