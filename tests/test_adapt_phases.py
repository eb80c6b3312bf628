"""adapt's phase timings and on_phase hook: the seam tools/perf.py measures through."""

from __future__ import annotations

from edgetransfer.adapt import AdaptConfig, adapt

from .conftest import DIGITS, SOURCE

# "bundle": a head run keeps its backbone in the cache as a bundle (a lookup once it is there)
PHASES = ["prepare", "images", "train", "fit", "write", "report", "bundle"]


def test_phases_are_timed_in_order_and_nest(tmp_path):
    started: list[str] = []
    res = adapt(
        AdaptConfig(
            data_dir=DIGITS,
            out=tmp_path / "run",
            weights=str(SOURCE),
            arch="simple_cnn",
            epochs=2,
            on_phase=started.append,
        )
    )
    assert started == PHASES
    t = res.timings
    # by end time
    assert list(t) == ["prepare", "images", "fit", "train", "report", "write", "bundle"]
    assert all(v > 0 for v in t.values()), t
    assert t["fit"] <= t["train"] and t["report"] <= t["write"]


def test_no_report_no_report_phase(tmp_path):
    started: list[str] = []
    res = adapt(
        AdaptConfig(
            data_dir=DIGITS,
            out=tmp_path / "run",
            weights=str(SOURCE),
            arch="simple_cnn",
            strategy="bias",
            epochs=1,
            report=False,
            on_phase=started.append,
        )
    )
    assert started == ["prepare", "images", "train", "fit", "write"]
    assert "report" not in res.timings
