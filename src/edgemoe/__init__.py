"""edgemoe: Mixture-of-Experts over heterogeneous edge networks.

Layers (imports point downward only; docs/architecture.md has the picture and the rules, which
tests/test_architecture.py checks):

- foundation: ``errors``, ``files`` (atomic writes), ``paths`` (data root), ``registry``, ``config``;
- ``edgemoe.moe``    pure PyTorch MoE layer, routers (top-k, expert choice, ETR), experts, losses;
- ``edgemoe.edge``   pure numpy edge network model, arrivals, queues, Lyapunov controllers, simulator;
- ``edgemoe.train``  Stable-MoE training: composes ``moe`` and ``edge``;
- ``edgemoe.collab`` MoE² collaborative inference over edge LLMs;
- ``edgemoe.report`` tables and plots of runs;
- ``edgemoe.experiments`` comparisons, the demo, simulation runs: seeds, sweeps, run folders;
- ``edgemoe.cli``    the ``edgemoe`` command: parses flags, calls ``experiments`` or the library.

Axis letters in array names (``scores_NE`` is tokens x experts):

- ``E`` experts, and the edge servers that host them (server e hosts expert e: one axis, one letter);
- ``T`` tokens of a batch in the MoE layer, or slots of a run in a trace (``backlog_TE``);
- ``N`` tokens of one slot in the edge model; ``K`` experts per token; ``R`` rows of a chunk (the
  tokens of several slots concatenated);
- ``D`` model width, ``H`` expert hidden width, ``C`` classes, channels or token classes;
- MoE²: ``Q`` questions, ``O`` answer options, ``B`` candidate subsets of a batch, ``V`` vocabulary,
  and (within ``collab``/``serving`` only) ``N`` its experts, which are whole LLMs (``probs_QNO``).
"""

__version__ = "0.1.0"
