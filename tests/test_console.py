"""The web console's logic over HTTP, in-process: logins, CSRF, roles, the quarantine pages.

The browser tests (tests/integration/test_console_browser.py) drive the same
pages in chromium against the real stack.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import stat
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage

import pytest
from aiohttp.test_utils import TestClient, TestServer

from console.admins import AdminStore
from console.app import Console, make_app
from console.quarantine_pages import Quarantine, matches
from schemas import events as ev

PASSWORD = "correct horse battery staple"


class FakeIndex:
    def __init__(self, records: dict[str, dict]):
        self.records = records

    def items(self):
        return iter(self.records.items())

    def get(self, key):
        return self.records.get(key)

    def close(self):
        pass


def hostile_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "mallory@partner.test"
    msg["To"] = "lee@example.test"
    msg["Subject"] = "<script>alert('subject')</script> invoice"
    msg.set_content("Pay now <script>alert('body')</script>")
    msg.add_alternative("<html><body><img src=x onerror=alert(1)><b>bold</b></body></html>", subtype="html")
    msg.add_attachment(b"MZ\x90\x00fake program", maintype="application", subtype="octet-stream",
                       filename="invoice.pdf.exe")
    return msg.as_bytes()


def record(message_id: str, sender: str, rcpt: str, reasons: list[str], raw: bytes, state="quarantined") -> dict:
    return {
        "message_id": message_id, "session_id": "s-" + message_id, "state": state,
        "envelope": {"mail_from": sender, "rcpt_to": [rcpt], "sha256": hashlib.sha256(raw).hexdigest(),
                     "size": len(raw), "client_ip": "192.0.2.7", "received_at": "2026-12-01T10:00:00+00:00"},
        "direction": "inbound", "action": "quarantine", "reasons": reasons, "results": [],
        "policy_version": "p1", "quarantined_at": "2026-12-01T10:00:00+00:00", "announced": True,
    }


@pytest.fixture(scope="module")
def admins_file(tmp_path_factory):
    """Two accounts, hashed once (Argon2id is slow on purpose); each test gets its own copy."""
    admins = AdminStore(tmp_path_factory.mktemp("console") / "admins.json")
    admins.add("root", "admin", PASSWORD)
    admins.add("desk", "helpdesk", PASSWORD)
    return admins.path


@pytest.fixture
def world(tmp_path, admins_file):
    raw = hostile_message()
    blobs = {hashlib.sha256(raw).hexdigest(): raw}
    records = {
        "m1": record("m1", "mallory@partner.test", "lee@example.test", ["ATTACHMENT_TYPE_BLOCKED"], raw),
        "m2": record("m2", "news@list.test", "kim@example.test", ["SPAM_SCORE"], raw),
        "m3": record("m3", "old@partner.test", "lee@example.test", ["SPAM_SCORE"], raw, state="released"),
    }
    admins = AdminStore(tmp_path / "console" / "admins.json")
    admins.path.parent.mkdir()
    shutil.copy(admins_file, admins.path)
    published: list[ev.Event] = []

    async def publish(event):
        published.append(event)

    console = Console(admins, Quarantine(lambda: FakeIndex(records), lambda digest: blobs[digest]), publish,
                      secure_cookies=False)
    return console, published, records


@pytest.fixture
async def client(world):
    console, _, _ = world
    async with TestClient(TestServer(make_app(console))) as client:
        yield client


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


async def log_in(client, name="root", password=PASSWORD):
    page = await (await client.get("/login")).text()
    return await client.post("/login", data={"name": name, "password": password, "csrf_token": csrf_of(page)},
                             allow_redirects=False)


# -- administrators ---------------------------------------------------------------


def test_admin_store_keeps_argon2id_verifiers_only_in_a_private_file(tmp_path):
    store = AdminStore(tmp_path / "admins.json")
    store.add("alice", "admin", PASSWORD)
    text = store.path.read_text()
    assert PASSWORD not in text and "$argon2id$" in text
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.authenticate("alice", PASSWORD).role == "admin"
    assert store.authenticate("alice", PASSWORD + "x") is None
    assert store.authenticate("nobody", PASSWORD) is None


@pytest.mark.parametrize("name,role,password,why", [
    ("alice", "root", PASSWORD, "role"),
    ("al ice", "admin", PASSWORD, "name"),
    ("alice", "admin", "short", "shorter"),
    ("alice", "admin", "password123456", "too easy to guess"),
    ("alice", "admin", "alice-rules-the-console", "name|domain"),
])
def test_admin_store_refuses_bad_names_roles_and_short_passwords(tmp_path, name, role, password, why):
    with pytest.raises(ValueError, match=why):
        AdminStore(tmp_path / "admins.json").add(name, role, password)


# -- login, sessions, CSRF ----------------------------------------------------------


async def test_pages_need_a_login(client):
    response = await client.get("/quarantine", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/login"


async def test_login_sets_a_strict_httponly_secure_session_cookie(world):
    console, _, _ = world
    console.secure_cookies = True
    async with TestClient(TestServer(make_app(console))) as client:
        form = await client.get("/login")
        # (The test client speaks plain HTTP, so it keeps Secure cookies to itself: send it by hand.)
        login_cookie = form.cookies["__Host-bulwark-login"].value
        response = await client.post("/login", data={"name": "root", "password": PASSWORD,
                                                      "csrf_token": csrf_of(await form.text())},
                                     cookies={"__Host-bulwark-login": login_cookie}, allow_redirects=False)
    assert response.status == 303
    for name, headers in (("__Host-bulwark-login", form.headers), ("__Host-bulwark-console", response.headers)):
        [cookie] = [c for c in headers.getall("Set-Cookie") if c.startswith(name + "=")]
        assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Domain" not in cookie


async def test_a_failed_login_is_an_event_without_the_password(client, world):
    _, published, _ = world
    response = await log_in(client, password="wrong password, guessing")
    assert response.status == 401 and "Wrong name or password" in await response.text()
    [event] = published
    assert isinstance(event, ev.ConsoleLoginFailed) and event.login == "root" and event.client_ip == "127.0.0.1"
    assert "guessing" not in event.model_dump_json()
    # An unknown name is refused the same way (the page does not say who exists).
    response = await log_in(client, name="nobody", password="wrong password, guessing")
    assert response.status == 401 and published[1].login == "nobody"


async def test_a_post_without_the_csrf_token_is_refused(client, world):
    _, published, _ = world
    await log_in(client)
    response = await client.post("/quarantine/m1/release", data={})
    assert response.status == 403
    response = await client.post("/quarantine/m1/release", data={"csrf_token": "forged"})
    assert response.status == 403
    page = await (await client.get("/login", allow_redirects=False)).text()
    # Even the login form needs its token (login CSRF).
    response = await client.post("/login", data={"name": "root", "password": PASSWORD})
    assert response.status == 403 and page is not None
    assert published == []


async def test_without_a_session_no_token_opens_a_form(client, world):
    _, published, _ = world
    form = await client.get("/login")  # a login cookie and its token, but nobody logged in
    response = await client.post("/quarantine/m1/release", data={"csrf_token": csrf_of(await form.text())})
    assert response.status == 403 and published == []


async def test_logout_ends_the_session(client):
    await log_in(client)
    page = await (await client.get("/quarantine")).text()
    response = await client.post("/logout", data={"csrf_token": csrf_of(page)}, allow_redirects=False)
    assert response.status == 303
    assert (await client.get("/quarantine", allow_redirects=False)).status == 303


async def test_helpdesk_may_use_the_quarantine_but_not_admin_pages(client):
    await log_in(client, name="desk")
    assert (await client.get("/quarantine")).status == 200
    response = await client.get("/admins")
    assert response.status == 403 and "helpdesk" in await response.text()


async def test_every_page_forbids_scripts_and_framing(client):
    response = await client.get("/login")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Server"] == "Bulwark"


# -- quarantine ----------------------------------------------------------------------------


def test_filters_are_case_insensitive_substrings():
    r = record("m", "Mallory@Partner.test", "lee@example.test", ["ATTACHMENT_TYPE_BLOCKED"], b"")
    assert matches(r, "quarantined", sender="mallory", recipient="LEE@", reason="attachment")
    assert not matches(r, "quarantined", sender="kim")
    assert not matches(r, "released") and matches(r, "all")
    # Held on 2026-12-01 (UTC): days are inclusive bounds.
    assert matches(r, "all", since="2026-12-01", until="2026-12-01")
    assert not matches(r, "all", since="2026-12-02") and not matches(r, "all", until="2026-11-30")


async def test_search_lists_only_matching_held_messages(client):
    await log_in(client)
    page = await (await client.get("/quarantine")).text()
    assert "/quarantine/m1" in page and "/quarantine/m2" in page and "/quarantine/m3" not in page
    page = await (await client.get("/quarantine", params={"reason": "spam"})).text()
    assert "/quarantine/m1" not in page and "/quarantine/m2" in page
    page = await (await client.get("/quarantine", params={"recipient": "lee@", "state": "all"})).text()
    assert "/quarantine/m1" in page and "/quarantine/m3" in page and "/quarantine/m2" not in page
    page = await (await client.get("/quarantine", params={"since": "2026-12-02"})).text()
    assert "/quarantine/m" not in page
    # Not a date: no bound rather than an error.
    page = await (await client.get("/quarantine", params={"since": "yesterday"})).text()
    assert "/quarantine/m1" in page


async def test_the_list_is_empty_before_the_quarantine_sink_made_its_index(world):
    console, _, _ = world
    console.quarantine = Quarantine(lambda: None, lambda digest: b"")
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client)
        response = await client.get("/quarantine")
        assert response.status == 200 and "0 messages" in await response.text()
        assert (await client.get("/quarantine/m1")).status == 404


async def test_message_view_escapes_everything_and_lists_attachments(client):
    await log_in(client)
    page = await (await client.get("/quarantine/m1")).text()
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&#39;subject&#39;)&lt;/script&gt; invoice" in page
    assert "&lt;script&gt;alert(&#39;body&#39;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "invoice.pdf.exe" in page and "application/octet-stream" in page
    assert hashlib.sha256(b"MZ\x90\x00fake program").hexdigest() in page


async def test_release_and_delete_publish_the_cli_events_as_the_logged_in_admin(client, world):
    _, published, _ = world
    await log_in(client, name="desk")
    page = await (await client.get("/quarantine/m1")).text()
    response = await client.post("/quarantine/m1/release", data={"csrf_token": csrf_of(page),
                                                                 "reason": "expected invoice"},
                                 allow_redirects=False)
    assert response.status == 303
    response = await client.post("/quarantine/m2/delete", data={"csrf_token": csrf_of(page),
                                                                "reason": "newsletter nobody reads"},
                                 allow_redirects=False)
    assert response.status == 303
    released, deleted = published
    assert isinstance(released, ev.QuarantineReleased) and released.by == "desk"
    assert released.message_id == "m1" and released.envelope.rcpt_to == ["lee@example.test"]
    assert released.reason == "expected invoice"
    assert isinstance(deleted, ev.QuarantineDeleted) and deleted.by == "desk" and deleted.message_id == "m2"
    assert deleted.reason == "newsletter nobody reads"


async def test_a_release_or_deletion_needs_a_reason_of_one_line(client, world):
    _, published, _ = world
    await log_in(client, name="desk")
    page = await (await client.get("/quarantine/m1")).text()
    # Each form has a labelled, required reason field.
    assert '<label for="reason">Reason</label>' in page and '<label for="reason-to">Reason</label>' in page
    assert re.search(r'<input id="reason" name="reason" required maxlength="300"', page)
    for action, data in (("release", {}), ("delete", {"reason": "  \r\n "})):
        refused = await client.post(f"/quarantine/m1/{action}", data={"csrf_token": csrf_of(page), **data})
        assert refused.status == 400 and "give a reason" in await refused.text()
    assert published == []
    # A line break cannot forge a second log or syslog line; a long reason is cut.
    await client.post("/quarantine/m1/release", data={"csrf_token": csrf_of(page),
                                                      "reason": "expected\r\nFAKE: entry " + "x" * 500},
                      allow_redirects=False)
    [released] = published
    assert released.reason.startswith("expected FAKE: entry x") and len(released.reason) == ev.REASON_MAX


async def test_the_reason_is_shown_escaped_once_the_sink_has_marked_the_message(client, world):
    _, _, records = world
    records["m3"].update(by="desk", reason="<script>alert('why')</script> sender confirmed")
    await log_in(client)
    view = await (await client.get("/quarantine/m3")).text()
    assert "&lt;script&gt;alert(&#39;why&#39;)&lt;/script&gt; sender confirmed" in view
    assert "<script>alert" not in view
    records["m3"].pop("reason")  # released before reasons were kept
    assert "(no reason recorded)" in await (await client.get("/quarantine/m3")).text()


async def test_a_message_no_longer_held_cannot_be_released(client, world):
    _, published, _ = world
    await log_in(client)
    page = await (await client.get("/quarantine")).text()
    response = await client.post("/quarantine/m3/release", data={"csrf_token": csrf_of(page), "reason": "x"})
    assert response.status == 409 and published == []


# -- bulwark console add-admin -------------------------------------------------------


def test_add_admin_reads_the_password_from_stdin_and_never_echoes_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bulwark.cli import main
    from console.admins import admins_path

    monkeypatch.setenv("BULWARK_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["console", "add-admin", "alice", "--role", "helpdesk", "--password-stdin"],
                                input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output and "alice can log in to the console as helpdesk" in result.output
    assert AdminStore(admins_path(tmp_path)).authenticate("alice", PASSWORD).role == "helpdesk"
    listed = CliRunner().invoke(main, ["console", "admins"])
    assert listed.output.split() == ["alice", "helpdesk"]
    weak = CliRunner().invoke(main, ["console", "add-admin", "bob", "--role", "admin", "--password-stdin"],
                              input="short\n")
    assert weak.exit_code != 0 and "shorter than 12 characters" in weak.output


async def test_a_second_release_before_the_sinks_act_is_refused(client, world):
    _, published, _ = world
    await log_in(client)
    page = await (await client.get("/quarantine/m1")).text()
    first = await client.post("/quarantine/m1/release", data={"csrf_token": csrf_of(page), "reason": "expected"},
                              allow_redirects=False)
    assert first.status == 303
    # The index still says "quarantined" (the sink has not marked it yet).
    again = await client.post("/quarantine/m1/delete", data={"csrf_token": csrf_of(page), "reason": "oops"})
    assert again.status == 409 and "root already asked to release" in await again.text()
    view = await (await client.get("/quarantine/m1")).text()
    assert 'id="release"' not in view and "root asked to release this message" in view
    assert len(published) == 1


# -- Dynamic Screening and Location Screening ---------------------------------------


def gateway_policy(**sections):
    from bulwark.policy import Policy
    from bulwark.policy.runtime import PolicyHolder

    return PolicyHolder.fixed(Policy.model_validate({"hostname": "gw.example.test",
                                                     "local_domains": ["example.test"], **sections}))


class Bans(dict):
    """The console reads ``screening.bans`` through a StateView: ``get(ip)``."""


async def test_a_banned_address_gets_no_page_until_the_ban_expires(world):
    console, published, _ = world
    now = datetime.now(timezone.utc)
    ban = ev.BanIssued(client_ip="127.0.0.1", reason="Dynamic Screening: 3 failed console logins in 5 minutes",
                       counters={"failed_console_login": 3}, expires_at=now + timedelta(minutes=10))
    console.policy, console.bans = gateway_policy(), Bans({"127.0.0.1": ban})
    async with TestClient(TestServer(make_app(console))) as client:
        for path in ("/login", "/quarantine", "/static/console.css"):
            response = await client.get(path, allow_redirects=False)
            assert response.status == 403, path
        text = await (await client.get("/login")).text()
        assert "127.0.0.1 is banned by Dynamic Screening until" in text and "3 failed console logins" in text
        # A login attempt from a banned address is not even checked (nor counted again).
        response = await client.post("/login", data={"name": "root", "password": PASSWORD, "csrf_token": "x"})
        assert response.status == 403 and published == []
        # Expired (or lifted: the view then holds a BanLifted) is no ban.
        console.bans["127.0.0.1"] = ban.model_copy(update={"expires_at": now - timedelta(seconds=1)})
        assert (await client.get("/login")).status == 200
        console.bans["127.0.0.1"] = ev.BanLifted(client_ip="127.0.0.1", by="root")
        assert (await log_in(client)).status == 303


async def test_location_screening_refuses_requests_or_only_logins(world, tmp_path):
    from .geodb import write_country_db

    console, published, _ = world
    db = write_country_db(tmp_path / "countries.mmdb", {"127.0.0.0/8": "KP"})
    console.bans = Bans()
    console.policy = gateway_policy(location_screening={"enabled": True, "database": str(db),
                                                        "refuse_http_auth_from": ["KP"]})
    async with TestClient(TestServer(make_app(console))) as client:
        assert (await client.get("/login")).status == 200  # the form, yes
        response = await log_in(client)  # the login, no: before the password is checked
        assert response.status == 403 and "Refused by Location Screening (login from KP)" in await response.text()
        assert published == [] and "__Host-bulwark-console" not in response.cookies
    console.policy = gateway_policy(location_screening={"enabled": True, "database": str(db),
                                                        "refuse_http_from": ["KP"]})
    async with TestClient(TestServer(make_app(console))) as client:
        response = await client.get("/login")
        assert response.status == 403 and "request from KP" in await response.text()
    # A country the lists do not name is served.
    console.policy = gateway_policy(location_screening={"enabled": True, "database": str(db),
                                                        "refuse_http_from": ["RU"], "refuse_http_auth_from": ["RU"]})
    async with TestClient(TestServer(make_app(console))) as client:
        assert (await log_in(client)).status == 303


async def test_an_unreadable_country_database_fails_closed_for_a_while(world, tmp_path):
    from .geodb import write_country_db

    console, _, _ = world
    db = write_country_db(tmp_path / "countries.mmdb", {"127.0.0.0/8": "KP"})
    console.policy = gateway_policy(location_screening={"enabled": True, "database": str(db),
                                                        "refuse_http_from": ["RU"]})
    db.unlink()
    async with TestClient(TestServer(make_app(console))) as client:
        assert (await client.get("/login")).status == 503


# -- tracking ----------------------------------------------------------------------------


def tracked_world():
    """Three messages on mail.received and what became of them on mail.verdicts."""
    from bulwark.kafka import Record
    from console.tracking import Tracking

    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)

    def received(mid, sender, rcpt, ip, at, header=None):
        envelope = ev.Envelope(mail_from=sender, rcpt_to=[rcpt], sha256="0" * 64, size=100, client_ip=ip,
                               received_at=at)
        return ev.MessageReceived(message_id=mid, session_id="s-" + mid, occurred_at=at, envelope=envelope,
                                  direction="inbound", header_message_id=header)

    def verdict(r, action, reasons=()):
        return ev.Verdict(message_id=r.message_id, occurred_at=r.occurred_at + timedelta(seconds=1), action=action,
                          reasons=list(reasons), results=[], policy_version="p1", envelope=r.envelope,
                          direction="inbound")

    a = received("q1", "alice@partner.test", "lee@example.test", "192.0.2.1", t0, "<abc@partner.test>")
    b = received("q2", "<script>x</script>@evil.test", "kim@example.test", "192.0.2.2", t0 + timedelta(hours=1))
    c = received("q3", "bob@partner.test", "lee@example.test", "192.0.2.1", t0 + timedelta(hours=2))
    events = [a, verdict(a, "deliver"), b, verdict(b, "reject", ["VIRUS"]),
              ev.MessageRefused(message_id="q2", reply_code=550, reasons=["VIRUS"], policy_version="p1"),
              c, verdict(c, "quarantine", ["SPAM_SCORE"])]
    records = [Record("mail.received" if isinstance(e, ev.MessageReceived) else "mail.verdicts", 0, i, None, e)
               for i, e in enumerate(events)]
    asked: list = []

    async def read(topics, since):
        asked.append((tuple(topics), since))
        return [r for r in records if r.event.occurred_at >= since]

    async def trace(ident):
        return [r for r in records if r.event.message_id == ident]

    return Tracking(read, trace), asked, t0


def test_tracking_rows_say_what_became_of_each_message():
    from console.tracking import Query, matches, rows

    tracking, _, t0 = tracked_world()
    found = rows(asyncio.run(tracking._read(["mail.received", "mail.verdicts"], t0)))
    assert [(r["message_id"], r["action"]) for r in found] == [
        ("q3", "quarantine"), ("q2", "refused (550)"), ("q1", "deliver")]
    q1 = found[2]
    assert matches(q1, Query(message_id="<ABC@partner.test>")) and matches(q1, Query(message_id="q1"))
    assert matches(q1, Query(sender="ALICE", recipient="lee@", client_ip="192.0.2.1"))
    assert not matches(q1, Query(client_ip="192.0.2.10")) and not matches(q1, Query(recipient="kim"))
    assert matches(q1, Query(since=t0, until=t0 + timedelta(minutes=1)))
    assert not matches(q1, Query(since=t0 + timedelta(seconds=1)))


def test_tracking_reads_only_the_range_asked_for():
    from console.tracking import Query

    now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    q, values = Query.from_form({}, now)
    assert q.since == datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc) and q.until is None
    q, values = Query.from_form({"since": "2026-11-02", "until": "2026-11-03", "sender": " a@b "}, now)
    # A day alone: from its start, until its end.
    assert (q.since.day, q.until.day, q.sender) == (2, 4, "a@b")
    q, _ = Query.from_form({"since": "2026-02-30T10:00", "until": "soon"}, now)
    assert q.since.day == 30 and q.until is None  # not a time: the default range


@pytest.fixture
async def tracking_client(world):
    console, _, _ = world
    console.tracking, asked, t0 = tracked_world()
    async with TestClient(TestServer(make_app(console))) as client:
        yield client, asked, t0


async def test_the_help_desk_searches_and_reads_a_timeline(tracking_client):
    client, asked, t0 = tracking_client
    await log_in(client, name="desk")
    page = await (await client.get("/tracking")).text()
    assert 'for="client_ip">Client IP' in page and "/tracking/q" not in page and asked == []
    page = await (await client.get("/tracking", params={"recipient": "lee@", "since": "2026-12-01T08:00"})).text()
    assert "2 messages received since 2026-12-01 08:00 UTC" in page
    assert page.index("/tracking/q3") < page.index("/tracking/q1") and "/tracking/q2" not in page
    assert asked == [(("mail.received", "mail.verdicts"), t0.replace(hour=8))]
    page = await (await client.get("/tracking", params={"client_ip": "192.0.2.2", "since": "2026-12-01"})).text()
    assert "/tracking/q2" in page and "refused (550) (VIRUS)" in page
    assert "&lt;script&gt;x&lt;/script&gt;@evil.test" in page and "<script>" not in page
    page = await (await client.get("/tracking/q1")).text()
    assert "received 100 bytes from &lt;alice@partner.test&gt; to lee@example.test" in page
    assert "verdict deliver" in page and "mail.verdicts" in page
    assert (await client.get("/tracking/nothing")).status == 404


async def test_tracking_needs_a_login(tracking_client):
    client, asked, _ = tracking_client
    response = await client.get("/tracking", params={"sender": "a"}, allow_redirects=False)
    assert response.status == 303 and asked == []


# -- screening and accounts ----------------------------------------------------------------


class Tables:
    """The workers' answers (streams/web.py's JSON), as the console receives them."""

    def __init__(self):
        self.asked: list[str] = []

    async def ip(self, ip):
        self.asked.append(ip)
        return {"ip": ip, "window": {"start": "2026-12-01T10:00:00+00:00", "end": "2026-12-01T10:05:00+00:00",
                                     "minutes": 5.0},
                "counters": {"connections": 4, "failed_console_login": 2},
                "limits": {"connections": 11, "failed_console_login": 3}, "ban": None}

    async def account(self, address):
        self.asked.append(address)
        return {"address": address, "window": {"start": "2026-12-01T09:05:00+00:00",
                                               "end": "2026-12-01T10:05:00+00:00", "minutes": 60.0},
                "messages": 7, "client_ips": ["192.0.2.9"], "message_limit": 1000, "limit_reached": None,
                "state": {"address": address, "enabled": False, "by": "hijack-detection", "reason": "too many"}}


@pytest.fixture
def screening_world(world):
    console, published, _ = world
    now = datetime.now(timezone.utc)
    console.policy = gateway_policy()
    console.bans = Bans({
        "192.0.2.66": ev.BanIssued(client_ip="192.0.2.66", reason="Dynamic Screening: 3 failed console logins",
                                   counters={"failed_console_login": 3, "connections": 0},
                                   expires_at=now + timedelta(minutes=9)),
        "192.0.2.67": ev.BanIssued(client_ip="192.0.2.67", reason="Dynamic Screening: 11 connections",
                                   counters={"connections": 11}, expires_at=now - timedelta(minutes=1)),
    })
    console.account_states = Bans({
        "mia@example.test": ev.AccountStateChanged(address="mia@example.test", enabled=False, reason="hijacked?",
                                                   by="hijack-detection"),
        "noah@example.test": ev.AccountStateChanged(address="noah@example.test", enabled=True, reason="ok", by="root"),
    })
    console.tables = Tables()
    return console, published


async def test_an_admin_sees_bans_with_counters_and_expiry_and_unbans(screening_world):
    console, published = screening_world
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client)
        page = await (await client.get("/screening")).text()
        assert "192.0.2.66" in page and "failed_console_login 3" in page and "192.0.2.67" not in page  # expired
        assert "connections 0" not in page
        response = await client.post("/screening/192.0.2.66/unban", data={"csrf_token": csrf_of(page)},
                                     allow_redirects=False)
        assert response.status == 303 and response.headers["Location"] == "/screening?unbanned=192.0.2.66"
        [lifted] = published
        assert isinstance(lifted, ev.BanLifted) and lifted.client_ip == "192.0.2.66" and lifted.by == "root"
        # Not banned: nothing to lift, nothing published.
        response = await client.post("/screening/192.0.2.67/unban", data={"csrf_token": csrf_of(page)})
        assert response.status == 409 and len(published) == 1
        # Without the token: refused, as every form.
        assert (await client.post("/screening/192.0.2.66/unban", data={})).status == 403 and len(published) == 1


async def test_the_counters_of_an_ip_come_from_the_workers(screening_world):
    console, _ = screening_world
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client)
        page = await (await client.get("/screening", params={"ip": "192.0.2.70"})).text()
        assert console.tables.asked == ["192.0.2.70"]
        assert re.search(r"failed_console_login</th><td>2</td><td>3</td>", page) and "Not banned." in page
        assert (await client.get("/screening", params={"ip": "not-an-ip"})).status == 400

        async def down(ip):
            from console.tables import TablesUnavailable
            raise TablesUnavailable("no streams worker answered at https://127.0.0.1:1 (ClientConnectorError)")

        console.tables.ip = down
        response = await client.get("/screening", params={"ip": "192.0.2.70"})
        assert response.status == 200 and "no streams worker answered" in await response.text()


async def test_an_admin_sees_disabled_accounts_and_enables_one(screening_world):
    console, published = screening_world
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client)
        page = await (await client.get("/accounts")).text()
        assert "mia@example.test" in page and "hijacked?" in page and "noah@example.test" not in page
        response = await client.post("/accounts/mia@example.test/enable",
                                     data={"csrf_token": csrf_of(page), "reason": "password reset by phone"},
                                     allow_redirects=False)
        assert response.status == 303
        [enabled] = published
        assert isinstance(enabled, ev.AccountStateChanged) and enabled.enabled
        assert (enabled.address, enabled.by, enabled.reason) == ("mia@example.test", "root", "password reset by phone")
        response = await client.post("/accounts/noah@example.test/enable", data={"csrf_token": csrf_of(page)})
        assert response.status == 409 and len(published) == 1
        page = await (await client.get("/accounts", params={"address": "Mia@Example.test"})).text()
        assert console.tables.asked == ["mia@example.test"] and "7 (no more than 1000)" in page
        assert "disabled by hijack-detection: too many" in page


async def test_the_help_desk_is_refused_screening_and_accounts(screening_world):
    console, published = screening_world
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client, name="desk")
        page = await (await client.get("/quarantine")).text()
        assert 'href="/screening"' not in page
        for path in ("/screening", "/accounts"):
            assert (await client.get(path)).status == 403
        for path in ("/screening/192.0.2.66/unban", "/accounts/mia@example.test/enable"):
            assert (await client.post(path, data={"csrf_token": csrf_of(page)})).status == 403
        assert published == [] and console.tables.asked == []


async def test_streams_tables_say_when_no_worker_answers(tmp_path):
    from bulwark.devstack import free_port
    from console.tables import StreamsTables, TablesUnavailable

    # No certificate to pin, then no worker listening: a message for the page, not a crash.
    missing = StreamsTables(f"https://127.0.0.1:{free_port()}", tmp_path / "no-such.crt")
    with pytest.raises(TablesUnavailable, match="no streams worker answered"):
        await missing.ip("192.0.2.1")


# -- policy ------------------------------------------------------------------------------------


def policy_history():
    from bulwark.policy import Policy

    base = {"hostname": "gw.example.test", "local_domains": ["example.test"]}
    first = Policy.model_validate(base)
    second = Policy.model_validate({**base, "screening": {"failed_console_login_limit": 5}})
    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
    return [
        ev.PolicyPublished(policy_version=first.version, document=first.model_dump(mode="json"),
                           source="/etc/bulwark/policy.yaml", applied_by="root", occurred_at=t0),
        ev.PolicyPublished(policy_version=second.version, document=second.model_dump(mode="json"),
                           source="/etc/bulwark/policy.yaml", applied_by="<b>kim</b>",
                           occurred_at=t0 + timedelta(hours=1)),
    ], second


@pytest.fixture
async def policy_client(world):
    from bulwark.policy.runtime import PolicyHolder

    console, _, _ = world
    history, active = policy_history()

    async def read_history():
        return history

    console.policy, console.policy_history = PolicyHolder.fixed(active), read_history
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client)
        yield client, history


async def test_the_policy_page_shows_the_active_version_its_history_and_the_audit(policy_client):
    from bulwark.policy.audit import audit

    client, (first, second) = policy_client
    page = await (await client.get("/policy")).text()
    assert f"In force: <strong>{second.policy_version}</strong>, applied 2026-12-01 10:00:00 UTC by &lt;b&gt;kim" in page
    assert page.index(second.policy_version + "</a> (active)") < page.index(f">{first.policy_version}</a>")
    findings = audit(policy_history()[1])
    assert f"{sum(f.met for f in findings)} of {len(findings)} recommendations met" in page
    assert "NOT MET" in page  # no user verification source, to start with
    page = await (await client.get(f"/policy/version/{first.policy_version}")).text()
    assert "failed_console_login_limit: 3" in page
    assert (await client.get("/policy/version/nope")).status == 404


async def test_the_diff_between_two_versions(policy_client):
    client, (first, second) = policy_client
    page = await (await client.get("/policy/diff", params={"from": first.policy_version,
                                                           "to": second.policy_version})).text()
    assert '<span class="remove">-  failed_console_login_limit: 3</span>' in page
    assert '<span class="add">+  failed_console_login_limit: 5</span>' in page
    assert page.count('class="add"') == 1 and page.count('class="remove"') == 1
    same = await (await client.get("/policy/diff", params={"from": first.policy_version,
                                                           "to": first.policy_version})).text()
    assert "the same rules" in same
    assert (await client.get("/policy/diff", params={"from": "x", "to": first.policy_version})).status == 404


async def test_the_help_desk_is_refused_the_policy(world):
    console, _, _ = world
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client, name="desk")
        assert (await client.get("/policy")).status == 403


# -- dashboard --------------------------------------------------------------------------------


def dashboard_records(now):
    """Two hours of a gateway's life, as the dashboard reads them."""
    from bulwark.kafka import Record

    def at(hours_ago, minute=5):
        return now.replace(minute=minute, second=0, microsecond=0) - timedelta(hours=hours_ago)

    envelope = ev.Envelope(mail_from="<svg onload=alert(1)>@evil.test", rcpt_to=["lee@example.test"],
                           sha256="0" * 64, size=1, client_ip="203.0.113.9", received_at=now)
    verdict = lambda action, when: ev.Verdict(action=action, results=[], policy_version="p", envelope=envelope,  # noqa: E731
                                              direction="inbound", occurred_at=when, message_id="m")
    events = [
        verdict("deliver", at(1)), verdict("deliver", at(1, 10)), verdict("quarantine", at(1, 20)),
        verdict("deliver", at(0)), verdict("reject", at(0, 1)),
        ev.SessionRefused(client_ip="203.0.113.7", phase="connect", reply_code=421, reason="banned", occurred_at=at(0)),
        ev.SessionMail(client_ip="203.0.113.7", session_id="s1", sender="spam@junk.test", accepted=True,
                       reply_code=250, occurred_at=at(0, 1)),
        *[ev.SessionRcpt(client_ip="203.0.113.7", session_id="s1", recipient=f"x{i}@example.test", accepted=False,
                         reply_code=550, occurred_at=at(0, 2)) for i in range(3)],
        ev.SessionMail(client_ip="203.0.113.8", session_id="s2", sender="forged@example.test", accepted=False,
                       reply_code=550, occurred_at=at(0)),
        ev.BanIssued(client_ip="203.0.113.7", reason="r", expires_at=now, occurred_at=at(0, 3)),
        # Older than the period: not counted.
        verdict("deliver", at(30)),
    ]
    return [Record("t", 0, i, None, e) for i, e in enumerate(events)]


