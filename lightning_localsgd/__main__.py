"""``python -m lightning_localsgd fit --config ...``: the command line of :mod:`lightning_localsgd.cli`."""

from lightning_localsgd.cli import main

if __name__ == "__main__":
    main()
