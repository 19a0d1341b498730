"""Worker startup refuses a bad model dir with a clear one-line error (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind, reason", [("missing", "is not a directory"),
                                          ("file", "is not a directory"),
                                          ("empty", "has no config.json")])
def test_worker_run_rejects_a_bad_model_dir(tmp_path, kind, reason):
    target = tmp_path / "model"
    if kind == "file":
        target.write_text("not a model")
    elif kind == "empty":
        target.mkdir()
    # Port 1 on localhost: nothing may be contacted before the model is checked.
    proc = subprocess.run([sys.executable, "-m", "worker", "run", "--model-dir", str(target),
                           "--bootstrap", "127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot load the model" in proc.stderr and reason in proc.stderr
    assert str(target) in proc.stderr and "Traceback" not in proc.stderr
