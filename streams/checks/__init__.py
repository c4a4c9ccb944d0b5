"""The content check contract, and the registry that finds the checks.

A check is one module in this package that declares:

- ``NAME``: its name (lower case, used in the policy's ``checks:`` section);
- ``DESCRIPTION``: one line for administrators;
- ``Settings``: a pydantic model subclassing :class:`CheckSettings`, every
  field with a default (the secure one);
- ``DEFAULT_ACTIONS``: result name -> action, used unless the policy's
  ``actions:`` says otherwise;
- ``async def check(message, settings) -> list[CheckResult]``;
- optionally ``actions(settings) -> dict``: default actions that follow one of
  the check's settings (antivirus ``when_infected: refuse|quarantine``), over
  ``DEFAULT_ACTIONS``;
- optionally ``redirects(settings) -> dict``: result name -> the address a
  ``redirect`` of that result goes to (DLP's per-rule address), over the
  policy's ``redirect_to``.

A check reports named results and never decides the action (that is
``streams.verdict``). Adding a check means adding a module and its tests,
nothing in the pipeline. A check that raises or times out produces the
result ``<NAME>_FAIL`` with outcome ``fail``, whose default action is
quarantine: a failed check never lets a message through unchecked.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import time
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bulwark import metrics
from schemas.events import CheckResult

if TYPE_CHECKING:
    from bulwark.policy import Policy
    from streams.message import Message


class CheckSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    timeout_seconds: float = Field(default=30.0, gt=0)


@dataclass(frozen=True)
class CheckModule:
    name: str
    description: str
    settings_model: type[CheckSettings]
    default_actions: dict[str, str]
    run: Callable[["Message", Any], Awaitable[list[CheckResult]]]
    settings_actions: Callable[[Any], dict[str, str]] | None = None
    settings_redirects: Callable[[Any], dict[str, str]] | None = None

    @property
    def fail_result(self) -> str:
        return f"{self.name.upper()}_FAIL"

    def settings(self, policy: "Policy") -> CheckSettings:
        return self.settings_model.model_validate(policy.checks.get(self.name, {}))

    def actions(self, policy: "Policy") -> dict[str, str]:
        """Result name -> default action, under this policy's settings for the check."""
        if self.settings_actions is None:
            return self.default_actions
        return {**self.default_actions, **self.settings_actions(self.settings(policy))}

    def redirects(self, policy: "Policy") -> dict[str, str]:
        """Result name -> where a 'redirect' of it goes, when the check's settings name an address."""
        return self.settings_redirects(self.settings(policy)) if self.settings_redirects else {}


def _load(module: ModuleType) -> CheckModule:
    missing = [a for a in ("NAME", "DESCRIPTION", "Settings", "DEFAULT_ACTIONS", "check") if not hasattr(module, a)]
    if missing:
        raise TypeError(f"check module {module.__name__} lacks {', '.join(missing)}")
    if not issubclass(module.Settings, CheckSettings):
        raise TypeError(f"{module.__name__}.Settings must subclass CheckSettings")
    return CheckModule(module.NAME, module.DESCRIPTION, module.Settings, dict(module.DEFAULT_ACTIONS), module.check,
                       getattr(module, "actions", None), getattr(module, "redirects", None))


def discover() -> dict[str, CheckModule]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        check = _load(importlib.import_module(f"{__name__}.{info.name}"))
        found[check.name] = check
    return found


CHECKS: dict[str, CheckModule] = discover()


def validate_settings(policy: "Policy") -> list[tuple[tuple, str]]:
    """(location under checks:, message) for every invalid check setting."""
    problems = []
    for name, raw in policy.checks.items():
        check = CHECKS.get(name)
        if check is None:
            problems.append(((name,), f"no such check; known checks: {', '.join(sorted(CHECKS))}"))
            continue
        try:
            check.settings_model.model_validate(raw)
        except ValidationError as exc:
            problems.extend(((name, *err["loc"]), err["msg"]) for err in exc.errors())
    return problems


async def _run_one(check: CheckModule, message: "Message", settings: CheckSettings) -> list[CheckResult]:
    started = time.monotonic()
    results = await _results(check, message, settings)
    # Measured here, once for every check, so a check module stays a pure
    # adapter (a timed-out check counts its whole timeout).
    metrics.CHECK_SECONDS.labels(check=check.name).observe(time.monotonic() - started)
    for result in results:
        metrics.CHECK_RESULTS.labels(check=check.name, outcome=result.outcome).inc()
    return results


async def _results(check: CheckModule, message: "Message", settings: CheckSettings) -> list[CheckResult]:
    try:
        return await asyncio.wait_for(check.run(message, settings), settings.timeout_seconds)
    except asyncio.TimeoutError:
        detail = f"timed out after {settings.timeout_seconds:g}s"
    except Exception as exc:  # a check's failure is a result, not a lost message
        detail = f"{type(exc).__name__}: {exc}"
    return [CheckResult(check=check.name, name=check.fail_result, outcome="fail", detail=detail)]


async def run_checks(message: "Message", policy: "Policy") -> list[CheckResult]:
    """Every enabled check's results, the checks run concurrently."""
    enabled = [(c, c.settings(policy)) for c in CHECKS.values()]
    enabled = [(c, s) for c, s in enabled if s.enabled]
    batches = await asyncio.gather(*(_run_one(c, message, s) for c, s in enabled))
    return [result for batch in batches for result in batch]
