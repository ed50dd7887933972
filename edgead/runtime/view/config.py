"""The station view's address, options and access token, from its output URI.

    http://127.0.0.1:8080, http://:8080    this machine only (the default host; no token needed)
    http://0.0.0.0:8080, http://@:8080     every interface: needs the token
    http://10.0.0.5:8080?fps=10&quality=70&strip=12

Options: ``fps`` caps the frames the view encodes per second (default 15), ``quality`` is the
JPEG quality of the live frame (default 80), ``strip`` the number of NG parts kept (default 8).
The token never goes in the URI (``ps`` shows every process's command line): it comes from
``EDGEAD_VIEW_TOKEN``, or ``--view-token``, or is generated and printed once.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

DEFAULT_PORT = 8080
TOKEN_ENV = "EDGEAD_VIEW_TOKEN"
LOOPBACK_NAMES = ("localhost",)
OPTIONS = {"fps": (float, 15.0, 0.1, 120.0), "quality": (int, 80, 10, 100), "strip": (int, 8, 1, 64)}


class ViewConfigError(ValueError):
    """The view's URI or token is unusable; the message says what to write instead."""


@dataclass(frozen=True)
class ViewConfig:
    host: str
    port: int
    fps: float = 15.0
    quality: int = 80
    strip: int = 8
    token: str | None = None
    token_generated: bool = False

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def url(self, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port if port is None else port}/"

    def token_ok(self, offered: str | None) -> bool:
        """Constant-time comparison, so the answer's timing says nothing about the token."""
        if self.token is None:
            return True
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_view_uri(uri: str, token: str | None = None, environ: dict[str, str] | None = None) -> ViewConfig:
    """The :class:`ViewConfig` of ``uri``; ``token`` is ``--view-token`` (the environment's
    ``EDGEAD_VIEW_TOKEN`` when not given)."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "http":
        raise ViewConfigError(f"{uri}: the station view is an http:// URI, e.g. http://127.0.0.1:{DEFAULT_PORT}")
    try:
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError as err:
        raise ViewConfigError(f"{uri}: bad port ({err}); e.g. http://127.0.0.1:{DEFAULT_PORT}") from err
    if parts.path not in ("", "/"):
        raise ViewConfigError(f"{uri}: the view is served at the root; drop the path {parts.path!r}")
    # "http://@:8080" is every interface, as jetson-utils reads "@"; no host at all is this machine only.
    host = parts.hostname or ("0.0.0.0" if parts.netloc.startswith("@") else "127.0.0.1")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "token" in query:
        raise ViewConfigError(f"{uri.split('?')[0]}: do not put the token in the URI (ps shows it to every "
                              f"user); set {TOKEN_ENV} or give --view-token")
    options = _options(uri, query)
    env = os.environ if environ is None else environ
    token = token or env.get(TOKEN_ENV) or None
    generated = False
    if token is None and not is_loopback(host):
        token, generated = secrets.token_urlsafe(18), True
    if token is not None and len(token) < 8:
        raise ViewConfigError(f"the view token is {len(token)} characters long; use at least 8 "
                              f"(e.g. {TOKEN_ENV}=$(openssl rand -hex 16))")
    return ViewConfig(host=host, port=port, token=token, token_generated=generated, **options)


def _options(uri: str, query: dict[str, str]) -> dict[str, float | int]:
    unknown = sorted(set(query) - set(OPTIONS))
    if unknown:
        raise ViewConfigError(f"{uri}: unknown view option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    out: dict[str, float | int] = {}
    for name, (kind, default, low, high) in OPTIONS.items():
        if name not in query:
            out[name] = default
            continue
        try:
            value = kind(query[name])
        except ValueError:
            raise ViewConfigError(f"{uri}: {name}={query[name]!r} is not a number") from None
        if not low <= value <= high:
            raise ViewConfigError(f"{uri}: {name}={value} is out of range [{low}, {high}]")
        out[name] = value
    return out
