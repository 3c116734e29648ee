"""URL parsing and redaction: every field, every error, never a password."""

from __future__ import annotations

import pytest

from strictconsume.amqp import ConnectionParameters, parse_url, redact_url


def test_full_url() -> None:
    params = parse_url(
        "amqps://alice:p%40ss@broker.example:5999/shop?heartbeat=15&connection_timeout=2.5"
        "&frame_max=65536&channel_max=16&cafile=/ca.pem"
    )
    assert params == ConnectionParameters(
        host="broker.example",
        port=5999,
        username="alice",
        password="p@ss",
        vhost="shop",
        tls=True,
        heartbeat=15,
        connection_timeout=2.5,
        frame_max=65536,
        channel_max=16,
        cafile="/ca.pem",
    )


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://h", "/"),
        ("amqp://h/", "/"),
        ("amqp://h/%2F", "/"),
        ("amqp://h/%2Fshop", "/shop"),
        ("amqp://h/shop", "shop"),
    ],
)
def test_vhost(url: str, vhost: str) -> None:
    assert parse_url(url).vhost == vhost


def test_defaults() -> None:
    params = parse_url("amqp://")
    assert (params.host, params.port, params.username, params.password) == (
        "localhost",
        5672,
        "guest",
        "guest",
    )
    assert params.heartbeat is None
    assert parse_url("amqps://h").port == 5671
    assert parse_url("AMQP://h").tls is False


def test_ipv6_host() -> None:
    params = parse_url("amqp://u:p@[::1]:5673/")
    assert (params.host, params.port) == ("::1", 5673)
    assert params.url == "amqp://u:***@[::1]:5673/%2F"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://u:topsecret@h/", "scheme must be amqp or amqps"),
        ("amqp://u:topsecret@h:notaport/", "the port must be a number"),
        ("amqp://u:top/secret@h/vh", "percent-encode it"),
        ("amqp://u:top?secret@h/", "percent-encode it"),
        ("amqp://u:top#secret@h/", "percent-encode it"),
        ("amqp://u:topsecret@h/a/b", "one path segment"),
        ("amqp://u:topsecret@h/?heartbeat=soon", "heartbeat must be an integer"),
        ("amqp://u:topsecret@h/?heartbeat=-1", "must not be negative"),
        ("amqp://u:topsecret@h/?connection_timeout=0", "must be positive"),
        ("amqp://u:topsecret@h/?hearbeat=10", "unknown query parameter 'hearbeat'"),
        ("amqp://u:topsecret@h/?auth_mechanism=CRAM", "PLAIN or EXTERNAL"),
        ("amqp://u:topsecret@h/?frame_max=100", "frame_max must be between 4096 and 4294967295"),
        # Values the client refuses once connected used to pass here, and the App
        # then reconnected for ever (issue 14): they are refused at once.
        ("amqp://u:topsecret@h/?frame_max=0", "frame_max must be between 4096 and 4294967295"),
        ("amqp://u:topsecret@h/?frame_max=4294967296", "frame_max must be between"),
        ("amqp://u:topsecret@h/?channel_max=0", "channel_max must be between 1 and 65535"),
        ("amqp://u:topsecret@h/?channel_max=65536", "channel_max must be between 1 and 65535"),
        ("amqp://u:topsecret@h/?heartbeat=70000", "heartbeat must be between 0 and 65535"),
        ("amqp://u:topsecret@h/#frag", "fragment"),
    ],
)
def test_malformed_urls_are_named_without_password(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid AMQP URL") as info:
        parse_url(url)
    message = str(info.value)
    assert fragment in message
    assert "secret" not in message  # every password here contains it, nothing else does
    assert "u:***@" in message


def test_non_string_url() -> None:
    with pytest.raises(TypeError, match="url must be a str, not bytes"):
        parse_url(b"amqp://h")  # type: ignore[arg-type]


def test_password_never_in_repr_or_url() -> None:
    params = parse_url("amqp://bob:hunter2@h/")
    assert "hunter2" not in repr(params)
    assert "hunter2" not in params.url
    assert params.url == "amqp://bob:***@h:5672/%2F"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://bob:hunter2@h:5672/v", "amqp://bob:***@h:5672/v"),
        ("amqp://bob@h/", "amqp://bob:***@h/"),
        ("amqp://h/", "amqp://h/"),
        ("amqp://bob:hun@ter2@h/", "amqp://bob:***@h/"),
        ("amqp://bob:hun/ter2@h/v", "amqp://bob:***@h/v"),
        ("amqp://bob:hun?ter2@h/", "amqp://bob:***@h/"),
        ("not a url bob:hunter2@h", "***@h"),
        ("plain", "plain"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
