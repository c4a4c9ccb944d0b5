"""The safety net's bookkeeping (sinks/unjudged.py): what is due, and where each partition may be committed.

The loop that feeds it real records is tested against a real broker in
tests/integration/test_worker_unjudged.py.
"""

from __future__ import annotations

from schemas.codec import HEADER_RESEND, HEADER_TYPE
from sinks.unjudged import Ledger, resend_count

AFTER = 120.0
T0 = 1_800_000_000.0  # a wall-clock time, seconds
HEADERS = [(HEADER_TYPE, b"message.received")]


def ledger(max_resends: int = 3) -> Ledger:
    return Ledger(after=AFTER, max_resends=max_resends)


def receive(book: Ledger, message_id: str, offset: int, partition: int = 0, at: float = T0, resend: int = 0,
            now: float = T0) -> None:
    headers = HEADERS + ([(HEADER_RESEND, str(resend).encode())] if resend else [])
    book.received(partition, offset, message_id, int(at * 1000), b"{}", headers, resend, now)


def test_a_message_without_a_verdict_is_due_once_the_period_has_passed():
    book = ledger()
    receive(book, "m1", 10)
    assert book.due(T0 + AFTER - 1) == []
    [due] = book.due(T0 + AFTER)
    assert (due.message_id, due.offset, due.value) == ("m1", 10, b"{}")


def test_a_message_judged_in_time_is_never_due():
    book = ledger()
    receive(book, "m1", 10)
    assert book.verdict(0, "m1", int((T0 + 0.5) * 1000), T0 + 0.5) is not None
    assert book.due(T0 + 100 * AFTER) == []
    assert book.counts() == (0, 0)


def test_a_verdict_read_before_its_message_settles_it():
    """After a restart the verdicts are read from further back than the messages: either may come first."""
    book = ledger()
    assert book.verdict(0, "m1", int(T0 * 1000), T0) is None
    receive(book, "m1", 10)
    assert book.due(T0 + 10 * AFTER) == []


def test_a_refusal_counts_as_a_verdict():
    # The loop hands message.refused to verdict() as it does message.verdict: both settle the message.
    from sinks.unjudged import SETTLES

    assert SETTLES == {b"message.verdict", b"message.refused"}


def test_nothing_is_sent_again_until_the_verdicts_were_read_far_enough():
    book = ledger()
    receive(book, "m1", 10, partition=2)
    asked = []

    def behind(partition, due):
        asked.append((partition, due))
        return False

    assert book.due(T0 + 10 * AFTER, behind) == []
    assert asked == [(2, T0 + AFTER)]


def test_after_a_re_send_the_next_waits_a_whole_period():
    book = ledger()
    receive(book, "m1", 10)
    [due] = book.due(T0 + AFTER + 5)
    book.resent(due, T0 + AFTER + 5)
    assert due.resends == 1
    assert book.due(T0 + 2 * AFTER) == []
    assert book.due(T0 + 2 * AFTER + 5) == [due]


def test_the_copy_read_back_after_a_restart_gives_the_count_back():
    book = ledger()
    now = T0 + 10 * AFTER  # the restart, long after the message
    receive(book, "m1", 10, now=now)
    receive(book, "m1", 40, resend=2, now=now)
    [waiting] = book.pending.values()
    assert waiting.resends == 2
    assert waiting.offset == 10  # the original holds the commit, not the copy
    assert HEADER_RESEND not in dict(waiting.headers)
    assert book.due(now) == []
    assert book.due(now + AFTER) == [waiting]


def test_a_copy_of_a_message_already_judged_changes_nothing():
    book = ledger()
    receive(book, "m1", 10)
    book.verdict(0, "m1", int(T0 * 1000), T0 + 1)
    receive(book, "m1", 40, resend=1, now=T0 + 200)
    assert book.pending == {}


def test_offsets_are_committed_up_to_the_earliest_message_still_waiting():
    book = ledger()
    receive(book, "a", 10, partition=0, at=T0)
    receive(book, "b", 11, partition=0, at=T0 + 1)
    receive(book, "c", 12, partition=0, at=T0 + 2)
    receive(book, "d", 7, partition=1, at=T0 + 3)
    book.verdict(0, "a", int(T0 * 1000), T0 + 1)
    book.verdict(0, "c", int(T0 * 1000), T0 + 1)
    book.verdict(1, "d", int(T0 * 1000), T0 + 1)
    positions = book.commit_positions()
    # Partition 0 waits for b (offset 11, with its time, where a restart reads the verdicts from);
    # partition 1 has nothing waiting: the next offset.
    assert positions == {0: (11, int((T0 + 1) * 1000)), 1: (8, int((T0 + 3) * 1000))}
    book.verdict(0, "b", int(T0 * 1000), T0 + 2)
    assert book.commit_positions()[0] == (13, int((T0 + 2) * 1000))


def test_a_message_given_up_on_is_counted_and_no_longer_holds_its_partition():
    book = ledger(max_resends=1)
    receive(book, "a", 10)
    receive(book, "b", 11, at=T0 + 1)
    [a, b] = book.due(T0 + AFTER + 2)
    book.give_up(a)
    assert book.counts() == (1, 1)
    assert book.due(T0 + 100 * AFTER) == [b]
    assert book.commit_positions()[0][0] == 11


def test_partitions_moved_away_are_forgotten():
    book = ledger()
    receive(book, "a", 10, partition=0)
    receive(book, "b", 10, partition=3)
    book.forget_partitions({3})
    assert set(book.pending) == {"a"}
    assert set(book.commit_positions()) == {0}


def test_verdicts_are_remembered_long_enough_then_forgotten():
    book = ledger()
    book.verdict(0, "m1", int(T0 * 1000), T0)
    book.prune(T0 + 4 * AFTER)
    assert "m1" in book.judged
    book.prune(T0 + 3600)
    assert "m1" not in book.judged


def test_the_resend_header_is_read_as_a_count():
    assert resend_count([(HEADER_TYPE, b"message.received")]) == 0
    assert resend_count([(HEADER_RESEND, b"3")]) == 3
    assert resend_count(None) == 0
