"""Calibration of a classifier's outputs: ECE, NLL, Brier score and temperature scaling."""

import numpy as np

N_BINS = 15
HEADS = ("softmax", "linear")
# The smallest normal float64: a probability of 0 becomes a large but finite log (-708).
TINY = np.finfo(np.float64).tiny
# The temperatures fit_temperature searches; symmetric in log T, so its first guess is T = 1.
TEMPERATURE_RANGE = (0.05, 20.0)
# 40 halvings of log(400) leave an interval ~5e-12 wide in log T, far finer than needed.
SEARCH_STEPS = 40
# A softmax head in float32 sums to 1 within ~1e-6; raw scores passed by mistake do not.
ROW_SUM_TOLERANCE = 1e-3


def _matrix(values, name: str) -> np.ndarray:
    """`values` as a finite, non-empty float64 array of shape (images, classes)."""
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must have shape (images, classes), both > 0; got {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} must be finite; found NaN or infinity")
    return matrix


def _labels(labels, matrix: np.ndarray, name: str) -> np.ndarray:
    """`labels` as a 1-D integer array with one class index in range per row of `matrix`."""
    labels = np.asarray(labels)
    images, classes = matrix.shape
    if labels.shape != (images,):
        raise ValueError(f"labels must have shape ({images},) to match {name}; got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (class indices); got dtype {labels.dtype}")
    outside = labels[(labels < 0) | (labels >= classes)]
    if outside.size:
        raise ValueError(f"labels must lie in [0, {classes}); found {outside[0]}")
    return labels


def _probability_matrix(probabilities) -> np.ndarray:
    """`probabilities` checked to be rows of probabilities, not scores passed by mistake."""
    matrix = _matrix(probabilities, "probabilities")
    if matrix.min() < 0 or matrix.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]; pass scores through probabilities()")
    if np.max(np.abs(matrix.sum(axis=1) - 1)) > ROW_SUM_TOLERANCE:
        raise ValueError("each row of probabilities must sum to 1")
    return matrix


def _positive(value, name: str) -> float:
    """`value` as a finite float > 0."""
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return value


def scores_from_outputs(outputs, head: str) -> np.ndarray:
    """The model's outputs as scores whose softmax (at temperature 1) gives its probabilities.

    A "softmax" head outputs probabilities p, whose scores are log(max(p, TINY)); a "linear"
    head (the hinge and squared losses) outputs raw class scores, returned as float64.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    outputs = _matrix(outputs, "outputs")
    return np.log(np.maximum(outputs, TINY)) if head == "softmax" else outputs


def probabilities(scores, temperature: float = 1.0) -> np.ndarray:
    """The softmax of scores / temperature, row by row; each row sums to 1."""
    scaled = _matrix(scores, "scores") / _positive(temperature, "temperature")
    # Subtracting each row's maximum keeps exp() from overflowing; the softmax is unchanged.
    exponentials = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def _bin_sums(probabilities, labels, bins: int):
    """Per confidence bin: the count of images, how many are correct, their summed confidence."""
    if not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins!r}")
    matrix = _probability_matrix(probabilities)
    labels = _labels(labels, matrix, "probabilities")
    confidence = matrix.max(axis=1)
    correct = matrix.argmax(axis=1) == labels
    # Edges as b / bins (not cumulative steps), so that a confidence equal to the rational
    # b / bins, rounded the same way, meets its edge exactly and falls in the lower bin.
    inner_edges = np.arange(1, bins) / bins
    index = np.digitize(confidence, inner_edges, right=True)
    count = np.bincount(index, minlength=bins)
    hits = np.bincount(index, weights=correct, minlength=bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    return count, hits, confidence_sum


def expected_calibration_error(probabilities, labels, bins: int = N_BINS) -> float:
    """The expected calibration error over `bins` equal-width confidence bins.

    An image's confidence is its largest probability; it is correct when that class (the
    first, on a tie) is its label. Bin b holds the confidences in (b / bins, (b + 1) / bins],
    and the first bin also holds 0. With n_b images in bin b out of N,

        ECE = sum over b of (n_b / N) * |accuracy_b - mean confidence_b|,

    where accuracy_b is the fraction of bin b's images that are correct; empty bins add 0.
    """
    count, hits, confidence_sum = _bin_sums(probabilities, labels, bins)
    # Per bin, n_b * |accuracy_b - confidence_b| = |hits_b - confidence_sum_b|.
    return float(np.abs(hits - confidence_sum).sum() / count.sum())


def negative_log_likelihood(probabilities, labels) -> float:
    """The mean over images of -log p_label, with p clipped at TINY so that it stays finite."""
    matrix = _probability_matrix(probabilities)
    labels = _labels(labels, matrix, "probabilities")
    label_probability = matrix[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(label_probability, TINY)).mean())


def brier_score(probabilities, labels) -> float:
    """The multi-class Brier score, in [0, 2]: the mean over images of the sum over classes
    of (p_k - onehot_k)^2, where onehot_k is 1 for the label's class and 0 elsewhere."""
    matrix = _probability_matrix(probabilities)
    labels = _labels(labels, matrix, "probabilities")
    one_hot = np.eye(matrix.shape[1])[labels]
    return float(((matrix - one_hot) ** 2).sum(axis=1).mean())


