"""The MoE² gateway: an OpenAI-compatible HTTP endpoint over a set of edge LLM experts.

One job per module, after vLLM's split: :mod:`~edgemoe.serving.config` (the ``serve:`` settings),
:mod:`~edgemoe.serving.protocol` (the wire schema and error objects),
:mod:`~edgemoe.serving.metrics` (Prometheus text and JSON logs), :mod:`~edgemoe.serving.breaker`
(per-expert circuit breakers and health probes), :mod:`~edgemoe.serving.service` (MoE² serving:
the policy's route, the fan-out under a deadline, combining answers), :mod:`~edgemoe.serving.app`
(the ASGI app) and :mod:`~edgemoe.serving.launcher` (uvicorn). See docs/serving.md.
"""
