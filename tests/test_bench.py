"""The benchmark's logic on tiny sizes: it runs and its results are well formed.

Nothing here asserts a wall time or a speed: the figures of a loaded test machine mean
nothing, and the README quotes those of a real run.
"""

import json
import math
import os
from dataclasses import replace

import keras
import numpy as np
import pytest

from study import backend, bench
from study import data as data_lib
from study.config import ConfigError, load_config
from study.search_config import load_study

from .conftest import REPO, run_cli

QUICK = bench.SIZES["quick"]


@pytest.fixture(scope="module")
def config():
    return load_config(
        None, ["data.dataset=cifar10", "model.width=0.0625", "training.batch_size=32"]
    )


@pytest.fixture(scope="module")
def cifar10(cifar10_tarball):
    return data_lib.load_cifar("cifar10", cifar10_tarball)


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_steady_rates_leave_out_the_first_and_the_last_epoch():
    # Reports at the end of epochs 1..5; the last one also evaluated the test set.
    times = [10.0, 12.0, 13.0, 15.0, 30.0]
    assert bench.steady_rates(times, 100) == [50.0, 100.0, 50.0]
    assert bench.steady_rates([1.0, 2.0], 100) == []


def test_overhead_ratios_compare_each_way_with_bare_fit():
    first = {
        "bare": {"wall": [0.0, 1.0, 2.0, 3.0, 9.0], "cpu": [0.0, 2.0, 4.0, 6.0, 9.0]},
        "local": {
            "wall": [0.0, 1.02, 2.04, 3.06, 9.0],
            "cpu": [1.0, 3.0, 5.0, 7.0, 9.0],
            # Epoch-end work per epoch; epochs 2 to 4 end inside the steady cycles.
            "machinery": [0.5, 0.01, 0.02, 0.03, 0.0],
        },
        # A trial process that ended before its CPU time was read gives NaN: left out.
        "tune": {
            "wall": [5.0, 6.25, 7.5, 8.75, 20.0],
            "cpu": [0.0, 2.5, math.nan, 7.5, 9.0],
            "machinery": [0.5, 0.05, 0.05, 0.05, 0.0],
        },
    }
    # A slow spell in round two: every way at half speed.
    second = {
        way: {**times, "wall": [2 * t for t in times["wall"]]} for way, times in first.items()
    }
    result = bench.summarise_overhead([first, second], 100, daemon_share=0.02)
    assert result["rounds"] == 2
    assert sorted(result["bare"]["cycles"]) == pytest.approx([50, 50, 50, 100, 100, 100])
    assert result["bare"]["images_per_second"] == pytest.approx(75)
    assert result["bare"]["images_per_cpu_second"] == pytest.approx(50)
    assert result["local/bare"] == pytest.approx(1 / 1.02)
    assert result["local/bare met"] and result["local/bare target"] == 0.97
    assert result["local/bare cpu"] == pytest.approx(1)
    assert result["tune/bare"] == pytest.approx(0.8)
    assert result["tune/bare rounds"] == pytest.approx([0.8, 0.8])
    assert not result["tune/bare met"]
    # Accounting: epoch-end seconds over the steady cycles' seconds, both rounds.
    assert result["local"]["machinery_share"] == pytest.approx(0.12 / (3 * 1.02 + 3 * 2.04))
    assert result["local/bare accounted"] == pytest.approx(1 - 0.12 / 9.18)
    assert result["tune/bare accounted"] == pytest.approx(1 - 0.3 / (3 * 1.25 + 3 * 2.5) - 0.02)
    assert "bare/bare accounted" not in result and "machinery_share" not in result["bare"]


def test_model_variants_change_one_factor_at_a_time(config):
    cpu = bench.model_variants(config, gpu=False)
    assert bench.model_variants(config, gpu=False, backend_name="jax")[0].jit_compile
    assert cpu[0] == bench.Variant(False, False, 32, 1, False)  # The trial's own settings.
    assert len(set(cpu)) == len(cpu)
    assert {(v.mixed_precision, v.jit_compile) for v in cpu} == {
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    }
    assert sorted({v.batch_size for v in cpu}) == [16, 32, 64, 128]
    gpu = bench.model_variants(config, gpu=True)
    assert gpu[0] == bench.Variant(True, True, 32, 16, False)  # auto: 16 steps with a GPU.
    assert [v.steps_per_execution for v in gpu if v.steps_per_execution != 16] == [1]
    quick = bench.model_variants(config, gpu=False, factors=QUICK.model_factors)
    assert [(v.steps_per_execution, v.augment) for v in quick] == [
        (1, False),
        (16, False),
        (1, True),
    ]


