"""Progress under --no_progress: a heartbeat line every few minutes, never silence; no empty bars (issue 25)."""

import io

from rome_flax import progress


def test_heartbeat_prints_position_elapsed_estimate_and_postfix_at_its_interval():
  now = [0.0]
  out = io.StringIO()
  beat = progress.Heartbeat(total=100, initial=20, desc="train", unit="step", every=120, clock=lambda: now[0], file=out)
  for _ in range(10):   # 10 steps in 100 s: no line yet
    now[0] += 10
    beat.update()
  assert out.getvalue() == ""
  beat.set_postfix(loss="0.431")
  for _ in range(2):
    now[0] += 10
    beat.update()
  # 12 steps in 120 s, 68 left at 10 s a step
  assert out.getvalue() == "train: 32/100 steps, 2.0 min, about 11.3 min left (loss 0.431)\n"
  beat.write("step 32 dev accuracy 0.9")
  assert out.getvalue().endswith("step 32 dev accuracy 0.9\n")


def test_iterate_keeps_items_and_skips_empty_loops(capsys):
  assert list(progress.iterate([1, 2, 3], "all exits", show=False)) == [1, 2, 3]
  empty = []
  assert progress.iterate(empty, "TOKEE settings", show=True) is empty
  assert capsys.readouterr().err == ""


def test_durations_read_naturally():
  assert [progress.duration(s) for s in (42, 210, 7200)] == ["42 s", "3.5 min", "2.0 h"]
