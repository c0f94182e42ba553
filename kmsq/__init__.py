"""kmsq entry points: the ``kmsq`` command line. The only place that picks concrete adapters."""
