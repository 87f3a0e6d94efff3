"""An installed kolm (a wheel, not the checkout) works from any directory: its DeepSpeed configs and
harness task ship inside the package, and the launcher imports without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.cli
REPO = Path(__file__).resolve().parent.parent

PROBE = """
import kolm, launch.submit
from kolm.train.config import RunConfig
from kolm.train.dsconfig import template_path
from kolm.export.harness import SHIPPED_TASKS
for stage in (1, 2, 3):
    print(template_path(RunConfig(zero_stage=stage)))
print(template_path(RunConfig(deepspeed_config="ds_configs/zero3_offload.json")))
print(sorted(p.name for p in SHIPPED_TASKS.iterdir()))
print(kolm.__file__, launch.submit.__file__, launch.submit.site_script())
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """kolm built as a wheel and installed (without its dependencies, which this environment has)."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((root / "dist").glob("kolm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"kolm/train/ds_configs/zero2.json", "kolm/export/tasks/ko_constitution_cloze.yaml",
            "kolm/export/tasks/ko_constitution_cloze.jsonl", "launch/submit.py"} <= set(names)
    target = root / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return target


def test_an_installed_kolm_finds_its_configs_and_launcher_from_any_directory(tmp_path, installed):
    env = {k: v for k, v in os.environ.items() if k != "KOLM_HOME"}
    env["PYTHONPATH"] = str(installed)  # ahead of the checkout's editable install
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert all(line.startswith(str(installed / "kolm" / "train" / "ds_configs")) for line in lines[:4]), lines
    assert lines[3].endswith("zero3_offload.json")
    assert "ko_constitution_cloze.yaml" in lines[4]
    assert lines[5] == f"{installed}/kolm/__init__.py {installed}/launch/submit.py None"
    help_text = subprocess.run([sys.executable, "-m", "launch.submit", "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "--eval RUN_DIR" in help_text.stdout
