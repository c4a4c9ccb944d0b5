"""docker-compose.yml cannot run here (no Docker engine); check what can be checked.

It must describe the same topology as the local launcher: the same Bulwark
subcommands, the same environment variables, a policy that validates.
"""

from __future__ import annotations

import re

import yaml

from bulwark.cli import main
from bulwark.devstack import COMPONENTS
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
