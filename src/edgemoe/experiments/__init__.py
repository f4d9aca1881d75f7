"""edgemoe.experiments: runs that compose the library layers and report on them.

Comparisons, the demo, seeds and sweeps live here, above ``train``, ``collab`` and ``edge``; the CLI
only parses arguments and calls into this layer, and no library layer imports it (or ``report``).

- :mod:`edgemoe.experiments.compare`: Stable-MoE training against baseline policies over seeds;
- :mod:`edgemoe.experiments.demo`: the ``edgemoe demo`` comparison on the embedded default;
- :mod:`edgemoe.experiments.simulate`: network simulation runs (``edgemoe simulate``): policies or a
  parameter sweep, seeds in worker processes, the workload chunk sized to a memory budget;
"""
