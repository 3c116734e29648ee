"""The atheris fuzz target of the AMQP core's input side, run and replayed.

``test_fuzzer_finds_nothing`` runs the coverage-guided fuzzer (``fuzz_frames``) for a
bounded time over a copy of the corpus. The fast tests replay every corpus file
in-process, without atheris, so that a regression input added to ``corpus/`` is
checked on every run, and check that the seeds still are what ``make_corpus``
generates and still reach the states they were written for.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strictconsume.amqp._errors import RemoteProtocolError
from strictconsume.amqp._protocol import ConnectionBlocked, ProtocolConnection, PublishConfirmed
from tests.fuzz import make_corpus
from tests.fuzz.fuzz_frames import (
    MAX_CUTS,
    PHASES,
    TestOneInput,
    check_event_fields,
    decode_input,
    encode_input,
    run,
)

REPO = Path(__file__).resolve().parents[2]
CORPUS = make_corpus.CORPUS
CORPUS_FILES = sorted(CORPUS.iterdir())
FUZZ_SECONDS = int(os.environ.get("STRICTCONSUME_FUZZ_SECONDS", "60"))
# The committed corpus stays small (merge new finds with -merge=1).
MAX_CORPUS_FILES = 200
MAX_CORPUS_BYTES = 1_000_000
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.name for p in CORPUS_FILES])
def test_corpus_input_replays_without_a_finding(path: Path) -> None:
    """Fed this corpus input, the core gives documented events or RemoteProtocolError,
    keeps at most one incomplete frame buffered and never over-assembles content
    (TestOneInput raises on anything else)."""
    TestOneInput(path.read_bytes())


def test_seeds_are_valid_sessions_of_every_phase() -> None:
    """Every seed is a valid stream: it completes events and no protocol error ends it,
    so the fuzzer starts from deep states of every phase rather than from rejections."""
    seeds = make_corpus.seeds()
    phases = set()
    for name, data in seeds.items():
        outcome = run(data)
        assert outcome.error is None, (name, outcome.error)
        assert outcome.events, name
        phases.add(outcome.phase.name)
    assert phases == {phase.name for phase in PHASES}


def test_committed_seeds_are_what_make_corpus_generates(capsys: pytest.CaptureFixture[str]) -> None:
    """The seed files in corpus/ are exactly make_corpus's output (regenerate with
    ``python -m tests.fuzz.make_corpus``)."""
    assert make_corpus.main(["--check"]) == 0, capsys.readouterr().out


def test_committed_corpus_stays_small() -> None:
    """The committed corpus keeps the bound the brief sets: at most 200 files, 1 MB."""
    total = sum(p.stat().st_size for p in CORPUS_FILES)
    print(f"\ncorpus: {len(CORPUS_FILES)} files, {total} bytes")
    assert len(CORPUS_FILES) <= MAX_CORPUS_FILES
    assert total <= MAX_CORPUS_BYTES


def test_input_layout_round_trips() -> None:
    """encode_input and decode_input agree: the phase, and the stream split at the cuts."""
    stream = bytes(range(50))
    phase, pieces = decode_input(encode_input("mid-content", stream, [30, 10, 10, 50, 0]))
    assert phase.name == "mid-content"
    assert pieces == [stream[:10], stream[10:30], stream[30:]]
    # Any bytes decode: cut points wrap around the stream, a short input has no cuts.
    phase, pieces = decode_input(bytes([7, 3, 0xFF, 0xFF, 0, 1]))
    assert phase is PHASES[7 % len(PHASES)]
    assert pieces == []
    assert decode_input(b"") == (PHASES[0], [])
    assert decode_input(b"\x01") == (PHASES[1], [])
    with pytest.raises(ValueError, match="at most"):
        encode_input("handshake", b"", list(range(MAX_CUTS)))


def test_the_target_reports_what_is_not_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target lets every exception but a protocol error escape, and catches a core
    that buffers a whole frame: so the fuzzer would report such a bug."""
    # The handshake phase: preparing it feeds nothing, so only the stream meets the
    # patched parser.
    data = (CORPUS / "seed-handshake-whole").read_bytes()

    def broken(self: ProtocolConnection, source: bytes | bytearray) -> int:
        raise KeyError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(ProtocolConnection, "_parse", broken)
        with pytest.raises(KeyError, match="a bug"):
            TestOneInput(data)

    def hoarding(self: ProtocolConnection, source: bytes | bytearray) -> int:
        return 0  # keeps every byte buffered, whole frames included

    with monkeypatch.context() as patch:
        patch.setattr(ProtocolConnection, "_parse", hoarding)
        with pytest.raises(AssertionError, match="bytes buffered"):
            TestOneInput(data)

    def refusing(self: ProtocolConnection, source: bytes | bytearray) -> int:
        raise RemoteProtocolError("garbage")

    with monkeypatch.context() as patch:
        patch.setattr(ProtocolConnection, "_parse", refusing)
        assert isinstance(run(data).error, RemoteProtocolError)


