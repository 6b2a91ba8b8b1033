"""The viewer's web app (Starlette, served by uvicorn) and its security rules.

Routes (all GET)::

    /                                  the page (index.html)
    /config.js                         tells the page it talks to a server
    /static/<name>                     the page's own files (OpenSeadragon, view.js, view.css)
    /api/slides                        the slide list
    /api/slide/<key>[/<layer>]         one slide's facts, one layer's payload (wsikit.view.data)
    /dzi/<key>/<level>/<col>_<row>.jpeg  DeepZoom tiles

Nothing from a URL is joined onto a file path: static files are read into a table at start-up and
looked up by name; slides and layers by key in :class:`~wsikit.view.data.ViewJob`'s tables. Anything
else is a 404. Every request needs the session's token (``?token=`` once, then a cookie, or the
``X-Wsikit-Token`` header) unless the server was started without one, which is allowed only on the
loopback interface; on loopback the ``Host`` header must name the loopback too (no DNS rebinding).
"""

from __future__ import annotations

import gzip
import json
import logging
import secrets
import socket
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wsikit.slide import SlideError
from wsikit.view.base import ViewError
from wsikit.view.data import ViewJob
from wsikit.view.export import static_files

COOKIE = "wsikit_view_token"
HEADER = "x-wsikit-token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'",
}
log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


class TokenGate:
    """ASGI middleware: 403 unless the request carries the token (query, cookie or header).

    A token given in the page's query string is turned into an HttpOnly cookie and the browser sent on
    to the same page without it, so it does not stay in the address bar or the history.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        from_query = request.query_params.get("token")
        given = from_query or request.cookies.get(COOKIE) or request.headers.get(HEADER) or ""
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            response = PlainTextResponse(
                "403: this viewer needs its token; open the URL `wsikit view` printed", 403
            )
            await response(scope, receive, send)
            return
        if from_query and request.url.path == "/":
            response = RedirectResponse("/", 303)
            self._set_cookie(response)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _set_cookie(self, response: Response) -> None:
        response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", path="/")


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class _Payloads:
    """JSON payloads of the job, encoded once (plain and gzip) and kept."""

    def __init__(self, job: ViewJob) -> None:
        self.job = job
        self._done: dict[tuple[str, ...], tuple[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def response(self, request: Request, key: tuple[str, ...], cache: bool = True) -> Response:
        with self._lock:
            hit = self._done.get(key)
        if hit is None:
            payload = self._build(key)
            raw = json.dumps(payload, separators=(",", ":")).encode()
            hit = (raw, gzip.compress(raw, 5))
            if cache:
                with self._lock:
                    self._done[key] = hit
        headers = {"Cache-Control": "no-cache"}
        if "gzip" in request.headers.get("accept-encoding", "") and len(hit[0]) > 1024:
            headers["Content-Encoding"] = "gzip"
            return Response(hit[1], media_type="application/json", headers=headers)
        return Response(hit[0], media_type="application/json", headers=headers)

    def _build(self, key: tuple[str, ...]) -> dict[str, Any]:
        if key == ("slides",):
            return self.job.slide_list()
        if len(key) == 1:
            return self.job.meta(key[0])
        return self.job.layer(key[0], key[1])


def build_app(job: ViewJob, token: str | None, host: str = "127.0.0.1") -> Starlette:
    """The viewer app for ``job``; ``token`` None is allowed on a loopback ``host`` only."""
    if token is None and not is_loopback(host):
        raise ViewError(f"--host {host}: serving beyond this machine needs the token; drop --no-token")
    files = static_files()
    payloads = _Payloads(job)

    def page(request: Request) -> Response:
        return Response(files["index.html"][0], media_type="text/html", headers={"Cache-Control": "no-store"})

    def config(request: Request) -> Response:
        return Response('window.WSIKIT_CONFIG = {"mode": "server"};\n', media_type="text/javascript")

    def static(request: Request) -> Response:
        hit = files.get(request.path_params["name"])
        if hit is None:
            return PlainTextResponse("404: no such file", 404)
        return Response(hit[0], media_type=hit[1], headers={"Cache-Control": "max-age=3600"})

    def api(request: Request) -> Response:
        key = tuple(v for v in (request.path_params.get("key"), request.path_params.get("layer")) if v)
        try:
            return payloads.response(request, key or ("slides",), cache=bool(key))
        except KeyError:
            return PlainTextResponse("404: no such slide or layer in this job", 404)
        except (ViewError, SlideError) as exc:
            return PlainTextResponse(f"422: {exc}", 422)

    def tile(request: Request) -> Response:
        p = request.path_params
        try:
            dz = job.deepzoom(p["key"])
            data = dz.tile(int(p["level"]), int(p["col"]), int(p["row"]))
        except KeyError:
            return PlainTextResponse("404: no such slide or tile", 404)
        except (ViewError, SlideError) as exc:
            return PlainTextResponse(f"422: {exc}", 422)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    routes = [
        Route("/", page),
        Route("/config.js", config),
        Route("/static/{name:path}", static),
        Route("/api/slides", api),
        Route("/api/slide/{key}", api),
        Route("/api/slide/{key}/{layer}", api),
        Route("/dzi/{key}/{level:int}/{col:int}_{row:int}.jpeg", tile),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if is_loopback(host):
        middleware.append(
            Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])
        )
    if token is not None:
        middleware.append(Middleware(TokenGate, token=token))
    return Starlette(routes=routes, middleware=middleware)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one); a taken port raises :class:`ViewError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ViewError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(app: Starlette) -> Any:
    """A uvicorn server for ``app``: ``.run(sockets=[bind(...)])`` serves until ``.should_exit`` is set."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def warm_predictions(job: ViewJob) -> threading.Thread:
    """Score every slide of every run in the background, so the slide list fills in its predictions."""

    def run() -> None:
        for source in job.sources:
            for rec in job.slides.values():
                try:
                    if source.has(rec, job):
                        source.payload(rec, job)
                except (KeyError, ViewError, SlideError) as exc:
                    log.warning("%s: %s", rec.slide_id, exc)

    thread = threading.Thread(target=run, name="wsikit-view-scores", daemon=True)
    thread.start()
    return thread
