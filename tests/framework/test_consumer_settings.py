"""Consumer settings per environment (``_config``): the layers code < file < environment
< command line, per consumer and for the App; the errors of a bad file, variable or
option; ``--print-settings``; and, against the real broker with pika as the oracle, a
disabled consumer that declares nothing while another one works."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import strictconsume as sc
from strictconsume._cli import main
from strictconsume._config import (
    ResolvedConsumer,
    SettingsLayers,
    consumer_variable,
    load_config,
    resolve_consumers,
)
from strictconsume._settings import SettingsError

from ..amqp.oracle import Oracle
from ..conftest import REPO
from .polling import wait_until
from .test_observability import call


async def handle(msg: sc.Message) -> None:
    pass


def spec(queue: str, **options: Any) -> sc.ConsumerSpec:
    return sc.ConsumerSpec(queue=queue, handler=handle, **options)


def write(tmp_path: Path, text: str, name: str = "settings.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


LAYERED = """
[consumers.orders]
prefetch = 10
timeout = 5
[env.prod.consumers.orders]
prefetch = 20
"""


def resolve_one(
    specs: list[sc.ConsumerSpec],
    path: str | None,
    env: str | None = None,
    environ: dict[str, str] | None = None,
    options: tuple[str, ...] = (),
) -> ResolvedConsumer:
    file = load_config(path, env) if path else None
    (first, *_) = resolve_consumers(specs, file=file, environ=environ or {}, command_line=options)
    return first


# -- layering ---------------------------------------------------------------------------


def test_each_layer_overrides_the_one_before_per_setting(tmp_path: Path) -> None:
    path = write(tmp_path, LAYERED)
    specs = [spec("orders", prefetch=5, timeout=1.0, concurrency=2)]
    variable = "STRICTCONSUME_CONSUMERS__ORDERS__PREFETCH"

    code = resolve_one(specs, None)
    assert (code.spec.prefetch, code.spec.timeout, code.sources) == (5, 1.0, {})

    base = resolve_one(specs, path)
    table = f"file {path} [consumers.orders]"
    assert (base.spec.prefetch, base.spec.timeout) == (10, 5.0)
    assert base.sources == {"prefetch": f"{table} prefetch", "timeout": f"{table} timeout"}

    prod = resolve_one(specs, path, "prod")
    assert (prod.spec.prefetch, prod.spec.timeout) == (20, 5.0)
    assert prod.sources["prefetch"] == f"file {path} [env.prod.consumers.orders] prefetch"

    env = resolve_one(specs, path, "prod", {variable: "30"})
    assert (env.spec.prefetch, env.sources["prefetch"]) == (30, f"env {variable}")

    cli = resolve_one(specs, path, "prod", {variable: "30"}, ("orders.prefetch=40",))
    assert (cli.spec.prefetch, cli.spec.timeout, cli.spec.concurrency) == (40, 5.0, 2)
    assert cli.sources["prefetch"] == "option --consumer orders.prefetch=40"
    # the handler and what is not a setting stay the code's
    assert cli.spec.handler is handle
    assert cli.spec.queue == "orders"


def test_every_operational_setting_from_each_source(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [consumers.jobs]
        enabled = false
        concurrency = 3
        retry_delays = [0.5, 2]
        delivery_limit = 4
        consumer_timeout = 600
        """,
    )
    quorum = [spec("jobs", queue_type="quorum")]
    from_file = resolve_one(quorum, path).spec
    assert from_file.enabled is False
    assert (from_file.concurrency, from_file.retry.delays) == (3, (0.5, 2.0))
    assert (from_file.delivery_limit, from_file.consumer_timeout) == (4, 600.0)

    environ = {
        consumer_variable("jobs", "enabled"): "yes",
        consumer_variable("jobs", "retry_delays"): "1, 2.5",
        consumer_variable("jobs", "timeout"): "7.5",
        consumer_variable("jobs", "delivery_limit"): "0",
    }
    from_env = resolve_one(quorum, path, environ=environ).spec
    assert (from_env.enabled, from_env.retry.delays, from_env.timeout) == (True, (1.0, 2.5), 7.5)
    assert from_env.delivery_limit == 0
    no_retries = resolve_one(quorum, None, options=("jobs.retry_delays=none",)).spec
    assert no_retries.retry.delays == ()
    off = resolve_one(quorum, None, options=("jobs.enabled=off",)).spec
    assert off.enabled is False


