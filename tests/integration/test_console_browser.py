"""The web console in a real browser (Debian's chromium, headless, through
chromedriver) against the real stack: the console process `make run` starts,
the quarantine sink's index, Kafka, the delivery sink and a downstream server.

Screenshots of each step land in the test's tmp directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from bulwark.devstack import wait_for_port
from schemas import events as ev
from schemas.topics import BANS, CONSOLE_LOGINS, QUARANTINE

from .conftest import DIGEST_PERIOD_SECONDS, LOCAL_DOMAIN
from .policy_helpers import applied_policy

pytestmark = pytest.mark.integration

ADMIN, HELPDESK, PASSWORD = "ops-admin", "desk-lee", "tundra quartz lantern 42"
#: The address the console sees through the relay (the task's 127.0.12.1-30).
BANNED_IP = "127.0.12.1"
HOSTILE_SUBJECT = "<script>document.title='pwned'</script> invoice"
#: A reason as an administrator might type it, markup included: shown as text, never run.
RELEASE_REASON = "expected invoice <script>document.title='pwned'</script>, the sender confirmed by phone"
HOSTILE_BODY = "Please pay.\n<script>document.title='pwned'</script>\n<img src=x onerror=\"document.title='pwned'\">\n"


@pytest.fixture(scope="module")
def console(gateway):
    """The console's base URL, with an administrator and a help-desk account added through the CLI."""
    for name, role in ((ADMIN, "admin"), (HELPDESK, "helpdesk")):
        subprocess.run([sys.executable, "-m", "bulwark.cli", "console", "add-admin", name, "--role", role,
                        "--password-stdin"], input=PASSWORD + "\n", env=gateway.stack.env, check=True,
                       capture_output=True, text=True, timeout=60)
    settings = gateway.settings
    wait_for_port(settings.console_host, settings.console_port, 60, gateway.stack.procs["console"])
    return f"https://{settings.console_host}:{settings.console_port}"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "apt-get install chromium chromium-driver (see .ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    # The stack's certificate is self-signed; the session is still HTTPS, so Secure cookies apply.
    options.accept_insecure_certs = True
    # A driver given by path: selenium's manager downloads nothing.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.implicitly_wait(5)
    shots = iter(range(1, 100))
    driver.shot = lambda name: driver.save_screenshot(str(tmp_path / f"{next(shots):02d}-{name}.png"))
    try:
        yield driver
    finally:
        driver.quit()


def log_in(browser, console, name, password=PASSWORD):
    """Log in with the keyboard only: type, Tab to the password, Enter."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(console + "/login")
    assert label_of(browser, "name") == "Name" and label_of(browser, "password") == "Password"
    field = browser.switch_to.active_element  # the name field has the focus (autofocus)
    assert field.get_attribute("id") == "name"
    field.send_keys(name)
    field.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "password"
    browser.switch_to.active_element.send_keys(password + Keys.ENTER)
    # Either the quarantine (logged in) or the login form again, with its error.
    WebDriverWait(browser, 15).until(lambda b: b.current_url.endswith("/quarantine")
                                     or b.find_elements("id", "login-error"))


def wait_for_url(browser, part):
    """Wait until the browser is on the next page: a click only starts the navigation,
    and elements found before it ends belong to the old page."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 15).until(lambda b: part in b.current_url)


def label_of(browser, field_id):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f"label[for='{field_id}']").text


class SourceRelay:
    """A plain TCP relay that reaches the console from another loopback address.

    Chromium cannot choose its source address, and 127.0.0.1 is allow-listed
    in the test policy (Dynamic Screening never bans it); through this relay
    the console sees a real connection from ``source_ip`` (the TLS session
    is the browser's own, passed through byte for byte).
    """

    def __init__(self, target: tuple[str, int], source_ip: str):
        self.target, self.source_ip = target, source_ip
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=30, source_address=(self.source_ip, 0))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@contextlib.contextmanager
def relayed(gateway, source_ip):
    """The console's base URL through a relay from ``source_ip``."""
    settings = gateway.settings
    relay = SourceRelay((settings.console_host, settings.console_port), source_ip)
    try:
        yield f"https://127.0.0.1:{relay.port}"
    finally:
        relay.close()


