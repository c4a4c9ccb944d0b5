"""Per-user quarantine digests: who gets one, what it says, its signed links, and
the console page a link opens (in-process; no broker)."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy as email_policy

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bulwark.policy import Policy
from console.digest_links import DigestLinks, LinkExpired, LinkInvalid, load_key
from schemas import events as ev
from sinks.digest import held_for, period_end, queue_digests, user_releasable

from .test_console import FakeIndex, hostile_message, record
from .test_delivery_queue import make_sink

NOW = datetime(2026, 12, 2, 0, 5, tzinfo=timezone.utc)


def digest_policy(**digest) -> Policy:
    return Policy.model_validate({
        "hostname": "gw.example.test", "local_domains": ["example.test"],
        "mail_servers": [{"name": "mx", "host": "127.0.0.1", "port": 9, "default": True}],
        "quarantine_digest": {"enabled": True, "console_url": "https://console.example.test:8445", **digest},
    })


def held(message_id, rcpt, at, reasons=("SPAM_SCORE",), results=(), state="quarantined", direction="inbound"):
    r = record(message_id, "news@list.test", rcpt, list(reasons), hostile_message(), state=state)
    r.update(quarantined_at=at.isoformat(), results=list(results), direction=direction)
    return r


VIRUS = {"check": "antivirus", "name": "VIRUS_FOUND", "outcome": "hit", "detail": "Eicar"}


def records():
    day = datetime(2026, 12, 1, tzinfo=timezone.utc)
    return [
        held("m1", "lee@example.test", day + timedelta(hours=9)),
        held("m2", "Lee@Example.test", day + timedelta(hours=10), reasons=["VIRUS_FOUND"], results=[VIRUS]),
        held("m3", "kim@example.test", day + timedelta(hours=11)),
        held("m4", "lee@example.test", day - timedelta(hours=1)),  # the period before
        held("m5", "lee@example.test", day + timedelta(hours=12), state="released"),
        held("m6", "out@partner.test", day + timedelta(hours=13), direction="outbound"),
    ]


def test_who_gets_a_digest_and_which_messages_a_user_may_release():
    policy = digest_policy()
    assert period_end(NOW, 24 * 3600) == datetime(2026, 12, 2, tzinfo=timezone.utc)
    assert period_end(NOW, 6 * 3600) == datetime(2026, 12, 2, tzinfo=timezone.utc)
    found = held_for(records(), policy, NOW.replace(minute=0) - timedelta(hours=24), NOW.replace(minute=0))
    assert {k: [r["message_id"] for r in v] for k, v in found.items()} == {
        "lee@example.test": ["m1", "m2"], "kim@example.test": ["m3"]}
    assert user_releasable(records()[0], policy) and not user_releasable(records()[1], policy)
    with pytest.raises(ValueError, match="console_url"):
        Policy.model_validate({"hostname": "gw", "local_domains": ["example.test"],
                               "quarantine_digest": {"enabled": True}})


def old_token(links, monkeypatch, hours, message_id="m1", rcpt="lee@example.test"):
    """A link signed ``hours`` ago."""
    import time

    from itsdangerous.timed import TimestampSigner

    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: int(time.time() - hours * 3600))
    token = links.token(message_id, rcpt)
    monkeypatch.undo()
    return token


def test_links_are_signed_and_expire(tmp_path, monkeypatch):
    key = load_key(tmp_path)
    assert len(key) == 32 and (tmp_path / "secrets" / "digest.key").stat().st_mode & 0o777 == 0o600
    links = DigestLinks(key)
    token = links.token("m1", "lee@example.test")
    assert links.open(token, 72) == ("m1", "lee@example.test")
    with pytest.raises(LinkInvalid):
        links.open(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1], 72)
    with pytest.raises(LinkInvalid):
        DigestLinks(b"x" * 32).open(token, 72)  # another gateway's key
    assert links.open(old_token(links, monkeypatch, 71), 72) == ("m1", "lee@example.test")
    with pytest.raises(LinkExpired):
        links.open(old_token(links, monkeypatch, 73), 72)
    assert load_key(tmp_path) == key  # made once, then read


@pytest.fixture(autouse=True)
def policy_period(monkeypatch):
    """The policy's period, whatever the environment says: the integration
    stack's short BULWARK_DIGEST_PERIOD_SECONDS stays set for the whole
    session when `make test` runs both suites in one process."""
    monkeypatch.delenv("BULWARK_DIGEST_PERIOD_SECONDS", raising=False)


@pytest.fixture
def links(tmp_path):
    return DigestLinks(load_key(tmp_path))


async def test_queued_digests_list_the_messages_with_links_once_per_period(tmp_path, links):
    from bulwark.policy.runtime import PolicyHolder

    from .test_delivery_queue import delivered, run_until

    sent: list[tuple[list[str], bytes]] = []
    senders: list[str] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        sent.append((list(rcpts), bytes(data)))
        senders.append(mail_from)
        return delivered(rcpts)

    sink = make_sink(tmp_path, send)
    sink.policy = PolicyHolder.fixed(digest_policy())
    digest = await sink.blobs.put(hostile_message())
    held_records = records()
    for r in held_records:
        r["envelope"]["sha256"] = digest
    queued = await queue_digests(sink, held_records, links, now=NOW)
    assert len(queued) == 2
    assert await queue_digests(sink, held_records, links, now=NOW + timedelta(hours=1)) == []  # the same period
    await run_until(sink, lambda: len(sent) == 2)
    mails = {rcpts[0]: message_from_bytes(data, policy=email_policy.default) for rcpts, data in sent}
    lee = mails["lee@example.test"]
    assert lee["Subject"] == "Quarantine: 2 messages held for you" and lee["Auto-Submitted"] == "auto-generated"
    body = lee.get_content()
    assert "<script>alert('subject')</script> invoice" in body  # text/plain: shown, never run
    urls = re.findall(r"https://console\.example\.test:8445/digest/(\S+)", body)
    assert [links.open(u, 72) for u in urls] == [("m1", "lee@example.test")]  # m2 (a virus): no link
    assert "Only an administrator can release this one." in body
    assert "/digest/" in mails["kim@example.test"].get_content()
    assert senders == ["", ""]  # the null sender: a digest that fails bounces nowhere


# -- the console page a link opens -------------------------------------------------------


@pytest.fixture
async def link_client(tmp_path, links):
    from bulwark.policy.runtime import PolicyHolder
    from console.admins import AdminStore
    from console.app import Console, make_app
    from console.quarantine_pages import Quarantine

    raw = hostile_message()
    by_id = {r["message_id"]: r for r in records()}
    for r in by_id.values():
        r["envelope"]["sha256"] = hashlib.sha256(raw).hexdigest()
    published: list[ev.Event] = []

    async def publish(event):
        published.append(event)

    console = Console(AdminStore(tmp_path / "admins.json"), Quarantine(lambda: FakeIndex(by_id), lambda d: raw),
                      publish, secure_cookies=False, policy=PolicyHolder.fixed(digest_policy()), digest_links=links)
    async with TestClient(TestServer(make_app(console))) as client:
        yield client, published


def csrf_of(html):
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


async def test_a_link_releases_that_message_to_that_recipient_once(link_client, links):
    client, published = link_client
    token = links.token("m1", "lee@example.test")
    page = await (await client.get(f"/digest/{token}")).text()
    assert "Release it to lee@example.test" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert 'href="/quarantine"' not in page  # no console for the user, only this message
    # Without the form's token: refused, as every form.
    assert (await client.post(f"/digest/{token}", data={})).status == 403 and published == []
    response = await client.post(f"/digest/{token}", data={"csrf_token": csrf_of(page)}, allow_redirects=False)
    assert response.status == 303
    [released] = published
    assert (released.message_id, released.to, released.by) == ("m1", ["lee@example.test"],
                                                                "lee@example.test (digest link)")
    assert released.reason == "released by the recipient from the digest"
    page = await (await client.get(f"/digest/{token}")).text()
    assert "Release requested" in page and 'id="release"' not in page
    # The link again, with a form token that passes (as from a second tab): a link works once.
    client.session.cookie_jar.clear()
    again = await client.post(f"/digest/{token}", data={"csrf_token": "second-tab"},
                              cookies={"__Host-bulwark-login": "second-tab"})
    assert again.status == 409 and len(published) == 1


async def test_links_that_are_expired_forged_or_for_malware_release_nothing(link_client, links, monkeypatch):
    client, published = link_client
    assert (await client.get(f"/digest/{old_token(links, monkeypatch, 73)}")).status == 410
    assert (await client.get(f"/digest/{DigestLinks(b'y' * 32).token('m1', 'lee@example.test')}")).status == 404
    # A valid signature, but the message was not for this address.
    assert (await client.get(f"/digest/{links.token('m3', 'lee@example.test')}")).status == 404
    response = await client.get(f"/digest/{links.token('m2', 'lee@example.test')}")
    assert response.status == 403 and "Only an administrator" in await response.text()
    response = await client.get(f"/digest/{links.token('m5', 'lee@example.test')}")
    assert "already released" in await response.text()
    assert published == []


async def test_a_period_of_seconds_from_the_settings_replaces_the_policys_hours(tmp_path, links, monkeypatch):
    """BULWARK_DIGEST_PERIOD_SECONDS: what the integration test's short period rests on."""
    from bulwark.policy.runtime import PolicyHolder
    from bulwark.settings import Settings

    from .test_delivery_queue import delivered

    async def send(route, req, mail_from, rcpts, data, record=None):
        return delivered(rcpts)

    monkeypatch.setenv("BULWARK_DIGEST_PERIOD_SECONDS", "30")
    assert Settings.from_env().digest_period_seconds == 30
    sink = make_sink(tmp_path, send)
    sink.settings = sink.settings.with_(digest_period_seconds=30)
    sink.policy = PolicyHolder.fixed(digest_policy())
    held_records = [held("in", "lee@example.test", NOW - timedelta(seconds=10)),
                    held("before", "kim@example.test", NOW - timedelta(seconds=40))]
    for r in held_records:
        r["envelope"]["sha256"] = await sink.blobs.put(hostile_message())
    # NOW (00:05:00) is a boundary: the period just ended is 00:04:30 to 00:05:00.
    queued = await queue_digests(sink, held_records, links, now=NOW + timedelta(seconds=1))
    assert queued == [f"digest-20261202000500-{hashlib.sha256(b'lee@example.test').hexdigest()[:20]}"]
    assert await queue_digests(sink, held_records, links, now=NOW + timedelta(seconds=29)) == []  # the same period
    # Whole hours keep the id's hour form (no digest sent twice across an upgrade).
    sink.settings = sink.settings.with_(digest_period_seconds=None)
    held_records[0]["quarantined_at"] = (NOW - timedelta(hours=1)).isoformat()
    [daily] = await queue_digests(sink, held_records, links, now=NOW)
    assert daily.startswith("digest-2026120200-")
