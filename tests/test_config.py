"""The trial config: defaults, files, overrides, and one-line errors for bad input."""

import pytest
import yaml

from study.config import ConfigError, TrialConfig, flatten, load_config, validate
from study.search_config import SearchConfig, load_study

from .conftest import REPO, run_cli

CONFIGS = REPO / "configs"


def test_default_yaml_is_the_code_defaults():
    assert load_study(CONFIGS / "default.yaml").trial == TrialConfig()
    raw = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    search = raw.pop("search")
    assert raw == TrialConfig().to_dict()
    # The study settings too (the space and baseline are the file's own): one set of
    # defaults, said in both places alike.
    settings = {k: v for k, v in search.items() if k not in ("space", "baseline")}
    defaults = {
        name: field.default
        for name, field in SearchConfig.model_fields.items()
        if name not in ("space", "baseline")
    }
    assert settings == defaults


def test_seed_config_is_the_notebook():
    config = load_study(CONFIGS / "seed.yaml").trial
    assert config.model.width == 1.0 and not config.model.batch_norm and not config.model.augment
    assert (config.optimizer.name, config.optimizer.learning_rate) == ("rmsprop", 1e-4)
    assert (config.optimizer.schedule, config.optimizer.decay) == ("inverse_time", 1e-6)
    assert config.training.batch_size == 64
    assert config.loss.head == "softmax"
    assert config.data.validation == "test"
    # As a study: a grid over the notebook's three losses, every run to the end.
    search = load_study(CONFIGS / "seed.yaml").search
    assert (search.searcher, search.scheduler, search.trial_count) == ("grid", "fifo", 3)
    assert set(search.space["loss.name"].choice) == {
        "categorical_crossentropy",
        "mean_squared_logarithmic_error",
        "hinge",
    }


def test_smoke_config_is_small():
    config = load_study(CONFIGS / "smoke.yaml").trial
    assert config.model.width < 0.5 and config.training.epochs <= 2
    assert config.data.train_subset <= 1000


def test_overrides_are_typed_by_yaml():
    config = load_config(
        None,
        [
            "optimizer.learning_rate=0.01",
            "model.batch_norm=true",
            "training.epochs=3",
            "data.validation_size=500",
        ],
    )
    assert config.optimizer.learning_rate == 0.01
    assert config.model.batch_norm is True
    assert config.training.epochs == 3
    assert config.data.validation_size == 500 and isinstance(config.data.validation_size, int)


def test_resolved_config_round_trips():
    config = load_study(CONFIGS / "seed.yaml", ["loss.name=hinge"]).trial
    assert validate(config.to_dict()) == config


