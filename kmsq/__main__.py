"""``python -m kmsq``: the same as the ``kmsq`` command."""

from kmsq.cli import main

main()
