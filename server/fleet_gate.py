"""The coordinator's public port: Flower's Fleet API (what SuperNodes call) and nothing else.

Flower 1.41's SuperLink serves its Fleet API, its Control API (``flwr run``, ``flwr log``, ``flwr
supernode register``) and its Runtime API (the ServerApp's) on one HTTP port, and the open-source
Control API authenticates no one: its account plugin is a no-op unless Flower's enterprise OIDC plugin
is installed, and TLS only proves the server to the caller. Flower leaves it to the operator to keep
that port away from everyone but themselves, and a federation's port must be open to every
institution. Started on the federation's address, as fedlora once did, any party holding the address
and the CA certificate (every institution) could ``flwr run`` its own app: its ServerApp ran in the
coordinator's folder, its ClientApp at every institution, and ``flwr log`` streamed what they found.

So the SuperLink listens on loopback only, where the coordinator's own ``flwr`` commands reach it
(server.deploy), and this gate listens on ``federation.superlink_address`` with the SuperLink's TLS
certificate. It forwards a POST to one of the Fleet endpoints (``/v1/fleet/<name>``) to the SuperLink,
body and headers untouched (node authentication signs them), and answers 404 to anything else before
the SuperLink sees it: no Control, no Runtime, no documentation pages. A call the SuperLink does not
take (it is starting, or restarting after a crash, behind an already listening gate) is answered 502 or
504, which SuperNodes retry, as they would had they reached the SuperLink directly.

    python -m fedlora.server.fleet_gate --host H --port P --upstream https://127.0.0.1:Q \
        [--certfile F --keyfile K --ca CA] [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import httpx
import uvicorn
from flwr.supercore.app_utils import start_parent_process_monitor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("fedlora.server.fleet_gate")
FLEET = "/v1/fleet/"
ENDPOINT = re.compile(r"[a-z][a-z-]{0,63}")  # Flower's Fleet endpoints: register-node, pull-messages, ...
UPSTREAM_SECONDS = 600.0
# Hop-by-hop headers, and what httpx recomputes or has already undone (it decodes compressed bodies)
NOT_PASSED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length",
     "content-encoding", "proxy-authorization", "proxy-authenticate"}
)  # fmt: skip


def passable(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in NOT_PASSED]


def unreachable(upstream: str, name: str, err: httpx.TransportError) -> Response:
    """The answer to a Fleet call the SuperLink did not take (not started yet, restarting, gone): 504
    for a timeout, else 502, the codes a SuperNode retries. Any other code (an unhandled error's 500)
    ends Flower's heartbeat thread for good: its node is then declared unavailable mid-round although
    it still pulls and answers messages."""
    timed_out = isinstance(err, httpx.TimeoutException)
    log.warning("%s: the SuperLink at %s did not answer (%s)", name, upstream, type(err).__name__)
    return PlainTextResponse(
        f"the SuperLink did not answer ({type(err).__name__})", status_code=504 if timed_out else 502
    )


def gate_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """The ASGI app: Fleet calls forwarded to ``upstream`` (the SuperLink on loopback), the rest 404."""
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=UPSTREAM_SECONDS)

    async def forward(request: Request) -> Response:
        name = request.path_params["name"]
        if not ENDPOINT.fullmatch(name) or request.url.query:
            return PlainTextResponse("not served here", status_code=404)
        try:
            answer = await client.post(
                FLEET + name, content=await request.body(), headers=passable(request.headers.items())
            )
        except httpx.TransportError as err:
            return unreachable(upstream, name, err)
        return Response(answer.content, answer.status_code, headers=dict(passable(answer.headers.items())))

    async def refuse(_request: Request) -> Response:
        return PlainTextResponse("not served here", status_code=404)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [
        Route(FLEET + "{name}", forward, methods=["POST"]),
        Route("/{rest:path}", refuse, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedlora.server.fleet_gate", description=__doc__)
    ap.add_argument("--host", required=True, help="the federation's address, as SuperNodes reach it")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the SuperLink on loopback, e.g. https://127.0.0.1:Q")
    ap.add_argument("--certfile", help="the SuperLink's TLS certificate (none: plain HTTP, --insecure)")
    ap.add_argument("--keyfile")
    ap.add_argument("--ca", help="the CA that signed it, to check the SuperLink on loopback")
    ap.add_argument("--parent-pid", type=int, help="exit when this process (fedlora-server start) is gone")
    args = ap.parse_args(argv)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=args.ca) if args.ca else False
    uvicorn.run(
        gate_app(args.upstream, verify),
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