def test_dashboard_figures_count_actions_refusals_and_bans_per_hour():
    from console.dashboard import figures

    now = datetime(2026, 12, 1, 12, 30, tzinfo=timezone.utc)
    f = figures(dashboard_records(now), now)
    assert len(f.hours) == 24 and f.hours[-1] == now.replace(minute=0)
    assert (f.by_action["deliver"][-2:], f.by_action["quarantine"][-2:], f.by_action["reject"][-2:]) == (
        [2, 1], [1, 0], [0, 1])
    assert f.messages == 5 and f.bans[-1] == 1 and sum(f.bans) == 1
    # The refused connection, RCPTs (the session's sender counts them) and MAIL; the rejected message.
    assert f.top_ips == [("203.0.113.7", 4), ("203.0.113.8", 1), ("203.0.113.9", 1)]
    assert f.top_senders == [("spam@junk.test", 3), ("<svg onload=alert(1)>@evil.test", 1),
                             ("forged@example.test", 1)]


def test_charts_are_svg_with_text_escaped():
    from console.dashboard import horizontal_bars, nice_top, stacked_bars

    assert [nice_top(n) for n in (1, 3, 7, 10, 11, 480)] == [1, 5, 10, 10, 20, 500]
    hours = [datetime(2026, 12, 1, h, tzinfo=timezone.utc) for h in range(3)]
    svg = stacked_bars("c", "Messages <per> hour", "d", hours, {"deliver": [1, 0, 4], "reject": [0, 0, 1]})
    assert svg.startswith("<svg") and 'role="img"' in svg and "Messages &lt;per&gt; hour" in svg
    assert svg.count("<rect") == 3 + 2  # three non-empty segments, two legend keys
    assert "<title>02:00 deliver: 4</title>" in svg
    # The axis: 0, halfway and the top (5 for a peak of 5).
    assert [m for m in re.findall(r'text-anchor="end" font-size="11">([^<]+)<', svg)] == ["0", "2.5", "5"]
    bars = horizontal_bars("s", "Top", [("<svg onload=alert(1)>@evil.test", 2)])
    assert "<svg onload" not in bars and "&lt;svg onload=alert(1)&gt;@evil.test" in bars


