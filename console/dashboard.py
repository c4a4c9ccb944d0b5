"""The dashboard's figures over the last hours, and their charts as SVG drawn here.

Figures come from the audit topics, read from the start of the period only
(``since``: each partition entered at its first record of the period):

- messages per hour by action: ``message.verdict`` on ``mail.verdicts``;
- top refused client addresses and senders: what the gateway refused during
  the SMTP dialogue on ``smtp.sessions`` (a refused connection or command,
  a refused MAIL, RCPT or DATA; a refused RCPT or DATA counts for the
  session's sender) and the messages a verdict rejected;
- bans per hour: ``screening.ban_issued`` on ``screening.bans``.

The charts are SVG elements written on the server (no script: the console's
Content-Security-Policy allows none), colours as presentation attributes, each
with a title and a description, and each followed by the same figures as a
table for those who do not see the chart.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from aiohttp import web
from markupsafe import Markup, escape

from console.web import ConsoleBase
from schemas import events as ev
from schemas.topics import BANS, SESSIONS, VERDICTS

HOURS = 24
#: The page's figures are at most this old.
DASHBOARD_SECONDS = 60
TOP = 10
ACTIONS = ("deliver", "quarantine", "reject", "redirect")
#: Colour-blind-safe (Okabe and Ito), one per action; the legend names them too.
COLOURS = {"deliver": "#009E73", "quarantine": "#E69F00", "reject": "#D55E00", "redirect": "#0072B2",
           "bans": "#CC79A7"}
TYPES = {ev.Verdict.TYPE, ev.SessionRefused.TYPE, ev.SessionMail.TYPE, ev.SessionRcpt.TYPE, ev.SessionData.TYPE,
         ev.BanIssued.TYPE}


@dataclass
class Figures:
    since: datetime
    hours: list[datetime]
    by_action: dict[str, list[int]]
    top_ips: list[tuple[str, int]]
    top_senders: list[tuple[str, int]]
    bans: list[int]

    @property
    def messages(self) -> int:
        return sum(sum(counts) for counts in self.by_action.values())


def hour_of(when: datetime) -> datetime:
    return when.replace(minute=0, second=0, microsecond=0)


def figures(records: list, now: datetime, hours: int = HOURS) -> Figures:
    """The dashboard's figures from the records of the period (any order)."""
    first = hour_of(now) - timedelta(hours=hours - 1)
    slots = [first + timedelta(hours=i) for i in range(hours)]
    index = {slot: i for i, slot in enumerate(slots)}
    by_action = {action: [0] * hours for action in ACTIONS}
    bans = [0] * hours
    ips: Counter[str] = Counter()
    senders: Counter[str] = Counter()
    sender_of: dict[str, str] = {}  # session id -> its current MAIL FROM
    for record in sorted(records, key=lambda r: r.event.occurred_at):
        event = record.event
        slot = index.get(hour_of(event.occurred_at))
        if slot is None:
            continue
        if isinstance(event, ev.Verdict):
            by_action.setdefault(event.action, [0] * hours)[slot] += 1
            if event.action == "reject":
                ips[event.envelope.client_ip] += 1
                senders[event.envelope.mail_from or "<>"] += 1
        elif isinstance(event, ev.BanIssued):
            bans[slot] += 1
        elif isinstance(event, ev.SessionMail):
            sender_of[event.session_id or ""] = event.sender or "<>"
            if not event.accepted:
                ips[event.client_ip] += 1
                senders[event.sender or "<>"] += 1
        elif isinstance(event, (ev.SessionRcpt, ev.SessionData)):
            if not event.accepted:
                ips[event.client_ip] += 1
                if sender := sender_of.get(event.session_id or ""):
                    senders[sender] += 1
        elif isinstance(event, ev.SessionRefused):
            ips[event.client_ip] += 1
    return Figures(first, slots, by_action, _top(ips), _top(senders), bans)


