"""HTTPS inside the node (hypercorn on trio): /metrics now, the S3 gateway
when it is mounted.

TLS 1.2+ with the node's certificate; clients must present a certificate
from the cluster CA (mTLS, as everywhere). hypercorn's ASGI scope does not
expose the peer certificate, so this listener checks the chain and validity
but cannot consult the revocation list; it serves read-only metrics, and
anything that writes authenticates again inside the request (S3 SigV4).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, HTTPResponseStartEvent, Scope

log = logging.getLogger(__name__)

App = ASGIFramework


def metrics_app(render: Callable[[], bytes]) -> App:
    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            not_found: HTTPResponseStartEvent = {
                "type": "http.response.start",
                "status": 404,
                "headers": [(b"content-type", b"text/plain")],
            }
            await send(not_found)
            await send({"type": "http.response.body", "body": b"not found\n", "more_body": False})
            return
        body = render()
        ok: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
        }
        await send(ok)
        head = scope["method"] == "HEAD"
        await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})

    return app


async def serve_https(
    app: App,
    bind: tuple[str, int],
    tls_dir: Path,
    *,
    require_client_certificate: bool = True,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    config = Config()
    config.bind = [f"{bind[0]}:{bind[1]}"]
    config.certfile = str(tls_dir / "cert.pem")
    config.keyfile = str(tls_dir / "key.pem")
    config.ca_certs = str(tls_dir / "ca.pem")
    config.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_NONE
    config.accesslog = None
    config.errorlog = logging.getLogger("cloudless.http")
    config.graceful_timeout = 1.0
    await serve(app, config, task_status=task_status)