@pytest.fixture
def relay(gateway, console):
    """(base URL through the relay, the client address the console sees)."""
    with relayed(gateway, BANNED_IP) as url:
        yield url, BANNED_IP


def fail_logins(browser, url, n):
    from selenium.webdriver.common.by import By

    for guess in range(n):
        log_in(browser, url, ADMIN, password=f"wrong guess number {guess}")
        assert "Wrong name or password" in browser.find_element(By.ID, "login-error").text


def wait_for_ban(gateway, ip):
    [ban] = gateway.wait_records(lambda r: isinstance(r.event, ev.BanIssued), [BANS.name], keys={ip},
                                 timeout=60, what=f"the ban of {ip}")
    return ban.event


def refusal_at(browser, url, timeout=30):
    """The refusal the console shows at ``url`` (it follows screening.bans a moment after the broker has it)."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        browser.get(url)
        refusal = browser.find_elements(By.ID, "refusal")
        if refusal or time.monotonic() > deadline:
            return refusal[0].text if refusal else None
        time.sleep(0.5)


def quarantine_hostile(gateway, sender):
    msg = gateway.message(sender, [f"lee@{LOCAL_DOMAIN}"], HOSTILE_SUBJECT, HOSTILE_BODY)
    msg.add_attachment(b"MZ\x90\x00console program", maintype="application", subtype="octet-stream",
                       filename="invoice.pdf.exe")
    queue_id = gateway.send(msg)
    gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name], keys={queue_id},
                         timeout=60)
    return queue_id


def test_an_admin_finds_views_and_releases_a_quarantined_message(gateway, console, browser):
    from selenium.webdriver.common.by import By

    queue_id = quarantine_hostile(gateway, "mallory-console@partner.test")
    log_in(browser, console, ADMIN)
    assert browser.current_url.endswith("/quarantine")
    browser.shot("quarantine")

    # Search by sender, through the labelled form.
    assert label_of(browser, "sender") == "Sender" and label_of(browser, "reason") == "Reason"
    browser.find_element(By.ID, "sender").send_keys("mallory-console")
    browser.find_element(By.ID, "reason").send_keys("attachment")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    wait_for_url(browser, "sender=mallory-console")
    links = browser.find_elements(By.CSS_SELECTOR, "tbody a")
    assert [a.text for a in links] == [queue_id]
    browser.shot("search")

    # The message view: the hostile subject and body are text, nothing ran.
    links[0].click()
    wait_for_url(browser, f"/quarantine/{queue_id}")
    assert browser.find_element(By.ID, "subject").text == HOSTILE_SUBJECT
    assert "<script>document.title='pwned'</script>" in browser.find_element(By.CSS_SELECTOR, "pre.body").text
    assert browser.title != "pwned" and browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.TAG_NAME, "img") == []
    attachments = browser.find_element(By.ID, "attachments").text
    assert "invoice.pdf.exe" in attachments and "application/octet-stream" in attachments
    assert hashlib.sha256(b"MZ\x90\x00console program").hexdigest() in attachments
    assert not gateway.downstream.matching(lambda d: "mallory-console@" in d.mail_from)
    browser.shot("message")

    # Who and why: the reason is a labelled field, typed from the keyboard.
    assert label_of(browser, "reason") == "Reason"
    browser.find_element(By.ID, "reason").send_keys(RELEASE_REASON)
    browser.find_element(By.ID, "release").click()
    wait_for_url(browser, "done=release")
    assert "Release requested" in browser.find_element(By.ID, "done").text
    browser.shot("released")
    [delivered] = gateway.downstream.wait_for(lambda d: "mallory-console@" in d.mail_from, timeout=60,
                                              what="the released message")
    assert delivered.rcpt_to == [f"lee@{LOCAL_DOMAIN}"]
    released = gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineReleased), [QUARANTINE.name],
                                    keys={queue_id})
    assert (released[0].event.by, released[0].event.reason) == (ADMIN, RELEASE_REASON)
    # The message view says who and why once the quarantine sink has marked it (a moment after the event),
    # escaped as text; the tracking timeline (bulwark trace's) says it too.
    deadline = time.monotonic() + 30
    while "released" not in browser.find_element(By.ID, "state").text and time.monotonic() < deadline:
        time.sleep(0.5)
        browser.get(f"{console}/quarantine/{queue_id}")
    assert browser.find_element(By.ID, "state").text == f"released (by {ADMIN})"
    assert browser.find_element(By.ID, "why").text == RELEASE_REASON
    assert browser.title != "pwned" and browser.find_elements(By.TAG_NAME, "script") == []
    browser.shot("released-why")
    browser.get(f"{console}/tracking/{queue_id}")
    assert f"released from quarantine by {ADMIN} ({RELEASE_REASON})" in browser.find_element(By.ID, "timeline").text


def test_a_failed_login_is_refused_and_recorded(gateway, console, browser):
    from selenium.webdriver.common.by import By

    log_in(browser, console, ADMIN, password="not the password at all")
    assert "Wrong name or password" in browser.find_element(By.ID, "login-error").text
    browser.shot("failed-login")
    [failed] = gateway.wait_records(
        lambda r: isinstance(r.event, ev.ConsoleLoginFailed) and r.event.login == ADMIN,
        [CONSOLE_LOGINS.name], what="the refused login")
    assert failed.event.client_ip == "127.0.0.1"
    assert "not the password" not in failed.event.model_dump_json()


def test_a_post_without_the_csrf_token_is_refused(gateway, console, browser):
    from selenium.webdriver.common.by import By

    queue_id = quarantine_hostile(gateway, "csrf-console@partner.test")
    log_in(browser, console, ADMIN)
    browser.get(f"{console}/quarantine/{queue_id}")
    # A forged form: the session cookie goes with it (as it would from
    # another tab), the token does not.
    cookie = browser.get_cookie("__Host-bulwark-console")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    request = urllib.request.Request(f"{console}/quarantine/{queue_id}/release", method="POST",
                                     data=urllib.parse.urlencode({}).encode(),
                                     headers={"Cookie": f"{cookie['name']}={cookie['value']}"})
    unverified = ssl._create_unverified_context()  # the stack's self-signed certificate
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=unverified, timeout=30)
    assert refused.value.code == 403
    # And in the browser: the release form with its token removed.
    browser.execute_script(
        "document.querySelector(\"form[action$='/release'] input[name=csrf_token]\").remove()")
    browser.find_element(By.ID, "reason").send_keys("forged")
    browser.find_element(By.ID, "release").click()
    wait_for_url(browser, "/release")
    assert "did not come from the console" in browser.find_element(By.ID, "refusal").text
    browser.shot("csrf-refused")
    assert not [r for r in gateway.records([QUARANTINE.name], keys={queue_id})
                if isinstance(r.event, ev.QuarantineReleased)]


def test_the_help_desk_is_refused_an_admin_page(gateway, console, browser):
    from selenium.webdriver.common.by import By

    log_in(browser, console, HELPDESK)
    assert browser.current_url.endswith("/quarantine")
    assert not browser.find_elements(By.LINK_TEXT, "Administrators")
    browser.get(console + "/admins")
    wait_for_url(browser, "/admins")
    assert "may not open this page" in browser.find_element(By.ID, "refusal").text
    browser.shot("helpdesk-refused")
    for page in ("/dashboard", "/screening", "/accounts", "/policy"):
        browser.get(console + page)
        wait_for_url(browser, page)
        assert "may not open this page" in browser.find_element(By.ID, "refusal").text, page


def test_failed_logins_are_counted_until_the_address_is_banned(gateway, console, relay, browser):
    """Dynamic Screening counts the console's refused logins (console.logins) and bans
    the address at the policy's failed_console_login_limit (3, the guide's default);
    the console then refuses every request from it."""
    from selenium.webdriver.common.by import By

    url, ip = relay
    fail_logins(browser, url, 3)
    browser.shot("three-failed-logins")
    ban = wait_for_ban(gateway, ip)
    assert ban.counters["failed_console_login"] == 3 and "3 failed console logins" in ban.reason
    # The console follows screening.bans: the next request is refused.
    assert f"{ip} is banned by Dynamic Screening until" in refusal_at(browser, url + "/login")
    assert not browser.find_elements(By.ID, "password")
    browser.shot("banned")
    # From the allow-listed 127.0.0.1 the same administrator still logs in.
    log_in(browser, console, ADMIN)
    assert browser.current_url.endswith("/quarantine")


def test_the_help_desk_tracks_a_message_and_reads_its_timeline(gateway, console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    sender, source_ip = "tracked-console@partner.test", "127.0.12.2"
    msg = gateway.message(sender, [f"lee@{LOCAL_DOMAIN}"], "tracking, please")
    queue_id = gateway.send(msg, source_ip=source_ip)
    gateway.downstream.wait_for(lambda d: sender in d.mail_from, timeout=60, what="the tracked message")
    log_in(browser, console, HELPDESK)
    browser.find_element(By.LINK_TEXT, "Tracking").click()
    wait_for_url(browser, "/tracking")
    # The search form from the keyboard: labelled fields, Enter submits.
    assert label_of(browser, "client_ip") == "Client IP" and label_of(browser, "message_id") == "Message id"
    browser.find_element(By.ID, "client_ip").send_keys(source_ip)
    browser.find_element(By.ID, "sender").send_keys("tracked-console" + Keys.ENTER)
    wait_for_url(browser, "client_ip=")
    links = browser.find_elements(By.CSS_SELECTOR, "#found tbody a")
    assert [a.text for a in links] == [queue_id]
    assert "deliver" in browser.find_element(By.CSS_SELECTOR, "#found tbody").text
    browser.shot("tracking-search")
    # By the Message-ID header too.
    browser.get(console + "/tracking?message_id=" + urllib.parse.quote(msg["Message-ID"]))
    assert [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#found tbody a")] == [queue_id]
    browser.find_element(By.LINK_TEXT, queue_id).click()
    wait_for_url(browser, f"/tracking/{queue_id}")
    timeline = browser.find_element(By.ID, "timeline").text
    assert f"connect from {source_ip}" in timeline and f"MAIL FROM:<{sender}>" in timeline
    assert "verdict deliver" in timeline and "queued for delivery" in timeline
    browser.shot("tracking-timeline")


def test_an_admin_sees_a_ban_with_its_counters_and_lifts_it(gateway, console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ip, counted_ip = "127.0.12.3", "127.0.12.4"
    with relayed(gateway, ip) as url:
        fail_logins(browser, url, 3)
        wait_for_ban(gateway, ip)
        assert "is banned" in refusal_at(browser, url + "/login")
    with relayed(gateway, counted_ip) as url:
        fail_logins(browser, url, 1)
    browser.delete_all_cookies()
    log_in(browser, console, ADMIN)
    browser.find_element(By.LINK_TEXT, "Screening").click()
    wait_for_url(browser, "/screening")
    row = browser.find_element(By.XPATH, f"//table[@id='bans']//tr[td[1]='{ip}']")
    assert "3 failed console logins" in row.text and "failed_console_login 3" in row.text
    browser.shot("bans")

    # The windowed counters of an address, from the worker's table (it counts a moment after the event).
    deadline = time.monotonic() + 30
    while True:
        field = browser.find_element(By.ID, "ip")
        field.clear()
        field.send_keys(counted_ip + Keys.ENTER)
        wait_for_url(browser, f"ip={counted_ip}")
        counters = browser.find_element(By.ID, "counters").text
        if "failed_console_login 1 3" in counters or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "failed_console_login 1 3" in counters and "Not banned." in browser.find_element(By.ID, "ban-state").text
    browser.shot("counters")

    # Unban, from the keyboard: focus the row's button, Enter.
    button = browser.find_element(By.CSS_SELECTOR, f"button[aria-label='Unban {ip}']")
    button.send_keys(Keys.ENTER)
    wait_for_url(browser, "unbanned=")
    assert f"Ban on {ip} lifted" in browser.find_element(By.ID, "done").text
    browser.shot("unbanned")
    [lifted] = gateway.wait_records(lambda r: isinstance(r.event, ev.BanLifted), [BANS.name], keys={ip},
                                    what="the lifted ban")
    assert lifted.event.by == ADMIN
    # The address reaches the console again (the browser's session goes with
    # it: cookies do not depend on the port), and ingest, which follows the same topic.
    with relayed(gateway, ip) as url:
        deadline = time.monotonic() + 30
        while True:
            browser.get(url + "/quarantine")
            if browser.find_elements(By.ID, "count") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert browser.find_elements(By.ID, "count") and not browser.find_elements(By.ID, "refusal")
    deadline = time.monotonic() + 30
    while True:
        try:
            with gateway.smtp(ip) as client:
                assert client.ehlo("client.test")[0] == 250
                break
        except smtplib.SMTPConnectError:  # 421 until ingest has read the BanLifted too
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_an_admin_reads_the_dashboard_and_the_policy(gateway, console, browser):
    from selenium.webdriver.common.by import By

    log_in(browser, console, ADMIN)
    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    wait_for_url(browser, "/dashboard")
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart[role=img]")
    assert len(charts) >= 2  # messages per hour and bans per hour; the top lists when something was refused
    # The stack has judged mail by now (its warm-up at least): some bar is drawn.
    assert browser.find_elements(By.CSS_SELECTOR, "#messages-chart rect title")
    browser.shot("dashboard")
    browser.find_element(By.LINK_TEXT, "Policy").click()
    wait_for_url(browser, "/policy")
    assert "recommendations met" in browser.find_element(By.ID, "audit-summary").text
    browser.shot("policy")


def test_the_help_desk_releases_a_message_to_another_address(gateway, console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    queue_id = quarantine_hostile(gateway, "release-to-console@partner.test")
    log_in(browser, console, HELPDESK)
    browser.get(f"{console}/quarantine/{queue_id}")
    assert label_of(browser, "to") == "Release to another address"
    browser.find_element(By.ID, "to").send_keys(f"audit@{LOCAL_DOMAIN}" + Keys.TAB)
    # Tab from the address reaches its form's own reason field; Enter submits.
    assert browser.switch_to.active_element.get_attribute("id") == "reason-to"
    assert label_of(browser, "reason-to") == "Reason"
    browser.switch_to.active_element.send_keys("for the audit mailbox" + Keys.ENTER)
    wait_for_url(browser, "done=release")
    browser.shot("released-to")
    [delivered] = gateway.downstream.wait_for(lambda d: "release-to-console@" in d.mail_from, timeout=60,
                                              what="the message released to another address")
    assert delivered.rcpt_to == [f"audit@{LOCAL_DOMAIN}"]
    assert f"X-Bulwark-Released-For: lee@{LOCAL_DOMAIN}" in delivered.text
    [released] = gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineReleased), [QUARANTINE.name],
                                      keys={queue_id})
    assert released.event.to == [f"audit@{LOCAL_DOMAIN}"] and released.event.by == HELPDESK
    assert released.event.reason == "for the audit mailbox"


def test_an_account_with_totp_logs_in_with_its_code_from_the_keyboard(gateway, console, browser):
    import re

    import pyotp
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    name = "ops-totp"
    subprocess.run([sys.executable, "-m", "bulwark.cli", "console", "add-admin", name, "--role", "admin",
                    "--password-stdin"], input=PASSWORD + "\n", env=gateway.stack.env, check=True,
                   capture_output=True, text=True, timeout=60)
    enrolled = subprocess.run([sys.executable, "-m", "bulwark.cli", "console", "totp", name], env=gateway.stack.env,
                              check=True, capture_output=True, text=True, timeout=60)
    secret = re.search(r"the key ([A-Z2-7]+) ", enrolled.stdout).group(1)

    def attempt(code):
        browser.get(console + "/login")
        field = browser.switch_to.active_element
        field.send_keys(name + Keys.TAB)
        browser.switch_to.active_element.send_keys(PASSWORD + Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("id") == "code"
        assert label_of(browser, "code").startswith("One-time code")
        browser.switch_to.active_element.send_keys(code + Keys.ENTER)
        WebDriverWait(browser, 15).until(lambda b: b.current_url.endswith("/quarantine")
                                         or b.find_elements("id", "login-error"))

    attempt("000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
    assert browser.find_elements(By.ID, "login-error")  # the right password alone is not enough
    browser.shot("totp-refused")
    attempt(pyotp.TOTP(secret).now())
    assert browser.current_url.endswith("/quarantine")
    browser.shot("totp-logged-in")


def test_a_user_releases_a_message_with_a_digest_link(gateway, console, browser):
    """The link a digest carries (signed with the gateway's key, as the delivery
    process signs it) opens a page without a login and releases that message to that user."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from console.digest_links import DigestLinks, load_key

    queue_id = quarantine_hostile(gateway, "digest-console@partner.test")
    token = DigestLinks(load_key(gateway.settings.data_dir)).token(queue_id, f"lee@{LOCAL_DOMAIN}")
    browser.delete_all_cookies()
    browser.get(f"{console}/digest/{token}")
    assert browser.find_element(By.ID, "subject").text == HOSTILE_SUBJECT
    assert not browser.find_elements(By.LINK_TEXT, "Quarantine")  # no console for the user
    browser.shot("digest-link")
    browser.find_element(By.ID, "release").send_keys(Keys.ENTER)
    wait_for_url(browser, "done=1")
    assert "Release requested" in browser.find_element(By.ID, "done").text
    browser.shot("digest-released")
    [delivered] = gateway.downstream.wait_for(lambda d: "digest-console@" in d.mail_from, timeout=60,
                                              what="the message released by its recipient")
    assert delivered.rcpt_to == [f"lee@{LOCAL_DOMAIN}"]
    [released] = gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineReleased), [QUARANTINE.name],
                                      keys={queue_id})
    assert released.event.by == f"lee@{LOCAL_DOMAIN} (digest link)"
    assert released.event.reason == "released by the recipient from the digest"
    # A forged link opens nothing.
    browser.get(f"{console}/digest/{token[:-4]}AAAA")
    assert "not valid" in browser.find_element(By.ID, "refusal").text