def test_model_section_times_every_variant(config, cifar10):
    section = bench.section_model(config, cifar10, QUICK, backend.configure())
    assert [row["steps_per_execution"] for row in section["rows"]] == [1, 16, 1]
    for row in section["rows"]:
        assert "error" not in row, row
        assert _positive(row["images_per_second"]) and len(row["runs"]) == QUICK.runs
    assert section["rows"][0]["vs_trial_default"] == 1.0
    assert keras.mixed_precision.global_policy().name == "float32"  # Restored.


def _row(augment, rate, **settings):
    """A model section row: the trial's settings unless `settings` says otherwise."""
    row = {"mixed_precision": False, "jit_compile": False, "batch_size": 32}
    row |= {"steps_per_execution": 1, **settings}
    return row | {"augment": augment, "images_per_second": rate}


def test_pipeline_is_compared_with_the_model(config, cifar10):
    splits = data_lib.split(cifar10, config.data, seed=0)
    model = {"rows": [_row(False, 100.0), _row(True, 90.0)]}
    section = bench.section_pipeline(config, splits, QUICK, model, backend.configure())
    assert section["images"] == len(splits.y_train)
    for key in ("images_per_second", "keras_loop_images_per_second"):
        assert _positive(section[key]), key
    slower = min(section["images_per_second"], section["keras_loop_images_per_second"])
    assert section["ratio_to_model"] == pytest.approx(slower / 100)
    assert section["bottleneck"] == (section["ratio_to_model"] < 1)
    assert section["augmentation"]["in_model_images_per_second"] == 90.0


def test_augmentation_goes_where_it_is_faster():
    rows = [_row(False, 100.0), _row(False, 50.0, batch_size=64), _row(True, 80.0)]
    # Off a GPU the host augments, then trains: 1 / (1/100 + 1/400) = 80 images/s.
    on_cpu = bench._augmentation_choice(rows, numpy_rate=400.0, gpu=False)
    assert on_cpu["in_input_images_per_second"] == pytest.approx(80.0)
    assert on_cpu["faster"] == "model"  # A tie stays in the model.
    assert bench._augmentation_choice(rows, numpy_rate=300.0, gpu=False)["faster"] == "model"
    # With a GPU the input overlaps the device: the slower of the two decides.
    assert bench._augmentation_choice(rows, numpy_rate=90.0, gpu=True)["faster"] == "input"
    assert bench._augmentation_choice(rows[:2], numpy_rate=90.0, gpu=True) is None


def test_numpy_augmentation_flips_and_shifts_like_the_model():
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    out = bench.numpy_flip_shift(images, np.random.default_rng(1))
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)], mode="reflect")
    for index in range(8):
        crops = [
            padded[index, dy : dy + 32, dx : dx + 32][:, ::step]
            for dy in range(9) for dx in range(9) for step in (1, -1)
        ]  # fmt: skip
        assert any(np.array_equal(out[index], crop) for crop in crops)


def test_bare_fit_and_local_mode_are_timed_once_an_epoch(config, cifar10, tmp_path):
    run_config = bench.overhead_config(config, 100, 3)
    assert len(data_lib.split(cifar10, run_config.data, seed=0).y_train) == 100
    for times in (
        bench.run_bare(run_config, cifar10),
        bench.run_local_mode(run_config, cifar10, tmp_path),
    ):
        for clock in ("wall", "cpu"):
            assert len(times[clock]) == 3 and times[clock] == sorted(times[clock])
    assert (tmp_path / "local" / "epochs.csv").is_file()


def test_official_format_data_sets_load_at_two_sizes(tmp_path):
    config = load_config(None, [])  # CIFAR-100
    sizes = replace(QUICK, tarball_images=(400, 200), small_fraction=2)
    paths = bench.write_data_sets(config, sizes, tmp_path)
    loaded = {name: bench.measure_load(config, path) for name, path in paths.items()}
    assert [len(data.y_train) for data, _ in loaded.values()] == [200, 400]
    stats = {name: measured for name, (_, measured) in loaded.items()}
    assert stats["full"]["images"] == 600 and _positive(stats["full"]["seconds"])
    scaling = bench._scaling({"load": stats})
    assert scaling["data_size_ratio"] == pytest.approx(2)
    assert _positive(scaling["load_time_ratio"])


def test_in_process_sections_print_a_table_and_write_json(tmp_path):
    out = tmp_path / "bench.json"
    options = bench.options_from(
        bench.parse_args(["--quick", "--width", "0.0625", "--out", str(out)]), gpu=False
    )
    options = replace(options, sections=("pipeline",))  # No Ray here: see the study test.
    results = bench.run_bench(options, echo=lambda line: None)
    assert json.loads(out.read_text())["pipeline"]["images"] == results["pipeline"]["images"]
    table = bench.format_table(results)
    assert "2. Input pipeline" in table and "model width 0.0625 (--width)" in table
    assert "model" not in results and "startup" not in results


