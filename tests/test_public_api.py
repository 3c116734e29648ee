"""The public surface: every name users rely on exists, and nothing private leaks."""

from __future__ import annotations

import strictconsume
import strictconsume.amqp

AMQP_NAMES = {
    "AMQPError",
    "Channel",
    "ChannelClosed",
    "ConnectionClosed",
    "ConnectionLost",
    "ConnectionParameters",
    "Connection",
    "Consumer",
    "ConsumerCancelled",
    "Delivery",
    "Flag",
    "GetResult",
    "Headers",
    "LocalProtocolError",
    "MessageReturned",
    "Properties",
    "PublishNacked",
    "QueueDeclareOk",
    "RemoteProtocolError",
    "ReplyTimeout",
    "Timestamp",
    "asyncio_cancel_requested",
    "decode_properties",
    "encode_properties",
    "UnsupportedSetting",
    "connect",
    "connect_stream",
    "parse_url",
    "redact_url",
}


FRAMEWORK_NAMES = {
    "App",
    "Binding",
    "CallNext",
    "ConsumerSpec",
    "DecodeError",
    "Duplicate",
    "Idempotency",
    "InvalidBody",
    "Message",
    "Middleware",
    "Publisher",
    "Reject",
    "Requeue",
    "Retry",
    "RetryLater",
    "SettingsError",
    "StartupError",
    "TraceContextFilter",
    "TraceContextFormatter",
    "amqp",
    "consumer",
}

IDEMPOTENCY_NAMES = {
    "Claim",
    "Duplicate",
    "Idempotency",
    "IdempotencyStore",
    "InvalidKey",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "StoreError",
}


def _public(module: object) -> set[str]:
    # `annotations` is the `from __future__ import annotations` feature object. dir(),
    # not vars(): strictconsume's framework names load on first use.
    return {name for name in dir(module) if not name.startswith("_")} - {"annotations"}


def test_amqp_public_names() -> None:
    public = _public(strictconsume.amqp)
    assert public == AMQP_NAMES


def test_framework_public_names() -> None:
    # The subpackages `testing`, `outbox` and `idempotency` appear once something imported
    # them (the framework's names load lazily, and Idempotency with them)
    assert _public(strictconsume) - {"testing", "outbox", "idempotency"} == FRAMEWORK_NAMES


def test_idempotency_public_names() -> None:
    import strictconsume.idempotency as idempotency

    assert set(idempotency.__all__) == IDEMPOTENCY_NAMES
    # the same class as strictconsume.Duplicate (which, loading the framework's names,
    # shows it as strictconsume.Duplicate)
    assert idempotency.Duplicate is strictconsume.Duplicate
    for name in IDEMPOTENCY_NAMES:  # the optional drivers' stores import on demand
        obj = getattr(idempotency, name)
        assert obj.__module__.startswith("strictconsume"), name
        assert "._" not in obj.__module__ or name in ("PostgresStore", "RedisStore"), name


def test_outbox_public_names() -> None:
    import strictconsume.outbox as outbox

    assert set(outbox.__all__) == {
        "OutboxRow",
        "OutboxTable",
        "PostgresOutbox",
        "Relay",
        "RelayStats",
        "SQLiteOutbox",
    }
    for name in outbox.__all__:
        assert getattr(outbox, name).__module__ == "strictconsume.outbox", name


def test_testing_public_names() -> None:
    import strictconsume.testing

    assert set(strictconsume.testing.__all__) == {
        "HandlerResult",
        "run_handler",
        "run_handler_sync",
    }
    assert "testing" in _public(strictconsume)


def test_framework_classes_show_the_public_module() -> None:
    # CallNext and Middleware are type aliases (for annotating middleware), not classes
    for name in FRAMEWORK_NAMES - {"amqp", "consumer", "CallNext", "Middleware"}:
        assert getattr(strictconsume, name).__module__ == "strictconsume", name


def test_public_objects_do_not_claim_private_homes() -> None:
    for name in AMQP_NAMES - {"Properties"}:
        obj = getattr(strictconsume.amqp, name)
        module = getattr(obj, "__module__", "")
        assert module.startswith("strictconsume.amqp"), (name, module)


def test_errors_share_one_base() -> None:
    for name in AMQP_NAMES:
        obj = getattr(strictconsume.amqp, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, strictconsume.amqp.AMQPError), name


def test_version() -> None:
    assert isinstance(strictconsume.__version__, str)
    assert strictconsume.__version__[0].isdigit()
