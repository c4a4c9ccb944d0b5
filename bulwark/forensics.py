"""Publishing what a replay found to ``forensics.replay`` (``bulwark replay --publish``).

A replay writes nothing unless asked. Asked, it publishes one
``ReplayFinding`` per row it reports, then a ``ReplayCompleted`` with its
selection and figures, all keyed by one replay id: on the topic's single
partition a consumer reads a replay's findings, in order, before the record
that says there are no more. The events go through the same publisher as
every other event (``bulwark.kafka.EventPublisher``: idempotent, each one
acknowledged by the broker before the command ends).
"""

from __future__ import annotations

import getpass

from bulwark.kafka import EventPublisher, make_producer
from bulwark.settings import Settings
from schemas import events as ev


async def publish(settings: Settings, findings: list[dict], *, replay: str, mode: str, candidate_policy: str | None,
                  selection: dict, read: int, selected: int, by: str | None = None) -> str:
    """Publish the findings (``ReplayFinding`` fields but the replay's own) and the completion; the replay id."""
    replay_id = ev.new_id()
    common = dict(replay_id=replay_id, replay=replay, mode=mode)
    events: list[ev.Event] = [ev.ReplayFinding(**common, **finding) for finding in findings]
    events.append(ev.ReplayCompleted(**common, candidate_policy=candidate_policy, selection=selection, read=read,
                                     selected=selected, findings=len(findings), by=by or getpass.getuser()))
    publisher = EventPublisher(make_producer(settings, "bulwark-replay"))
    await publisher.start()
    try:
        for event in events:
            await publisher.publish(event)
    finally:
        await publisher.stop()
    return replay_id


def verdict_finding(outcome) -> dict:
    """A verdict replay's row (``bulwark.replay.Outcome``) as a finding."""
    return dict(subject=outcome.message_id, message_id=outcome.message_id, recorded=outcome.recorded_action,
                replayed=outcome.replayed_action, causes=list(outcome.causes), error=outcome.error,
                details=outcome.as_json())


def session_findings(report) -> list[dict]:
    """A session replay's rows (``bulwark.replay_sessions.Report``) as findings.

    With a candidate: each client address or account whose facts differ.
    Without: each fact the recorded policies issue, and each recorded fact
    they do not reproduce.
    """
    from bulwark.replay_sessions import Difference

    if report.differences is not None:
        return [dict(subject=d.subject, recorded=Difference.summary(d.recorded),
                     replayed=Difference.summary(d.candidate), causes=list(d.causes), details=d.as_json())
                for d in report.differences]
    out = [dict(subject=f.subject, recorded=f.short(), replayed=f.short(), details=vars(f).copy())
           for f in report.recorded_policies]
    out += [dict(subject=f.subject, recorded=f.short(), replayed="none",
                 causes=["on the topic, not issued by the replay under the recorded policies"], details=vars(f).copy())
            for f in report.not_reproduced]
    return out
