"""The ``kmsq`` commands, one module per command group; ``kmsq.cli`` registers them."""
