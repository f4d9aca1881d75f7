"""edgemoe.edge: edge network model and per-slot control (pure numpy, no torch).

Public API (see docs/stable-moe.md):

- :class:`NetworkSpec`, :func:`load_scenario`, :func:`load_spec`: servers, slots, arrivals, scores;
- :func:`make_arrivals`: seeded arrival processes (Poisson, MMPP, CSV trace);
- :class:`NetworkState`, :func:`advance`: token backlog Q_E, virtual energy queue Z_E, ``online_E``;
- :class:`SlotEngine`: the one slot loop state (queues, energy, on/offline) that the simulator and
  the trainer both advance;
- :class:`Decision`, :func:`make_controller`: ``decide(state, scores_NE) -> Decision``;
- :func:`save_score_trace`, :func:`load_score_trace`: the recorded gate-score format.
"""

from edgemoe.edge.arrivals import ArrivalProcess, make_arrivals, read_trace_csv
from edgemoe.edge.controllers import (
    ALL_POLICIES,
    GATE_FOLLOWING,
    LOAD_ONLY,
    Controller,
    Decision,
    expand_policies,
    make_controller,
)
from edgemoe.edge.scores import (
    ScoreTrace,
    SkewedScoreGenerator,
    Workload,
    load_score_trace,
    save_score_trace,
)
from edgemoe.edge.spec import (
    SCENARIOS,
    ArrivalSpec,
    ControllerSpec,
    NetworkSpec,
    ScoreSpec,
    ServerSpec,
    load_scenario,
    load_spec,
    spec_from_dict,
)
from edgemoe.edge.state import NetworkState, SlotEngine, SlotOutcome, advance

__all__ = [
    "ALL_POLICIES",
    "GATE_FOLLOWING",
    "LOAD_ONLY",
    "SCENARIOS",
    "ArrivalProcess",
    "ArrivalSpec",
    "Controller",
    "ControllerSpec",
    "Decision",
    "NetworkSpec",
    "NetworkState",
    "ScoreSpec",
    "ScoreTrace",
    "ServerSpec",
    "SkewedScoreGenerator",
    "SlotEngine",
    "SlotOutcome",
    "Workload",
    "advance",
    "expand_policies",
    "load_scenario",
    "load_score_trace",
    "load_spec",
    "make_arrivals",
    "make_controller",
    "read_trace_csv",
    "save_score_trace",
    "spec_from_dict",
]
