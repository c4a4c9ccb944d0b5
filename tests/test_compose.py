"""docker-compose.yml as Docker Compose itself reads it.

There is no Docker engine on the development machines, so the stack cannot be
started here; what can be checked is what `docker compose config` checks.
infra/compose-check is a small Go program around compose-go (the loader inside
Docker Compose v2, pinned in its go.mod): it interpolates, validates against
the Compose schema, normalises and checks consistency, then prints the project
as JSON. These tests build it with the Go toolchain and assert on what a user
of the stack would notice: the services that run, the ports they can reach,
the clamd they scan with.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from unittest.mock import patch

import pytest

from bulwark.policy import parse
from bulwark.settings import REPO_ROOT, Settings

VALIDATOR = REPO_ROOT / "infra" / "compose-check"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
CLAMD_SH = REPO_ROOT / "infra" / "clamav" / "clamd.sh"
POLICY = """hostname: gw.example.com
local_domains: [example.com]
mail_servers:
  - {name: mx, host: 10.1.1.1, default: true}
"""
#: Module and build caches, kept between runs (git-ignored): after the first
#: build the tests need neither the network nor a recompile.
GO_CACHE = REPO_ROOT / ".cache" / "go"


def _go_directive() -> tuple[int, int]:
    """The Go version infra/compose-check/go.mod asks for (compose-go's own minimum)."""
    found = re.search(r"^go (\d+)\.(\d+)", (VALIDATOR / "go.mod").read_text(), re.M)
    return int(found.group(1)), int(found.group(2))


def _go_version(go: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "GOTOOLCHAIN": "local"}).stdout
    except OSError:
        return None
    found = re.match(r"go(\d+)\.(\d+)", out.strip())
    return (int(found.group(1)), int(found.group(2))) if found else None


def find_go() -> str:
    """The newest Go toolchain here: on PATH, the machine image's /usr/local/go, or Debian's."""
    candidates = [shutil.which("go"), "/usr/local/go/bin/go", *glob.glob("/usr/lib/go-*/bin/go")]
    versions = {go: v for go in dict.fromkeys(c for c in candidates if c) if (v := _go_version(go))}
    if not versions:
        pytest.fail("no Go toolchain found (looked on PATH, in /usr/local/go and /usr/lib/go-*): the "
                    "docker-compose.yml check builds infra/compose-check with Go; .ci/run installs it", pytrace=False)
    go = max(versions, key=versions.get)
    if versions[go] < (1, 21):
        need = "%d.%d" % _go_directive()
        pytest.fail(f"{go} is Go {'%d.%d' % versions[go]}: compose-go needs Go {need}, and a Go older than 1.21 "
                    f"cannot fetch a newer toolchain itself; install Go >= {need}", pytrace=False)
    return go


def go_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOMODCACHE=str(GO_CACHE / "mod"),
        GOCACHE=str(GO_CACHE / "build"),
        # -mod=mod: go.mod and go.sum are the pins, and a module missing from
        # the cache is fetched once from the module proxy and kept above;
        # -modcacherw so that `rm -rf .cache` works without chmod.
        GOFLAGS="-mod=mod -modcacherw -buildvcs=false",
        # A local Go older than go.mod's directive (but >= 1.21) fetches the
        # toolchain go.mod names into the module cache above; a recent enough
        # one (the machines' 1.26) is used as is.
        GOTOOLCHAIN="auto",
    )
    return env


