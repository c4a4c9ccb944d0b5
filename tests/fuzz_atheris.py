"""Coverage-guided fuzzing with atheris (libFuzzer) for longer hunts than CI's hypothesis runs.

Three targets, with the same properties as tests/test_fuzz_codec.py,
test_fuzz_policy.py and test_fuzz_mime.py: an uncaught exception, an input
slower than ``-timeout`` or a process over ``-rss_limit_mb`` is a finding
(libFuzzer writes it to ``crash-*``/``timeout-*``/``oom-*``). Each finding
becomes an ``@example`` or a regression test in those files.

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python -m tests.fuzz_atheris codec  -atheris_runs=200000
    .venv/bin/python -m tests.fuzz_atheris policy -atheris_runs=50000
    .venv/bin/python -m tests.fuzz_atheris mime   -atheris_runs=20000 -timeout=10 -rss_limit_mb=2048 CORPUS_DIR

Everything after the target name goes to libFuzzer. Not collected by pytest
(the module name does not start with ``test_``).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from datetime import datetime, timezone

    from pydantic import ValidationError

    from bulwark.policy import PolicyError, parse
    from schemas import codec
    from schemas.events import Envelope
    from streams import outbreak
    from streams.checks import CHECKS, dlp, macros
    from streams.message import Message, UnreadableMessage


def codec_target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    header = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
    try:
        codec.decode(fdp.ConsumeBytes(fdp.remaining_bytes()), [(codec.HEADER_TYPE, header)])
    except (codec.UnknownEvent, ValidationError):
        pass


def policy_target(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    try:
        parse("hostname: gw.example.com\nlocal_domains: [example.com]\n" + text, "fuzz.yaml")
    except PolicyError:
        pass


_ENVELOPE = Envelope(mail_from="erin@partner.test", rcpt_to=["frank@example.com"], sha256="0" * 64, size=1,
                     client_ip="192.0.2.7", received_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
_DLP = CHECKS["dlp"].settings_model()
_MACROS = CHECKS["macros"].settings_model(use_clamav=False)


def mime_target(data: bytes) -> None:
    message = Message("m1", "s1", _ENVELOPE, "outbound", data)
    try:
        list(message.parts())
        dlp.scan_message(message, _DLP, "outbound")
        macros.results(macros.inspect_message(message, _MACROS), None)
        outbreak.fingerprints(message)
    except UnreadableMessage:
        pass


TARGETS = {"codec": codec_target, "policy": policy_target, "mime": mime_target}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz_atheris {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
