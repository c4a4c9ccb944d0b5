"""What the Policy page shows: the versions on ``config.policy``, a diff, the audit.

The history is ``bulwark policy show --history``'s (every version still on
the compacted topic, oldest first, the last active); the diff compares two
versions' validated documents as YAML, line by line (difflib); the audit is
``bulwark policy audit``'s findings for the policy in force.
"""

from __future__ import annotations

import asyncio
import difflib

import yaml
from aiohttp import web

from console.web import ConsoleBase, Refused
from schemas.events import PolicyPublished


def as_yaml(document: dict) -> list[str]:
    """A version's document as the lines of a policy file (keys in the order they were validated)."""
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True).splitlines()


def diff(old: PolicyPublished, new: PolicyPublished, context: int = 3) -> list[tuple[str, str]]:
    """(kind, line) of a unified diff from ``old`` to ``new``: kind is add, remove, hunk, file or same."""
    lines = difflib.unified_diff(as_yaml(old.document), as_yaml(new.document), fromfile=old.policy_version,
                                 tofile=new.policy_version, n=context, lineterm="")
    out = []
    for line in lines:
        if line.startswith(("---", "+++")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "remove"
        else:
            kind = "same"
        out.append((kind, line))
    return out


def by_version(history: list[PolicyPublished], version: str) -> PolicyPublished | None:
    # The newest record of a version: re-applying one replaces only its own record.
    return next((e for e in reversed(history) if e.policy_version == version), None)


class PolicyPages(ConsoleBase):
    """The policy in force, its history, a diff and the audit (administrators only)."""

    async def policy_page(self, request: web.Request) -> web.Response:
        from bulwark.policy.audit import as_yaml, audit

        self.require(request, "admin")
        history = await self.policy_history()
        in_force = self.policy.current
        findings = await asyncio.to_thread(audit, in_force)
        return self.render("policy.html", request, {
            "history": list(reversed(history)), "version": in_force.version,
            "findings": [(f, as_yaml(f.fix) if not f.met else "") for f in findings],
            "met": sum(f.met for f in findings),
        })

    async def policy_diff(self, request: web.Request) -> web.Response:
        self.require(request, "admin")
        history = await self.policy_history()
        old = by_version(history, request.query.get("from", ""))
        new = by_version(history, request.query.get("to", ""))
        if old is None or new is None:
            raise Refused(404, "Choose two versions that are on config.policy.")
        return self.render("policy_diff.html", request, {"old": old, "new": new, "lines": diff(old, new)})

    async def policy_version(self, request: web.Request) -> web.Response:
        self.require(request, "admin")
        event = by_version(await self.policy_history(), request.match_info["version"])
        if event is None:
            raise Refused(404, "No such version on config.policy.")
        return self.render("policy_version.html", request, {"e": event, "text": "\n".join(as_yaml(event.document))})
