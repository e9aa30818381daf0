"""The notebook's CNN: its exact shape at width 1, and the options."""

import numpy as np
import pytest

from study.config import validate
from study.model import FlipShift, build_model


def _config(**sections):
    return validate(sections)


def _images(count):
    return np.random.default_rng(0).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def test_model_takes_uint8_and_scales_it_to_unit_range():
    import keras

    model = build_model(_config(model={"width": 0.125}))
    assert model.inputs[0].dtype == "uint8"
    x = _images(3)
    scaled = keras.Model(model.inputs[0], model.get_layer("rescale").output)(x)
    np.testing.assert_allclose(np.asarray(scaled), x.astype("float32") / 255, rtol=1e-6)


def test_width_one_is_the_notebook_network():
    model = build_model(_config())
    assert model.count_params() == 6_777_060
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [128, 128, 256, 256, 512, 512]
    assert [c.padding for c in convs] == ["same", "valid"] * 3
    dropouts = [layer.rate for layer in model.layers if layer.__class__.__name__ == "Dropout"]
    assert dropouts == [0.25, 0.25, 0.5]
    assert model.get_layer("dense").units == 1024
    assert model.output_shape == (None, 100)


def test_the_model_outputs_float32_scores_whatever_the_loss():
    """The head is the loss's (study/losses.py): every model ends in raw class scores, in
    float32 under mixed precision too, and the same network serves every loss."""
    import keras

    x = _images(4)
    outputs = {}
    for loss in ({"name": "categorical_crossentropy"}, {"name": "hinge", "head": "softmax"}):
        model = build_model(_config(loss=loss, model={"width": 0.125}))
        assert model.layers[-1].name == "scores" and model.layers[-1].dtype_policy.name == "float32"
        outputs[loss["name"]] = np.asarray(model(x))
    assert not np.allclose(outputs["categorical_crossentropy"].sum(axis=1), 1.0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_model(_config(model={"width": 0.125}))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.get_layer("dense").compute_dtype == "bfloat16"
    assert keras.backend.standardize_dtype(mixed(x).dtype) == "float32"


def test_width_dataset_and_options():
    config = _config(
        data={"dataset": "cifar10"},
        model={
            "width": 0.25,
            "batch_norm": True,
            "augment": True,
            "conv_dropout": 0,
            "activation": "relu",
        },
    )
    model = build_model(config)
    names = [layer.name for layer in model.layers]
    assert model.output_shape == (None, 10)
    assert model.get_layer("block1_conv1").filters == 32
    assert model.get_layer("dense").units == 256
    assert sum("_bn" in n for n in names) == 6
    assert "flip_shift" in names
    assert not any("block" in n and "dropout" in n for n in names)
    assert not model.get_layer("block1_conv1").use_bias


def test_augmentation_and_dropout_only_in_training():
    model = build_model(_config(model={"width": 0.125, "augment": True}))
    x = _images(2)
    np.testing.assert_allclose(model(x, training=False), model(x, training=False))
    assert not np.allclose(model(x, training=True), model(x, training=False))


def _candidates(image, pad=4):
    """Every flip and whole-pixel shift of up to `pad` pixels, edges reflected."""
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)], mode="reflect")
    size = image.shape[0]
    for flip in (False, True):
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[dy : dy + size, dx : dx + size]
                yield (flip, dy - pad, dx - pad), crop[:, ::-1] if flip else crop


def test_augmentation_flips_and_shifts_each_image_and_is_identity_at_inference():
    x = _images(32)
    layer = FlipShift(seed=3)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    augmented = np.asarray(layer(x, training=True))
    assert augmented.dtype == np.uint8
    drawn = []
    for image, result in zip(x, augmented, strict=True):
        matches = [
            how for how, candidate in _candidates(image) if np.array_equal(candidate, result)
        ]
        assert matches, "not a flip and shift of its image"
        drawn.append(matches[0])
    # Drawn per image: over 32 images, both flips and many shifts, up to 4 pixels.
    assert {flip for flip, _, _ in drawn} == {False, True}
    assert len(set(drawn)) > 10
    assert max(max(abs(dy), abs(dx)) for _, dy, dx in drawn) <= 4


def test_an_augmented_model_saves_and_loads_in_safe_mode(tmp_path):
    import keras

    model = build_model(_config(model={"width": 0.0625, "augment": True}))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True, compile=False)
    x = _images(4)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6)


@pytest.mark.parametrize("width", [0.01, 0.5, 2.0])
def test_width_scales_every_layer(width):
    model = build_model(_config(model={"width": width}))
    assert model.get_layer("block3_conv2").filters == max(1, round(512 * width))
