"""The source distribution and how setup.py chooses what to build."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "setup.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_sdist_holds_every_source_the_build_and_the_tests_need(tmp_path):
    """Every tracked file of csrc/ (the headers the .cpp/.cu files include too) and tests/
    (helpers and golden data), so that the extension builds from the sdist and its tests run."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "csrc", "tests"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    src = tmp_path / "src"  # a copy of the tracked tree: the sdist build writes its egg-info beside setup.py
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    proc = _setup("-q", "sdist", "-d", str(tmp_path / "dist"), cwd=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [archive] = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(set(tracked + ["setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"]) - packed)
    assert not missing, f"not in the sdist: {missing}"


@pytest.mark.parametrize("env,why", [({"USE_CUDA": "0"}, "USE_CUDA=0"),
                                     ({"CUDA_HOME": "/nonexistent"}, "'/nonexistent'")])
def test_a_build_without_a_cuda_toolkit_makes_the_cpu_kernels_and_says_why(env, why):
    import torch

    proc = _setup("--name", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if torch.version.cuda is None and "CUDA_HOME" in env:  # a CPU build of torch says that instead
        why = "not a CUDA build"
    assert "rsp_fast: building the CPU kernels only: " in proc.stderr and why in proc.stderr


def test_use_cuda_1_without_a_toolkit_stops_with_the_reason():
    proc = _setup("--name", env={"USE_CUDA": "1", "CUDA_HOME": "/nonexistent"})
    assert proc.returncode != 0 and "rsp_fast: USE_CUDA=1 but " in proc.stderr
