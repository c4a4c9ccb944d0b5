"""The local domains' MTA-STS policy, served by ingest and read back by an MTA-STS client.

The client is Bulwark's own (sinks/mta_sts.py), resolving through NSD, which
publishes the TXT record `bulwark mta-sts show` prints; the HTTPS server is
the one ingest runs (ingest/mta_sts_host.py) on a certificate of a test CA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bulwark.policy import Policy
from ingest import mta_sts_host
from sinks.mta_sts import MtaStsResolver, mx_matches, parse_policy
from sinks.outbound_tls import client_context
from sinks.routing import resolver_for
from tests.outbound_servers import Authority, Nsd, free_port

HOST_IP = "127.0.1.40"


def policy(**mta_sts) -> Policy:
    return Policy.model_validate({"hostname": "mx1.example.test", "local_domains": ["example.test", "other.test"],
                                  "tls": {"mta_sts": mta_sts}})


class Holder:
    def __init__(self, current):
        self.current = current


@pytest.fixture
async def served(tmp_path):
    ca = Authority(tmp_path / "ca")
    holder = Holder(policy(mode="enforce", mx=["mx1.example.test", "*.backup.example.test"]))
    port = free_port(HOST_IP)
    runner = await mta_sts_host.start(lambda: holder.current, HOST_IP, port,
                                      ca.context("mta-sts.example.test", "mta-sts.other.test"))
    zones = {d: [f"mta-sts A {HOST_IP}",
                 f'_mta-sts TXT "{mta_sts_host.txt_record(holder.current, d).split(chr(34))[1]}"']
             for d in ("example.test", "other.test")}
    nsd = Nsd(tmp_path / "nsd", zones).start()
    client = MtaStsResolver(resolver_for(nsd.address), client_context(ca.ca_file, True, True), port)
    try:
        yield holder, client, nsd, port, ca
    finally:
        await runner.cleanup()
        nsd.stop()


async def test_a_sender_gets_the_policy_of_each_local_domain(served):
    holder, client, *_ = served
    for domain in ("example.test", "other.test"):
        fetched = await client.policy(domain)
        assert (fetched.mode, fetched.mx, fetched.max_age) == \
            ("enforce", ["mx1.example.test", "*.backup.example.test"], 7 * 24 * 3600)
        assert fetched.policy_id == mta_sts_host.policy_id(holder.current)
    assert mx_matches("mx1.example.test", fetched.mx) and mx_matches("b.backup.example.test", fetched.mx)
    assert not mx_matches("x.y.backup.example.test", fetched.mx)  # a wildcard is one label (RFC 8461 4.1)


async def test_other_hosts_get_no_policy(served):
    _, client, nsd, port, ca = served
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://{HOST_IP}:{port}/.well-known/mta-sts.txt",
                            headers={"Host": "mta-sts.partner.test"}, ssl=False) as response:
            assert response.status == 404


def test_the_policy_file_and_its_id_follow_the_policy():
    testing = policy()
    assert parse_policy(mta_sts_host.policy_text(testing)) == {"mode": "testing", "mx": ["mx1.example.test"],
                                                              "max_age": 604800}
    enforce = policy(mode="enforce")
    assert mta_sts_host.policy_id(enforce) != mta_sts_host.policy_id(testing)
    assert mta_sts_host.policy_id(enforce).isalnum() and len(mta_sts_host.policy_id(enforce)) <= 32


def test_the_cli_prints_the_records_to_publish(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("hostname: mx1.example.test\nlocal_domains: [example.test, other.test]\n"
                    "tls: {mta_sts: {mode: enforce}}\n")
    out = subprocess.run([sys.executable, "-m", "bulwark.cli", "mta-sts", "show", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "mode: enforce" in out and "mx: mx1.example.test" in out
    expected = mta_sts_host.policy_id(policy(mode="enforce"))
    assert f'_mta-sts.example.test. IN TXT "v=STSv1; id={expected}"' in out
    assert f'_mta-sts.other.test. IN TXT "v=STSv1; id={expected}"' in out
