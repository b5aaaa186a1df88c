"""EndPredictor (policy/session_end.py): which completion endings end a conversation."""

import pytest
from hypothesis import given, settings, strategies as st

from sglang_marconi.policy.session_end import EndPredictor


def test_ending_is_the_last_output_tokens():
    p = EndPredictor(tail_tokens=3)
    assert p.ending([5, 6, 7, 8]) == (6, 7, 8)
    assert p.ending([7, 8, 9]) == (7, 8, 9)
    assert p.ending([8, 9]) is None  # shorter than the tail: no feature


def test_final_takes_eight_unanswered_and_no_continuation_at_the_default():
    p = EndPredictor()
    e = (1, 2, 3, 4)
    assert p.p_continue(e) == 0.5 and not p.likely_final(e)
    for _ in range(7):
        p.unanswered(e)
    assert p.p_continue(e) == pytest.approx(1 / 9) and not p.likely_final(e)
    p.unanswered(e)
    assert p.p_continue(e) == pytest.approx(1 / 10) and p.likely_final(e)
    p.continued(e)  # one continuation: 2/11 > 0.1
    assert not p.likely_final(e)
    assert not p.likely_final(None)


def test_memory_is_bounded_least_recently_seen_forgotten_first():
    p = EndPredictor(tail_tokens=1, capacity=2)
    p.unanswered((1,))
    p.unanswered((2,))
    p.continued((1,))  # (1,) seen again: (2,) is now the oldest
    p.unanswered((3,))
    assert len(p) == 2 and p.p_continue((2,)) == 0.5 and p.p_continue((1,)) == pytest.approx(2 / 4)


@pytest.mark.parametrize("kw, word", [({"tail_tokens": 0}, "tail_tokens"), ({"tail_tokens": True}, "tail_tokens"),
                                       ({"max_continue": 0.0}, "max_continue"), ({"max_continue": 1.0}, "max_continue"),
                                       ({"capacity": 0}, "capacity")])
def test_bad_settings_are_named(kw, word):
    with pytest.raises(ValueError, match=word):
        EndPredictor(**kw)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(events=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=60),
       max_continue=st.floats(0.01, 0.99))
def test_final_iff_posterior_at_most_the_threshold(events, max_continue):
    """Against plain counting on random event streams."""
    p = EndPredictor(tail_tokens=1, max_continue=max_continue)
    counts = {}
    for cont, k in events:
        c, u = counts.get(k, (0, 0))
        counts[k] = (c + cont, u + (not cont))
        (p.continued if cont else p.unanswered)((k,))
    for k in range(6):
        c, u = counts.get(k, (0, 0))
        assert p.likely_final((k,)) == ((c + 1) / (c + u + 2) <= max_continue)
