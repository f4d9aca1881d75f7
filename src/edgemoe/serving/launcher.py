"""Running the gateway: uvicorn in the foreground (``edgemoe serve``) or on a thread (tests,
benchmarks), with a header read timeout uvicorn lacks.

uvicorn bounds idle keep-alive connections but not a client that opens a connection and sends its
headers slowly (or never): :func:`header_timeout_protocol` closes such a connection after
``serve.header_timeout_s``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from edgemoe.serving.app import create_app
from edgemoe.serving.config import GatewayConfig, is_loopback, resolve_api_key
from edgemoe.serving.metrics import LOG, Metrics, configure_logging
from edgemoe.serving.service import MoE2Service


def header_timeout_protocol(seconds: float, metrics: Metrics | None = None) -> type:
    """uvicorn's httptools protocol, closing a connection whose request headers take over ``seconds``
    (answered with a bare 408, logged, and counted as route ``other`` when ``metrics`` is given)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            LOG.warning("header timeout", extra={"fields": {"client": str(self.client), "after_s": seconds}})
            if metrics is not None:
                metrics.request("other", 408, seconds)
            if not self.transport.is_closing():
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                )
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_config(app: Any, config: GatewayConfig, metrics: Metrics, **kwargs: Any) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        http=header_timeout_protocol(config.serve.header_timeout_s, metrics),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        **kwargs,
    )


@dataclass
class RunningServer:
    """A uvicorn server on a background thread (tests, benchmarks); ``stop()`` ends it."""

    url: str
    server: Any
    thread: threading.Thread
    service: MoE2Service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_in_thread(
    config: GatewayConfig, service: MoE2Service | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningServer:
    """Serve ``config`` on ``host:port`` (0 = ephemeral) in a thread; returns once it listens."""
    import uvicorn

    service = service or MoE2Service(config)
    app = create_app(service, resolve_api_key(config.serve, host))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, config, service.metrics))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway failed to start")
        time.sleep(0.01)
    bound_host, bound_port = sock.getsockname()[:2]
    return RunningServer(f"http://{bound_host}:{bound_port}", server, thread, service)


def serve_forever(config: GatewayConfig, host: str | None = None, port: int | None = None) -> None:
    """``edgemoe serve``: check the key, build the service and run uvicorn in the foreground."""
    import uvicorn

    host = host or config.serve.host
    port = port if port is not None else config.serve.port
    api_key = resolve_api_key(config.serve, host)
    configure_logging()
    service = MoE2Service(config)
    app = create_app(service, api_key)
    LOG.info("listening", extra={"fields": {"host": host, "port": port, "experts": service.names,
                                            "api_key": api_key is not None, "loopback": is_loopback(host)}})  # fmt: skip
    uvicorn.Server(uvicorn_config(app, config, service.metrics, host=host, port=port)).run()
