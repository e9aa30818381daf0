"""The best trial's model, from its checkpoint: per-class accuracy and its mistakes.

Loads `model.keras` (Keras safe mode) and evaluates it on the validation split the search
ranked by, never retraining. The test set is left to the confirmation phase.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import AnalysisError
from study import data as data_lib
from study.config import from_params


def load_splits(config: dict, data_dir: str | None = None) -> data_lib.Splits:
    """The trial's data splits, from --data-dir or the study's own data settings."""
    trial = from_params(config)  # Dotted keys, as analysis.results.trial_config gives them.
    directory = data_dir or trial.data.data_dir
    data = data_lib.load_cifar(trial.data.dataset, directory, trial.data.label_mode)
    return data_lib.split(data, trial.data, seed=trial.data.split_seed)


def predict(model_path: Path, images: np.ndarray, batch_size=512) -> np.ndarray:
    import keras

    import study.model  # noqa: F401  Registers the model's own augmentation layer for loading.

    try:
        model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    except ValueError as error:  # Safe mode refuses a checkpoint that carries code.
        reason = " ".join(str(error).split())
        raise AnalysisError(f"{model_path}: not loaded: {reason}") from None
    return model.predict(model_input(model, images), batch_size=batch_size, verbose=0).argmax(1)


def model_input(model, images: np.ndarray) -> np.ndarray:
    """uint8 images as they are; models saved before the model scaled its own input took
    float images in [0, 1]."""
    if model.inputs[0].dtype == "uint8":
        return images
    return images.astype("float32") / 255.0


def per_class_accuracy(labels, predictions, class_names) -> pd.DataFrame:
    frame = pd.DataFrame({"label": labels, "correct": labels == predictions})
    table = frame.groupby("label").correct.agg(["mean", "size"]).reset_index()
    table["class"] = [class_names[i] for i in table.label]
    table = table.rename(columns={"mean": "accuracy", "size": "images"})
    return table[["class", "accuracy", "images"]].sort_values("accuracy", ascending=False)


def mistakes_figure(images, labels, predictions, class_names, out: Path, count=24) -> Path:
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(labels != predictions)[:count]
    columns = 8
    rows = max(1, -(-len(wrong) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong, strict=False):
        axis.imshow(images[index])
        axis.set_title(
            f"true: {class_names[labels[index]]}\npred: {class_names[predictions[index]]}",
            fontsize=8,
        )
    figure.suptitle(f"Misclassified validation images ({len(wrong)} shown), best trial")
    path = out / "mistakes.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
