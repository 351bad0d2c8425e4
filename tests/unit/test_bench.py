"""The benchmark's pure helpers (bench/benchlib.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import benchlib as bl  # noqa: E402


def test_given_runs_with_missing_values_when_medians_then_each_key_uses_the_present_ones():
    runs = [{"wall_s": 1.0, "gap_s": None, "name": "x"}, {"wall_s": 3.0, "gap_s": 2.0},
            {"wall_s": 2.0, "gap_s": 4.0, "ok": True}]
    assert bl.medians(runs) == {"wall_s": 2.0, "gap_s": 3.0}
    assert bl.median([None, None]) is None


def test_given_points_on_a_line_when_extrapolated_then_the_line_is_followed():
    pts = [(2048.0, 2.0 + 0.001 * 2048), (4096.0, 2.0 + 0.001 * 4096)]
    assert bl.fit_line(pts) == pytest.approx((2.0, 0.001))
    assert bl.extrapolate(pts, 65536) == pytest.approx(2.0 + 65.536)
    with pytest.raises(ValueError):
        bl.fit_line([(1.0, 1.0), (1.0, 2.0)])


def test_given_proc_texts_when_parsed_then_cpu_and_sizes_come_out():
    stat = "1234 (python -m (x)) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 8 0 99 0 0"
    assert bl.proc_cpu_seconds(stat, 100) == pytest.approx(4.0)
    status = "Name:\tpython\nVmHWM:\t  51200 kB\nVmRSS:\t   2048 kB\n"
    assert bl.proc_status_bytes(status, "VmHWM") == 51200 * 1024
    assert bl.proc_status_bytes(status, "VmSwap") is None


def test_given_values_when_formatted_then_units_are_readable():
    assert bl.fmt_seconds(0.0042) == "4.20ms"
    assert bl.fmt_seconds(0.25) == "250ms"
    assert bl.fmt_seconds(2.5) == "2.50s"
    assert bl.fmt_bytes(100 * 1024 * 1024) == "100MiB"
    assert bl.fmt_bytes(1.5 * (1 << 30)) == "1.5GiB"
    assert bl.fmt_ratio(1.0, 2.0) == "0.50" and bl.fmt_ratio(1.0, None) == "-"
    assert bl.fmt_ratio(0.56, 204.0) == "0.0027"
    out = bl.format_table(["a", "bb"], [["x", "1"], ["yyy", "22"]]).splitlines()
    assert out[0] == "| a   | bb |" and out[3] == "| yyy | 22 |"


def test_given_config_specs_when_parsed_then_items_combine():
    assert bl.parse_config("base") == {"name": "base", "chunk_bytes": 0, "variants": (),
                                       "mallopt": True, "options": (), "writer": None}
    cfg = bl.parse_config("chunk=3M+variant=prefetch+client-no-mallopt+opt:grpc.x=1+no-writer")
    assert cfg["chunk_bytes"] == 3 << 20 and cfg["variants"] == ("prefetch",)
    assert not cfg["mallopt"] and cfg["options"] == ("grpc.x=1",) and not cfg["writer"]
    assert bl.parse_size("256K") == 256 * 1024 and bl.parse_size("1048576") == 1 << 20
    with pytest.raises(ValueError):
        bl.parse_config("turbo")
