"""`bulwark policy apply` and `bulwark policy show`: publishing the policy.

Only a policy that validates is ever published, so an invalid file leaves the
running policy in force. The version is the digest of the validated content:
the same rules carry the same version wherever they are loaded, and a verdict
names exactly the rules it was made under.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bulwark.kafka import EventPublisher, make_producer, read_topics
from bulwark.policy import Policy, load
from bulwark.settings import Settings
from schemas.events import PolicyPublished
from schemas.topics import POLICY


async def published_history(settings: Settings) -> list[PolicyPublished]:
    """Every policy still on config.policy, oldest first; the last is active."""
    records = await read_topics(settings, [POLICY.name])
    return [r.event for r in sorted(records, key=lambda r: r.offset) if isinstance(r.event, PolicyPublished)]


async def active(settings: Settings) -> PolicyPublished | None:
    history = await published_history(settings)
    return history[-1] if history else None


@dataclass(frozen=True)
class Applied:
    policy: Policy
    event: PolicyPublished | None  # None: it was already active
    previous: str | None


async def apply(settings: Settings, path: Path | str, by: str, only_if_changed: bool = False) -> Applied:
    """Validate the file (raises PolicyError) and publish it."""
    policy = load(path)
    current = await active(settings)
    if only_if_changed and current is not None and current.policy_version == policy.version:
        return Applied(policy, None, current.policy_version)
    event = PolicyPublished(
        policy_version=policy.version,
        document=policy.model_dump(mode="json"),
        source=str(Path(path).resolve()),
        applied_by=by,
    )
    publisher = EventPublisher(make_producer(settings, "bulwark-policy"))
    await publisher.start()
    try:
        await publisher.publish(event)
    finally:
        await publisher.stop()
    return Applied(policy, event, current.policy_version if current else None)