def _nll_slope(scores: np.ndarray, labels: np.ndarray, inverse_temperature: float) -> float:
    """d NLL / d beta of softmax(beta * scores): the mean over images of
    sum_k p_k * (score_k - score_label)."""
    # Differences from the label's score, not E_p[score] - score_label: where p is nearly
    # one-hot the latter cancels to exactly 0 and would hide the direction of the minimum.
    margins = scores - scores[np.arange(len(labels)), labels][:, None]
    weights = probabilities(scores * inverse_temperature)
    return float((weights * margins).sum(axis=1).mean())


def fit_temperature(scores, labels) -> float:
    """The temperature T in TEMPERATURE_RANGE that minimises the NLL of
    probabilities(scores, T) on these images; the nearer bound if the minimum lies outside.

    The NLL is convex in beta = 1 / T, so its slope in beta rises with beta and a bisection
    on log beta over the range finds the minimum deterministically, to ~1e-11 relative.
    Where each row's scores are all equal every T fits equally, and the answer is T = 1.
    """
    scores = _matrix(scores, "scores")
    labels = _labels(labels, scores, "scores")
    if np.all(scores.max(axis=1) == scores.min(axis=1)):
        return 1.0
    shortest, longest = TEMPERATURE_RANGE
    lower, upper = np.log(1 / longest), np.log(1 / shortest)  # log beta
    for _ in range(SEARCH_STEPS):
        middle = (lower + upper) / 2
        # A positive slope means the NLL falls towards smaller beta, i.e. higher T. A slope
        # that underflows to 0 comes from rows that are right with certainty: go sharper.
        if _nll_slope(scores, labels, np.exp(middle)) > 0:
            upper = middle
        else:
            lower = middle
    return float(np.exp(-(lower + upper) / 2))


def reliability(probabilities, labels, bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per confidence bin, as in expected_calibration_error, for a reliability diagram:
    `lower` and `upper` edges, `count` of images, and their `accuracy` and mean `confidence`
    (NaN where a bin is empty)."""
    count, hits, confidence_sum = _bin_sums(probabilities, labels, bins)
    occupied = count > 0
    accuracy = np.full(bins, np.nan)
    mean_confidence = np.full(bins, np.nan)
    accuracy[occupied] = hits[occupied] / count[occupied]
    mean_confidence[occupied] = confidence_sum[occupied] / count[occupied]
    return {
        "lower": np.arange(bins) / bins,
        "upper": np.arange(1, bins + 1) / bins,
        "count": count,
        "accuracy": accuracy,
        "confidence": mean_confidence,
    }


# The figures that calibration records, at temperature 1 and (with "_scaled") after scaling.
FIGURES = {
    "ece": expected_calibration_error,
    "nll": negative_log_likelihood,
    "brier": brier_score,
}


def _figures(probability_matrix: np.ndarray, labels, suffix: str = "") -> dict[str, float]:
    """Each of FIGURES for these probabilities, under its name followed by `suffix`."""
    return {name + suffix: figure(probability_matrix, labels) for name, figure in FIGURES.items()}


def calibration(
    test_scores, test_labels, validation_scores=None, validation_labels=None
) -> dict[str, float | None]:
    """The calibration figures of one run: `ece`, `nll` and `brier` on the test images at
    temperature 1; `temperature` fitted on the validation images alone, and `ece_scaled`,
    `nll_scaled` and `brier_scaled` on the test images at that temperature. The scaled
    four are None without validation images: fitting on the test images would flatter them.
    """
    if (validation_scores is None) != (validation_labels is None):
        raise ValueError("give validation_scores and validation_labels together, or neither")
    figures = _figures(probabilities(test_scores), test_labels)
    if validation_scores is None:
        return figures | {"temperature": None} | {name + "_scaled": None for name in FIGURES}
    temperature = fit_temperature(validation_scores, validation_labels)
    # One temperature fits any number of classes, so a mismatch would pass unnoticed.
    if np.shape(validation_scores)[1] != np.shape(test_scores)[1]:
        raise ValueError(
            f"validation_scores have {np.shape(validation_scores)[1]} classes, "
            f"test_scores {np.shape(test_scores)[1]}; they must agree"
        )
    scaled = _figures(probabilities(test_scores, temperature), test_labels, "_scaled")
    return figures | {"temperature": temperature} | scaled


# The calibration figures of a confirmation run, as confirm.csv holds them (test set).
RUN_FIGURES = (
    "test_ece", "test_nll", "test_brier", "temperature",
    "test_ece_scaled", "test_nll_scaled", "test_brier_scaled",
)  # fmt: skip
RELIABILITY = "reliability"  # One run's reliability bins, as JSON.


def run_figures(test_scores, test_labels, validation_scores=None, validation_labels=None):
    """`calibration`'s figures under confirm.csv's names (test_ece, ..., temperature), and
    the run's reliability bins on the test images at temperature 1 as JSON (counts,
    correct counts and summed confidences, which add up over seeds)."""
    import json

    figures = calibration(test_scores, test_labels, validation_scores, validation_labels)
    named = {
        name if name == "temperature" else f"test_{name}": value for name, value in figures.items()
    }
    probability_matrix = probabilities(test_scores)
    bins = reliability(probability_matrix, test_labels)
    counts = bins["count"].astype(int)
    summed = {
        "count": counts.tolist(),
        "correct": np.round(np.nan_to_num(bins["accuracy"]) * counts).astype(int).tolist(),
        "confidence": (np.nan_to_num(bins["confidence"]) * counts).round(6).tolist(),
    }
    return named | {RELIABILITY: json.dumps(summed)}
