"""A settings file and per-consumer settings: what an operator changes per environment
without touching the code.

The file is TOML (``--config FILE``, or ``STRICTCONSUME_CONFIG``), read with the
standard library's :mod:`tomllib`::

    [app]                          # the App's settings: url, prefetch, grace_period, ...
    prefetch = 32

    [consumers.orders]             # the consumer of queue "orders" (or settings_name=)
    timeout = 30
    retry_delays = [1, 10, 60]

    [env.prod.app]                 # only with --env prod (or STRICTCONSUME_ENV=prod)
    url = "amqps://consumer@rabbit.prod:5671/shop"
    [env.prod.consumers.orders]
    prefetch = 200

Each layer overrides the one before, setting by setting: the code, the file's top
tables, the chosen ``[env.NAME.*]`` tables, the environment (``STRICTCONSUME_*`` for
the App, ``STRICTCONSUME_CONSUMERS__<NAME>__<KEY>`` for a consumer), the command line
(``--prefetch``, ``--consumer NAME.KEY=VALUE``). Every table of the file, the
environments not chosen included, is checked when the App starts: an unknown table,
consumer or key, or a value of the wrong type, is an error naming the file, the table
and the key, so a typo in ``[env.prod]`` shows in staging.

A consumer's NAME is its ``settings_name=``, else its queue. In a variable's name it is
upper-cased with every character other than a letter or digit replaced by ``_``
(``orders.v2`` and ``orders-v2`` both become ``ORDERS_V2``: two such consumers in one
App are an error that asks for a ``settings_name=``). Only the options about operation
are settings (:data:`CONSUMER_KEYS`); the handler, the queue's type, arguments and
bindings are the code's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from ._consumer import MAX_PREFETCH, ConsumerSpec
from ._retry import Retry
from ._settings import ENV_PREFIX, Settings, SettingsError, layered_settings

__all__ = [
    "CONFIG_VARIABLE",
    "CONSUMER_KEYS",
    "CONSUMER_PREFIX",
    "ENV_VARIABLE",
    "ConfigFile",
    "ResolvedConsumer",
    "SettingsLayers",
    "consumer_variable",
    "load_config",
    "render_settings",
    "resolve_consumers",
]

CONFIG_VARIABLE = f"{ENV_PREFIX}CONFIG"
ENV_VARIABLE = f"{ENV_PREFIX}ENV"
CONSUMER_PREFIX = f"{ENV_PREFIX}CONSUMERS__"

#: Where a value came from, as errors and ``--print-settings`` name it.
Where = str


# -- the keys and their values ---------------------------------------------------------


@attrs.frozen
class _Key:
    """One setting: the TOML types it accepts, how text (a variable, an option)
    becomes a value, and the check of the value."""

    toml_types: tuple[type, ...]
    what: str
    parse: Callable[[str], Any]
    check: Callable[[Any], Any]


def _text_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _count(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not low <= value <= MAX_PREFETCH:
            raise ValueError(f"must be an integer from {low} to {MAX_PREFETCH}")
        return int(value)

    return check


def _at_least(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if value < low:
            raise ValueError(f"must be an integer >= {low}")
        return int(value)

    return check


def _positive_seconds(value: Any) -> float:
    number = float(value)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError("must be a number of seconds > 0")
    return number


def _text_delays(text: str) -> list[float]:
    stripped = text.strip().strip("[]")
    if stripped.lower() == "none":
        return []
    return [float(part) for part in stripped.replace(",", " ").split()]


def _delays(value: Any) -> tuple[float, ...]:
    for delay in value:
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise ValueError(f"each delay must be a number of seconds, not {delay!r}")
    return Retry(delays=tuple(value)).delays  # the policy's own range check


#: The consumer settings: each one the :class:`ConsumerSpec` field of the same name,
#: but ``retry_delays``, which is ``retry=Retry(delays=...)``. ``consumer_timeout``
#: (the broker's ``x-consumer-timeout`` for this consumer) is one: how long the broker
#: waits for an ack depends on the deployment, like the handler timeout does.
CONSUMER_KEYS: dict[str, _Key] = {
    "enabled": _Key((bool,), "true or false", _text_bool, bool),
    "prefetch": _Key((int,), "an integer", int, _count(1)),
    "concurrency": _Key((int,), "an integer", int, _count(1)),
    "timeout": _Key((int, float), "a number of seconds", float, _positive_seconds),
    "retry_delays": _Key((list,), "a list of seconds", _text_delays, _delays),
    "delivery_limit": _Key((int,), "an integer", int, _at_least(0)),
    "consumer_timeout": _Key((int, float), "a number of seconds", float, _positive_seconds),
}

#: The App's settings a file's ``[app]`` table may hold (``url`` is ``urls``), with the
#: TOML types each accepts; ``_settings`` checks the values as it checks the code's.
APP_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "url": ((str, list), "a URL or a list of URLs"),
    "prefetch": ((int,), "an integer"),
    "grace_period": ((int, float), "a number of seconds"),
    "consumer_timeout": ((int, float), "a number of seconds"),
    "http": ((str,), "a string HOST:PORT"),
    "queue_stats_interval": ((int, float), "a number of seconds"),
    "backend": ((str,), "a string"),
    "log_level": ((str,), "a string"),
    "log_format": ((str,), "a string"),
}


def _of_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # TOML's true is not the integer 1
    return isinstance(value, types)


def consumer_variable(name: str, key: str) -> str:
    """The environment variable of setting ``key`` of the consumer named ``name``."""
    return f"{CONSUMER_PREFIX}{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}__{key.upper()}"


# -- the file ---------------------------------------------------------------------------


@attrs.frozen
class ConfigFile:
    """A settings file as it applies to one environment (or none): each value with
    where it is written."""

    path: str
    env: str | None
    #: App setting -> (where, value).
    app: dict[str, tuple[Where, Any]]
    #: Consumer name -> key -> (where, checked value).
    consumers: dict[str, dict[str, tuple[Where, Any]]]
    #: Consumer name -> every table that names it (for an unknown consumer's error).
    tables: dict[str, list[str]]


def _table(value: Any, path: str, table: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SettingsError(
            f"settings file {path}: {table} must be a table ([{table}]), not {value!r}"
        )
    return value


def _read_section(
    data: dict[str, Any], path: str, prefix: str
) -> tuple[dict[str, tuple[Where, Any]], dict[str, dict[str, tuple[Where, Any]]]]:
    """The ``app`` and ``consumers`` tables under ``prefix`` ("" or "env.NAME."),
    checked for unknown keys and wrong types."""
    app: dict[str, tuple[Where, Any]] = {}
    consumers: dict[str, dict[str, tuple[Where, Any]]] = {}
    allowed = ("app", "consumers") if prefix else ("app", "consumers", "env")
    for name in data:
        if name not in allowed:
            raise SettingsError(
                f"settings file {path}: unknown table or key '{prefix}{_toml_key(name)}'; "
                f"the file holds {', '.join(f'[{prefix}{a}]' for a in allowed)}"
            )
    table = f"{prefix}app"
    for key, value in _table(data.get("app", {}), path, table).items():
        where = f"file {path} [{table}] {key}"
        if key not in APP_KEYS:
            raise SettingsError(
                f"{where}: unknown setting; [{table}] may hold {', '.join(APP_KEYS)}"
            )
        types, what = APP_KEYS[key]
        if not _of_type(value, types):
            raise SettingsError(f"{where}: must be {what}, not {value!r}")
        app["urls" if key == "url" else key] = (where, value)
    for name, settings in _table(data.get("consumers", {}), path, f"{prefix}consumers").items():
        table = f"{prefix}consumers.{_toml_key(name)}"
        values = consumers.setdefault(name, {})
        for key, value in _table(settings, path, table).items():
            where = f"file {path} [{table}] {key}"
            if key not in CONSUMER_KEYS:
                raise SettingsError(
                    f"{where}: unknown consumer setting; a consumer may have "
                    f"{', '.join(CONSUMER_KEYS)}"
                )
            spec = CONSUMER_KEYS[key]
            if not _of_type(value, spec.toml_types):
                raise SettingsError(f"{where}: must be {spec.what}, not {value!r}")
            try:
                values[key] = (where, spec.check(value))
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"{where}: the value {value!r} is not usable: {exc}") from None
    return app, consumers


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def load_config(path: str, env: str | None) -> ConfigFile:
    """Read and check the settings file at ``path``, for environment ``env``.

    Raises:
        SettingsError: the file cannot be read, is not TOML, has an unknown table or
            key or a value of the wrong type (in any environment), or has no
            ``[env.<env>]``; the message names the file, the table and the key.
    """
    import tomllib  # only an App given a settings file reads TOML

    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise SettingsError(f"settings file {path}: cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path}: not valid TOML: {exc}") from None
    app, consumers = _read_section(data, path, "")
    tables = {name: [f"consumers.{_toml_key(name)}"] for name in consumers}
    envs = _table(data.get("env", {}), path, "env")
    chosen: tuple[dict[str, tuple[Where, Any]], dict[str, dict[str, tuple[Where, Any]]]] | None
    chosen = None
    for name, section in envs.items():
        prefix = f"env.{_toml_key(name)}."
        read = _read_section(_table(section, path, prefix[:-1]), path, prefix)
        for consumer in read[1]:
            tables.setdefault(consumer, []).append(f"{prefix}consumers.{_toml_key(consumer)}")
        if name == env:
            chosen = read
    if env is not None:
        if chosen is None:
            have = ", ".join(sorted(envs)) or "none"
            raise SettingsError(
                f"settings file {path} has no [env.{_toml_key(env)}] tables for the chosen "
                f"environment {env!r} (environments in the file: {have})"
            )
        app.update(chosen[0])
        for consumer, values in chosen[1].items():
            consumers.setdefault(consumer, {}).update(values)
    return ConfigFile(path=path, env=env, app=app, consumers=consumers, tables=tables)


# -- the consumers ----------------------------------------------------------------------


@attrs.frozen
class ResolvedConsumer:
    """A consumer as it runs: its spec with every layer applied, and where each
    setting that is not the code's came from."""

    name: str
    spec: ConsumerSpec
    #: Key -> where (a file's table and key, a variable, an option).
    sources: dict[str, Where]


