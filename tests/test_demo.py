"""The demo reaches the edge of stability: sharpness rises to 2/lr and hovers there."""

import numpy as np

from sgdprobe import cli
from tests.tbutil import read_events


def test_demo_reaches_and_hovers_at_the_edge_of_stability(tmp_path, capsys):
    logdir = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "800", "--every", "20", "--logdir", str(logdir)]) == 0
    printed = capsys.readouterr().out
    assert f"TensorBoard logs written to {logdir}" in printed and "edge of stability" in printed
    events = read_events(logdir)
    sharp = np.array([e.value for e in events.Scalars("sharpness/lambda_max")])
    threshold = events.Scalars("sharpness/threshold")[0].value
    assert threshold == 10.0
    assert sharp[0] < 0.5 * threshold  # starts well below 2/lr ...
    late = sharp[len(sharp) // 2 :]
    assert np.median(np.abs(late / threshold - 1)) < 0.05  # ... and hovers at it in the second half
    assert late.max() < 1.3 * threshold


def test_plugins_command_lists_builtins(capsys):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "sharpness" in out and "(default)" in out