@pytest.fixture(scope="session")
def compose_check(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("compose-check") / "compose-check"
    built = subprocess.run([find_go(), "build", "-o", str(binary), "."], cwd=VALIDATOR,
                           env=go_environment(), capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, f"go build of infra/compose-check failed:\n{built.stderr}"
    return binary


def user_environment() -> dict[str, str]:
    """The environment of someone who has set nothing for Compose or Bulwark."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "BULWARK_"))}


def run_check(compose_check: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(compose_check), path.name], cwd=path.parent, env=user_environment(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def project(compose_check) -> dict:
    result = run_check(compose_check, COMPOSE_FILE)
    assert result.returncode == 0, f"Docker Compose's loader refuses docker-compose.yml:\n{result.stderr}"
    return json.loads(result.stdout)


def test_compose_loads_the_file_as_a_project_with_every_service_the_stack_needs(project):
    assert project["name"] == "bulwark"
    assert set(project["services"]) == {
        "kafka", "topics", "ingest", "streams", "delivery", "quarantine", "dmarc-reports", "trace-index", "unjudged",
        "mailbox", "clamd", "console",
    }
    # The policy the services read is the shipped compose policy, not a
    # directory Docker would create in its place.
    for name, service in project["services"].items():
        if service.get("image") == "bulwark:local":
            policy = next(v for v in service["volumes"] if v["target"] == "/etc/bulwark/policy.yaml")
            assert Path(policy["source"]) == REPO_ROOT / "infra" / "policy.compose.yaml", name
            assert policy["read_only"] and policy["bind"]["create_host_path"] is False, name


BROKEN = {
    # a misspelt key is not silently ignored (the schema)
    "unknown key": (("  ingest:\n", "  ingest:\n    restart_policy: always\n"),
                    "additional properties 'restart_policy' not allowed"),
    # a dependency on a service that does not exist (consistency)
    "undefined service": (("      mailbox:\n        condition: service_started",
                           "      mailbx:\n        condition: service_started"),
                          'depends on undefined service "mailbx"'),
    # a port that is not a number (normalisation of the short syntax)
    "bad port": (('"127.0.0.1:2525:2525"', '"127.0.0.1:2525:25x25"'), "Invalid containerPort: 25x25"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_copy_of_the_file_is_refused_with_composes_error(compose_check, tmp_path, case):
    (old, new), error = BROKEN[case]
    text = COMPOSE_FILE.read_text()
    assert old in text, f"the {case} case no longer applies to docker-compose.yml"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    result = run_check(compose_check, broken)
    assert result.returncode != 0
    assert error in result.stderr


# -- what a user can reach from the host -------------------------------------------------

def settings_of(service: dict) -> Settings:
    """The settings a Bulwark service's process reads from its compose environment."""
    with patch.dict(os.environ, {k: str(v) for k, v in service["environment"].items()}, clear=True):
        return Settings.from_env()


def listeners(project: dict) -> dict[str, tuple[str, str, int]]:
    """Every listener of the stack: name -> (service, address it listens on in its container, port)."""
    services = project["services"]
    ingest, mailbox, streams, console = (settings_of(services[name])
                                         for name in ("ingest", "mailbox", "streams", "console"))
    found = {
        "inbound SMTP": ("ingest", ingest.smtp_host, ingest.smtp_port),
        "submission (587)": ("ingest", ingest.smtp_host, ingest.submission_port),
        "submissions (465)": ("ingest", ingest.smtp_host, ingest.submissions_port),
        "demo mailbox": ("mailbox", mailbox.mailbox_host, mailbox.mailbox_port),
        "streams worker HTTPS tables": ("streams", streams.streams_web_host, streams.streams_web_port),
        "web console": ("console", console.console_host, console.console_port),
    }
    kafka = services["kafka"]["environment"]
    host_listener = dict(item.split("://") for item in kafka["KAFKA_LISTENERS"].split(","))["HOST"]
    address, _, port = host_listener.rpartition(":")
    found["Kafka (host listener)"] = ("kafka", address or "0.0.0.0", int(port))
    clamd = clamd_conf(services["clamd"]["environment"])
    found["clamd (INSTREAM)"] = ("clamd", clamd["TCPAddr"], int(clamd["TCPSocket"]))
    # Every long-running Bulwark process's Prometheus metrics (docs/operations.md, Metrics).
    for component in METRICS_SERVICES:
        settings = settings_of(services[component])
        found[f"{component} metrics"] = (component, settings.metrics_host, settings.metrics_port(component))
    return found


#: The compose services that serve metrics: every long-running Bulwark
#: process (the export is not part of the compose stack: it needs a destination).
METRICS_SERVICES = ("ingest", "streams", "delivery", "quarantine", "dmarc-reports", "console", "mailbox")


#: The host ports docs/deployment.md promises, all on 127.0.0.1.
HOST_PORTS = {
    "inbound SMTP": 2525,
    "submission (587)": 2587,
    "submissions (465)": 2465,
    "demo mailbox": 2526,
    "streams worker HTTPS tables": 6066,
    "web console": 8445,
    "Kafka (host listener)": 29092,
    "clamd (INSTREAM)": 3310,
    "ingest metrics": 9461,
    "streams metrics": 9462,
    "delivery metrics": 9463,
    "quarantine metrics": 9464,
    "dmarc-reports metrics": 9465,
    "console metrics": 9466,
    "mailbox metrics": 9468,
}


def test_every_listener_is_published_on_the_hosts_loopback(project):
    for name, (service, address, port) in listeners(project).items():
        assert port, f"{name} is turned off in docker-compose.yml"
        # A process listening on 127.0.0.1 inside its container is unreachable
        # through a published port.
        assert address in ("0.0.0.0", "::"), f"{name} listens on {address} inside the {service} container"
        published = [p for p in project["services"][service].get("ports", []) if p["target"] == port]
        assert published, f"{name} ({service}:{port}) is not published to the host"
        assert [(p["host_ip"], int(p["published"]), p["protocol"]) for p in published] == \
            [("127.0.0.1", HOST_PORTS[name], "tcp")], name
    assert set(listeners(project)) == set(HOST_PORTS)


def test_kafka_advertises_to_host_clients_the_port_they_can_reach(project):
    # A client bootstraps on the published port, then reconnects to the
    # advertised address: both must be the host's side of the same port.
    kafka = project["services"]["kafka"]["environment"]
    advertised = dict(item.split("://") for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))["HOST"]
    assert advertised == f"localhost:{HOST_PORTS['Kafka (host listener)']}"


def test_the_streams_worker_listens_where_its_settings_say_and_routes_to_itself(tmp_path):
    from streams.app import build_app

    settings = Settings.from_env().with_(data_dir=tmp_path, blob_dir=tmp_path / "blobs",
                                         streams_web_host="0.0.0.0", streams_web_port=6066)
    app = build_app(settings, parse(POLICY))
    assert (app.conf.web_bind, app.conf.web_port) == ("0.0.0.0", 6066)
    # The canonical URL other workers route to is never the wildcard.
    assert app.conf.web_host == "127.0.0.1"


# -- clamd ---------------------------------------------------------------------------------

#: The clamd.conf options that say where clamd listens and keeps its files;
#: every other option is a scanning setting.
CLAMD_PLACEMENT = {"TCPAddr", "TCPSocket", "PidFile", "LogFile", "TemporaryDirectory", "DatabaseDirectory"}


def clamd_conf(environment: dict, script: Path = CLAMD_SH) -> dict[str, str]:
    """The clamd.conf clamd.sh writes (its `config` command) in this environment, as option -> value."""
    result = subprocess.run(["bash", str(script), "config"], capture_output=True, text=True, timeout=60,
                            env={**user_environment(), **{k: str(v) for k, v in environment.items()}})
    assert result.returncode == 0, result.stderr
    options: dict[str, str] = {}
    for line in result.stdout.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            assert name not in options, f"{name} is set twice: clamd would keep the first"
            options[name] = value.strip()
    return options


def host_path(service: dict, path: str) -> Path:
    """The file on the host that ``path`` inside the service's container is bind-mounted from."""
    inside = Path(path)
    for volume in service.get("volumes", []):
        if volume["type"] == "bind" and inside.is_relative_to(volume["target"]):
            return Path(volume["source"]) / inside.relative_to(volume["target"])
    pytest.fail(f"{path} is not mounted from the checkout", pytrace=False)


def test_compose_clamd_runs_the_projects_clamd_sh_with_the_settings_make_run_uses(project):
    clamd = project["services"]["clamd"]
    command = (clamd.get("entrypoint") or []) + (clamd.get("command") or [])
    assert host_path(clamd, command[0]) == CLAMD_SH and command[1:] == ["run"]
    assert all(v["read_only"] for v in clamd["volumes"] if v["type"] == "bind")

    in_compose = clamd_conf(clamd["environment"])
    with_make_run = clamd_conf({})
    settings = {k: v for k, v in in_compose.items() if k not in CLAMD_PLACEMENT}
    assert settings == {k: v for k, v in with_make_run.items() if k not in CLAMD_PLACEMENT}
    # What the antivirus and macros checks rely on (docs/admin-guide.md: Antivirus).
    for name in ("AlertOLE2Macros", "AlertEncrypted", "AlertExceedsMax", "ScanArchive", "ScanOLE2"):
        assert settings[name] == "yes", name
    assert settings["StreamMaxLength"] == "64M"
    # The project's signature database, built with sigtool into clamd.sh's directory.
    assert in_compose["DatabaseDirectory"] == f"{clamd['environment']['BULWARK_CLAMD_DIR']}/db"


def test_the_streams_worker_scans_with_the_compose_clamd_once_it_answers(project):
    services = project["services"]
    streams = settings_of(services["streams"])
    conf = clamd_conf(services["clamd"]["environment"])
    assert streams.clamd_host == "clamd" and streams.clamd_port == int(conf["TCPSocket"])
    assert conf["TCPAddr"] == "0.0.0.0"  # reachable from the streams container
    assert services["streams"]["depends_on"]["clamd"]["condition"] == "service_healthy"
    healthcheck = services["clamd"]["healthcheck"]["test"]
    assert healthcheck[0] == "CMD" and host_path(services["clamd"], healthcheck[1]) == CLAMD_SH
    assert healthcheck[2:] == ["status"]


def test_the_published_ports_are_the_ones_docs_deployment_md_lists(project):
    table = re.findall(r"^\| ([\w-]+) \| (\d+) \|", (REPO_ROOT / "docs" / "deployment.md").read_text(), re.M)
    documented = {(service, int(port)) for service, port in table}
    published = {(name, int(p["published"])) for name, service in project["services"].items()
                 for p in service.get("ports", [])}
    assert documented == published
