"""service.store.states: one table of allowed transitions; everything else raises."""

from __future__ import annotations

import itertools

import pytest

from service.errors import IllegalTransition
from service.store.states import TRANSITIONS, JobState, check_transition

S = JobState

ALLOWED = {
    (S.RECEIVING, S.QUEUED),
    (S.RECEIVING, S.REJECTED),
    (S.RECEIVING, S.FAILED),
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.FAILED),
    (S.RUNNING, S.SENDING),
    (S.RUNNING, S.QUEUED),
    (S.RUNNING, S.FAILED),
    (S.SENDING, S.DONE),
    (S.SENDING, S.QUEUED),
    (S.SENDING, S.FAILED),
    (S.DONE, S.QUEUED),
    (S.FAILED, S.QUEUED),
}


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(JobState, JobState)))
def test_transition(old: JobState, new: JobState) -> None:
    if (old, new) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition, match=f"from {old.value} to {new.value}"):
            check_transition(old, new)


def test_happy_path_and_admin_retry() -> None:
    path = [S.RECEIVING, S.QUEUED, S.RUNNING, S.SENDING, S.DONE, S.QUEUED]
    for old, new in itertools.pairwise(path):
        check_transition(old, new)
    assert TRANSITIONS[S.REJECTED] == frozenset()