def test_the_event_check_rejects_a_field_of_the_wrong_type() -> None:
    """The target's event check catches a field whose value is not of its annotated
    type, and passes the events of a real session."""
    check_event_fields([ConnectionBlocked("low on memory"), PublishConfirmed(2, (1, 2), True)])
    with pytest.raises(AssertionError, match=r"ConnectionBlocked\.reason = b'low'"):
        check_event_fields([ConnectionBlocked(b"low")])  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="publish_tags"):
        check_event_fields([PublishConfirmed(2, (1, None), True)])  # type: ignore[arg-type]
    outcome = run((CORPUS / "seed-handshake-session").read_bytes())
    assert outcome.error is None
    check_event_fields(outcome.events)


def _figures(output: str) -> dict[str, str]:
    """libFuzzer's last status line (cov, ft, corp, exec/s) and final stats."""
    figures: dict[str, str] = {}
    status = [line for line in output.splitlines() if re.match(r"#\d+\s", line)]
    if status:
        last = status[-1]
        figures["status"] = last
        for key in ("cov", "ft", "corp", "exec/s"):
            found = re.search(rf"\b{re.escape(key)}: (\S+)", last)
            if found:
                figures[key] = found.group(1)
    for key, value in re.findall(r"^stat::(\w+):\s+(\S+)", output, re.MULTILINE):
        figures[key] = value
    return figures


@pytest.mark.slow
@pytest.mark.timeout(FUZZ_SECONDS + 180)
def test_fuzzer_finds_nothing(tmp_path: Path) -> None:
    """Coverage-guided fuzzing for STRICTCONSUME_FUZZ_SECONDS (60 by default) over a
    copy of the corpus finds no input that makes the core raise anything but
    RemoteProtocolError, hang for 10 s, or break the buffer and content checks."""
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    log = tmp_path / "fuzz.log"
    command = [
        sys.executable,
        "-m",
        "tests.fuzz.fuzz_frames",
        str(corpus),
        f"-max_total_time={FUZZ_SECONDS}",
        "-max_len=4096",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
    ]
    began = time.monotonic()
    with log.open("wb") as out:
        returncode = subprocess.run(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=FUZZ_SECONDS + 150
        ).returncode
    elapsed = time.monotonic() - began
    output = log.read_text(errors="replace")
    figures = _figures(output)
    found = sorted(p for p in artifacts.iterdir() if p.name.startswith(ARTIFACT_PREFIXES))
    print(
        f"\nfuzzed {elapsed:.0f} s: {figures.get('number_of_executed_units', '?')} executions, "
        f"{figures.get('average_exec_per_sec', '?')} exec/s, cov {figures.get('cov', '?')}, "
        f"ft {figures.get('ft', '?')}, corpus {figures.get('corp', '?')} "
        f"({len(CORPUS_FILES)} committed files, {len(list(corpus.iterdir()))} after), "
        f"peak RSS {figures.get('peak_rss_mb', '?')} MB"
    )
    if returncode != 0 or found:
        report = [f"the fuzzer exited {returncode}; artifacts: {[p.name for p in found]}"]
        for path in found:
            report.append(f"{path.name} (hex): {path.read_bytes().hex()}")
        start = output.find("=== Uncaught Python exception")
        report.append(output[start:] if start >= 0 else "\n".join(output.splitlines()[-60:]))
        report.append(
            "replay: .venv/bin/python -m tests.fuzz.fuzz_frames ARTIFACT; minimise: add "
            "-minimize_crash=1 -runs=20000 -exact_artifact_path=MIN; then add MIN to "
            "tests/fuzz/corpus as a regression input"
        )
        pytest.fail("\n".join(report), pytrace=False)
    assert int(figures["number_of_executed_units"]) > 0, output[-2000:]
