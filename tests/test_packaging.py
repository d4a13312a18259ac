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
    """Every tracked file of csrc/ (the headers the .cpp/.cu files include too), tests/ (helpers
    and golden data), and the benchmarks/ and scripts/ the tests run, so that the extension
    builds from the sdist and its tests run; and docs/, which the README links to."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "csrc", "tests", "benchmarks", "scripts", "docs"], cwd=ROOT, capture_output=True, text=True,
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


def test_the_extension_knows_the_torch_it_was_built_against(monkeypatch):
    """rsp_fast._C holds the torch release it was compiled against; another minor release
    turns the compiled kernels off with a reason that says so (and how to rebuild)."""
    import importlib.util

    import torch

    from rsp_fast.ops import custom

    if importlib.util.find_spec("rsp_fast._C") is None:
        pytest.skip("rsp_fast._C is not built")
    from rsp_fast import _C

    assert custom.HAVE_C, custom.C_ERROR
    assert _C.TORCH_VERSION == torch.__version__.split("+")[0]
    monkeypatch.setattr(_C, "TORCH_VERSION", "1.0.0")
    have, why, broken = custom._load_extension()
    assert not have and broken and "built against torch 1.0.0" in why and "pip install --no-build-isolation" in why


SCRIPT = """
import json, warnings, torch
from torch import nn
import rsp_fast
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for _ in range(2):
        R = rsp_fast.RSP(model, hostile_k=2).attribute(torch.randn(2, 3, 8, 8))
print(json.dumps({"warnings": [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)],
                  "cpp": rsp_fast.backends("cpu")["cpp"], "finite": bool(torch.isfinite(R).all())}))
"""


@pytest.mark.parametrize("extension", ["missing", "broken"])
def test_without_a_loadable_extension_the_pytorch_engine_runs(tmp_path, extension):
    """No rsp_fast._C at all (not built: quietly, as documented), or one that cannot load
    (built for another torch or CUDA: ``auto`` warns once, naming the problem)."""
    import importlib.machinery
    import json

    package = tmp_path / "rsp_fast"
    shutil.copytree(ROOT / "rsp_fast", package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if extension == "broken":
        (package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared library")
    # -S: no site hooks, so an editable install of the checkout (a finder of its own) cannot stand
    # in for the copy; the site-packages folders come on the path after the copy instead
    import site

    path = os.pathsep.join([str(tmp_path), *site.getsitepackages()])
    proc = subprocess.run([sys.executable, "-S", "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["finite"]
    if extension == "missing":
        assert report["warnings"] == [] and "rsp_fast._C is not built" in report["cpp"]
    else:
        [warning] = report["warnings"]
        assert "rsp_fast._C is not importable" in warning and "the PyTorch engine runs" in warning
        assert report["cpp"] == warning


def test_python_dash_m_runs_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "rsp_fast", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage: rsp-fast" in proc.stdout
