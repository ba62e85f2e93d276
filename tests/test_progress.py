# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Progress bars: count what was done, end with one summary line, stay quiet when asked to."""

from __future__ import annotations

import io
import re

import pytest

from medcbm.progress import format_summary, progress, progress_enabled

SUMMARY = re.compile(
    r"^medcbm: (?P<desc>[\w ]+): (?P<n>\d+) (?P<unit>\w+) in (?P<s>\d+\.\d) s(?: \((?P<rate>[\d.]+) \w+/s\))?$"
)


def _summaries(text: str) -> list[re.Match]:
    return [m for line in text.splitlines() if (m := SUMMARY.match(line.split("\r")[-1].strip()))]


def test_iterating_counts_items_and_prints_one_summary(monkeypatch):
    monkeypatch.delenv("MEDCBM_PROGRESS", raising=False)
    out = io.StringIO()
    items = list(range(7))
    seen = [x for x in progress(items, desc="features", unit="img", file=out)]
    assert seen == items
    (m,) = _summaries(out.getvalue())
    assert (m["desc"], m["n"], m["unit"]) == ("features", "7", "img")
    assert "/7 [" in out.getvalue()  # the tqdm bar itself (with its total) went to the same stream


def test_step_counts_units_per_item_and_manual_updates(monkeypatch):
    monkeypatch.delenv("MEDCBM_PROGRESS", raising=False)
    out = io.StringIO()
    batches = [[1, 2, 3], [4, 5], [6]]
    for _ in progress(batches, total=6, desc="inference", step=len, file=out):
        pass
    with progress(total=4, desc="fit", unit="step", file=out) as bar:
        bar.update(3)
        bar.set_postfix("head")
    got = [(m["desc"], int(m["n"]), m["unit"]) for m in _summaries(out.getvalue())]
    assert got == [("inference", 6, "img"), ("fit", 3, "step")]


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_medcbm_progress_0_silences_bar_and_summary(monkeypatch, value):
    monkeypatch.setenv("MEDCBM_PROGRESS", value)
    assert not progress_enabled()
    out = io.StringIO()
    assert list(progress(range(3), desc="features", file=out)) == [0, 1, 2]
    assert out.getvalue() == ""


def test_summary_line_has_count_seconds_and_rate():
    assert format_summary("features", 100, 4.0) == "features: 100 img in 4.0 s (25.0 img/s)"
    assert format_summary("features", 0, 0.0) == "features: 0 img in 0.0 s"


def test_closing_twice_prints_once(monkeypatch):
    monkeypatch.delenv("MEDCBM_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress(total=2, desc="probe", unit="concept", file=out)
    bar.update(2)
    assert bar.close() == bar.close()
    assert len(_summaries(out.getvalue())) == 1
