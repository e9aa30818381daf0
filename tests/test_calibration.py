"""Calibration figures against plain reference computations on hand-made predictions."""

import math

import numpy as np
import pytest

from study.calibration import (
    brier_score,
    calibration,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    probabilities,
    reliability,
    scores_from_outputs,
)

BINS = 15
DRAWN_TEMPERATURE = 2.5


def _plain_softmax(scores, temperature=1.0):
    exponentials = np.exp(scores / temperature - (scores / temperature).max(axis=1)[:, None])
    return exponentials / exponentials.sum(axis=1)[:, None]


def _plain_nll(scores, labels, temperature):
    rows = _plain_softmax(scores, temperature)
    return -np.mean([math.log(rows[image, label]) for image, label in enumerate(labels)])


@pytest.fixture(scope="module")
def drawn():
    """20,000 images whose labels were drawn from softmax(scores / 2.5): the scores at
    temperature 1 are over-confident, and 2.5 is the temperature that calibrates them."""
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 4, size=(20_000, 10))
    cumulative = _plain_softmax(scores, DRAWN_TEMPERATURE).cumsum(axis=1)
    # Inverse-CDF sampling; the minimum guards a cumulative sum that rounds below 1.
    labels = np.minimum((rng.random((20_000, 1)) > cumulative).sum(axis=1), 9)
    return scores, labels


def test_a_perfectly_calibrated_model_has_zero_ece():
    """In each bin, 30 images at the bin's centre confidence c = (2b + 1) / 30, of which
    exactly 2b + 1 (a fraction c) are correct."""
    classes, group = 40, 30
    rows, labels = [], []
    for bin_index in range(BINS):
        confidence = (2 * bin_index + 1) / group
        row = np.full(classes, (1 - confidence) / (classes - 1))
        row[bin_index] = confidence
        assert row.argmax() == bin_index
        rows += [row] * group
        correct = 2 * bin_index + 1
        labels += [bin_index] * correct + [bin_index + 1] * (group - correct)
    rows, labels = np.array(rows), np.array(labels)

    assert expected_calibration_error(rows, labels) == pytest.approx(0, abs=1e-12)
    bins = reliability(rows, labels)
    np.testing.assert_array_equal(bins["count"], [group] * BINS)
    np.testing.assert_allclose(bins["accuracy"], bins["confidence"], rtol=0, atol=1e-12)


def test_an_over_confident_model_against_hand_computed_figures():
    """Ten images at confidence 0.9 of which six are right: ECE |0.6 - 0.9| = 0.3."""
    rows = np.array([[0.9, 0.05, 0.05]] * 10)
    labels = np.array([0] * 6 + [1] * 4)

    assert expected_calibration_error(rows, labels) == pytest.approx(0.3, abs=1e-12)
    nll = (6 * -math.log(0.9) + 4 * -math.log(0.05)) / 10
    assert negative_log_likelihood(rows, labels) == pytest.approx(nll, rel=1e-12)
    # Right: 0.1^2 + 0.05^2 + 0.05^2 = 0.015; wrong: 0.9^2 + 0.95^2 + 0.05^2 = 1.715.
    assert brier_score(rows, labels) == pytest.approx((6 * 0.015 + 4 * 1.715) / 10, rel=1e-12)
    figures = calibration(scores_from_outputs(rows, "softmax"), labels)
    assert figures["ece"] == pytest.approx(0.3, abs=1e-12)
    assert figures["nll"] == pytest.approx(nll, rel=1e-12)


def test_figures_on_random_predictions_match_plain_loops():
    rng = np.random.default_rng(1)
    rows = _plain_softmax(rng.normal(0, 3, size=(500, 7)))
    labels = rng.integers(0, 7, size=500)

    ece, counts = 0.0, []
    for bin_index in range(BINS):
        lower, upper = bin_index / BINS, (bin_index + 1) / BINS
        members = [
            image
            for image in range(500)
            if lower < rows[image].max() <= upper or (bin_index == 0 and rows[image].max() == 0)
        ]
        counts.append(len(members))
        if members:
            accuracy = np.mean([rows[image].argmax() == labels[image] for image in members])
            confidence = np.mean([rows[image].max() for image in members])
            ece += len(members) / 500 * abs(accuracy - confidence)
    nll = np.mean([-math.log(rows[image, labels[image]]) for image in range(500)])
    brier = np.mean(
        [
            sum((rows[image, k] - (k == labels[image])) ** 2 for k in range(7))
            for image in range(500)
        ]
    )

    assert expected_calibration_error(rows, labels) == pytest.approx(ece, rel=1e-12)
    assert negative_log_likelihood(rows, labels) == pytest.approx(nll, rel=1e-12)
    assert brier_score(rows, labels) == pytest.approx(brier, rel=1e-12)
    np.testing.assert_array_equal(reliability(rows, labels)["count"], counts)


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    """1/3 = 5/15 is the upper edge of bin 4; 1 that of bin 14; 0.5 lies inside bin 7."""
    rows = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    labels = np.array([0, 0, 2])
    bins = reliability(rows, labels)

    assert np.flatnonzero(bins["count"]).tolist() == [4, 7, 14]
    assert bins["lower"][4] == 4 / 15 and bins["upper"][4] == 5 / 15
    assert bins["accuracy"][7] == 0 and bins["confidence"][7] == 0.5
    assert np.isnan(bins["accuracy"][0]) and np.isnan(bins["confidence"][0])


