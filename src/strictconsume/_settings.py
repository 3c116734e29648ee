"""Settings: from code, then the environment, then the command line (each overrides).

=================  ===============================  =========================
setting            environment                      default
=================  ===============================  =========================
url                STRICTCONSUME_URL, else AMQP_URL amqp://guest:guest@localhost:5672/
prefetch           STRICTCONSUME_PREFETCH           64
grace_period       STRICTCONSUME_GRACE_PERIOD       30.0 (seconds)
backend            STRICTCONSUME_BACKEND            trio (or asyncio)
log_level          STRICTCONSUME_LOG_LEVEL          INFO
log_format         STRICTCONSUME_LOG_FORMAT         text (or json)
consumer_timeout   STRICTCONSUME_CONSUMER_TIMEOUT   1800.0 (the broker's, seconds)
http               STRICTCONSUME_HTTP               not served (HOST:PORT)
=================  ===============================  =========================

Several URLs (the nodes of a cluster) are separated by commas or whitespace; the
reconnect loop cycles through them. ``consumer_timeout`` is the broker's
``consumer_timeout`` (RabbitMQ's default is 30 minutes), which AMQP does not reveal:
a handler timeout that is unset or longer is warned about at start-up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs

from .amqp import ConnectionParameters, parse_url, redact_url

__all__ = [
    "DEFAULT_URL",
    "ENV_PREFIX",
    "Settings",
    "SettingsError",
    "parse_address",
    "resolve_settings",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
ENV_PREFIX = "STRICTCONSUME_"


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``:PORT`` for every interface).

    Raises:
        ValueError: not of that form.
    """
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdecimal():
        raise ValueError("must be HOST:PORT, for example 127.0.0.1:9000 or :9000")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("the port must be from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names where it came from."""


def _urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """Every URL in ``value``: a string or a sequence of them, each of which may hold
    several separated by commas or whitespace (``--url`` repeated, an env variable)."""
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) for item in items):
        raise SettingsError("url needs at least one amqp:// or amqps:// URL")
    urls = tuple(url for item in items for url in item.replace(",", " ").split())
    if not urls:
        raise SettingsError("url needs at least one amqp:// or amqps:// URL")
    return urls


@attrs.frozen
class Settings:
    """The effective settings of an App."""

    urls: tuple[str, ...] = attrs.field(default=(DEFAULT_URL,), repr=False)
    prefetch: int = 64
    grace_period: float = 30.0
    backend: Literal["trio", "asyncio"] = "trio"
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    consumer_timeout: float = 1800.0
    http: str | None = None

    @property
    def parameters(self) -> tuple[ConnectionParameters, ...]:
        return tuple(parse_url(url) for url in self.urls)

    @property
    def redacted_urls(self) -> tuple[str, ...]:
        return tuple(redact_url(url) for url in self.urls)

    def __repr__(self) -> str:
        return (
            f"Settings(urls={self.redacted_urls!r}, prefetch={self.prefetch!r}, "
            f"grace_period={self.grace_period!r}, backend={self.backend!r}, "
            f"log_level={self.log_level!r}, log_format={self.log_format!r}, "
            f"consumer_timeout={self.consumer_timeout!r}, http={self.http!r})"
        )


def _int(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("not an integer")
        number = int(value)  # "abc" -> ValueError
        if isinstance(value, float) and value != number:
            raise ValueError("not an integer")
        if not low <= number <= high:
            raise ValueError(f"must be from {low} to {high}")
        return number

    return convert


def _seconds(value: Any) -> float:
    number = float(value)
    if not (number >= 0 and math.isfinite(number)):
        raise ValueError("must be a number of seconds >= 0")
    return number


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return convert


def _log_level(value: Any) -> str:
    text = str(value).strip().upper()
    if not isinstance(logging.getLevelName(text), int):
        raise ValueError("must be a logging level such as DEBUG, INFO, WARNING or ERROR")
    return text


def _http_address(value: Any) -> str:
    text = str(value).strip()
    parse_address(text)  # -> ValueError naming the form wanted
    return text


def _url_setting(value: Any) -> tuple[str, ...]:
    urls = _urls(value)
    for url in urls:
        parse_url(url)  # malformed -> ValueError naming the problem (never the password)
    return urls


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "urls": _url_setting,
    "prefetch": _int(1, 65535),
    "grace_period": _seconds,
    "backend": _choice("trio", "asyncio"),
    "log_level": _log_level,
    "log_format": _choice("text", "json"),
    "consumer_timeout": _seconds,
    "http": _http_address,
}


def _from_environment(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Setting name -> (where from, raw value) for the variables that are set."""
    found: dict[str, tuple[str, str]] = {}
    for variable in (f"{ENV_PREFIX}URL", "AMQP_URL"):
        if environ.get(variable):
            found["urls"] = (variable, environ[variable])
            break
    for name in _CONVERTERS:
        if name == "urls":
            continue
        variable = f"{ENV_PREFIX}{name.upper()}"
        if environ.get(variable):
            found[name] = (variable, environ[variable])
    return found


def _convert(name: str, source: str, value: Any) -> Any:
    try:
        return _CONVERTERS[name](value)
    except (TypeError, ValueError) as exc:
        shown = "(hidden: it holds credentials)" if name == "urls" else repr(value)
        raise SettingsError(f"{source}: the value {shown} is not usable: {exc}") from None


def resolve_settings(
    code: Mapping[str, Any],
    environ: Mapping[str, str],
    command_line: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge code < environment < command line into validated :class:`Settings`.

    ``None`` values mean "not given" at every level.

    Raises:
        SettingsError: a value is unusable; the message names the setting, where it
            came from (argument, variable, option) and what is allowed.
    """
    values: dict[str, Any] = {}
    for name, value in code.items():
        if value is not None:
            values[name] = _convert(name, f"App({name}=...)", value)
    for name, (variable, raw) in _from_environment(environ).items():
        values[name] = _convert(name, f"environment variable {variable}", raw)
    for name, value in (command_line or {}).items():
        if value is not None:
            option = "--url" if name == "urls" else f"--{name.replace('_', '-')}"
            values[name] = _convert(name, f"option {option}", value)
    return Settings(**values)
