"""AMQP URLs: parsing into :class:`ConnectionParameters`, and redaction.

``amqp[s]://user:password@host:port/vhost?heartbeat=30&connection_timeout=10``

- The vhost is the percent-decoded path without its leading ``/``; an empty path
  (``amqp://host`` or ``amqp://host/``) means the default vhost ``/``, as pika and
  aiormq read it; write ``%2F`` for ``/`` explicitly or ``/%2Fshop`` for ``/shop``.
- The default port is 5672 for ``amqp`` and 5671 for ``amqps``; user and password
  default to ``guest``.
- Query parameters: ``heartbeat`` (seconds, 0 to 65535; 0 disables),
  ``connection_timeout`` (seconds, for TCP connect plus handshake), ``frame_max``
  (bytes, 4096 to 2**32 - 1), ``channel_max`` (1 to 65535),
  ``auth_mechanism`` (``PLAIN`` or ``EXTERNAL``), and for TLS ``cafile``,
  ``certfile``, ``keyfile``, ``server_hostname``. An unknown parameter is an error,
  not silently ignored: a typo in ``heartbeat`` would otherwise go unnoticed; so is a
  value the client can never use (``frame_max=0``, ``channel_max=0``,
  ``heartbeat=70000``), rather than a failure after every connect.

A password never appears in a repr, an error message or a log line: use
:func:`redact_url` to show a URL.
"""

from __future__ import annotations

import urllib.parse

import attrs

__all__ = ["ConnectionParameters", "parse_url", "redact_url"]

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
_INT_PARAMS = {"heartbeat", "frame_max", "channel_max"}
#: The values the client can use (AMQP 0-9-1: short and long fields; a frame must hold
#: at least 4096 bytes, the protocol's minimum frame_max).
_INT_RANGES = {
    "heartbeat": (0, 65535),
    "frame_max": (4096, 2**32 - 1),
    "channel_max": (1, 65535),
}
_FLOAT_PARAMS = {"connection_timeout"}
_STR_PARAMS = {"auth_mechanism", "cafile", "certfile", "keyfile", "server_hostname"}


@attrs.frozen
class ConnectionParameters:
    """Where and how to connect; built by :func:`parse_url`."""

    host: str = "localhost"
    port: int = 5672
    username: str = "guest"
    password: str = attrs.field(default="guest", repr=False)
    vhost: str = "/"
    tls: bool = False
    heartbeat: int | None = None
    connection_timeout: float = 10.0
    frame_max: int = 131072
    channel_max: int = 2047
    auth_mechanism: str = "PLAIN"
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    server_hostname: str | None = None

    @property
    def url(self) -> str:
        """The URL with the password replaced by ``***``, for messages and logs."""
        scheme = "amqps" if self.tls else "amqp"
        user = urllib.parse.quote(self.username, safe="")
        vhost = urllib.parse.quote(self.vhost, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}:***@{host}:{self.port}/{vhost}"


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Works on malformed URLs too (it never raises), so that an error about a bad URL
    can quote it safely: everything before the last ``@`` is taken as user info, so
    a password with an unencoded ``/``, ``?`` or ``#`` is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url else "***@" + url.rsplit("@", 1)[1]
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"


def _fail(url: str, problem: str) -> ValueError:
    return ValueError(f"invalid AMQP URL {redact_url(url)!r}: {problem}")


def parse_url(url: str) -> ConnectionParameters:
    """Parse an ``amqp://`` or ``amqps://`` URL.

    Args:
        url: The URL, for example ``amqp://guest:guest@localhost:5672/%2F?heartbeat=30``.

    Returns:
        The connection parameters.

    Raises:
        TypeError: ``url`` is not a string.
        ValueError: the URL is malformed; the message names the problem and shows the
            URL without its password.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    scheme_sep = url.find("://")
    after_scheme = url[scheme_sep + 3 :] if scheme_sep >= 0 else url
    authority_end = min((i for i in map(after_scheme.find, "/?#") if i >= 0), default=-1)
    if authority_end >= 0 and "@" in after_scheme[authority_end:]:
        # urlsplit would cut the user info at that character and read part of the
        # password as a path, query or port: refuse it without quoting any of it.
        raise ValueError(
            f"invalid AMQP URL {redact_url(url)!r}: the user name or password contains "
            "'/', '?' or '#'; percent-encode it (for example '/' as %2F)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise _fail(url, "the port must be a number from 0 to 65535") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _fail(url, f"the scheme must be amqp or amqps, not {parts.scheme!r}")
    if parts.fragment:
        raise _fail(url, "a fragment (#...) has no meaning in an AMQP URL")
    host = parts.hostname or "localhost"
    path = parts.path
    if path.startswith("/"):
        path = path[1:]
    if "/" in path:
        raise _fail(url, "the vhost must be one path segment; write '/' in a vhost as %2F")
    vhost = urllib.parse.unquote(path) or "/"
    username = urllib.parse.unquote(parts.username) if parts.username is not None else "guest"
    password = urllib.parse.unquote(parts.password) if parts.password is not None else "guest"
    fields: dict[str, object] = {}
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:  # pragma: no cover - parse_qs is lenient
        raise _fail(url, str(exc)) from None
    for name, values in query.items():
        value = values[-1]
        if name in _INT_PARAMS:
            try:
                number = int(value)
            except ValueError:
                raise _fail(url, f"{name} must be an integer, not {value!r}") from None
            if number < 0:
                raise _fail(url, f"{name} must not be negative, not {number}")
            low, high = _INT_RANGES[name]
            if not low <= number <= high:
                raise _fail(url, f"{name} must be between {low} and {high}, not {number}")
            fields[name] = number
        elif name in _FLOAT_PARAMS:
            try:
                seconds = float(value)
            except ValueError:
                raise _fail(url, f"{name} must be a number of seconds, not {value!r}") from None
            if not seconds > 0:
                raise _fail(url, f"{name} must be positive, not {value!r}")
            fields[name] = seconds
        elif name in _STR_PARAMS:
            fields[name] = value
        else:
            known = ", ".join(sorted(_INT_PARAMS | _FLOAT_PARAMS | _STR_PARAMS))
            raise _fail(url, f"unknown query parameter {name!r} (known: {known})")
    mechanism = str(fields.pop("auth_mechanism", "PLAIN")).upper()
    if mechanism not in ("PLAIN", "EXTERNAL"):
        raise _fail(url, f"auth_mechanism must be PLAIN or EXTERNAL, not {mechanism!r}")
    return ConnectionParameters(
        host=host,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        username=username,
        password=password,
        vhost=vhost,
        tls=scheme == "amqps",
        auth_mechanism=mechanism,
        **fields,  # type: ignore[arg-type]
    )
