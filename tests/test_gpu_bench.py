"""The prepared GPU run, in its quick CPU mode: it runs without TensorFlow or Ray, writes
its JSON after each section, and reports what a run cut off by its budget got done."""

import json
import subprocess
import sys

from study import gpu_bench
from study.config import load_config

from .conftest import REPO, require_jax, run_cli


def test_quick_run_measures_every_section_without_tensorflow_or_ray(tmp_path):
    """.ci/gpu-bench as it runs on the GPU machine, in its quick mode (CI's run of it)."""
    require_jax()
    result = subprocess.run(
        ["bash", str(REPO / ".ci" / "gpu-bench"), str(tmp_path), "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (tmp_path / "gpu-bench.log").read_text()[-3000:]
    results = json.loads((tmp_path / "gpu-bench.json").read_text())
    sections = results["sections"]
    for name in ("model", "trial"):
        assert sections[name]["keras_backend"] == "jax", name
        assert sections[name]["forbidden_modules"] == [], name  # No tensorflow, no ray.
    model = sections["model"]["rows"]
    assert [row["augment"] for row in model] == [False, True]
    assert all(row["images_per_second"] > 0 and row["batch_size"] == 50 for row in model)
    # The quick plan's steps per execution (a GPU trial's 16 would warm up for 64 steps).
    assert results["plan"]["steps_per_execution"] == 2
    assert [row["steps_per_execution"] for row in model] == [2, 2]
    assert "1. model alone (mixed_bfloat16, 2 steps per execution):" in result.stdout
    trial = sections["trial"]
    assert trial["status"] == "completed" and len(trial["images_per_second_by_epoch"]) == 2
    packing = sections["packing"]
    assert set(packing) == {"1", "2"} and packing["2"]["errors"] == []
    assert len(packing["2"]["per_trial_images_per_second"]) == 2
    assert packing["2"]["images_per_second"] > 0
    assert "study.gpu_bench (Keras on JAX; no TensorFlow, no Ray)" in result.stdout


def test_a_run_cut_off_by_its_budget_still_reports(tmp_path):
    require_jax()
    out = tmp_path / "gpu-bench.json"
    result = run_cli("study.gpu_bench", "--quick", "--budget", "3", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert sections["model"]["error"] == "cut off: out of the time budget"
    assert sections["trial"]["error"] == "cut off: out of the time budget"
    assert sections["packing"]["2"] == {"skipped": "out of the time budget"}


def test_tensorflow_and_ray_are_absent_to_it():
    code = (
        "from study.gpu_bench import forbid_imports\n"
        "forbid_imports()\n"
        "for name in ('tensorflow', 'ray.tune'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError as error:\n"
        "        print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.splitlines() == [
        "No module named 'tensorflow' (study.gpu_bench runs without it)",
        "No module named 'ray' (study.gpu_bench runs without it)",
    ]


def test_the_full_plan_compiles_each_program_for_one_batch_shape():
    plan = gpu_bench.FULL
    config = load_config(None, [f"data.dataset={plan.dataset}", *plan.overrides])
    train_images, test_images = (count * 100 for count in plan.per_class)
    assert (train_images, test_images) == (50_000, 10_000)
    assert (config.model.width, config.training.batch_size) == (1.0, 512)
    validation = config.data.validation_size
    assert (train_images - validation) % config.training.batch_size == 0
    assert validation % config.training.eval_batch_size == 0
    assert config.data.test_subset % config.training.eval_batch_size == 0
