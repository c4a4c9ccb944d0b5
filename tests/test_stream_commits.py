"""Which mail.received offset a Faust worker commits (streams/transport.py).

The chaos run (bench/chaos.py) lost 13 of 2,558 messages answered 250: a
worker committed offsets past messages it had read and never judged, and
the worker that took the partition over started after them. Faust's own
choice counted every record between two commit markers as done as soon as
a later one was acknowledged, and skipped the head check when nothing had
been committed yet. These are the cases it got wrong, and the ordinary ones.
"""

from __future__ import annotations

from streams.transport import committable


def test_a_message_still_being_judged_holds_the_commit_back():
    # Records at odd offsets, a transaction marker after each; 11 is in an
    # agent's hands while 13 and 15 finished (the content agent runs four at once).
    # Faust's bookkeeping committed 16 here.
    assert committable(10, [13, 15], {11}) is None
    # Once 11 is done, everything up to 15 is.
    assert committable(10, [11, 13, 15], set()) == 16


def test_on_a_partition_nothing_was_committed_for_the_first_messages_count_too():
    # A worker reads offsets 0-3 as a rebalance suspends its flow (Faust drops
    # them without a word), then judges 5 and 7; Faust committed 8.
    assert committable(None, [5, 7], {0, 1, 2, 3}) is None
    assert committable(None, [0, 1, 2, 3, 5, 7], set()) == 8


def test_commit_markers_and_compacted_offsets_never_hold_the_commit_back():
    assert committable(10, [11, 13, 15], set()) == 16
    assert committable(None, [0, 2, 4], set()) == 5


def test_what_finished_below_an_unfinished_message_is_committed():
    assert committable(10, [11, 13, 17], {15}) == 14


def test_nothing_new_commits_nothing():
    assert committable(16, [], set()) is None
    assert committable(16, [], {17}) is None


def test_unfinished_offsets_below_the_commit_are_another_worker_s_past():
    # Read by this worker before the partition went elsewhere and came back
    # committed further: they no longer hold anything back.
    assert committable(20, [21, 23], {5}) == 24
