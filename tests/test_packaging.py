"""A regular (non-editable) install carries the patch series and finds it without the checkout."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_installed_package_finds_its_patch_series(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__", ".gpu"))
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)
    wheel = next(wheels.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    shutil.rmtree(source)  # nothing may come from the copy of the checkout
    probe = "from hlwq_gguf import paths, upstream; print(paths.PATCH_DIR); print(*[p.name for p in upstream.patch_files()])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    patch_dir, names = result.stdout.splitlines()
    assert Path(patch_dir) == site / "ggml_patch"
    assert names.split() == sorted(p.name for p in (REPO / "ggml_patch").glob("*.patch"))
