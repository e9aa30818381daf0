"""What TensorBoard, MLflow and Weights & Biases get from a run, and their settings.

Every run (a study's trial or a local run) gives each tool the same things: its per-epoch
metrics named as in epochs.csv, with the epoch as the step, and the config it trained
with, each key once and dotted (`optimizer.learning_rate`); a key that a search condition
left out is empty (an empty MLflow param, null in W&B, absent from TensorBoard's HParams).
TensorBoard event files are always written (tensorboardX, so on any Keras backend);
`--logger mlflow` and `--logger wandb` add the trackers, configured from the variables
those tools read and checked before anything starts. A study's trials reach them through
Ray's own callbacks (study/callbacks.py); a local run through `LocalTrackers`, here.
"""

import importlib.util
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from study.config import METRIC, ConfigError

LOGGERS = ("mlflow", "wandb")
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "viz"}
# The columns of TensorBoard's HParams table, beside the hyper-parameters.
HPARAMS_METRICS = (METRIC, "val_loss", "accuracy", "loss")
TRIAL_TAG = "ray_trial_id"  # Ties an MLflow run to its Tune trial, as in optuna.db.
WANDB_ONLINE = ("online", "shared", "run")


def scalars(metrics: dict) -> dict[str, float]:
    """An epoch's numeric metrics, without the epoch itself (the step)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "epoch"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def failed(status: str) -> bool:
    return status in ("diverged", "dead", "error")


@dataclass(frozen=True)
class Trackers:
    """The trackers a run logs to, and where: resolved from the environment up front."""

    names: tuple[str, ...] = ()
    folder: Path = Path(".")
    mlflow_uri: str = ""
    mlflow_experiment: str = ""
    wandb_project: str = ""
    wandb_group: str = ""
    wandb_mode: str = ""
    wandb_dir: str = ""

    def wandb_init(self) -> dict:
        """wandb.init's arguments (beside the run's id, name and config)."""
        return {
            "project": self.wandb_project,
            "group": self.wandb_group,
            "mode": self.wandb_mode,
            "dir": self.wandb_dir,
            "resume": "allow",  # A resumed trial goes on in the same run.
        }

    def lines(self, logdir=None) -> list[str]:
        """How to open the run in each tool, printed at its end (TensorBoard reads `logdir`,
        by default the run's folder)."""
        board = f"TensorBoard: tensorboard --logdir {logdir or self.folder}"
        if importlib.util.find_spec("tensorboard") is None:
            board += "  (TensorBoard itself comes with the viz extra: pip install -e '.[viz]')"
        lines = [board]
        if "mlflow" in self.names:
            lines.append(f"MLflow: mlflow ui --backend-store-uri {self.mlflow_uri}")
        if "wandb" in self.names and self.wandb_mode in WANDB_ONLINE:
            lines.append(f"W&B: project {self.wandb_project}, group {self.wandb_group}")
        elif "wandb" in self.names:
            offline = Path(self.wandb_dir) / "wandb"
            lines.append(f"W&B: offline runs in {offline}; upload: wandb sync {offline}/offline-*")
        return lines


def _import(package: str, logger: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ConfigError(
            f"--logger {logger}: {error}; install it with pip install -e '.[{EXTRAS[logger]}]'"
        ) from None


def _answers(url: str, timeout: float = 3.0) -> str | None:
    """None if something accepts a TCP connection at the URL's host and port; else why not."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def _check_mlflow(uri: str) -> None:
    import mlflow

    where = f"--logger mlflow: MLFLOW_TRACKING_URI={uri!r}"
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        if reason := _answers(uri):
            raise ConfigError(f"{where}: nothing answers there ({reason}); is the server up?")
    elif scheme != "databricks":
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        except Exception as error:
            raise ConfigError(f"{where}: {str(error).strip() or type(error).__name__}") from None


def _wandb_key(base_url: str) -> bool:
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(base_url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _check_wandb(mode: str) -> None:
    import wandb

    try:
        wandb.Settings(mode=mode)
    except Exception:
        allowed = "online, offline, disabled, shared, dryrun, run"
        raise ConfigError(f"--logger wandb: WANDB_MODE={mode!r}; allowed: {allowed}") from None
    if mode not in WANDB_ONLINE:
        return
    base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    hint = "or set WANDB_MODE=offline to keep the runs in the study folder (wandb sync later)"
    if not _wandb_key(base_url):
        raise ConfigError(
            f"--logger wandb: WANDB_MODE is {mode} but no W&B API key is set up "
            f"(`wandb login` or WANDB_API_KEY); {hint}"
        )
    if reason := _answers(base_url):
        raise ConfigError(f"--logger wandb: {base_url} does not answer ({reason}); {hint}")


def check_trackers(names, folder: Path, name: str, group: str | None = None) -> Trackers:
    """The trackers `names` (--logger, repeatable) for the run `name` whose folder is
    `folder`, from their environment variables; a missing package or a bad setting is a
    ConfigError, raised before anything starts or is written. By default the MLflow
    experiment and the W&B group are `group` (else `name`), the W&B project `name`."""
    group = group or name
    from study.console import quiet_libraries

    quiet_libraries()
    names = tuple(dict.fromkeys(names))
    settings = {"names": names, "folder": Path(folder)}
    if "mlflow" in names:
        _import("mlflow", "mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            _check_mlflow(uri)
        settings["mlflow_uri"] = uri or f"sqlite:///{Path(folder).resolve()}/mlflow.db"
        settings["mlflow_experiment"] = os.environ.get("MLFLOW_EXPERIMENT_NAME") or group
    if "wandb" in names:
        _import("wandb", "wandb")
        mode = os.environ.get("WANDB_MODE", "online")
        _check_wandb(mode)
        settings["wandb_mode"] = mode
        settings["wandb_project"] = os.environ.get("WANDB_PROJECT") or name
        settings["wandb_group"] = os.environ.get("WANDB_RUN_GROUP") or group
        settings["wandb_dir"] = os.environ.get("WANDB_DIR") or str(Path(folder).resolve())
    return Trackers(**settings)


# TensorBoard.


def hparams_summaries(hparams: dict):
    """The HParams plugin's summaries of one run: the experiment (which hyper-parameters
    and metrics there are), the session's start with its values; and a function that
    gives the session's end for a status."""
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    from tensorboardX.summary import hparams as summaries

    experiment, start, end = summaries(hparams, dict.fromkeys(HPARAMS_METRICS, 0.0))

    def ended(status: str):
        value = end.value[0]
        data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
        data.session_end_info.status = Status.Value(
            "STATUS_FAILURE" if failed(status) else "STATUS_SUCCESS"
        )
        value.metadata.plugin_data.content = data.SerializeToString()
        return end

    return experiment, start, ended


class TensorBoardRun:
    """One run's events file in `folder`: every epoch's metrics as scalars (the epoch as
    the step) and the run's hyper-parameters for TensorBoard's HParams dashboard. Each
    event is on disk once written: tensorboardX's SummaryWriter hands events to a thread
    that flushes every `flush_secs`, so a driver killed in between lost what it had logged
    (a resumed study does not log those epochs again)."""

    def __init__(self, folder: Path, hparams: dict):
        from tensorboardX.event_file_writer import EventsWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.writer = EventsWriter(str(folder / "events"))
        experiment, start, self.ended = hparams_summaries(hparams)
        self._write(experiment)
        self._write(start)

    def _write(self, summary, step: int = 0) -> None:
        import time

        from tensorboardX.proto.event_pb2 import Event

        self.writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()

    def epoch(self, metrics: dict) -> None:
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        values = [scalar(key, value).value[0] for key, value in scalars(metrics).items()]
        self._write(Summary(value=values), int(metrics["epoch"]))

    def close(self, status: str | None = None) -> None:
        """Ends the run with its status; without one (an interrupted study, which resumes)
        only closes the file."""
        if status is not None:
            self._write(self.ended(status))
        self.writer.close()


# MLflow.


def mlflow_params(params: dict) -> list:
    """MLflow params: every value as text, an empty one where a condition left a key out."""
    from mlflow.entities import Param

    return [Param(key, "" if value is None else str(value)) for key, value in params.items()]


def mlflow_metrics(metrics: dict) -> list:
    import time

    from mlflow.entities import Metric

    now, step = int(time.time() * 1000), int(metrics["epoch"])
    return [Metric(key, value, now, step) for key, value in scalars(metrics).items()]


def mlflow_experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


class MLflowRun:
    """A local run as an MLflow run."""

    def __init__(self, trackers: Trackers, name: str, params: dict):
        import mlflow

        self.client = mlflow.MlflowClient(trackers.mlflow_uri)
        experiment = mlflow_experiment(self.client, trackers.mlflow_experiment)
        self.run_id = self.client.create_run(experiment, run_name=name).info.run_id
        self.client.log_batch(self.run_id, params=mlflow_params(params))

    def epoch(self, metrics: dict) -> None:
        self.client.log_batch(self.run_id, metrics=mlflow_metrics(metrics))

    def close(self, status: str) -> None:
        self.client.set_tag(self.run_id, "status", status)
        self.client.set_terminated(self.run_id, "FAILED" if failed(status) else "FINISHED")


# Weights & Biases.


class WandbRun:
    """A local run as a W&B run."""

    def __init__(self, trackers: Trackers, name: str, params: dict):
        import wandb

        # Silent: the run's end names where its files are (Trackers.lines).
        settings = wandb.Settings(silent=True)
        self.run = wandb.init(name=name, config=params, settings=settings, **trackers.wandb_init())

    def epoch(self, metrics: dict) -> None:
        self.run.log({"epoch": int(metrics["epoch"]), **scalars(metrics)})

    def close(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=1 if failed(status) else 0)


class LocalTrackers:
    """A local run's TensorBoard events and trackers, fed by its sink (study/local.py)."""

    def __init__(self, trackers: Trackers, name: str, params: dict):
        self.runs = [TensorBoardRun(trackers.folder, params)]
        kinds = {"mlflow": MLflowRun, "wandb": WandbRun}
        self.runs += [kinds[kind](trackers, name, params) for kind in trackers.names]

    def epoch(self, metrics: dict) -> None:
        for run in self.runs:
            run.epoch(metrics)

    def close(self, status: str) -> None:
        for run in self.runs:
            try:
                run.close(status)
            except Exception as error:  # The run's own files are written; say, go on.
                print(f"warning: closing {type(run).__name__}: {error}", file=sys.stderr)