def _names(specs: Sequence[ConsumerSpec]) -> dict[str, ConsumerSpec]:
    by_name: dict[str, ConsumerSpec] = {}
    by_variable: dict[str, str] = {}
    for spec in specs:
        name = spec.settings_name or spec.queue
        if name in by_name:
            raise SettingsError(
                f"two consumers are named {name!r} for settings (queues "
                f"{by_name[name].queue!r} and {spec.queue!r}); give one a settings_name="
            )
        variable = consumer_variable(name, "KEY")
        if variable in by_variable:
            raise SettingsError(
                f"consumers {by_variable[variable]!r} and {name!r} would share the "
                f"environment variables {variable.removesuffix('KEY')}*; give one a "
                "settings_name="
            )
        by_name[name] = spec
        by_variable[variable] = name
    return by_name


def _unknown_consumer(where: str, name: str, known: Iterable[str]) -> SettingsError:
    names = ", ".join(repr(n) for n in known) or "none"
    return SettingsError(
        f"{where}: the App has no consumer named {name!r} (its consumers: {names}; a "
        "consumer is named by its queue, or by settings_name=)"
    )


def resolve_consumers(
    specs: Sequence[ConsumerSpec],
    *,
    file: ConfigFile | None,
    environ: Mapping[str, str],
    command_line: Sequence[str] = (),
) -> list[ResolvedConsumer]:
    """Apply the file, the environment and ``--consumer NAME.KEY=VALUE`` options to
    each consumer of the App, in that order.

    Raises:
        SettingsError: an unknown consumer or key anywhere, a value that is not usable,
            or a combination the spec refuses (concurrency above prefetch, a delivery
            limit on a classic queue); the message names where each value came from.
    """
    by_name = _names(specs)
    layers: dict[str, dict[str, tuple[Where, Any]]] = {name: {} for name in by_name}
    if file is not None:
        for name, tables in file.tables.items():
            if name not in by_name:
                raise _unknown_consumer(f"file {file.path} [{tables[0]}]", name, by_name)
        for name, values in file.consumers.items():
            layers[name].update(values)
    variables = {
        consumer_variable(name, key): (name, key) for name in by_name for key in CONSUMER_KEYS
    }
    for variable, raw in sorted(environ.items()):
        if not variable.startswith(CONSUMER_PREFIX) or not raw:
            continue
        if variable not in variables:
            example = consumer_variable(next(iter(by_name), "orders"), "prefetch")
            raise SettingsError(
                f"environment variable {variable} names no consumer setting: the App's "
                f"consumers are {', '.join(repr(n) for n in by_name) or 'none'} and their "
                f"settings {', '.join(CONSUMER_KEYS)} (for example {example})"
            )
        name, key = variables[variable]
        layers[name][key] = (f"env {variable}", _from_text(key, raw, f"env {variable}"))
    for assignment in command_line:
        target, equals, raw = assignment.partition("=")
        name, dot, key = target.strip().rpartition(".")
        where = f"option --consumer {assignment}"
        if not equals or not dot:
            raise SettingsError(f"{where}: write --consumer NAME.KEY=VALUE")
        if name not in by_name:
            raise _unknown_consumer(where, name, by_name)
        if key not in CONSUMER_KEYS:
            raise SettingsError(
                f"{where}: unknown consumer setting {key!r}; a consumer may have "
                f"{', '.join(CONSUMER_KEYS)}"
            )
        layers[name][key] = (where, _from_text(key, raw, where))
    return [_apply(name, spec, layers[name]) for name, spec in by_name.items()]