async def test_the_dashboard_page_for_admins_only_and_read_once_a_minute(world):
    from console.dashboard import Dashboard

    console, _, _ = world
    reads = []

    async def read(topics, since, types):
        reads.append((tuple(topics), since))
        return dashboard_records(datetime.now(timezone.utc))

    console.dashboard = Dashboard(read)
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client)
        page = await (await client.get("/dashboard")).text()
        assert page.count('<svg class="chart"') == 4 and "<svg onload" not in page
        assert "5 messages judged" in page and "1 ban issued in the period" in page
        assert reads[0][0] == ("mail.verdicts", "smtp.sessions", "screening.bans")
        assert datetime.now(timezone.utc) - reads[0][1] < timedelta(hours=24)
        await client.get("/dashboard")
        assert len(reads) == 1
    async with TestClient(TestServer(make_app(console))) as client:
        await log_in(client, name="desk")
        assert (await client.get("/dashboard")).status == 403


# -- TOTP ----------------------------------------------------------------------------------------


def test_totp_codes_are_checked_with_a_step_of_drift_and_work_once(tmp_path):
    import pyotp

    from console.admins import totp_step

    store = AdminStore(tmp_path / "admins.json")
    store.add("alice", "admin", PASSWORD)
    secret = store.set_totp("alice")
    assert store.all()[0].totp and secret not in str(store.all())
    totp, at = pyotp.TOTP(secret), 1_800_000_000.0
    code = totp.at(at)
    assert totp_step(secret, code, at) == totp.timecode(datetime.fromtimestamp(at, timezone.utc))
    assert totp_step(secret, totp.at(at - 30), at) is not None  # the clock of the phone a step behind
    assert totp_step(secret, totp.at(at - 90), at) is None and totp_step(secret, "12345x", at) is None
    assert store.authenticate("alice", PASSWORD) is None  # no code
    assert store.authenticate("alice", PASSWORD + "x", code, at=at) is None
    admin = store.authenticate("alice", PASSWORD, code, at=at)
    assert admin.role == "admin" and admin.totp_step is not None
    assert store.authenticate("alice", PASSWORD, code, at=at) is None  # replayed
    # Replayed after the console restarted (a new store on the same file): still refused.
    assert AdminStore(tmp_path / "admins.json").authenticate("alice", PASSWORD, code, at=at) is None
    assert AdminStore(tmp_path / "admins.json").authenticate("alice", PASSWORD, totp.at(at + 30), at=at + 30)
    # A password reset keeps the second factor; --off removes it.
    store.add("alice", "admin", PASSWORD)
    assert store.authenticate("alice", PASSWORD) is None
    store.set_totp("alice", enabled=False)
    assert store.authenticate("alice", PASSWORD).totp is False