def test_fit_temperature_recovers_the_temperature_that_drew_the_labels(drawn):
    scores, labels = drawn
    temperature = fit_temperature(scores, labels)

    assert temperature == pytest.approx(DRAWN_TEMPERATURE, rel=0.03)
    # A minimum of the NLL, computed plainly, to well within 1e-3 relative.
    fitted = _plain_nll(scores, labels, temperature)
    assert fitted < _plain_nll(scores, labels, temperature * 0.999)
    assert fitted < _plain_nll(scores, labels, temperature * 1.001)


def test_temperature_fitted_on_validation_images_lowers_the_test_ece(drawn):
    scores, labels = drawn
    figures = calibration(scores[10_000:], labels[10_000:], scores[:10_000], labels[:10_000])

    assert figures["temperature"] == pytest.approx(DRAWN_TEMPERATURE, rel=0.05)
    assert figures["ece"] > 0.2
    assert figures["ece_scaled"] < figures["ece"] / 5
    assert figures["nll_scaled"] < figures["nll"]
    assert figures["brier_scaled"] < figures["brier"]


def test_fit_temperature_stops_at_a_bound_or_at_one_where_any_temperature_fits():
    # Every image right by a wide margin: the sharper the better, down to the lowest bound.
    separated = np.eye(4)[[0, 1, 2, 3]] * 10
    assert fit_temperature(separated, np.array([0, 1, 2, 3])) == pytest.approx(0.05)
    # Every image wrong with confidence: the flatter the better, up to the highest bound.
    assert fit_temperature(separated, np.array([1, 2, 3, 0])) == pytest.approx(20)
    # A float32 softmax head that is right and certain: its other probabilities are 0.
    certain = scores_from_outputs(np.eye(3, dtype=np.float32), "softmax")
    assert fit_temperature(certain, np.array([0, 1, 2])) == pytest.approx(0.05)
    assert fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 0])) == 1.0


def test_softmax_outputs_round_trip_through_scores():
    rows = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    scores = scores_from_outputs(rows, "softmax")

    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(probabilities(scores), rows.astype(np.float64), rtol=0, atol=1e-7)
    raw = np.array([[3.0, -1.0], [0.5, 0.25]], dtype=np.float32)
    linear = scores_from_outputs(raw, "linear")
    assert linear.dtype == np.float64
    np.testing.assert_array_equal(linear, raw)


def test_probabilities_is_a_stable_softmax():
    rng = np.random.default_rng(2)
    scores = rng.normal(0, 5, size=(50, 6))
    expected = np.exp(scores / 2) / np.exp(scores / 2).sum(axis=1, keepdims=True)

    np.testing.assert_allclose(probabilities(scores, 2.0), expected, rtol=1e-12)
    extreme = probabilities(np.array([[1000.0, 0.0, -1000.0]]))
    np.testing.assert_array_equal(extreme, [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(probabilities(scores).sum(axis=1), 1, rtol=1e-12)


def test_calibration_without_validation_images_leaves_the_scaled_figures_none():
    rows = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    figures = calibration(scores_from_outputs(rows, "softmax"), np.array([0, 1, 1]))

    assert set(figures) == {
        "ece", "nll", "brier", "temperature", "ece_scaled", "nll_scaled", "brier_scaled",
    }  # fmt: skip
    assert all(isinstance(figures[key], float) for key in ("ece", "nll", "brier"))
    assert all(
        figures[key] is None for key in ("temperature", "ece_scaled", "nll_scaled", "brier_scaled")
    )


ROWS = np.array([[0.9, 0.1], [0.3, 0.7]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: scores_from_outputs(ROWS, "sigmoid"), "unknown head 'sigmoid'"),
        (lambda: expected_calibration_error(ROWS, np.array([0, 1, 1])), r"shape \(2,\)"),
        (lambda: negative_log_likelihood(ROWS, np.array([0, 2])), r"\[0, 2\); found 2"),
        (lambda: brier_score(ROWS, np.array([-1, 0])), "found -1"),
        (lambda: brier_score(ROWS, np.array([0.0, 1.0])), "integers"),
        (lambda: expected_calibration_error(np.zeros((0, 2)), np.array([], int)), "both > 0"),
        (lambda: probabilities(np.array([1.0, 2.0])), r"\(images, classes\)"),
        (lambda: probabilities(ROWS, temperature=0), "temperature must be"),
        (lambda: fit_temperature(np.array([[np.nan, 0.0]]), np.array([0])), "finite"),
        (lambda: negative_log_likelihood(np.array([[2.0, -1.0]]), np.array([0])), r"\[0, 1\]"),
        (lambda: brier_score(np.array([[0.5, 0.1]]), np.array([0])), "sum to 1"),
        (lambda: reliability(ROWS, np.array([0, 1]), bins=0), "bins"),
        (lambda: calibration(ROWS, np.array([0, 1]), validation_scores=ROWS), "together"),
        (
            lambda: calibration(ROWS, np.array([0, 1]), np.eye(3), np.array([0, 1, 2])),
            "3 classes, test_scores 2",
        ),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()
