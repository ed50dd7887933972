"""Who may see the line: the token, the Host and Origin checks, and headers that keep the page local.

- Bound to a loopback address: no token needed (one given is still required), and the Host header
  must name a loopback host, so a web page elsewhere cannot reach the view by DNS rebinding.
- Bound beyond loopback: every request needs the token, as ``Authorization: Bearer TOKEN``, as the
  cookie the page sets after ``/?token=TOKEN``, or as ``?token=`` (stream URLs for other players).
  Without it: 401. Compared in constant time (:meth:`ViewConfig.token_ok`).
- A WebSocket from another origin is refused (browsers send cookies with cross-site WebSockets).
- Every response forbids the page to load or send anything outside this server (CSP).
"""

from __future__ import annotations

from typing import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from edgead.runtime.view.config import ViewConfig, is_loopback

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store", "Cross-Origin-Resource-Policy": "same-origin"}


def cookie_name(port: int) -> str:
    return f"edgead_view_{port}"  # cookies ignore ports: two views on one host keep their own


def offered_token(request: web.Request, cookie: str) -> tuple[str | None, bool]:
    """(the token the request carries, whether it came in the query)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), False
    if cookie in request.cookies:
        return request.cookies[cookie], False
    if "token" in request.query:
        return request.query["token"], True
    return None, False


def host_allowed(request: web.Request, config: ViewConfig) -> bool:
    if not config.loopback:
        return True  # the token guards it; stations are reached by name or address
    host = urlsplit(f"//{request.host}").hostname or ""
    return is_loopback(host)


def same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc.lower() == request.host.lower()


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def guard(config: ViewConfig, port: Callable[[], int]) -> Middleware:
    """The middleware that applies the rules above to every request."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not host_allowed(request, config):
            raise web.HTTPForbidden(text=f"Host {request.host!r} refused: this view listens on {config.host} only\n")
        if request.headers.get("Upgrade", "").lower() == "websocket" and not same_origin(request):
            raise web.HTTPForbidden(text="WebSocket from another origin refused\n")
        if config.token is not None:
            cookie = cookie_name(port())
            token, in_query = offered_token(request, cookie)
            if not config.token_ok(token):
                raise web.HTTPUnauthorized(
                    headers={"WWW-Authenticate": 'Bearer realm="edgead station view"'},
                    text="401: this station view needs its token: open /?token=TOKEN once (the token was "
                         "printed at start, or is EDGEAD_VIEW_TOKEN), or send Authorization: Bearer TOKEN\n")
            if in_query and request.path == "/":  # keep the token out of the address bar and history
                response = web.HTTPSeeOther(location="/")
                response.set_cookie(cookie, token or "", httponly=True, samesite="Strict", path="/")
                raise response
        return await handler(request)

    return middleware


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: also for streams, WebSockets and errors."""
    for key, value in HEADERS.items():
        response.headers.setdefault(key, value)
