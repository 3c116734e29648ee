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


def _public(module: object) -> set[str]:
    # `annotations` is the `from __future__ import annotations` feature object. dir(),
    # not vars(): strictconsume's framework names load on first use.
    return {name for name in dir(module) if not name.startswith("_")} - {"annotations"}


def test_amqp_public_names() -> None:
    public = _public(strictconsume.amqp)
    assert public == AMQP_NAMES


def test_framework_public_names() -> None:
    # `testing` appears once something imported strictconsume.testing (not at run time)
    assert _public(strictconsume) - {"testing"} == FRAMEWORK_NAMES


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