async def test_a_login_with_totp_needs_the_code_once(world):
    import pyotp

    console, published, _ = world
    secret = console.admins.set_totp("root")

    async def attempt(code):
        page = await (await client.get("/login")).text()
        return await client.post("/login", data={"name": "root", "password": PASSWORD, "code": code,
                                                  "csrf_token": csrf_of(page)}, allow_redirects=False)

    async with TestClient(TestServer(make_app(console))) as client:
        page = await (await client.get("/login")).text()
        assert '<label for="code">One-time code' in page and 'autocomplete="one-time-code"' in page
        response = await attempt("")
        assert response.status == 401 and "Wrong name or password (or one-time code)" in await response.text()
        assert [e.login for e in published] == ["root"]  # counted by Dynamic Screening like any refusal
        code = pyotp.TOTP(secret).now()
        assert (await attempt(code)).status == 303
        await client.post("/logout", data={"csrf_token": csrf_of(await (await client.get("/quarantine")).text())})
        # The same code again (seen over a shoulder): refused.
        assert (await attempt(code)).status == 401 and len(published) == 2


def test_console_totp_prints_the_enrolment_once(tmp_path, monkeypatch):
    import pyotp
    from click.testing import CliRunner

    from bulwark.cli import main
    from console.admins import admins_path

    monkeypatch.setenv("BULWARK_DATA_DIR", str(tmp_path))
    store = AdminStore(admins_path(tmp_path))
    store.add("alice", "admin", PASSWORD)
    result = CliRunner().invoke(main, ["console", "totp", "alice"])
    assert result.exit_code == 0, result.output
    secret = re.search(r"the key ([A-Z2-7]+) ", result.output).group(1)
    assert "otpauth://totp/Bulwark%20console:alice?secret=" + secret in result.output
    assert store.authenticate("alice", PASSWORD, pyotp.TOTP(secret).now()).totp
    assert CliRunner().invoke(main, ["console", "admins"]).output.split() == ["alice", "admin", "totp"]
    assert CliRunner().invoke(main, ["console", "totp", "alice", "--off"]).exit_code == 0
    assert store.authenticate("alice", PASSWORD) is not None
    assert CliRunner().invoke(main, ["console", "totp", "bob"]).exit_code != 0


