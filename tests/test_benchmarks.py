"""The benchmark scripts run (quick mode) and write well-formed JSON."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {"sectional_normalize", "purge"}
    assert all(r["seconds_median"] > 0 and r["speedup"] > 0 for r in rows)
    assert "| op |" in proc.stdout
