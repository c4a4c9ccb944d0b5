"""docker-compose.yml cannot run here (no Docker engine); check what can be checked.

It must describe the same topology as the local launcher: the same Bulwark
subcommands, the same environment variables, a policy that validates.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from bulwark.cli import main
from bulwark.devstack import COMPONENTS, private_environment
from bulwark.policy import load
from bulwark.settings import REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SETTINGS_SOURCE = (REPO_ROOT / "bulwark" / "settings.py").read_text()


def _bulwark_services():
    return {name: svc for name, svc in COMPOSE["services"].items() if svc.get("image") == "bulwark:local"}


def test_compose_runs_every_component_of_the_local_launcher():
    commands = {tuple(svc["command"]) for svc in _bulwark_services().values()}
    for _, args in COMPONENTS:
        assert tuple(args) in commands


def test_every_compose_command_is_a_real_subcommand():
    for svc in _bulwark_services().values():
        command, ctx = main, None
        for word in svc["command"]:
            command = command.get_command(ctx, word)
            assert command is not None, f"bulwark {' '.join(svc['command'])} does not exist"


def test_compose_sets_only_variables_bulwark_reads():
    read = set(re.findall(r'"(BULWARK_[A-Z_]+)"', SETTINGS_SOURCE))
    for svc in _bulwark_services().values():
        for name in svc.get("environment", {}):
            assert name in read, f"{name} is set in docker-compose.yml but bulwark/settings.py never reads it"


def test_compose_kafka_is_the_pinned_broker_version():
    pom = (REPO_ROOT / "infra" / "kafka" / "pom.xml").read_text()
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1)
    assert COMPOSE["services"]["kafka"]["image"] == f"apache/kafka:{version}"


def test_shipped_policies_validate():
    for path in (REPO_ROOT / "infra").glob("policy.*.yaml"):
        load(path)


def test_a_private_stack_takes_its_ports_where_no_outgoing_connection_can():
    """The ports of a test's or benchmark's own stack, and those derived from
    them (a second worker's web port + 1, a second process's metrics port
    + 10), lie below the kernel's ephemeral range: an outgoing connection's
    source port cannot take one before its process listens on it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    env = private_environment(Path("/nonexistent"), Path("/nonexistent/policy.yaml"))
    web = int(env["BULWARK_STREAMS_WEB_PORT"])
    metrics = int(env["BULWARK_INGEST_METRICS_PORT"])
    ports = [int(value.rsplit(":", 1)[-1]) for name, value in env.items() if name.endswith(("_PORT", "_BOOTSTRAP"))]
    assert all(port < low for port in [*ports, web + 3, metrics + 30])
    assert len(set(ports)) == len(ports)
    # Nor does a port derived from one base fall on another listener's base.
    derived = {web + i for i in range(1, 4)} | {metrics + 10 * i for i in range(1, 4)}
    assert derived.isdisjoint(ports)
