"""The one place that turns check results into an action.

Checks report named results; the policy says what each result means. The
strongest action wins: reject > quarantine > redirect > deliver. A result
whose action is "tag" does not compete: it marks the message (``tags``) for
whatever delivery the other results allow. The verdict
lists every result, the names that decided it and the policy version, so a
decision can be explained from the topic alone months later.
"""

from __future__ import annotations

from bulwark import auth_results
from bulwark.policy import Policy
from schemas.events import CheckResult, Verdict
from streams.checks import CHECKS
from streams.message import Message

SEVERITY = {"deliver": 0, "redirect": 1, "quarantine": 2, "reject": 3}


def action_for(result: CheckResult, policy: Policy) -> str:
    if result.outcome == "pass":
        return "deliver"
    if result.name in policy.actions:
        return policy.actions[result.name]
    check = CHECKS.get(result.check)
    # The check's defaults may follow its settings (antivirus when_infected).
    default = check.actions(policy).get(result.name) if check else None
    # A failed check whose meaning nobody declared is treated as suspect:
    # it never lets a message through unchecked.
    return default or ("quarantine" if result.outcome == "fail" else "deliver")


def decide(message: Message, results: list[CheckResult], policy: Policy) -> Verdict:
    action, reasons, tags = "deliver", [], []
    own_redirect = None
    for result in results:
        wanted = action_for(result, policy)
        if wanted == "deliver":
            continue
        if wanted == "tag":
            tags.append(result.name)
            continue
        reasons.append(result.name)
        if wanted == "redirect" and own_redirect is None:
            # A check may name where its result goes (a DLP rule's compliance
            # mailbox); the first such address among the results is used.
            check = CHECKS.get(result.check)
            own_redirect = check.redirects(policy).get(result.name) if check else None
        if SEVERITY[wanted] > SEVERITY[action]:
            action = wanted
    redirect_to = None
    if action == "redirect":
        if own_redirect or policy.redirect_to:
            redirect_to = own_redirect or policy.redirect_to
        else:  # nowhere to redirect to: hold it for a person rather than deliver
            action = "quarantine"
            reasons.append("REDIRECT_ADDRESS_MISSING")
    clauses = [c for method in auth_results.METHODS for c in message.authentication_results.get(method, [])]
    return Verdict(
        session_id=message.session_id,
        message_id=message.message_id,
        action=action,
        reasons=reasons,
        redirect_to=redirect_to,
        results=results,
        policy_version=policy.version,
        envelope=message.envelope,
        direction=message.direction,
        tags=tags,
        # Sender authentication for the downstream (RFC 8601), under the gateway's name.
        authentication_results=auth_results.header_value(policy.hostname, clauses) if clauses else None,
    )
