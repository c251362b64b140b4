"""The benchmark runs end to end in a tiny configuration (structure only: timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from dwa_export._cli import main


def test_bench_quick_prints_every_section_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    exported = Path(__file__).resolve().parents[1] / "exported"  # the committed files: no export here
    assert main(["bench", "--quick", "--artifacts", str(exported), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for heading in (
        "per-batch overhead, K=3, cpu",
        "per-batch overhead, K=16, cpu",
        "eager train step, K=3, cpu",
        "compiled train step, K=3, cpu",
        "two epochs of 1,000 batches",
        "checkpoint with a 200-epoch log, K=16",
        "kernel call latency",
        "batched throughput",
        "export and start-up",
    ):
        assert heading in text, heading
    rows = json.loads(out.read_text())["rows"]
    names = {row["name"] for row in rows}
    for name in (
        "DWAHistory.record + weighted sum",
        "dwa(losses) via nn.Module.__call__",
        "recompute softmax every batch",
        "ONNX Runtime I/O binding",
        "runtime.DWAWeightsSession / bare run",
        "plain tensor copy (bandwidth reference)",
        "TorchScript / copy",
        "the same step with dwa(losses)",
        "max |weights - float64 reference|",
        "torch.save size",
        "load_state_dict() (validates every entry)",
    ):
        assert name in names, name
    for row in rows:
        assert row["value"] == row["value"] and row["value"] >= 0, row  # a number, not NaN
        assert (row["target"] == "") == (row["ok"] is None), row
    # The import checks are facts, not timings: they must hold.
    imports = [row for row in rows if row["name"].strip().startswith("imports none of")]
    assert len(imports) == 3 and all(row["ok"] for row in imports), imports
