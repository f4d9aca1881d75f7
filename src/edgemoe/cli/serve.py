"""``edgemoe serve --config collab.yaml``: the MoE² gateway (OpenAI-compatible HTTP API)."""

from __future__ import annotations

import argparse

from edgemoe.cli.common import add_config_args, load_config_dict
from edgemoe.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the MoE² gateway over the experts of a collab config",
        description="Serve /v1/chat/completions, /v1/moe2/answer, /v1/models, /health and /metrics "
        "(see docs/serving.md).",
    )
    add_config_args(parser)
    parser.add_argument("--host", default=None, help="interface to bind (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        raise ConfigError("--config", "is required: a collab.yaml with experts (see docs/serving.md)")
    try:
        from edgemoe.serving.config import load_gateway_config
        from edgemoe.serving.launcher import serve_forever
    except ImportError as exc:
        raise ConfigError("serve", f"needs the [serve] extra (pip install -e '.[serve]'): {exc}") from exc
    serve_forever(load_gateway_config(load_config_dict(args)), host=args.host, port=args.port)
    return 0