def http_status(url: str) -> int:
    """The status the console answers a GET of ``url`` with (urllib, not the browser: it shows no status)."""
    unverified = ssl._create_unverified_context()  # the stack's self-signed certificate
    try:
        with urllib.request.urlopen(url, context=unverified, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


def test_the_digest_of_a_period_arrives_at_its_end_and_its_link_releases_the_message(gateway, console, browser,
                                                                                     tmp_path):
    """The delivery process's digester, at a real period boundary (BULWARK_DIGEST_PERIOD_SECONDS,
    15 s in the test stack), mails the recipient the message held for them in the period just
    ended; the digest's own link releases it; an expired or altered link is refused."""
    import email
    import email.policy
    import re

    from itsdangerous import TimestampSigner, URLSafeTimedSerializer
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from console.digest_links import SALT, load_key

    rcpt, sender, source_ip = f"digest-period@{LOCAL_DOMAIN}", "digest-period@partner.test", "127.0.15.1"
    link_hours = 72
    enabled = f"quarantine_digest:\n  enabled: true\n  link_hours: {link_hours}\n  console_url: {console}\n"
    with applied_policy(gateway, tmp_path, enabled):
        msg = gateway.message(sender, [rcpt], "held until the digest")
        msg.add_attachment(b"MZ\x90\x00digest program", maintype="application", subtype="octet-stream",
                           filename="statement.pdf.exe")
        queue_id = gateway.send(msg, source_ip=source_ip)
        gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name],
                             keys={queue_id}, timeout=60, what="the quarantined message")
        # Within a period and a little more: the boundary, the digester's wake-up, the delivery.
        [digest] = gateway.downstream.wait_for(lambda d: d.rcpt_to == [rcpt] and d.mail_from == "",
                                               timeout=DIGEST_PERIOD_SECONDS * 3 + 30, what="the digest")
    parsed = email.message_from_bytes(digest.content, policy=email.policy.default)
    assert parsed["Subject"] == "Quarantine: 1 message held for you"
    body = parsed.get_body(("plain",)).get_content()
    assert f"From:     {sender}" in body and "Subject:  held until the digest" in body
    assert "ATTACHMENT_TYPE_BLOCKED" in body
    link = re.search(rf"{re.escape(console)}/digest/(\S+)", body)
    assert link, body
    token = link.group(1)
    assert not gateway.downstream.matching(lambda d: sender in d.mail_from)  # still held

    # Refused: the same link altered (its message id), and one signed with the gateway's
    # key more than link_hours ago. Neither releases anything.
    altered = ("B" if token[0] != "B" else "C") + token[1:]
    assert http_status(f"{console}/digest/{altered}") == 404
    hours_ago = int(time.time()) - (link_hours + 1) * 3600

    class LongAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return hours_ago

    expired = URLSafeTimedSerializer(load_key(gateway.settings.data_dir), salt=SALT,
                                     signer=LongAgo).dumps({"m": queue_id, "r": rcpt})
    assert http_status(f"{console}/digest/{expired}") == 410
    browser.delete_all_cookies()
    browser.get(f"{console}/digest/{expired}")
    assert "This link has expired" in browser.find_element(By.ID, "refusal").text
    browser.shot("digest-expired")

    # The digest's link, in the browser, with no login: the page, then the release.
    browser.get(f"{console}/digest/{token}")
    assert browser.find_element(By.ID, "subject").text == "held until the digest"
    browser.shot("digest-period-link")
    browser.find_element(By.ID, "release").send_keys(Keys.ENTER)
    wait_for_url(browser, "done=1")
    [delivered] = gateway.downstream.wait_for(lambda d: sender in d.mail_from, timeout=60,
                                              what="the message released from the digest")
    assert delivered.rcpt_to == [rcpt]
    [released] = gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineReleased), [QUARANTINE.name],
                                      keys={queue_id})
    assert (released.event.by, released.event.reason) == (f"{rcpt} (digest link)",
                                                          "released by the recipient from the digest")
    assert token not in released.event.model_dump_json()


def test_every_field_has_a_label_and_the_keyboard_reaches_the_content(gateway, console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    log_in(browser, console, ADMIN)
    for page in ("/quarantine", "/tracking", "/dashboard", "/screening", "/accounts", "/policy", "/admins"):
        browser.get(console + page)
        wait_for_url(browser, page)
        for field in browser.find_elements(By.CSS_SELECTOR, "input:not([type=hidden]), select, textarea"):
            ident = field.get_attribute("id")
            labelled = ident and browser.find_elements(By.CSS_SELECTOR, f"label[for='{ident}']")
            assert labelled or field.get_attribute("aria-label"), f"{page}: field {ident or field} has no label"
        for button in browser.find_elements(By.TAG_NAME, "button"):
            assert button.text.strip() or button.get_attribute("aria-label"), f"{page}: a button without a name"
        # The first Tab lands on "Skip to content", and following it moves the focus to the page's content.
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        skip = browser.switch_to.active_element
        assert skip.text == "Skip to content", page
        skip.send_keys(Keys.ENTER)
        assert browser.switch_to.active_element.get_attribute("id") == "main", page
    browser.shot("keyboard")
