"""benchmarks/gpu_check.sh and localize_overhead.py run end to end: on the CPU, at the tiny shapes,
one prompt, two steps, one repeat (the timings mean nothing; the table's shape and numbers are checked)."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("pixart", "sana", "flux", "sd3")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {
        **os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SIZE": "tiny",
        "GPU_CHECK_DTYPE": "float32", "GPU_CHECK_STEPS": "2", "GPU_CHECK_PROMPTS": "1", "GPU_CHECK_REPEATS": "1",
        "GPU_CHECK_TESTS": "0",  # the tests it would run are in this suite already
    }
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_gpu_check_prints_one_table_with_a_row_per_family(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = (out / "gpu_check.md").read_text()
    assert table in proc.stdout  # printed, and written
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    assert [r.split("|")[1].split("/")[0].strip() for r in rows] == list(FAMILIES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        ratios = [float(re.fullmatch(r"([0-9.]+)x", c).group(1)) for c in cells[1:5]]
        assert all(math.isfinite(r) and r > 0 for r in ratios), row
        assert re.fullmatch(r"(yes|no: .+)\*", cells[5]), row  # * : targets are for xl bf16 on a GPU


def test_each_benchmark_writes_its_record(smoke):
    _, out = smoke
    for family in FAMILIES:
        record = json.loads((out / f"{family}.json").read_text())
        assert record["family"] == family and record["size"] == "tiny" and not record["targets_apply"]
        assert set(record["medians"]) == {"plain", "contribution", "withhold"}
        assert len(record["withheld"]) == max(1, round(0.15 * record["blocks"]))
        assert all(math.isfinite(v) for r in record["ratios"].values() for v in r.values())


def test_a_failed_benchmark_is_a_row_too(smoke, tmp_path, monkeypatch):
    _, out = smoke
    spec = importlib.util.spec_from_file_location("localize_overhead", ROOT / "benchmarks" / "localize_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    (tmp_path / "pixart.json").write_text((out / "pixart.json").read_text())
    lines = bench.summarize(tmp_path, ["pixart", "flux"], tests="passed on cpu").splitlines()
    assert lines[2].startswith("| tiny invariants") and lines[2].endswith("| passed on cpu |")
    assert lines[3].startswith("| pixart /") and lines[4].startswith("| flux |") and "FAILED" in lines[4]
