"""Section 5, GPU packing: aggregate images/s of trials sharing a GPU; and the GPU goals
(30,000 images/s for one trial, 50,000 packed)."""

from pathlib import Path

from study.bench.common import GPU_TARGET_BATCH, TARGETS, median_or_none, steady_rates
from study.bench.tune_runs import run_tune


def study_trial(params: dict, data) -> None:
    """What a study's trial runs (as study.tuning.trial_function does)."""
    from study.trainable import tune_trainable

    tune_trainable(params, data)


def measure_packing(config, data, storage: Path, counts, images: int) -> list[dict]:
    rows = []
    for count in counts:
        run = run_tune(study_trial, config, data, storage, f"pack{count}", count, 1 / count)
        per_trial = [median_or_none(steady_rates(times, images)) for times in run["arrivals"]]
        rows.append(
            {
                "trials_per_gpu": count,
                "per_trial_images_per_second": per_trial,
                "images_per_second": sum(rate or 0 for rate in per_trial),
            }
        )
    return rows


def gpu_target_check(results: dict, gpu: bool) -> dict:
    if not gpu:
        return {"skipped": "no GPU on this machine: the GPU targets were not checked"}
    rows = results.get("model", {}).get("rows", [])
    one = [
        row.get("images_per_second") or 0
        for row in rows
        if row["batch_size"] == GPU_TARGET_BATCH and row["mixed_precision"] and row["jit_compile"]
    ]
    packed = [row["images_per_second"] for row in results.get("packing", {}).get("rows", [])]
    best_one, best_packed = max(one, default=None), max(packed, default=None)
    return {
        "one_trial_images_per_second": best_one,
        "one_trial_target": TARGETS["gpu_one_trial"],
        "one_trial_met": bool(best_one and best_one >= TARGETS["gpu_one_trial"]),
        "packed_images_per_second": best_packed,
        "packed_target": TARGETS["gpu_packed"],
        "packed_met": bool(best_packed and best_packed >= TARGETS["gpu_packed"]),
    }
