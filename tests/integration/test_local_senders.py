"""Outbound mail from the domain mail servers, with the default relay control rules.

"SMTP MAIL address must exist if it uses a local domain": a sender Bulwark
has no account for is asked about with the domain's verification sources, as
a recipient is. Here the source is a slapd of this module's own (so it can be
stopped), and the domain mail server of staff.example.test sends from
127.0.0.80-83:

- a sender the directory knows: accepted, delivered to a colleague (the
  downstream server) and to another domain (the smarthost, also downstream);
- a sender it does not know: 550 5.1.0;
- the directory down: 4xx, so the domain's server keeps the message;
- quiet.example.test has no sources: its mail server's senders are accepted.

The shared test policy turns on the exception that lets the domain mail
server send as anyone; this module applies the policy without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from schemas import events as ev
from schemas.topics import SESSIONS

from .policy_helpers import apply
from .verification_servers import SECRETS, SERVICE_DN, SUFFIX, make_certificates, ssha, start_slapd, write_secret

pytestmark = pytest.mark.integration

STAFF = "staff.example.test"  # verified by staff-ldap
QUIET = "quiet.example.test"  # no verification source
#: The staff domain mail server's addresses (127.0.0.80-83).
SERVER_NETWORK = "127.0.0.80/30"


def staff_directory() -> str:
    def person(uid: str) -> str:
        return (f"dn: uid={uid},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n"
                f"uid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {uid}@{STAFF}")

    return "\n\n".join([
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
        f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: bulwark\n"
        f"userPassword: {ssha(SECRETS['bind_password'])}",
        person("postmaster"), person("colleague"), person("latecomer"),
    ]) + "\n"


@pytest.fixture(scope="module")
def staff(gateway, tmp_path_factory):
    """The gateway under a policy with the staff directory and the default relay control rules."""
    root = tmp_path_factory.mktemp("local-senders")
    ca, cert, key = make_certificates(root)
    slapd = start_slapd(root / "slapd", ca, cert, key, ldif=staff_directory())
    original = Path(gateway.settings.policy_path)
    policy = yaml.safe_load(original.read_text())
    policy["local_domains"] += [STAFF, QUIET]
    downstream_port = policy["mail_servers"][0]["port"]
    policy["mail_servers"].append({
        "name": "staff-mx", "host": "127.0.0.1", "port": downstream_port, "domains": [STAFF, QUIET],
        "trusted_addresses": [SERVER_NETWORK]})
    policy.pop("relay_control", None)  # the defaults: no exception for unknown senders
    policy["verification_sources"].append({
        "name": "staff-ldap", "type": "ldap", "url": f"ldap://127.0.0.1:{slapd.ldap_port}", "tls": "starttls",
        "ca_file": str(ca), "base_dn": f"ou=people,{SUFFIX}", "bind_dn": SERVICE_DN,
        "bind_password_file": str(write_secret(root, "staff-bind", SECRETS["bind_password"])),
        "timeout_seconds": 2})
    policy["user_verification"]["domains"].update({STAFF: ["staff-ldap"], QUIET: []})
    changed = root / "policy.yaml"
    changed.write_text(yaml.safe_dump(policy, sort_keys=False))
    apply(gateway, changed)
    try:
        yield slapd
    finally:
        slapd.stop()
        apply(gateway, original)


def mail_event(gateway, ip: str, sender: str) -> ev.SessionMail:
    [record] = gateway.wait_records(
        lambda r: isinstance(r.event, ev.SessionMail) and r.event.sender == sender, [SESSIONS.name], keys={ip},
        what=f"session.mail for {sender}")[-1:]
    return record.event


def mail_from(gateway, ip: str, sender: str) -> tuple[int, str]:
    with gateway.smtp(ip) as client:
        client.ehlo("mx.staff.example.test")
        code, reply = client.mail(sender)
    return code, reply.decode()


def test_a_sender_the_directory_knows_reaches_a_colleague_and_another_domain(gateway, staff):
    sender = f"postmaster@{STAFF}"
    colleague, outsider = f"colleague@{STAFF}", "friend@partner.test"
    gateway.send(gateway.message(sender, [colleague], "to a colleague"), source_ip="127.0.0.80")
    gateway.send(gateway.message(sender, [outsider], "to another domain"), source_ip="127.0.0.80")

    [inside] = gateway.downstream.wait_for(lambda d: "to a colleague" in d.text, what="the colleague's copy")
    [outside] = gateway.downstream.wait_for(lambda d: "to another domain" in d.text, what="the outbound copy")
    assert inside.rcpt_to == [colleague] and outside.rcpt_to == [outsider]

    mail = mail_event(gateway, "127.0.0.80", sender)
    assert mail.accepted and mail.reason.startswith("local sender verified by staff-ldap")


def test_a_sender_the_directory_does_not_know_is_refused(gateway, staff):
    code, reply = mail_from(gateway, "127.0.0.81", f"ghost@{STAFF}")
    assert code == 550 and reply.startswith("5.1.0 Sender address rejected: not a known local address")
    mail = mail_event(gateway, "127.0.0.81", f"ghost@{STAFF}")
    assert not mail.accepted and mail.reason == "local sender does not exist (staff-ldap)"


def test_a_domain_without_sources_accepts_senders_from_its_mail_server(gateway, staff):
    sender = f"anyone@{QUIET}"
    gateway.send(gateway.message(sender, [f"colleague@{QUIET}"], "quiet domain"), source_ip="127.0.0.82")
    gateway.downstream.wait_for(lambda d: "quiet domain" in d.text, what="the quiet domain's message")
    mail = mail_event(gateway, "127.0.0.82", sender)
    assert mail.accepted and f"{QUIET} has no verification source" in mail.reason


def test_with_the_directory_down_an_unverified_sender_is_told_to_retry(gateway, staff):
    # Runs last: it stops this module's slapd.
    assert mail_from(gateway, "127.0.0.83", f"postmaster@{STAFF}")[0] == 250  # verified (and cached) first
    staff.stop()
    code, reply = mail_from(gateway, "127.0.0.83", f"latecomer@{STAFF}")
    assert code == 451 and reply.startswith(f"4.4.3 <latecomer@{STAFF}>: Sender address cannot be verified now")
    mail = mail_event(gateway, "127.0.0.83", f"latecomer@{STAFF}")
    assert not mail.accepted and mail.reason.startswith("sender verification unavailable (staff-ldap:")
    # What the directory said before it went down still holds, for its cache lifetime.
    assert mail_from(gateway, "127.0.0.83", f"postmaster@{STAFF}")[0] == 250
