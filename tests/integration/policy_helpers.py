"""Applying a policy to the running test stack, and waiting until ingest follows it."""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from pathlib import Path

from schemas import events as ev
from schemas.topics import SESSIONS, VERDICTS

#: Probe sessions come from their own addresses, so they never count against
#: the addresses the tests themselves use.
_PROBE_IPS = (f"127.0.9.{n}" for n in itertools.cycle(range(1, 250)))


def wait_until_ingest_uses(gateway, version: str, timeout: float = 60) -> None:
    """Probe with a MAIL until its session event records ``version``."""
    deadline = time.monotonic() + timeout
    while True:
        ip = next(_PROBE_IPS)
        with gateway.smtp(ip) as client:
            client.ehlo("probe.test")
            client.mail("probe@partner.test")
            client.rset()
        mails = gateway.wait_records(lambda r: isinstance(r.event, ev.SessionMail), [SESSIONS.name], keys={ip},
                                     what="probe MAIL event")
        if mails[-1].event.policy_version == version:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"ingest still on {mails[-1].event.policy_version}, not {version}")
        time.sleep(0.5)


def wait_until_streams_use(gateway, version: str, timeout: float = 60) -> None:
    """Probe with a harmless message until the Faust worker's verdict records ``version``.

    The worker's agents (content, screening, hijack) share one policy holder,
    so the verdict speaks for all of them.
    """
    deadline = time.monotonic() + timeout
    while True:
        queue_id = gateway.send(gateway.message("probe@partner.test", ["probe@example.test"], "probe"))
        [verdict] = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name], keys={queue_id},
                                         what="probe verdict")
        if verdict.event.policy_version == version:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the worker still on {verdict.event.policy_version}, not {version}")
        time.sleep(0.5)


def apply(gateway, path: Path) -> str:
    """Apply the file and return the version the CLI published it under."""
    result = gateway.cli("policy", "apply", str(path), "--by", "pytest")
    found = re.search(r"(?:applied )?policy ([0-9a-f]+)", result.stdout)
    assert found, result.stdout
    version = found.group(1)
    wait_until_ingest_uses(gateway, version)
    return version


def file_version(gateway, path: Path) -> str:
    """The version `bulwark policy check` gives a file (the CLI's view, as apply publishes it)."""
    return re.search(r"version ([0-9a-f]+)", gateway.cli("policy", "check", str(path)).stdout).group(1)


@contextlib.contextmanager
def applied_policy(gateway, tmp_path: Path, extra_yaml: str):
    """The test stack's policy plus ``extra_yaml``, in force for the block; then the original again."""
    original = Path(gateway.settings.policy_path)
    changed = tmp_path / "policy.changed.yaml"
    changed.write_text(original.read_text() + "\n" + extra_yaml)
    try:
        yield apply(gateway, changed)
    finally:
        apply(gateway, original)
