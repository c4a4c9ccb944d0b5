"""Every message answered 250 reaches the downstream once, under concurrent load.

A benchmark run once saw 6 of 2,001 messages delivered twice: the delivery
sink wrote back a stale copy of a queue entry (read before announcing it,
written after a delivery finished meanwhile), which made a delivered
message due again. This drives many concurrent sessions through the whole
pipeline and counts each Message-ID at the downstream.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from email.parser import BytesHeaderParser
from email.utils import make_msgid

import pytest

from schemas.topics import DELIVERIES, VERDICTS

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

MESSAGES = 300
SESSIONS = 20


def test_many_concurrent_sessions_each_message_delivered_once(gateway):
    ids = [make_msgid(idstring=f"once{i}", domain="load.partner.test") for i in range(MESSAGES)]

    queue_ids: dict[str, str] = {}

    def session(chunk: list[int]) -> list[int]:
        codes = []
        with gateway.smtp() as client:
            client.ehlo("load.partner.test")
            for i in chunk:
                msg = gateway.message("loader@partner.test", [f"once{i}@{LOCAL_DOMAIN}"], f"load {i}")
                msg.replace_header("Message-ID", ids[i])
                client.mail("loader@partner.test")
                client.rcpt(f"once{i}@{LOCAL_DOMAIN}")
                code, reply = client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
                codes.append(code)
                queue_ids[ids[i]] = reply.decode().rsplit(" ", 1)[-1]
        return codes

    chunks = [list(range(s, MESSAGES, SESSIONS)) for s in range(SESSIONS)]
    with ThreadPoolExecutor(SESSIONS) as pool:
        codes = [c for result in pool.map(session, chunks) for c in result]
    assert codes == [250] * MESSAGES

    wanted = set(ids)
    deadline = time.monotonic() + 120
    while missing := wanted - {_message_id(d) for d in gateway.downstream.matching(lambda d: True)}:
        if time.monotonic() > deadline:
            # Say where the missing ones are, from the topics.
            stuck = {queue_ids[m] for m in missing}
            steps = Counter(r.event.type for r in gateway.records([VERDICTS.name, DELIVERIES.name], keys=stuck))
            raise AssertionError(f"{len(missing)} of {MESSAGES} not at the downstream after 120 s; "
                                 f"their events: {dict(steps)}; e.g. {sorted(stuck)[:3]}")
        time.sleep(0.5)
    # A second copy would come from a retry (the test policy retries after
    # 1 and 2 s) or the next scheduler pass (0.2 s): wait well past both.
    time.sleep(8)
    seen = Counter(_message_id(d) for d in gateway.downstream.matching(lambda d: _message_id(d) in wanted))
    assert set(seen) == wanted
    assert [mid for mid, n in seen.items() if n > 1] == []


def _message_id(delivered) -> str | None:
    # Parsed, not grepped: a long Message-ID is folded onto a second line.
    value = BytesHeaderParser().parsebytes(delivered.content).get("Message-ID")
    return " ".join(str(value).split()) if value else None
