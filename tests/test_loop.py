"""`engine.loop`'s run-level progress: the time left and the generator's state in the progress line."""

from types import SimpleNamespace

from videomoco.engine.loop import duration, generator_state, run_eta


def test_duration_is_short_and_human():
    assert [duration(s) for s in (0, 45.4, 725, 3 * 3600 + 7 * 60, 2 * 86400 + 4 * 3600)] == [
        "0s", "45s", "12m05s", "3h07m", "2d04h"]


def test_run_eta_counts_the_rest_of_the_epoch_and_the_epochs_after():
    assert run_eta(2.0, steps_left_in_epoch=3, epochs_after=4, steps_per_epoch=10) == 2.0 * (3 + 40)


def test_generator_state_names_the_epoch_it_joins_counted_from_one():
    cfg = SimpleNamespace(adv_start_epoch=100)
    assert generator_state(99, cfg) == "off until 101" and generator_state(100, cfg) == "on"
