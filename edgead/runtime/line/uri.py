"""Parsing a line sink's URI: typed query options with one-line errors, loopback checks and
credentials that never come from the command line."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from edgead.runtime.sinks import SinkError


@dataclass
class LineURI:
    """``scheme://host:port/path?query``, with each option read (and checked) once."""

    text: str
    scheme: str
    host: str
    port: int
    path: str
    query: dict[str, str]
    port_given: bool = True
    used: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, uri: str, default_port: int) -> "LineURI":
        parts = urlsplit(uri)
        if parts.username or parts.password:
            raise SinkError(f"{redact(uri)}: no credentials in the URI (they would show in the process list "
                            "and the logs); give them in a credentials=FILE or in environment variables")
        if "#" in uri:
            raise SinkError(f"{uri}: '#' cannot appear in an output URI (an MQTT wildcard cannot be published to)")
        try:
            port = parts.port or default_port
        except ValueError as err:
            raise SinkError(f"{uri}: bad port ({err})") from err
        if not parts.hostname:
            raise SinkError(f"{uri}: no host; write {parts.scheme}://HOST:PORT...")
        query: dict[str, str] = {}
        for key, values in parse_qs(parts.query, keep_blank_values=True).items():
            if len(values) > 1:
                raise SinkError(f"{uri}: option {key!r} given {len(values)} times")
            query[key] = values[0]
        return cls(uri, parts.scheme.lower(), parts.hostname, port, parts.path, query, port_given=bool(parts.port))

    def _get(self, key: str, default: Any, convert: Callable[[str], Any], what: str) -> Any:
        self.used.add(key)
        if key not in self.query:
            return default
        try:
            return convert(self.query[key])
        except ValueError as err:
            raise SinkError(f"{self.text}: option {key}={self.query[key]!r} must be {what}") from err

    def text_option(self, key: str, default: str | None = None) -> str | None:
        return self._get(key, default, str, "text")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def check(value: str) -> str:
            if value.lower() not in choices:
                raise ValueError(value)
            return value.lower()
        return self._get(key, default, check, "one of " + "|".join(choices))

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        def check(value: str) -> float:
            number = float(value)
            if not number >= minimum:
                raise ValueError(value)
            return number
        return self._get(key, default, check, f"a number >= {minimum:g}")

    def integer(self, key: str, default: int | None, minimum: int = 0, maximum: int = 2**31) -> int | None:
        def check(value: str) -> int:
            number = int(value)
            if not minimum <= number <= maximum:
                raise ValueError(value)
            return number
        return self._get(key, default, check, f"an integer in {minimum}..{maximum}")

    def flag(self, key: str, default: bool | None = False) -> bool | None:
        def check(value: str) -> bool:
            if value.lower() in ("1", "true", "yes", "on", ""):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return self._get(key, default, check, "1 or 0")

    def path_option(self, key: str) -> Path | None:
        value = self.text_option(key)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.exists():
            raise SinkError(f"{self.text}: {key}={value}: no such file or folder")
        return path

    def check_unknown(self) -> None:
        """Refuse options nobody read: a typo (``pulse=50``) must not pass silently."""
        unknown = sorted(set(self.query) - self.used)
        if unknown:
            raise SinkError(f"{self.text}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(self.used))}")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redact(uri: str) -> str:
    """The URI without a user:password part (for messages and summaries)."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    return uri.replace(parts.netloc, parts.netloc.rsplit("@", 1)[1], 1)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    origin: str  # where they came from, for messages (never the values)


def load_credentials(uri: LineURI, env_prefix: str, say: Callable[[str], Any]) -> Credentials | None:
    """Username/password from ``credentials=FILE`` (JSON ``{"username": .., "password": ..}``), else
    from ``{env_prefix}_CREDENTIALS`` (a file path), else ``{env_prefix}_USERNAME`` and
    ``{env_prefix}_PASSWORD``; None when none is given."""
    path = uri.text_option("credentials") or os.environ.get(f"{env_prefix}_CREDENTIALS")
    if path:
        return _credentials_file(uri.text, Path(path).expanduser(), say)
    user = os.environ.get(f"{env_prefix}_USERNAME")
    if user is None:
        return None
    return Credentials(user, os.environ.get(f"{env_prefix}_PASSWORD", ""),
                       f"${env_prefix}_USERNAME/${env_prefix}_PASSWORD")


def _credentials_file(uri: str, path: Path, say: Callable[[str], Any]) -> Credentials:
    try:
        data = json.loads(path.read_text())
        user, password = data["username"], data.get("password", "")
        if not isinstance(user, str) or not isinstance(password, str):
            raise TypeError("username and password must be strings")
    except OSError as err:
        raise SinkError(f"{uri}: cannot read credentials file {path} ({err.strerror or err})") from err
    except (ValueError, KeyError, TypeError) as err:
        raise SinkError(f"{uri}: credentials file {path} must be JSON "
                        '{"username": "...", "password": "..."} (' + f"{err})") from err
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        say(f"warning: credentials file {path} is readable by other users; chmod 600 it")
    return Credentials(user, password, str(path))
