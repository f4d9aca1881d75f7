"""edgemoe: Mixture-of-Experts over heterogeneous edge networks.

Layers (dependencies point downward only):

- ``edgemoe.moe``    pure PyTorch MoE layer, routers (top-k, expert choice, ETR), experts, losses;
- ``edgemoe.edge``   pure numpy edge network model, arrivals, queues, Lyapunov controllers, simulator;
- ``edgemoe.train``  Stable-MoE training: composes ``moe`` and ``edge``;
- ``edgemoe.collab`` MoE² collaborative inference over edge LLMs;
- ``edgemoe.cli`` / ``edgemoe.report``  the ``edgemoe`` command and run reports.
"""

__version__ = "0.1.0"
