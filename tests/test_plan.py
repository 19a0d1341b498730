"""``python -m worker plan``: the model's shape from an artifact (or flags, never both), one-line
errors, JSON output; and the command from an installed wheel, outside any checkout, importing
nothing from bench/, devtools/ or torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker import capacity
from worker.__main__ import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
TRAFFIC = ["--msgs-per-s", "20000", "--sessions", "1e6"]


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory) -> Path:
    """A real artifact (model.artifact.save) of a small model with mean units: state 8 + 3 + 1."""
    from model import artifact
    from model.gru import GRUClassifier, ModelConfig
    from model.tokenizer import PAD, UNK, Vocab
    out = tmp_path_factory.mktemp("plan-model")
    cfg = ModelConfig(vocab_size=4, num_labels=3, embed_dim=4, hidden_size=8, mean_dim=3)
    artifact.save(out, GRUClassifier(cfg), Vocab((PAD, UNK, "a", "b")), ["x", "y", "z"])
    return out


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *TRAFFIC, "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_state_width_comes_from_the_artifact(capsys, small_artifact):
    out = plan_json(capsys, "--model-dir", str(small_artifact))
    assert out["model"]["state_size"] == 12 and out["model"]["labels"] == 3
    # GRS4 header, 12 x f32, 3 first-seen counts, one outbox entry of 33 + 3 x 4 bytes
    assert out["plan"]["value_bytes"] == capacity.HEADER_BYTES + 48 + 12 + 45
    assert out["measured"]["machine"] == capacity.REFERENCE.machine


def test_without_model_dir_the_artifact_run_would_load_is_used(capsys, monkeypatch,
                                                               small_artifact):
    monkeypatch.setenv("GRU_MODEL__DIR", str(small_artifact))
    assert plan_json(capsys)["model"]["source"] == str(small_artifact / "config.json")


def test_flags_describe_a_model_without_an_artifact(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GRU_MODEL__DIR", str(tmp_path / "absent"))
    out = plan_json(capsys, "--hidden", "160", "--mean-units", "32", "--layers", "1",
                    "--labels", "5")
    assert out["model"]["state_size"] == 193
    assert out["model"]["embed"] == capacity.REFERENCE.embed  # only the CPU estimate uses it
    assert out["plan"]["value_bytes"] == 909


@pytest.mark.parametrize("argv,says", [
    ([], "no model artifact at"),
    (["--hidden", "160"], "give --layers and --labels too"),
    (["--hidden", "0", "--layers", "1", "--labels", "5"], "--hidden=0 must be >= 1"),
    (["--model-dir", "{art}", "--hidden", "160"], "not both"),
    (["--model-dir", "{absent}"], "has no config.json"),
    (["--model-dir", "{art}", "--results", "{absent}"], "cannot read the results"),
])
def test_an_input_the_plan_cannot_use_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path,
                                                             small_artifact, argv, says):
    monkeypatch.setenv("GRU_MODEL__DIR", str(tmp_path / "absent"))
    argv = [a.format(art=small_artifact, absent=tmp_path / "absent") for a in argv]
    assert main(["plan", *TRAFFIC, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


def test_traffic_needs_sessions_or_concurrency(capsys, small_artifact):
    art = ["--model-dir", str(small_artifact)]
    assert main(["plan", "--msgs-per-s", "1", *art]) == 2
    assert "give --sessions, or --concurrent and --session-s" in capsys.readouterr().err
    assert main(["plan", "--msgs-per-s", "1", "--concurrent", "300", "--session-s", "300",
                 "--send-end", "--json", *art]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"]["sessions"] == 300 and out["profile"]["ends_per_s"] == 1


@pytest.mark.parametrize("flag", ["--msgs-per-s", "--sessions", "--ttl-s", "--tokens"])
def test_a_rate_or_count_at_zero_is_a_usage_error(capsys, flag):
    argv = {"--msgs-per-s": "1", "--sessions": "1", "--hidden": "8", "--layers": "1",
            "--labels": "2", flag: "0"}
    with pytest.raises(SystemExit) as e:
        main(["plan", *(x for kv in argv.items() for x in kv)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{flag}: 0 is not above zero" in err and err.count("\n") == 1


def test_results_file_replaces_the_built_in_constants(capsys, small_artifact):
    from bench.capacity import newest_result
    out = plan_json(capsys, "--model-dir", str(small_artifact), "--results",
                    str(newest_result()))
    assert out["measured"]["source"] == str(newest_result())
    assert out["plan"] == plan_json(capsys, "--model-dir", str(small_artifact))["plan"]


# --- from an installed wheel -----------------------------------------------------------------

CHECK = """
import importlib.util, json, sys
import worker
from worker.__main__ import main
rc = main(["plan", "--msgs-per-s", "20000", "--sessions", "1e6", "--model-dir", sys.argv[1],
           "--json"])
loaded = {m.split(".")[0] for m in sys.modules}
with open(sys.argv[2], "w") as f:
    json.dump({"rc": rc, "worker": worker.__file__,
               "imported": sorted(loaded & {"bench", "devtools", "tests", "torch", "model"}),
               "bench_findable": importlib.util.find_spec("bench") is not None}, f)
"""


@pytest.mark.heavy
@pytest.mark.slow
def test_plan_runs_from_an_installed_wheel_without_a_checkout(tmp_path, small_artifact):
    src, dist, site, run = (tmp_path / d for d in ("src", "dist", "site", "run"))
    # The wheel is built from a copy of what it packages, so the checkout gets no build/.
    for pkg in ("model", "worker", "devtools"):
        shutil.copytree(ROOT / pkg, src / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    run.mkdir()
    py = sys.executable
    # With the build backend at hand, build offline, without an isolated build environment.
    isolation = ["--no-build-isolation"] if _has(py, "setuptools") else []
    subprocess.run([py, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(dist),
                    str(src)], check=True, cwd=run, timeout=300)
    (wheel,) = dist.glob("gru_stream-*.whl")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, cwd=run, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRU_")}
    env["PYTHONPATH"] = str(site)

    helped = subprocess.run([py, "-m", "worker", "plan", "--help"], cwd=run, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert helped.returncode == 0, helped.stderr
    assert "--model-dir DIR" in helped.stdout and capacity.REFERENCE.machine in helped.stdout

    report = tmp_path / "report.json"
    done = subprocess.run([py, "-c", CHECK, str(small_artifact), str(report)], cwd=run, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(report.read_text())
    assert out["rc"] == 0 and json.loads(done.stdout)["model"]["state_size"] == 12
    assert Path(out["worker"]).is_relative_to(site)  # the wheel's copy, not the checkout's
    assert out["imported"] == [] and not out["bench_findable"]


def _has(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                          check=False).returncode == 0
