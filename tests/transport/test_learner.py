"""The limiter-shape learner, on a fake wall clock: which window a burst of refusals came from, how long to
pause, and how the capacity is revised."""

from __future__ import annotations

import pytest

from imagegen_provider.transport.learner import (
    Episodes,
    WindowShape,
    identify,
    pause_without_retry_after,
    revised_capacity,
)

MINUTE = 6_000_000.0  # a calendar minute boundary (a multiple of 60)


def counter(accepted: list[float]):
    return lambda start, end: sum(1 for t in accepted if start <= t < end)


def test_refusals_until_the_minute_boundary_identify_a_fixed_window():
    # 100 accepted from :10 to :30, refused from :30 until :00, accepted again at :00.1.
    accepted = [MINUTE + 10 + i * 0.2 for i in range(100)]
    shape = identify(episode_start=MINUTE + 30, resumed_at=MINUTE + 60.1, accepted_between=counter(accepted))
    assert shape == WindowShape("fixed", 100)


def test_refusals_ending_mid_minute_identify_a_sliding_window():
    # 100 accepted from :10 to :30; a sliding window accepts again at :10 of the next minute.
    accepted = [MINUTE + 10 + i * 0.2 for i in range(100)]
    shape = identify(episode_start=MINUTE + 30, resumed_at=MINUTE + 70.0, accepted_between=counter(accepted))
    assert shape == WindowShape("sliding", 100)


def test_a_sliding_window_freeing_at_the_boundary_is_not_taken_for_a_fixed_one():
    # 100 accepted from :45 of one minute to :15 of the next
    # (a burst straddling :00), refused from :15; the oldest acceptance's time not known, a probe at :00 of
    # the next minute that was accepted is not enough: only 50 of the 100 fell in the refusing calendar
    # minute, so a sliding window of 100, not a fixed window of 50.
    accepted = [MINUTE - 15 + i * 0.3 for i in range(100)]
    shape = identify(episode_start=MINUTE + 15, resumed_at=MINUTE + 60.2, accepted_between=counter(accepted))
    assert shape == WindowShape("sliding", 100)
    # A window already known to be fixed stays fixed (steady pacing spreads the last 60 s over two minutes).
    assert identify(episode_start=MINUTE + 15, resumed_at=MINUTE + 60.2, accepted_between=counter(accepted),
                    known="fixed") == WindowShape("fixed", 50)


def test_a_start_straddling_the_boundary_still_identifies_a_fixed_window():
    # A client starting at :42 sends 100 before :00 and 100 after (its window: 100 per calendar minute), is
    # refused from :17 until :00: a sliding window would have accepted again at :42 (when the oldest
    # acceptance left it, and the probing pause tried then); resuming only at :00 is a calendar window's.
    accepted = [MINUTE - 18 + i * 0.18 for i in range(100)] + [MINUTE + i * 0.17 for i in range(100)]
    shape = identify(episode_start=MINUTE + 17, resumed_at=MINUTE + 60.1, accepted_between=counter(accepted),
                     oldest=MINUTE - 18)
    assert shape == WindowShape("fixed", 100)


def test_short_episodes_are_a_token_bucket_and_identify_nothing():
    accepted = [MINUTE + i * 0.1 for i in range(100)]
    assert identify(episode_start=MINUTE + 59.0, resumed_at=MINUTE + 60.5, accepted_between=counter(accepted)) is None


def test_a_burst_of_refusals_is_one_episode():
    episodes = Episodes()
    assert episodes.refused(sent_at=10.0, retry_after=None) is True
    assert [episodes.refused(sent_at=10.0 + i * 0.01, retry_after=None) for i in range(20)] == [False] * 20
    # A request sent before the episode and answered late does not end it.
    assert episodes.accepted(sent_at=9.5) is None
    assert episodes.accepted(sent_at=12.0) == 10.0
    assert episodes.refused(sent_at=13.0, retry_after=1.0) is True and episodes.retry_after_seen


def test_pause_without_retry_after_per_shape():
    now = MINUTE + 40.0
    # Known fixed window: until the boundary.
    fixed = pause_without_retry_after(shape=WindowShape("fixed", 10), now=now, elapsed=0.0, oldest_in_window=None)
    assert fixed == pytest.approx(20.1)
    # Known sliding window: until the oldest accepted request leaves the last 60 s.
    sliding = pause_without_retry_after(shape=WindowShape("sliding", 10), now=now, elapsed=0.0,
                                        oldest_in_window=MINUTE + 5.0)
    assert sliding == pytest.approx(25.1)
    # Unknown: as long as the episode lasted (geometric probing), at least 1 s, never past the boundary.
    assert pause_without_retry_after(shape=None, now=now, elapsed=0.0, oldest_in_window=None) == 1.0
    assert pause_without_retry_after(shape=None, now=now, elapsed=8.0, oldest_in_window=None) == 8.0
    assert pause_without_retry_after(shape=None, now=now, elapsed=30.0, oldest_in_window=None) == pytest.approx(20.1)
    # ...nor past the moment a sliding window would free its oldest acceptance.
    assert pause_without_retry_after(shape=None, now=now, elapsed=30.0,
                                     oldest_in_window=MINUTE - 15.0) == pytest.approx(5.1)
    # Once that moment has passed (its probe refused), only the episode's length and the boundary count: a
    # window whose acceptances are spread over the minute does not draw a probe at each one's expiry.
    assert pause_without_retry_after(shape=None, now=now, elapsed=8.0,
                                     oldest_in_window=MINUTE - 25.0) == pytest.approx(8.0)
    # A refusal of a request that raced the moment (a second after it): probe again at once.
    assert pause_without_retry_after(shape=None, now=now, elapsed=30.0,
                                     oldest_in_window=MINUTE - 21.0) == pytest.approx(0.2)


def test_probing_an_unknown_window_costs_a_handful_of_refusals_per_minute():
    """From a refusal at :05 to the boundary, pausing as long as the episode lasted probes about 6 times."""
    start, now, probes = MINUTE + 5.0, MINUTE + 5.0, 0
    while now < MINUTE + 60.0:
        probes += 1
        now += pause_without_retry_after(shape=None, now=now, elapsed=now - start, oldest_in_window=None)
    assert probes <= 7
    assert now == pytest.approx(MINUTE + 60.1)  # the last probe lands just after :00


def test_capacity_revised_from_what_the_window_accepted():
    shape = WindowShape("fixed", 100)
    accepted = [MINUTE + i * 0.5 for i in range(90)]
    assert revised_capacity(shape, now=MINUTE + 50, accepted_between=counter(accepted)) == WindowShape("fixed", 90)
    # A stray refusal after few acceptances does not halve the rate.
    few = accepted[:20]
    assert revised_capacity(shape, now=MINUTE + 50, accepted_between=counter(few)) == shape


@pytest.mark.parametrize("text", [None, b"", "fixed", "fixed:-1", "fixed:0", "weird:10", "sliding:1e9", b"\xff:1"])
def test_shared_shapes_are_checked_before_believed(text):
    assert WindowShape.decode(text) is None


def test_shared_shape_round_trip():
    for shape in (WindowShape("fixed", 120), WindowShape("sliding", 600)):
        assert WindowShape.decode(shape.encode().encode()) == shape