def test_command_line_options():
    def options(*argv, gpu=False):
        return bench.options_from(bench.parse_args(list(argv)), gpu)

    cpu = options()
    assert cpu.config.model.width == bench.CPU_WIDTH and cpu.sizes == bench.SIZES["cpu"]
    assert "CPU default" in cpu.width_note
    assert options(gpu=True).config.model.width == 1.0
    assert options(gpu=True).sizes == bench.SIZES["gpu"]
    targets = options("--gpu-targets").config
    assert (targets.model.width, targets.training.batch_size) == (1.0, 512)
    assert options("--width", "0.5", "--quick").config.model.width == 0.5
    assert options("--set", "training.batch_size=64").config.training.batch_size == 64
    with pytest.raises(ConfigError, match="--sections: unknown bogus"):
        options("--sections", "model,bogus")
    assert options("--rounds", "6").sizes.overhead_rounds == 6
    with pytest.raises(ConfigError, match="--rounds: 0; it must be at least 1"):
        options("--rounds", "0")
    assert options("--images", "300").sizes.overhead_images == 300
    with pytest.raises(ConfigError, match="--images: 5; it must be at least 10"):
        options("--images", "5")


def test_gpu_targets_are_checked_only_on_a_gpu():
    assert "skipped" in bench.gpu_target_check({}, gpu=False)
    results = {
        "model": {
            "rows": [
                {
                    "batch_size": 512,
                    "mixed_precision": True,
                    "jit_compile": True,
                    "images_per_second": 31_000.0,
                },
                {
                    "batch_size": 512,
                    "mixed_precision": False,
                    "jit_compile": True,
                    "images_per_second": 40_000.0,
                },
            ]  # fmt: skip
        },
        "packing": {"rows": [{"images_per_second": 45_000.0}, {"images_per_second": 49_000.0}]},
    }
    check = bench.gpu_target_check(results, gpu=True)
    assert check["one_trial_images_per_second"] == 31_000 and check["one_trial_met"]
    assert check["packed_images_per_second"] == 49_000 and not check["packed_met"]


@pytest.mark.study
def test_command_line_runs_the_ray_sections(tmp_path, ray_env):
    out = tmp_path / "bench.json"
    result = run_cli(
        "study.bench", "--quick", "--width", "0.0625", "--set", "data.dataset=cifar10",
        "--sections", "overhead,startup,packing", "--out", out, env=ray_env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    overhead = results["overhead"]
    for way in ("bare", "local", "tune"):
        assert _positive(overhead[way]["images_per_second"]), way
        assert _positive(overhead[way]["images_per_cpu_second"]), way
        cycles = QUICK.overhead_rounds * (QUICK.overhead_epochs - 2)
        assert len(overhead[way]["cycles"]) == cycles, way
    assert _positive(overhead["local/bare"]) and _positive(overhead["tune/bare"])
    assert len(overhead["tune/bare rounds"]) == QUICK.overhead_rounds
    for key in ("local/bare accounted", "tune/bare accounted"):
        assert 0 < overhead[key] < 1, key
    assert 0 < overhead["ray_idle_cpu_share"] < os.cpu_count()
    assert "Ray's own processes took" in result.stdout
    startup = results["startup"]
    assert set(startup["load"]) == set(startup["trial"]) == {"small", "full"}
    for trial in startup["trial"].values():
        for key in ("launch_to_trial_seconds", "first_step_seconds"):
            assert _positive(trial[key]), key
        assert trial["launch_to_first_step_seconds"] == pytest.approx(
            trial["launch_to_trial_seconds"] + trial["trial_to_first_step_seconds"]
        )
    if results["machine"]["gpus"] == 0:
        assert results["packing"] == {"skipped": "no GPU on this machine"}
    assert "3. Machinery overhead" in result.stdout and "4. Start-up" in result.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_accepted_for_its_trial(path):
    """--config takes a study config, as --local does: its trial sections are benched."""
    args = bench.parse_args(["--config", str(path), "--width", "0.5"])
    if path.name.startswith("ray-cluster"):  # A cluster launcher file, not a study config.
        with pytest.raises(ConfigError, match="unknown key 'cluster_name'"):
            bench.options_from(args, gpu=False)
        return
    trial = load_study(path, check_space=False).trial
    assert bench.options_from(args, gpu=False).config == trial.model_copy(
        update={"model": trial.model.model_copy(update={"width": 0.5})}
    )
