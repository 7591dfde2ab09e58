"""``python -m pvio.harness.benchreport``: the figures of a make bench run, from its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pvio.harness import benchreport

DOC = {
    "datetime": "2026-12-02T20:00:00",
    "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11.7"},
    "benchmarks": [
        {
            "group": "ring one thread",
            "name": "test_batched_round_trips[64]",
            "stats": {"median": 0.0123},
            "extra_info": {"entries_per_s": 61234567.0, "ratio_to_c": 0.7345, "rows": [1, 2]},
        },
        {
            "group": "device models: stream, saturation",
            "name": "test_stream_at_saturation[pv]",
            "stats": {"median": 0.2},
            "extra_info": {
                "pps": 693329.4,
                "per_packet": {"interrupts": 0.0117, "copies": 2.0},
                "by_domain": {},
            },
        },
    ],
}


def test_the_report_has_one_line_per_benchmark_with_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(DOC))
    assert benchreport.main([str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "pvio bench figures: 2026-12-02T20:00:00, Test CPU, 2 CPUs, Python 3.11.7"
    assert "[device models: stream, saturation]" in out and "[ring one thread]" in out
    assert (
        "  test_stream_at_saturation[pv]: median 0.2 s  pps=693,329.4 "
        "per_packet.interrupts=0.0117 per_packet.copies=2" in out
    )
    assert (
        "  test_batched_round_trips[64]: median 0.0123 s  entries_per_s=61,234,567 ratio_to_c=0.7345" in out
    )


def test_a_missing_or_broken_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert benchreport.main([str(tmp_path / "none.json")]) == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert benchreport.main([str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("benchreport: cannot read ") for line in err)
    assert benchreport.main([]) == 2
