"""A throw-away local stack for benchmarks: real broker, real components, temp dirs."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

from bulwark.devstack import COMPONENTS, LocalStack, wait_for_port
from bulwark.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_stack(policy_text: str, components=("ingest",), extra_env: dict[str, str] | None = None):
    """Start Kafka, the topics and the named components; yield (settings, stack)."""
    root = Path(tempfile.mkdtemp(prefix="bulwark-bench-"))
    policy = root / "policy.yaml"
    policy.write_text(policy_text)
    env = {
        "BULWARK_DATA_DIR": str(root),
        "BULWARK_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "BULWARK_KAFKA_CONTROLLER_PORT": str(free_port()),
        "BULWARK_POLICY": str(policy),
        "BULWARK_SMTP_PORT": str(free_port()),
        "BULWARK_MAILBOX_PORT": str(free_port()),
        "BULWARK_STREAMS_WEB_PORT": str(free_port()),
        # The Faust worker's antivirus and macros checks scan through clamd.
        "BULWARK_CLAMD_PORT": str(free_port()),
        **(extra_env or {}),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    settings = Settings.from_env()
    stack = LocalStack.from_settings(settings)
    try:
        stack.start_kafka()
        if "streams" in components:
            stack.start_clamd()
        stack.ensure_topics()
        for name, args in COMPONENTS:
            if name in components:
                stack.start(name, args)
        if "ingest" in components:
            wait_for_port(settings.smtp_host, settings.smtp_port, 60, stack.procs["ingest"])
        yield settings, stack
    finally:
        stack.stop_all()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
