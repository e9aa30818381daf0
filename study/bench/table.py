"""The benchmark's results as a table for the terminal."""

from study.bench.common import TARGETS


def _number(value, digits=0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _model_lines(section: dict) -> list[str]:
    lines = [
        "1. Model throughput (training images/s on a fixed batch, median of runs after a warm-up)",
        f"   {'precision':<15} {'jit':<4} {'batch':>6} {'steps/exec':>10} {'augment':>8} "
        f"{'images/s':>10} {'vs trial':>9}",
    ]
    for index, row in enumerate(section["rows"]):
        precision = section["policy_mixed"] if row["mixed_precision"] else "float32"
        rate = row.get("images_per_second")
        cells = (
            f"   {precision:<15} {'on' if row['jit_compile'] else 'off':<4} "
            f"{row['batch_size']:>6} {row['steps_per_execution']:>10} "
            f"{'on' if row['augment'] else 'off':>8} {_number(rate):>10} "
            f"{_number(row.get('vs_trial_default'), 2):>9}"
        )
        if index == 0:
            cells += "  <- the trial's settings"
        if "error" in row:
            cells += f"  failed: {row['error'][:60]}"
        lines.append(cells)
    if "note" in section:
        lines.append(f"   note: {section['note']}")
    return lines


def _pipeline_lines(section: dict) -> list[str]:
    verdict = "the bottleneck" if section["bottleneck"] else "not the bottleneck"
    if section["ratio_to_model"] is None:
        compared = "   (the model section, not run, would give the model's rate to compare)"
    else:
        compared = (
            f"   the model trains {_number(section['model_images_per_second'])}: ratio "
            f"{_number(section['ratio_to_model'], 1)} (the slower of the two), {verdict}"
        )
    lines = [
        "2. Input pipeline (the trial's training batches: NumPy gathers from memory)",
        f"   alone {_number(section['images_per_second'])} images/s over "
        f"{section['images']:,} images; through Keras's training loop (a trivial model) "
        f"{_number(section['keras_loop_images_per_second'])}",
        compared,
        f"   each epoch's first batch after {1000 * section['first_batch_seconds']:.1f} ms "
        "(the epoch's order drawn)",
    ]
    choice = section.get("augmentation")
    if choice:
        where = "overlapping the device" if choice["in_input_overlapped"] else "then the model"
        lines += [
            f"   augmentation in the model (FlipShift, compiled): "
            f"{_number(choice['in_model_images_per_second'])} images/s; in the input (NumPy "
            f"{_number(section['numpy_augment_images_per_second'])} images/s, {where}): "
            f"{_number(choice['in_input_images_per_second'])}; faster: {choice['faster']}",
        ]
    return lines


def _overhead_lines(section: dict) -> list[str]:
    every = section.get("checkpoint_every")
    cadence = (
        f"checkpoints by time (at most one per {section['checkpoint_seconds']:g} s)"
        if every == "auto"
        else f"a checkpoint every {every} epoch{'s' if every != 1 else ''}"
    )
    lines = [
        "3. Machinery overhead (steady-state training images/s per whole epoch cycle, "
        f"{section['images_per_epoch']:,} images an epoch, epoch 1 and the last left out; "
        f"{section['rounds']} rounds of the three ways in turn, Ray up throughout; {cadence})",
    ]
    names = {"bare": "bare model.fit", "local": "local mode", "tune": "one Tune trial"}
    for way, name in names.items():
        if way not in section:
            continue
        rate = section[way]["images_per_second"]
        cpu_rate = section[way].get("images_per_cpu_second")
        line = f"   {name:<16} {_number(rate):>6} images/s {_number(cpu_rate):>6} per CPU-s"
        key = f"{way}/bare"
        if key in section:
            met = "met" if section[f"{key} met"] else "NOT met"
            line += (
                f"   {key} {_number(section[key], 3)} (target >= {TARGETS[key]}: {met}); "
                f"per CPU-s {_number(section.get(f'{key} cpu'), 3)}; by round "
                + ", ".join(_number(value, 2) for value in section[f"{key} rounds"])
            )
        lines.append(line)
        if f"{key} accounted" in section:
            share = section[way]["machinery_share"]
            daemons = " and Ray's daemons" if way == "tune" else ""
            lines.append(
                f"   {'':<16} checkpoint and report took {100 * share:.1f}% of each cycle: "
                f"{key} {_number(section[f'{key} accounted'], 3)} by accounting "
                f"(its own time{daemons} taken off)"
            )
    if "ray_idle_cpu_share" in section:
        lines.append(
            f"   Ray's own processes took {100 * section['ray_idle_cpu_share']:.1f}% of one CPU "
            "beside the bare and local runs"
        )
    return lines


def _startup_lines(section: dict) -> list[str]:
    lines = ["4. Start-up"]
    for name, load in section.get("load", {}).items():
        lines.append(
            f"   load {name:<5} tarball: {load['images']:>7,} images, "
            f"{load['megabytes']:6.1f} MB, {load['seconds']:6.2f} s "
            f"({load['microseconds_per_image']:.1f} us/image)"
        )
    for name, trial in section.get("trial", {}).items():
        lines.append(
            f"   trial {name:<5} data ({trial['train_images']:,} training images): launch to "
            f"first step {trial['launch_to_first_step_seconds']:.1f} s = launch to trial "
            f"{trial['launch_to_trial_seconds']:.1f} s + trial to first step "
            f"{trial['trial_to_first_step_seconds']:.1f} s; first step "
            f"{trial['first_step_seconds']:.1f} s; object-store put {trial['put_seconds']:.2f} s"
        )
    scaling = section.get("scaling", {})
    if "load_time_ratio" in scaling:
        lines.append(
            f"   full / small: data x{scaling['data_size_ratio']:.1f}, load time "
            f"x{scaling['load_time_ratio']:.1f}"
            + (
                f", trial start x{scaling['trial_start_ratio']:.2f}"
                if "trial_start_ratio" in scaling
                else ""
            )
        )
    return lines


def _packing_lines(section: dict) -> list[str]:
    if "skipped" in section:
        return [f"5. GPU packing: skipped ({section['skipped']})"]
    lines = ["5. GPU packing (aggregate training images/s of trials sharing one GPU)"]
    for row in section["rows"]:
        per_trial = ", ".join(_number(rate) for rate in row["per_trial_images_per_second"])
        lines.append(
            f"   {row['trials_per_gpu']} per GPU: {_number(row['images_per_second'])} images/s "
            f"({per_trial})"
        )
    return lines


def format_table(results: dict) -> str:
    machine = results["machine"]
    gpus = ", ".join(machine["gpu_names"]) if machine["gpus"] else "no GPU"
    model = results["config"]["model"]
    name = machine["backend"]
    threads = (
        f"; TensorFlow threads {machine['intra_op_threads'] or 'default'} intra-op, "
        f"{machine['inter_op_threads'] or 'default'} inter-op"
        if "intra_op_threads" in machine
        else ""
    )
    lines = [
        f"study.bench on {machine['cpus']} CPUs, {gpus} (Keras {machine['keras']} on "
        f"{name} {machine[name]})",
        f"model width {model['width']:g} ({results['width_note']}), "
        f"batch {results['config']['training']['batch_size']}{threads}",
    ]
    load = results.get("load_average")
    if load:
        lines.append(
            f"load average {load['min']:.1f} to {load['max']:.1f} over the run"
            + (
                f": above the {load['cpus']} CPUs, other processes ran beside it; noisy figures"
                if load["max"] > load["cpus"]
                else ""
            )
        )
    printers = {
        "model": _model_lines,
        "pipeline": _pipeline_lines,
        "overhead": _overhead_lines,
        "startup": _startup_lines,
        "packing": _packing_lines,
    }
    for name, printer in printers.items():
        if name in results:
            lines += ["", *printer(results[name])]
    if "gpu_targets" in results:
        targets = results["gpu_targets"]
        lines.append("")
        if "skipped" in targets:
            lines.append(f"GPU targets: {targets['skipped']}")
        else:
            lines.append(
                f"GPU targets: one trial {_number(targets['one_trial_images_per_second'])} "
                f"(>= {targets['one_trial_target']:,}: {targets['one_trial_met']}), packed "
                f"{_number(targets['packed_images_per_second'])} "
                f"(>= {targets['packed_target']:,}: {targets['packed_met']})"
            )
    return "\n".join(lines)