async def test_release_to_another_address(client, world):
    from console.addresses import AddressError, release_addresses

    _, published, _ = world
    assert release_addresses(" audit@example.test, kim@example.test audit@example.test") == [
        "audit@example.test", "kim@example.test"]
    for bad in ("", "kim", "kim@example.test>\r\nRCPT TO:<x@evil.test", "<kim@example.test>", "a@b", "x@-a.test"):
        with pytest.raises(AddressError):
            release_addresses(bad)
    await log_in(client, name="desk")
    page = await (await client.get("/quarantine/m1")).text()
    assert '<label for="to">Release to another address</label>' in page
    refused = await client.post("/quarantine/m1/release", data={"csrf_token": csrf_of(page), "reason": "audit",
                                                                "to": "kim@example.test\r\nDATA"})
    assert refused.status == 400 and published == []
    response = await client.post("/quarantine/m1/release", data={"csrf_token": csrf_of(page), "reason": "audit",
                                                                 "to": "audit@example.test"}, allow_redirects=False)
    assert response.status == 303
    [released] = published
    assert released.to == ["audit@example.test"] and released.envelope.rcpt_to == ["lee@example.test"]
    assert released.recipients == ["audit@example.test"] and released.by == "desk" and released.reason == "audit"


def test_quarantine_release_to_refuses_what_is_not_an_address_before_anything_else(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bulwark.cli import main

    monkeypatch.setenv("BULWARK_DATA_DIR", str(tmp_path))  # no index, no broker: refused before either is needed
    result = CliRunner().invoke(main, ["quarantine", "release", "q1", "--reason", "audit",
                                       "--to", "kim@example.test>\r\nDATA"])
    assert result.exit_code == 2 and "is not an address" in result.output


@pytest.mark.parametrize("command", ["release", "delete"])
def test_the_cli_asks_why_before_anything_else(tmp_path, monkeypatch, command):
    from click.testing import CliRunner

    from bulwark.cli import main

    monkeypatch.setenv("BULWARK_DATA_DIR", str(tmp_path))  # no index, no broker: refused before either is needed
    missing = CliRunner().invoke(main, ["quarantine", command, "q1"])
    assert missing.exit_code == 2 and "Missing option '--reason'" in missing.output
    blank = CliRunner().invoke(main, ["quarantine", command, "q1", "--reason", " \n "])
    assert blank.exit_code == 2 and "a reason is needed" in blank.output