def test_the_app_settings_in_the_file_sit_between_code_and_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [app]
        prefetch = 32
        grace_period = 3
        url = ["amqp://a:pw@one/", "amqp://a:pw@two/"]
        [env.prod.app]
        grace_period = 9.5
        """,
    )
    code = {"prefetch": 8, "grace_period": 1.0, "log_level": "DEBUG"}
    layers = SettingsLayers(config=path)
    settings = layers.settings(code, {}, {})
    assert (settings.prefetch, settings.grace_period, settings.log_level) == (32, 3.0, "DEBUG")
    assert settings.urls == ("amqp://a:pw@one/", "amqp://a:pw@two/")
    prod = SettingsLayers(config=path, env="prod").settings(code, {}, {})
    assert prod.grace_period == 9.5
    environ = {"STRICTCONSUME_PREFETCH": "50", "STRICTCONSUME_ENV": "prod"}
    from_env = SettingsLayers(config=path).settings(code, environ, {})
    assert (from_env.prefetch, from_env.grace_period) == (50, 9.5)
    assert SettingsLayers(config=path).settings(code, environ, {"prefetch": 60}).prefetch == 60
    # the file's path from the environment too
    assert SettingsLayers().settings({}, {"STRICTCONSUME_CONFIG": path}, {}).prefetch == 32


def test_the_file_is_read_once_so_a_running_app_does_not_depend_on_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[app]\nprefetch = 12\n[consumers.orders]\nenabled = false\n")
    app = sc.App()
    app.consumer("orders")(handle)
    app.configure(config=path)
    assert app.settings.prefetch == 12
    Path(path).write_text("[app]\nprefetch = 'broken'\n")
    assert app.settings.prefetch == 12
    Path(path).unlink()
    assert app.settings.prefetch == 12
    (orders,) = app.resolve_consumers()
    assert orders.spec.enabled is False
    app.configure(config=str(tmp_path / "gone.toml"))
    with pytest.raises(SettingsError, match=r"gone\.toml: cannot be read: No such file"):
        _ = app.settings


def test_queue_names_map_to_variable_names_and_a_clash_asks_for_a_settings_name() -> None:
    assert consumer_variable("orders.v2", "prefetch") == (
        "STRICTCONSUME_CONSUMERS__ORDERS_V2__PREFETCH"
    )
    assert consumer_variable("billing-events", "retry_delays") == (
        "STRICTCONSUME_CONSUMERS__BILLING_EVENTS__RETRY_DELAYS"
    )
    with pytest.raises(SettingsError, match=r"'orders\.v2' and 'orders-v2' would share .*"):
        resolve_consumers([spec("orders.v2"), spec("orders-v2")], file=None, environ={})
    named = [spec("orders.v2"), spec("orders-v2", settings_name="orders_next")]
    environ = {"STRICTCONSUME_CONSUMERS__ORDERS_NEXT__PREFETCH": "7"}
    first, second = resolve_consumers(named, file=None, environ=environ)
    assert (first.spec.prefetch, second.name, second.spec.prefetch) == (None, "orders_next", 7)
    with pytest.raises(SettingsError, match=r"two consumers are named 'a' .*settings_name="):
        resolve_consumers([spec("a"), spec("b", settings_name="a")], file=None, environ={})


def test_a_settings_name_replaces_the_queue_as_the_name(tmp_path: Path) -> None:
    specs = [spec("shop.orders.v3", settings_name="orders")]
    ok = resolve_one(specs, write(tmp_path, "[consumers.orders]\nprefetch = 3\n"))
    assert (ok.name, ok.spec.prefetch) == ("orders", 3)
    by_queue = write(tmp_path, '[consumers."shop.orders.v3"]\nprefetch = 3\n', "q.toml")
    with pytest.raises(SettingsError, match=r"no consumer named 'shop\.orders\.v3'"):
        resolve_one(specs, by_queue)


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[consumer.orders]\nprefetch = 1\n", r"unknown table or key 'consumer'"),
        ("[app]\nprefech = 1\n", r"\[app\] prefech: unknown setting"),
        ("[consumers.orders]\nprefech = 1\n", r"\[consumers\.orders\] prefech: unknown consumer"),
        ("[consumers.ordres]\nprefetch = 1\n", r"\[consumers\.ordres\]: the App has no consumer"),
        (
            "[env.prod.consumers.ordres]\nenabled = false\n",
            r"\[env\.prod\.consumers\.ordres\]: the App has no consumer named 'ordres'",
        ),
        (
            "[env.stage.consumers.orders]\ntimeout = 'x'\n",
            r"\[env\.stage\.consumers\.orders\] timeout: must be a number of seconds, not 'x'",
        ),
        ("[consumers.orders]\nprefetch = '10'\n", r"orders\] prefetch: must be an integer"),
        ("[consumers.orders]\nenabled = 1\n", r"orders\] enabled: must be true or false, not 1"),
        ("[consumers.orders]\nconcurrency = true\n", r"orders\] concurrency: must be an integer"),
        ("[consumers.orders]\nprefetch = 0\n", r"prefetch: the value 0 is not usable: .*1 to"),
        ("[consumers.orders]\nretry_delays = '1'\n", r"retry_delays: must be a list of seconds"),
        ("[consumers.orders]\nretry_delays = [0]\n", r"retry_delays: .*between 0\.001 s"),
        ("[app]\nprefetch = 1.5\n", r"\[app\] prefetch: must be an integer, not 1\.5"),
        ("[app]\nprefetch = 70000\n", r"\[app\] prefetch: the value 70000 is not usable"),
        ("[env.prod]\nurl = 'x'\n", r"unknown table or key 'env\.prod\.url'"),
        ("[consumers.orders\n", r"not valid TOML"),
        (
            "[consumers.orders]\nconcurrency = 9\nprefetch = 4\n",
            r"consumer 'orders': .*concurrency \(9\) cannot exceed prefetch \(4\).* "
            r"\(settings from file .* concurrency; file .* prefetch\)",
        ),
        ("[consumers.orders]\ndelivery_limit = 3\n", r"delivery_limit needs queue_type='quorum'"),
    ],
)
def test_a_bad_file_is_an_error_naming_file_table_and_key(
    tmp_path: Path, text: str, error: str
) -> None:
    path = write(tmp_path, text)
    layers = SettingsLayers(config=path)

    def start() -> None:
        layers.settings({}, {}, {})
        layers.consumers([spec("orders")], {})

    with pytest.raises(SettingsError, match=error) as caught:
        start()
    assert path in str(caught.value) or "consumer 'orders'" in str(caught.value)


def test_file_and_environment_choice_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "[env.prod.app]\nprefetch = 2\n[env.test.app]\nprefetch = 3\n")
    with pytest.raises(
        SettingsError, match=r"no \[env\.stage\] .*environments in the file: prod, test"
    ):
        SettingsLayers(config=path, env="stage").settings({}, {}, {})
    with pytest.raises(SettingsError, match=r"^STRICTCONSUME_ENV=prod chooses .* --config FILE"):
        SettingsLayers().settings({}, {"STRICTCONSUME_ENV": "prod"}, {})
    with pytest.raises(SettingsError, match=r"^--env chooses"):
        SettingsLayers(env="prod").settings({}, {}, {})
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match=rf"settings file {missing}: cannot be read"):
        SettingsLayers(config=missing).settings({}, {}, {})


@pytest.mark.parametrize(
    ("environ", "options", "error"),
    [
        (
            {"STRICTCONSUME_CONSUMERS__ORDER__PREFETCH": "3"},
            (),
            r"^environment variable STRICTCONSUME_CONSUMERS__ORDER__PREFETCH names no consumer "
            r"setting: the App's consumers are 'orders'.*STRICTCONSUME_CONSUMERS__ORDERS__PREFETCH",
        ),
        (
            {"STRICTCONSUME_CONSUMERS__ORDERS__PREFETCH": "ten"},
            (),
            r"^env STRICTCONSUME_CONSUMERS__ORDERS__PREFETCH: the value 'ten' is not usable: "
            r"must be an integer$",
        ),
        (
            {"STRICTCONSUME_CONSUMERS__ORDERS__ENABLED": "maybe"},
            (),
            r"ENABLED: the value 'maybe' is not usable: must be true or false$",
        ),
        ({}, ("orders.prefetch",), r"^option --consumer orders\.prefetch: write --consumer NAME"),
        ({}, ("ordres.prefetch=3",), r"no consumer named 'ordres'"),
        ({}, ("orders.queue_type=quorum",), r"unknown consumer setting 'queue_type'"),
        ({}, ("orders.timeout=-1",), r"the value '-1' is not usable: must be a number of seconds"),
    ],
)
def test_bad_variables_and_options_are_errors_naming_them(
    environ: dict[str, str], options: tuple[str, ...], error: str
) -> None:
    with pytest.raises(SettingsError, match=error):
        resolve_consumers([spec("orders")], file=None, environ=environ, command_line=options)


def test_an_empty_variable_is_not_given() -> None:
    environ = {"STRICTCONSUME_CONSUMERS__ORDERS__PREFETCH": "", "STRICTCONSUME_CONSUMERS__X": ""}
    (resolved,) = resolve_consumers([spec("orders", prefetch=3)], file=None, environ=environ)
    assert (resolved.spec.prefetch, resolved.sources) == (3, {})


# -- the command line -------------------------------------------------------------------

APP_MODULE = """
import strictconsume as sc

