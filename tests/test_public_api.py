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
    "UnsupportedSetting",
    "connect",
    "connect_stream",
    "parse_url",
    "redact_url",
}


FRAMEWORK_NAMES = {
    "App",
    "Binding",
    "ConsumerSpec",
    "DecodeError",
    "Duplicate",
    "Idempotency",
    "Message",
    "Publisher",
    "Reject",
    "Requeue",
    "Retry",
    "RetryLater",
    "SettingsError",
    "StartupError",
    "amqp",
    "consumer",
    "idempotency",
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
    # `annotations` is the `from __future__ import annotations` feature object.
    return {name for name in vars(module) if not name.startswith("_")} - {"annotations"}


def test_amqp_public_names() -> None:
    public = _public(strictconsume.amqp)
    assert public == AMQP_NAMES


def test_framework_public_names() -> None:
    # `testing` and `outbox` appear once something imported them (not at run time)
    assert _public(strictconsume) - {"testing", "outbox"} == FRAMEWORK_NAMES


def test_idempotency_public_names() -> None:
    import strictconsume.idempotency as idempotency

    assert set(idempotency.__all__) == IDEMPOTENCY_NAMES
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
    for name in FRAMEWORK_NAMES - {"amqp", "consumer", "idempotency"}:
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