def _from_text(key: str, raw: str, where: str) -> Any:
    spec = CONSUMER_KEYS[key]
    try:
        return spec.check(spec.parse(raw))
    except (TypeError, ValueError) as exc:
        detail = "must be " + spec.what if isinstance(exc, TypeError) else str(exc)
        if "could not convert" in detail or "invalid literal" in detail:
            detail = f"must be {spec.what}"
        raise SettingsError(f"{where}: the value {raw!r} is not usable: {detail}") from None


def _apply(name: str, spec: ConsumerSpec, values: dict[str, tuple[Where, Any]]) -> ResolvedConsumer:
    changes: dict[str, Any] = {}
    for key, (_, value) in values.items():
        if key == "retry_delays":
            changes["retry"] = attrs.evolve(spec.retry, delays=value)
        else:
            changes[key] = value
    try:
        resolved = attrs.evolve(spec, **changes)
    except (TypeError, ValueError) as exc:
        wheres = "; ".join(where for where, _ in values.values())
        raise SettingsError(f"consumer {name!r}: {exc} (settings from {wheres})") from None
    return ResolvedConsumer(
        name=name, spec=resolved, sources={key: where for key, (where, _) in values.items()}
    )


# -- the App's layers -------------------------------------------------------------------


@attrs.define
class SettingsLayers:
    """What an App was told besides its code: a settings file and an environment
    (from the command line, else the environment), and ``--consumer`` options."""

    config: str | None = None
    env: str | None = None
    consumer_options: tuple[str, ...] = ()
    _loaded: dict[tuple[str, str | None], ConfigFile] = attrs.field(factory=dict)

    def file(self, environ: Mapping[str, str]) -> ConfigFile | None:
        """The settings file for the chosen environment, read once: a running App
        never reads it again (a file edited or removed meanwhile changes nothing
        until the App is configured anew or restarted).

        Raises:
            SettingsError: see :func:`load_config`; an environment chosen without a file.
        """
        path = self.config or environ.get(CONFIG_VARIABLE) or None
        env = self.env or environ.get(ENV_VARIABLE) or None
        if path is None:
            if env is not None:
                given = "--env" if self.env else f"{ENV_VARIABLE}={env}"
                raise SettingsError(
                    f"{given} chooses an environment of a settings file, but no file is "
                    f"given: pass --config FILE or set {CONFIG_VARIABLE}"
                )
            return None
        key = (path, env)
        if key not in self._loaded:
            self._loaded = {key: load_config(path, env)}
        return self._loaded[key]

    def app_layers(
        self, code: Mapping[str, Any], environ: Mapping[str, str], command_line: Mapping[str, Any]
    ) -> dict[str, tuple[Where, Any]]:
        file = self.file(environ)
        return layered_settings(code, environ, command_line, file.app if file else None)

    def settings(
        self, code: Mapping[str, Any], environ: Mapping[str, str], command_line: Mapping[str, Any]
    ) -> Settings:
        layers = self.app_layers(code, environ, command_line)
        return Settings(**{name: value for name, (_, value) in layers.items()})

    def consumers(
        self, specs: Sequence[ConsumerSpec], environ: Mapping[str, str]
    ) -> list[ResolvedConsumer]:
        return resolve_consumers(
            specs,
            file=self.file(environ),
            environ=environ,
            command_line=self.consumer_options,
        )