app = sc.App(url="amqp://guest:s3cret@127.0.0.1:1/", grace_period=5)


@app.consumer("orders", timeout=30.0)
async def orders(msg: sc.Message) -> None:
    pass


@app.consumer("billing.events", queue_type="quorum")
def billing(msg: sc.Message) -> None:
    pass
"""


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module with an App of two consumers, importable by a name of its own."""
    name = f"settings_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for variable in ("STRICTCONSUME_URL", "AMQP_URL", "STRICTCONSUME_PREFETCH"):
        monkeypatch.delenv(variable, raising=False)
    yield f"{name}:app"
    sys.modules.pop(name, None)


def _rows(output: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Section -> key -> (value, where) of --print-settings output."""
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    current: dict[str, tuple[str, str]] = {}
    for line in output.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], {})
        elif line.startswith("  "):
            key, rest = line.strip().split(None, 1)
            value, _, where = rest.rpartition("  (")
            current[key] = (value.strip(), where.removesuffix(")"))
    return sections


def test_print_settings_shows_every_value_and_its_source(
    app_module: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(
        tmp_path,
        """
        [app]
        prefetch = 16
        [consumers."billing.events"]
        delivery_limit = 5
        [env.prod.app]
        url = "amqp://prod:pr0d-secret@rabbit.prod:5672/shop"
        [env.prod.consumers.orders]
        enabled = false
        """,
    )
    monkeypatch.setenv("STRICTCONSUME_ENV", "prod")
    monkeypatch.setenv("STRICTCONSUME_CONSUMERS__BILLING_EVENTS__CONCURRENCY", "4")
    argv = [app_module, "--config", path, "--consumer", "orders.retry_delays=1,5"]
    code = main([*argv, "--grace-period", "7", "--print-settings"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "pr0d-secret" not in out
    assert "s3cret" not in out
    assert out.splitlines()[0] == f"settings file: {path} (environment 'prod')"
    rows = _rows(out)
    assert rows["app"]["url"] == (
        "amqp://prod:***@rabbit.prod:5672/shop",
        f"file {path} [env.prod.app] url",
    )
    assert rows["app"]["prefetch"] == ("16", f"file {path} [app] prefetch")
    assert rows["app"]["grace_period"] == ("7.0", "option --grace-period")
    assert rows["app"]["backend"] == ("trio", "default")
    orders = rows["consumer 'orders' (queue 'orders', DISABLED: not declared, not consumed)"]
    assert orders["enabled"] == ("false", f"file {path} [env.prod.consumers.orders] enabled")
    assert orders["timeout"] == ("30.0", "code")
    assert orders["retry_delays"] == ("[1.0, 5.0]", "option --consumer orders.retry_delays=1,5")
    assert orders["prefetch"] == ("16", "the App's prefetch")
    billing = rows["consumer 'billing.events' (queue 'billing.events')"]
    assert billing["concurrency"] == (
        "4",
        "env STRICTCONSUME_CONSUMERS__BILLING_EVENTS__CONCURRENCY",
    )
    assert billing["delivery_limit"] == (
        "5",
        f'file {path} [consumers."billing.events"] delivery_limit',
    )
    assert billing["retry_delays"] == ("[1.0, 10.0, 60.0]", "default")
    assert (
        set(billing)
        == set(orders)
        == {
            "enabled",
            "prefetch",
            "concurrency",
            "timeout",
            "retry_delays",
            "delivery_limit",
            "consumer_timeout",
        }
    )


@pytest.mark.parametrize(
    ("text", "argv", "error"),
    [
        (
            "[consumers.ordres]\nprefetch = 2\n",
            [],
            r"\[consumers\.ordres\]: the App has no consumer",
        ),
        ("[consumers.orders]\nprefetch = 'x'\n", [], r"\[consumers\.orders\] prefetch: must be"),
        ("", ["--env", "prod"], r"has no \[env\.prod\] tables"),
        ("", ["--consumer", "orders.prefech=3"], r"unknown consumer setting 'prefech'"),
    ],
)
def test_a_settings_error_exits_1_with_one_line(
    app_module: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    argv: list[str],
    error: str,
) -> None:
    path = write(tmp_path, text)
    for extra in ([], ["--print-settings"]):
        code = main([app_module, "--config", path, *argv, *extra])
        out, err = capsys.readouterr()
        assert (code, out) == (1, "")
        (line,) = err.splitlines()
        assert line.startswith("strictconsume: error: ")
        assert re.search(error, line), line


def test_print_settings_as_a_process_exits_0_without_a_broker(
    app_module: str, tmp_path: Path
) -> None:
    path = write(tmp_path, "[consumers.orders]\nenabled = false\n")
    done = subprocess.run(
        [sys.executable, "-m", "strictconsume", app_module, "--config", path, "--print-settings"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert "consumer 'orders' (queue 'orders', DISABLED" in done.stdout
    assert "amqp://guest:***@127.0.0.1:1/" in done.stdout


# -- a disabled consumer on the broker ------------------------------------------------


@pytest.mark.broker
@pytest.mark.anyio
async def test_a_disabled_consumer_declares_nothing_and_the_app_is_ready_without_it(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oracle = Oracle(broker_url)
    run = uuid.uuid4().hex[:8]
    on, off = f"settings-on-{run}", f"settings-off.{run}"
    path = write(tmp_path, f'[env.test.consumers."{off}"]\nenabled = false\n')
    handled: list[bytes] = []

    async def record(msg: sc.Message) -> None:
        handled.append(msg.body)

    app = sc.App(url=broker_url, grace_period=1.0)
    app.consumer(on, retry=sc.Retry(delays=(1.0,)), timeout=5.0)(record)
    app.consumer(off, retry=sc.Retry(delays=(1.0,)), timeout=5.0)(record)
    app.configure(config=path, env="test")
    try:
        async with app.running():
            assert app.ready
            assert app.disabled == (off,)
            assert app.subscriptions == {on: True}
            status, _, body = await call(app.asgi(), "/health/ready")
            assert (status, json.loads(body)["consumers"]) == (
                200,
                {on: "subscribed", off: "disabled"},
            )
            await oracle.publish(on, b"works")

            async def handled_one() -> bool:
                return handled == [b"works"]

            await wait_until(handled_one, what="the enabled consumer handling its message")
            status, _, metrics = await call(app.asgi(), "/metrics")
            assert status == 200
            assert on in metrics.decode()
            assert off not in metrics.decode()  # neither counted nor polled for its depth
            for queue in (off, f"{off}.dlq", f"{off}.retry.1000"):
                assert not await oracle.queue_exists(queue), queue
            for queue in (on, f"{on}.dlq", f"{on}.retry.1000"):
                assert await oracle.queue_exists(queue), queue
        assert list(app.disabled) == []
        # the environment turns it back on, over the file
        monkeypatch.setenv(consumer_variable(off, "enabled"), "true")
        async with app.running():
            assert app.subscriptions == {on: True, off: True}
            assert await oracle.consumer_count(off) == 1
    finally:
        for name in (on, off):
            for queue in (name, f"{name}.dlq", f"{name}.retry.1000"):
                oracle.delete_now(queue)


@pytest.mark.parametrize("env", [None, "staging", "prod", "maintenance"])
def test_the_example_settings_file_fits_the_example_app(
    env: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    for variable in ("STRICTCONSUME_URL", "AMQP_URL", "STRICTCONSUME_ENV"):
        monkeypatch.delenv(variable, raising=False)
    argv = ["examples.orders:app", "--config", "examples/settings.toml", "--print-settings"]
    code = main([*argv, *(["--env", env] if env else [])])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "change-me" not in out
    orders = next(rows for title, rows in _rows(out).items() if title.startswith("consumer"))
    expected = {None: "20", "staging": "5", "prod": "100", "maintenance": "20"}[env]
    assert orders["prefetch"][0] == expected
    assert orders["enabled"][0] == ("false" if env == "maintenance" else "true")
