"""Progress lines: ETA formatting, and a rate that leaves out the first (compiling) update."""

import types

from unified_seq import progress


def test_eta_formats_minutes_hours_and_unknown():
    assert progress.format_eta(247.9) == "4m07s"
    assert progress.format_eta(3900) == "1h05m"
    assert progress.format_eta(float("inf")) == "?"


def test_the_meter_times_from_its_first_update(capsys, monkeypatch):
    clock = iter([0.0, 100.0, 110.0, 120.0])  # construction, then three updates
    # Only the progress module's clock: pytest's own timing keeps the real one.
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    meter = progress.Meter("eval captioning", total=50, unit="images", every=5.0)
    meter.update(10)  # at 100 s: compiled; not timed
    meter.update(20)  # 10 images in 10 s
    meter.update(30)
    lines = capsys.readouterr().out.splitlines()
    # 20 images in the 20 s after the first update: 1 image/s, 20 left.
    assert lines[-1] == "eval captioning: 30/50 images | 1.00 images/s | ETA 0m20s"
    assert lines[0] == "eval captioning: 20/50 images | 1.00 images/s | ETA 0m30s"
