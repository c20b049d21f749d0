"""report.py: table ratios, Pareto front, files written atomically."""

from __future__ import annotations

import json

from torchshrink.report import Report, _pareto_front, format_table, read_report, write_report


def _metrics(acc, size, macs=1000, lat=2.0):
    return {
        "accuracy": acc,
        "params": 100,
        "nonzero_params": 50,
        "macs": macs,
        "size_bytes": size,
        "latency_ms_b1": lat / 4,
        "latency_ms_b32": lat,
    }


def _report():
    base = _metrics(0.98, 400_000)
    stages = [
        {"name": "train", "kind": "train", "seconds": 3.0, "metrics": base, "details": {}},
        {
            "name": "prune",
            "kind": "prune",
            "seconds": 1.0,
            "metrics": _metrics(0.975, 100_000, 500, 1.0),
            "details": {},
        },
    ]
    return Report(
        "0.1.0", {"name": "t"}, 0, base, stages, stages[-1]["metrics"], {"model": "model.safetensors"}
    )


def test_table_ratios_against_baseline():
    table = format_table(_report())
    prune_row = next(line for line in table.splitlines() if line.startswith("| prune"))
    cells = [c.strip() for c in prune_row.strip("|").split("|")]
    assert cells[2] == "97.50%" and cells[3] == "-0.50"
    assert cells[5] == "4.00x"  # 400 kB -> 100 kB
    assert cells[9] == "2.00x"  # MACs halved
    assert cells[12] == "2.00x"  # latency halved


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.9), (50, 0.95), (200, 0.99), (60, 0.80), (300, 0.97)]
    assert _pareto_front(points) == [(50, 0.95), (200, 0.99)]


def test_write_and_read_back(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path)
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "pareto.png"}
    assert json.loads((tmp_path / "report.json").read_text())["artefacts"]["report_md"] == "report.md"
    assert read_report(tmp_path / "report.json").final == report.final
    assert "4.00x smaller" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_written_files_follow_the_umask(tmp_path):
    import os
    import stat

    write_report(_report(), tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("report.json", "report.md", "pareto.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
