"""What a process's watcher concludes from the coordination service's keys (`jsae.peers`):
a published error, a silent process, a finished one; no JAX processes needed."""

from jsae import peers

R = peers.ROOT


def _alive(*beats):
  return {f"{R}alive/{k}": str(b) for k, b in enumerate(beats)}


def test_a_changing_counter_is_alive_and_an_unchanged_one_goes_silent():
  changes = peers.last_changes({}, _alive(1, 1, 1), now=0.0, count=3)
  changes = peers.last_changes(changes, _alive(2, 5, 1), now=4.0, count=3)
  assert changes == {0: ("2", 4.0), 1: ("5", 4.0), 2: ("1", 0.0)}
  entries = _alive(3, 6, 1)
  changes = peers.last_changes(changes, entries, now=11.0, count=3)
  assert peers.news(entries, changes, me=0, count=3, now=11.0, timeout_s=10) == (
      2, "process 2 of 3 stopped responding (no heartbeat for 10 s): it was killed or crashed;"
      " its log says how", False)
  # ... unless it finished normally.
  entries[f"{R}done/2"] = "1"
  assert peers.news(entries, changes, me=0, count=3, now=11.0, timeout_s=10) is None


def test_a_process_that_never_beat_counts_from_the_first_read():
  changes = peers.last_changes({}, _alive(1), now=100.0, count=2)
  assert peers.news(_alive(1), changes, me=0, count=2, now=105.0, timeout_s=10) is None
  assert peers.news(_alive(1), changes, me=0, count=2, now=111.0, timeout_s=10)[1].startswith(
      "process 1 of 2 stopped responding")


def test_a_published_error_wins_and_the_lowest_process_is_reported_but_never_ones_own():
  entries = {**_alive(1, 1, 1), f"{R}error/2": "process 2 of 3 failed: disk full",
             f"{R}error/1": "process 1 of 3 failed: bad config"}
  changes = peers.last_changes({}, entries, now=0.0, count=3)
  assert peers.news(entries, changes, me=0, count=3, now=50.0, timeout_s=10) == (
      1, "process 1 of 3 failed: bad config", True)
  assert peers.news(entries, changes, me=1, count=3, now=0.0, timeout_s=10) == (
      2, "process 2 of 3 failed: disk full", True)


def test_process_0_leaves_once_every_other_process_has_read_failed_or_finished():
  entries = {f"{R}error/0": "x", f"{R}seen/1": "1"}
  assert not peers.acknowledged(entries, me=0, count=4)
  entries.update({f"{R}error/2": "y"})
  assert not peers.acknowledged(entries, me=0, count=4)
  assert peers.acknowledged(entries, me=0, count=4, gone=(3,))  # silent: it cannot read
  entries[f"{R}done/3"] = "1"
  assert peers.acknowledged(entries, me=0, count=4)


def test_the_stop_message_is_one_paragraph_naming_both_processes():
  text = peers.stop_message("jsae harvest", "process 0 of 3 failed: X is wrong; do Y.", 2, 3)
  assert text == ("jsae harvest: error: process 0 of 3 failed: X is wrong; do Y. Process 2 of"
                  " 3 stopped too; fix that and run the same command again to resume"
                  " (finished work is kept).")
  assert "\n" not in text