def _top(counts: Counter) -> list[tuple[str, int]]:
    """The most counted first; ties in a stable order (by name), so a reload shows the same list."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP]


# -- SVG ----------------------------------------------------------------------------

WIDTH, HEIGHT, LEFT, BOTTOM, TOP_MARGIN = 720, 220, 44, 28, 12


def nice_top(peak: int) -> int:
    """A round top for an axis: 1, 2, 5, 10, 20, 50..."""
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= peak:
                return step * magnitude
        magnitude *= 10


def stacked_bars(slug: str, title: str, description: str, hours: list[datetime],
                 series: dict[str, list[int]]) -> Markup:
    """An SVG bar chart, one bar per hour, each bar stacked by series (in the order given)."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(hours))]
    top = nice_top(max(totals, default=0) or 1)
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP_MARGIN
    step = plot_w / max(len(hours), 1)
    bar = max(step * 0.7, 1)
    parts = [
        f'<svg class="chart" id="{escape(slug)}" viewBox="0 0 {WIDTH} {HEIGHT + 24}" width="{WIDTH}" '
        f'height="{HEIGHT + 24}" role="img" aria-labelledby="{escape(slug)}-title {escape(slug)}-desc" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(slug)}-title">{escape(title)}</title>',
        f'<desc id="{escape(slug)}-desc">{escape(description)}</desc>',
    ]
    for fraction in (0, 0.5, 1):  # gridlines and their labels
        y = TOP_MARGIN + plot_h * (1 - fraction)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ccc"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
                     f'{escape(format(top * fraction, ",g"))}</text>')  # 2.5 halfway to 5, not 2
    for i, hour in enumerate(hours):
        x = LEFT + i * step + (step - bar) / 2
        y = TOP_MARGIN + plot_h
        for name, values in series.items():
            if not values[i]:
                continue
            h = plot_h * values[i] / top
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{COLOURS.get(name, "#777")}"><title>{escape(hour.strftime("%H:00"))} '
                         f'{escape(name)}: {values[i]}</title></rect>')
        if i % 3 == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle" font-size="11">'
                         f'{escape(hour.strftime("%H:00"))}</text>')
    x = LEFT
    for name in series:  # the legend
        parts.append(f'<rect x="{x}" y="{HEIGHT + 6}" width="12" height="12" fill="{COLOURS.get(name, "#777")}"/>')
        parts.append(f'<text x="{x + 16}" y="{HEIGHT + 16}" font-size="12">{escape(name)}</text>')
        x += 30 + 8 * len(name)
    parts.append("</svg>")
    return Markup("".join(parts))


def horizontal_bars(slug: str, title: str, rows: list[tuple[str, int]]) -> Markup:
    """An SVG bar per (label, count), longest first, labelled with both."""
    if not rows:
        return Markup("")
    line, label_w, width = 22, 260, WIDTH
    top = nice_top(rows[0][1])
    height = line * len(rows) + 8
    parts = [f'<svg class="chart" id="{escape(slug)}" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-labelledby="{escape(slug)}-title" xmlns="http://www.w3.org/2000/svg">',
             f'<title id="{escape(slug)}-title">{escape(title)}</title>']
    for i, (label, count) in enumerate(rows):
        y = 4 + i * line
        w = (width - label_w - 60) * count / top
        shown = label if len(label) <= 38 else label[:37] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" font-size="12">{escape(shown)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{max(w, 1):.1f}" height="{line - 6}" fill="#D55E00"/>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 14}" font-size="12">{count}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


class Dashboard:
    def __init__(self, read: Callable[[list[str], datetime, set[str]], Awaitable[list]]):
        self._read = read

    async def figures(self, now: datetime, hours: int = HOURS) -> Figures:
        since = hour_of(now) - timedelta(hours=hours - 1)
        records = await self._read([VERDICTS.name, SESSIONS.name, BANS.name], since, TYPES)
        return figures(records, now, hours)


def kafka_dashboard(settings) -> Dashboard:
    from bulwark.kafka import iter_records

    async def read(topics: list[str], since: datetime, types: set[str]) -> list:
        return [r async for r in iter_records(settings, topics, since=since, types=types)]

    return Dashboard(read)


class DashboardPage(ConsoleBase):
    """The dashboard (administrators only), its figures recomputed at most every DASHBOARD_SECONDS."""

    async def dashboard_page(self, request: web.Request) -> web.Response:
        self.require(request, "admin")
        now = datetime.now(timezone.utc)
        if self._figures is None or time.monotonic() - self._figures[0] > DASHBOARD_SECONDS:
            self._figures = (time.monotonic(), (now, await self.dashboard.figures(now)))
        at, f = self._figures[1]
        charts = {
            "messages": stacked_bars("messages-chart", "Messages per hour by action",
                                     f"Verdicts per hour over the last {len(f.hours)} hours, stacked by action.",
                                     f.hours, f.by_action),
            "bans": stacked_bars("bans-chart", "Dynamic Screening bans per hour",
                                 f"Bans issued per hour over the last {len(f.hours)} hours.", f.hours,
                                 {"bans": f.bans}),
            "ips": horizontal_bars("ips-chart", "Top refused client addresses", f.top_ips),
            "senders": horizontal_bars("senders-chart", "Top refused senders", f.top_senders),
        }
        return self.render("dashboard.html", request, {"f": f, "at": at, "charts": charts})
