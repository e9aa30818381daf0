"""Section 1, model throughput: the network alone on a fixed batch, one factor at a time."""

import functools
import statistics
from dataclasses import asdict, dataclass, replace

import numpy as np

from study import backend
from study import data as data_lib
from study.bench.common import FACTORS, Sizes, cpu_bf16, epoch_clock, ratio, with_values
from study.config import GPU_STEPS_PER_EXECUTION, TrialConfig


@dataclass(frozen=True)
class Variant:
    mixed_precision: bool
    jit_compile: bool
    batch_size: int
    steps_per_execution: int = 1
    augment: bool = False


def model_variants(
    config: TrialConfig, gpu: bool, factors=FACTORS, backend_name="tensorflow"
) -> list[Variant]:
    """The trial's own settings first, then one factor at a time: precision x compilation,
    batch size, steps per execution, augmentation."""
    chosen = config.training.resolve(gpu, backend_name)
    batch = config.training.batch_size
    base = Variant(
        chosen["mixed_precision"],
        chosen["jit_compile"],
        batch,
        chosen["steps_per_execution"],
        config.model.augment,
    )
    variants = [base]
    if "precision" in factors:
        flags = ((m, j) for m in (False, True) for j in (False, True))
        variants += [replace(base, mixed_precision=m, jit_compile=j) for m, j in flags]
    if "batch" in factors:
        variants += [replace(base, batch_size=b) for b in (batch // 2, batch * 2, batch * 4) if b]
    if "steps" in factors:
        other = 1 if base.steps_per_execution > 1 else GPU_STEPS_PER_EXECUTION
        variants.append(replace(base, steps_per_execution=other))
    if "augment" in factors:
        variants.append(replace(base, augment=not base.augment))
    return [v for i, v in enumerate(variants) if v not in variants[:i]]


@functools.cache
def _repeated_batch_class():
    import keras

    class RepeatedBatch(keras.utils.PyDataset):
        """One fixed batch, over and over: the model's rate without the input's cost."""

        def __init__(self, batch):
            super().__init__()
            self.batch = batch

        @property
        def num_batches(self):
            return None  # Endless; fit takes steps_per_epoch of it.

        def __getitem__(self, index):
            return self.batch

    return RepeatedBatch


def _one_batch(config: TrialConfig, data: data_lib.CifarData, batch_size: int):
    from study.losses import target_table

    targets = target_table(config.loss, config.data.num_classes)
    index = np.arange(batch_size) % len(data.y_train)
    images = data.x_train[index]  # uint8, as the trial's pipeline hands them to the model
    return images, targets[data.y_train[index]]


@dataclass
class Prepared:
    """A variant's compiled, warmed-up model, and the steps that make one timed run."""

    variant: Variant
    model: object  # keras.Model
    dataset: object
    steps: int


def prepare_model(
    config: TrialConfig, data, variant: Variant, sizes: Sizes, policy: str, steps_per_epoch=100
):
    """Builds and compiles one variant on a fixed batch (the model alone, no input cost),
    warms it up, and picks the steps for about `run_seconds` a run. `steps_per_epoch` sets
    the learning-rate schedule's length, as in a trial of that many steps an epoch."""
    import keras

    from study import trainable

    keras.utils.set_random_seed(config.seed)
    # Layers take the precision policy in force when they are built.
    keras.mixed_precision.set_global_policy(policy if variant.mixed_precision else "float32")
    trial = with_values(config, model__augment=variant.augment)
    try:
        spe = variant.steps_per_execution
        model = trainable.compile_model(trial, steps_per_epoch, variant.jit_compile, spe)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    dataset = _repeated_batch_class()(_one_batch(trial, data, variant.batch_size))
    # The first epoch traces (and with XLA compiles); the second estimates the rate.
    clock = epoch_clock()
    model.fit(
        dataset, epochs=2, steps_per_epoch=2 * spe, callbacks=[clock], shuffle=False, verbose=0
    )
    estimate = 2 * spe * variant.batch_size / clock.durations[-1]
    steps = max(1, round(sizes.run_seconds * estimate / variant.batch_size / spe)) * spe
    return Prepared(variant, model, dataset, steps)


def time_run(prepared: Prepared) -> float:
    """Training images/s of one timed run."""
    clock = epoch_clock()
    prepared.model.fit(
        prepared.dataset,
        epochs=1,
        steps_per_epoch=prepared.steps,
        callbacks=[clock],
        shuffle=False,
        verbose=0,
    )
    return prepared.steps * prepared.variant.batch_size / clock.durations[0]


def section_model(config, data, sizes, devices: backend.Devices) -> dict:
    import keras

    keras.backend.clear_session()
    gpu, policy = devices.gpus > 0, backend.mixed_policy(devices.capability)
    variants = model_variants(config, gpu, sizes.model_factors, devices.backend)
    prepared, failed = [], {}
    for variant in variants:
        try:
            prepared.append(prepare_model(config, data, variant, sizes, policy))
        except Exception as error:  # One variant that cannot run (no XLA kernel) is a row.
            failed[variant] = f"{type(error).__name__}: {error}"[:200]
    # The timed runs take turns: a burst of load from other processes then slows every
    # variant a little rather than one of them a lot.
    runs = {item.variant: [] for item in prepared}
    for _ in range(sizes.runs):
        for item in prepared:
            runs[item.variant].append(time_run(item))
    rows = []
    for variant in variants:
        row = asdict(variant)
        if variant in failed:
            row["error"] = failed[variant]
        else:
            row |= {"images_per_second": statistics.median(runs[variant]), "runs": runs[variant]}
        rows.append(row)
    baseline = rows[0].get("images_per_second")
    for row in rows:
        row["vs_trial_default"] = ratio(row.get("images_per_second"), baseline)
    result = {"policy_mixed": policy, "rows": rows}
    if not gpu and not cpu_bf16():
        result["note"] = "this CPU has no native bfloat16 (avx512_bf16/amx): it is emulated"
    return result
