"""The prepared GPU run, in its quick CPU mode: it runs without TensorFlow or Ray, writes
its JSON after each section, and reports what a run cut off by its budget got done."""

import json
import subprocess
import sys

import pytest

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
    assert [row["augment"] for row in model] == [False, True, False]
    assert all(row["images_per_second"] > 0 for row in model)
    assert [row["batch_size"] for row in model] == [50, 50, 64]
    # The notebook's recipe: batch 64, float32, RMSprop.
    assert [row["notebook"] for row in model] == [False, False, True]
    assert (model[2]["mixed_precision"], model[2]["optimizer"]) == (False, "rmsprop")
    assert "the notebook's recipe (batch 64, float32, rmsprop)" in result.stdout
    # The quick plan's steps per execution (a GPU trial's 16 would warm up for 64 steps).
    assert results["plan"]["steps_per_execution"] == 2
    assert [row["steps_per_execution"] for row in model] == [2, 2, 2]
    assert "1. model alone (mixed_bfloat16, 2 steps per execution):" in result.stdout
    trial = sections["trial"]
    assert trial["status"] == "completed" and len(trial["images_per_second_by_epoch"]) == 2
    assert trial["startup_seconds"] > 0 and trial["compile_seconds"] >= 0
    packing = sections["packing"]
    assert set(packing) == {"1", "2"} and packing["2"]["errors"] == []
    assert len(packing["2"]["per_trial_images_per_second"]) == 2
    rows = [sections["trial"]]  # Packing's row of 1 is the trial section's own run.
    _check_aggregate(packing["1"], rows)
    study = sections["study"]
    assert set(study) == {"1", "2"} and study["2"]["errors"] == []
    assert len(study["2"]["startup_seconds"]) == 2 and all(study["2"]["startup_seconds"])
    assert "4. a study's trials (configs/default.yaml, 2 epochs) launched together" in result.stdout
    assert results["missing_on_gpu_machine"] == []
    assert "MISSING" not in result.stdout
    assert "study.gpu_bench (Keras on JAX; no TensorFlow, no Ray)" in result.stdout


def _check_aggregate(row, trials):
    """The aggregate is the images all trials trained over the wall time from their common
    start to the last one's end, recomputed here from the trials' own records."""
    images = sum(trial["images_per_epoch"] * len(trial["epoch_ends"]) for trial in trials)
    wall = max(t["ended_at"] for t in trials) - min(t["started_at"] for t in trials)
    assert row["wall_seconds"] == pytest.approx(wall)
    assert row["images_per_second"] == pytest.approx(images / wall)


def test_the_aggregate_of_trials_that_do_not_overlap_is_not_the_sum_of_their_rates():
    """Two trials, each 100 images/s over 10 s, one after the other: together 100 images/s
    over 20 s, not 200 (the sum of each one's rate, which the table printed before)."""
    first = {"started_at": 0.0, "ended_at": 10.0, "epoch_ends": [5.0, 10.0],
             "images_per_epoch": 500, "images_per_second": 100.0}  # fmt: skip
    second = {**first, "started_at": 10.0, "ended_at": 20.0, "epoch_ends": [15.0, 20.0]}
    row = gpu_bench.aggregate([first, second])
    assert row["images_per_second"] == pytest.approx(100.0)
    assert row["steady_images_per_second"] is None  # They never ran together.
    together = gpu_bench.aggregate([first, {**first, "epoch_ends": [6.0, 10.0]}])
    assert together["images_per_second"] == pytest.approx(200.0)
    # Steady: each one's epochs inside the window from the last first epoch (6 s) to the
    # first last epoch (10 s): the second's epoch 2 (500 images in 4 s); the first has none.
    assert together["steady_images_per_second"] is None
    overlapping = {**first, "epoch_ends": [2.0, 4.0, 6.0, 8.0, 10.0], "images_per_epoch": 200}
    later = {**overlapping, "ended_at": 11.0, "epoch_ends": [3.0, 5.0, 7.0, 9.0, 11.0]}
    both = gpu_bench.aggregate([overlapping, later])
    # The window runs from the last first epoch's end (3 s) to the first last epoch's end
    # (10 s): the first trial's epochs 4-6, 6-8 and 8-10 (600 images in 6 s) and the
    # second's 3-5, 5-7 and 7-9 (600 in 6 s): 100 + 100.
    assert both["steady_images_per_second"] == pytest.approx(200.0)
    assert both["images_per_second"] == pytest.approx(2000 / 11)


def test_a_package_the_gpu_machine_lacks_is_named():
    assert gpu_bench.missing_on_machine(["numpy", "jax", "keras", "tensorboardX"]) == []
    assert gpu_bench.missing_on_machine(["ray", "tensorflow"]) == [
        "ray (ray)",
        "tensorflow (tensorflow)",
    ]
    # An optional import the GPU machine lacks fails there, so it fails here too.
    assert {"boto3", "ray", "tensorflow"} <= gpu_bench.lacking_packages()
    assert "numpy" not in gpu_bench.lacking_packages()


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
