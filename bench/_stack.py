"""A throw-away local stack for benchmarks: real broker, real components, temp dirs."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from bulwark.devstack import LocalStack, environment, private_environment
from bulwark.settings import Settings


@contextlib.contextmanager
def local_stack(policy_text: str, components=("ingest",), extra_env: dict[str, str] | None = None):
    """Start Kafka, the topics and the named components; yield (settings, stack)."""
    root = Path(tempfile.mkdtemp(prefix="bulwark-bench-"))
    policy = root / "policy.yaml"
    policy.write_text(policy_text)
    with environment({**private_environment(root, policy), **(extra_env or {})}):
        settings = Settings.from_env()
        stack = LocalStack.from_settings(settings)
        try:
            stack.start_kafka()
            if "streams" in components:
                stack.start_clamd()  # the antivirus and macros checks scan through it
            stack.ensure_topics()
            stack.start_components(only=tuple(components))
            yield settings, stack
        finally:
            stack.stop_all()