BAD_OVERRIDES = [
    ("model.width=0", "model.width"),
    ("model.width=-1", "model.width"),
    ("model.conv_dropout=1.0", "model.conv_dropout"),
    ("model.dense_dropout=-0.1", "model.dense_dropout"),
    ("training.epochs=0", "training.epochs"),
    ("training.batch_size=0", "training.batch_size"),
    ("training.epochs=abc", "training.epochs"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate"),
    ("loss.name=cross_entropy", "unknown loss 'cross_entropy'; allowed: categorical_crossentropy"),
    ("optimizer.name=adagrad", "unknown optimizer 'adagrad'; allowed: rmsprop, adam, adamw, sgd"),
    ("optimizer.schedule=step", "unknown schedule 'step'"),
    ("data.dataset=imagenet", "unknown dataset 'imagenet'; allowed: cifar100, cifar10"),
    ("model.activation=swish2", "unknown activation"),
    ("model.depth=3", "unknown key 'model.depth'; allowed keys in 'model': width"),
    ("trainer.epochs=3", "unknown key 'trainer'"),
    ("data.validation_size=1.5", "data.validation_size"),
    ("data.validation=val", "data.validation"),
    ("optimizer.warmup_epochs=40", "optimizer.warmup_epochs"),
    ("training.steps_per_execution=0", "training.steps_per_execution"),
    ("training.steps_per_execution=fast", "training.steps_per_execution"),
    (
        "training.checkpoint_every=often",
        "training.checkpoint_every: must be auto or a whole number of epochs >= 1 (got 'often')",
    ),
    ("training.checkpoint_every=0", "training.checkpoint_every: must be auto or a whole number"),
    ("training.checkpoint_every=1.5", "training.checkpoint_every: must be auto or a whole number"),
    ("training.checkpoint_every=true", "training.checkpoint_every: must be auto or a whole number"),
    (
        "training.checkpoint_seconds=0",
        "training.checkpoint_seconds: Input should be greater than 0",
    ),
]


@pytest.mark.parametrize(("override", "expected"), BAD_OVERRIDES)
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_auto_training_settings_follow_the_device():
    auto = load_config(None, []).training
    assert auto.resolve(gpu=True) == {
        "mixed_precision": True,
        "jit_compile": True,
        "steps_per_execution": 16,
    }
    assert auto.resolve(gpu=False) == {
        "mixed_precision": False,
        "jit_compile": False,
        "steps_per_execution": 1,
    }
    # Uncompiled JAX runs op by op: it compiles on CPU too.
    assert auto.resolve(gpu=False, backend="jax")["jit_compile"] is True
    chosen = load_config(
        None, ["training.mixed_precision=false", "training.steps_per_execution=4"]
    ).training
    assert chosen.resolve(gpu=True) == {
        "mixed_precision": False,
        "jit_compile": True,
        "steps_per_execution": 4,
    }


def test_checkpoint_cadence_by_time_by_default_or_by_epochs():
    training = load_config(None, []).training
    assert (training.checkpoint_every, training.checkpoint_seconds) == ("auto", 60.0)
    assert load_config(None, ["training.checkpoint_every=3"]).training.checkpoint_every == 3
    # A whole number read back from a CSV as a float is still a number of epochs.
    assert validate({"training": {"checkpoint_every": 2.0}}).training.checkpoint_every == 2


def test_label_smoothing_only_where_defined():
    load_config(None, ["loss.name=focal", "loss.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="label_smoothing > 0 is not defined for loss 'hinge'"):
        load_config(None, ["loss.name=hinge", "loss.label_smoothing=0.1"])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "model.width=0"], "error: model.width: Input should be greater than 0"),
        (["--set", "loss.name=nope"], "error: loss.name: unknown loss 'nope'"),
        (["--set", "model.nope=1"], "error: unknown key 'model.nope'"),
        (["--set", "noequals"], "error: --set 'noequals': expected section.key=value"),
        (["--config", "missing.yaml"], "error: --config: cannot read missing.yaml"),
        (["--data-dir", "/nonexistent/cifar"], "error: --data-dir: /nonexistent/cifar does not"),
    ],
)
def test_command_line_errors_exit_2_with_one_line(args, expected):
    result = run_cli("study.run", "--local", *args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_existing_run_folder_is_never_overwritten(tmp_path, cifar100_tarball):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "result.json").write_text("precious")
    result = run_cli(
        "study.run",
        "--local",
        "--config",
        str(CONFIGS / "smoke.yaml"),
        "--data-dir",
        str(cifar100_tarball),
        "--storage-path",
        str(tmp_path),
        "--name",
        "taken",
    )
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert (run_dir / "result.json").read_text() == "precious"


@pytest.mark.parametrize(
    "path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("ray-cluster"))
)
def test_every_shipped_config_loads(path):
    """Every shipped config loads (its search space checked too), and each trial value the
    file sets is the value the study runs with: none silently dropped or replaced."""
    study = load_study(path)
    raw = yaml.safe_load(path.read_text())
    raw.pop("search", None)
    loaded = flatten(study.trial.to_dict())
    for key, value in flatten(raw).items():
        assert loaded[key] == value, key


def test_help_speaks_to_users_and_its_commands_parse():
    """`--help` says what the tool answers and shows the everyday commands; each of them
    is a valid command line (parsed here, nothing run)."""
    from study import run

    result = run_cli("study.run", "--help")
    assert result.returncode == 0
    assert "Which loss, optimizer and regularisation" in result.stdout
    commands = [line.split("  ")[1] for line in run.HELP.splitlines() if "python -m" in line]
    assert len(commands) == 5
    for command in commands:
        run.parse_args(command.split()[3:])  # Exits 2 on an unknown option or value.


def test_a_study_folder_that_named_its_metric_still_loads(tmp_path):
    """Study folders once wrote `search.metric: val_accuracy` (a setting with one allowed
    value, now gone: every study ranks by val_accuracy); --resume and --confirm read them."""
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw["search"]["metric"] = "val_accuracy"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_study(path) == load_study(REPO / "configs" / "smoke.yaml")
    raw["search"]["metric"] = "val_loss"  # Never a loss: the key is refused, by name.
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match="unknown key 'search.metric'"):
        load_study(path)