# -- --print-settings -------------------------------------------------------------------

_SPEC_DEFAULTS = {field.name: field.default for field in attrs.fields(ConsumerSpec)}


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def render_settings(
    layers: Mapping[str, tuple[Where, Any]],
    settings: Settings,
    consumers: Sequence[ResolvedConsumer],
    file: ConfigFile | None,
) -> str:
    """The effective settings of the App and of each consumer, each with where it came
    from (``code``, ``default``, a file's table and key, ``env VARIABLE``, an option),
    passwords redacted: what ``python -m strictconsume MODULE --print-settings`` shows."""
    rows: list[tuple[str, str, str]] = []
    heading = f"settings file: {file.path}" if file else "settings file: none"
    if file and file.env:
        heading += f" (environment {file.env!r})"
    lines = [heading]
    for setting in attrs.fields(Settings):
        name = setting.name
        value = getattr(settings, name)
        shown = ", ".join(settings.redacted_urls) if name == "urls" else _shown(value)
        where = layers[name][0] if name in layers else "default"
        rows.append(("url" if name == "urls" else name, shown, where))
    lines += ["", "app:", *_table_lines(rows)]
    for resolved in consumers:
        spec = resolved.spec
        rows = []
        for key in CONSUMER_KEYS:
            field = "retry" if key == "retry_delays" else key
            value = spec.retry.delays if key == "retry_delays" else getattr(spec, key)
            default = _SPEC_DEFAULTS[field]
            default_value = Retry().delays if key == "retry_delays" else default
            where = resolved.sources.get(key) or (
                "default" if value == default_value or value is default else "code"
            )
            shown = _shown(value)
            if key == "prefetch" and value is None:
                shown, where = str(settings.prefetch), "the App's prefetch"
            elif key == "concurrency" and value is None:
                shown = f"{spec.prefetch or settings.prefetch} (the prefetch)"
            elif key == "delivery_limit":
                if spec.queue_type != "quorum":
                    shown = "none (a classic queue)"
                elif value is None:
                    shown = f"{spec.effective_delivery_limit} (RabbitMQ's default)"
            elif key == "consumer_timeout" and value is None:
                shown = f"none (the broker's, {settings.consumer_timeout:g} s)"
            rows.append((key, shown, where))
        state = "" if spec.enabled else ", DISABLED: not declared, not consumed"
        lines += ["", f"consumer {resolved.name!r} (queue {spec.queue!r}{state}):"]
        lines += _table_lines(rows)
    return "\n".join(lines)


def _table_lines(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    key_width = max(len(key) for key, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return [
        f"  {key:<{key_width}}  {value:<{value_width}}  ({where})".rstrip()
        for key, value, where in rows
    ]
