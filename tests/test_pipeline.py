"""The trial's input: uint8 batches, targets per loss, an order set by seed and epoch."""

import keras
import numpy as np
import pytest

from study import backend
from study.config import LossConfig
from study.losses import target_table
from study.pipeline import Batches, epoch_order


def _numbered(count):
    """Images whose pixels all hold their own index, so a batch shows which images it has."""
    return np.arange(count, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)


def _epoch(batches):
    return np.concatenate([batches[i][0][:, 0, 0, 0] for i in range(len(batches))])


def test_batches_keep_uint8_and_encode_targets_per_loss():
    labels = np.arange(10) % 3
    one_hot = Batches(_numbered(10), labels, 4, target_table(LossConfig(), 3), seed=0)
    # Training keeps whole batches: 2 of 4, the epoch's last 2 images left out.
    assert len(one_hot) == 2 and [len(one_hot[i][0]) for i in range(2)] == [4, 4]
    assert one_hot.images_per_pass == 8
    for i in range(2):
        images, targets = one_hot[i]
        assert images.dtype == np.uint8  # The model scales images on the device.
        assert targets.dtype == np.float32 and targets.shape == (len(images), 3)
        # Shuffled, but each image keeps its own label: image k holds the value k.
        np.testing.assert_array_equal(targets, np.eye(3)[labels[images[:, 0, 0, 0]]])
    seen = _epoch(one_hot)
    assert len(set(seen)) == 8 and set(seen) <= set(range(10))
    np.testing.assert_array_equal(seen, epoch_order(10, 0, 0)[:8])
    signed = Batches(_numbered(10), labels, 4, target_table(LossConfig(name="hinge"), 3))
    images, targets, _ = signed[0]
    np.testing.assert_array_equal(targets, 2 * np.eye(3)[labels[:4]] - 1)
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 1, 2, 3])  # No seed: in order.


def test_evaluation_pads_its_last_batch_with_weightless_images():
    labels = np.arange(10) % 3
    evaluation = Batches(_numbered(10), labels, 4, np.eye(3))
    assert len(evaluation) == 3 and evaluation.images_per_pass == 10
    batches = [evaluation[i] for i in range(3)]
    assert [len(images) for images, _, _ in batches] == [4, 4, 4]
    images, targets, weights = batches[-1]
    # Images 8 and 9, then 0 and 1 again as padding, weighted 0; the real images weigh the
    # padded pass over the real one, 12 / 10.
    np.testing.assert_array_equal(images[:, 0, 0, 0], [8, 9, 0, 1])
    np.testing.assert_array_equal(targets, np.eye(3)[labels[[8, 9, 0, 1]]])
    np.testing.assert_allclose(weights, [1.2, 1.2, 0, 0])
    np.testing.assert_allclose(batches[0][2], [1.2] * 4)


def test_a_trial_cannot_train_on_a_batch_larger_than_its_images():
    with pytest.raises(ValueError, match="training.batch_size: 16 is more than the 10"):
        Batches(_numbered(10), np.zeros(10, int), 16, np.eye(2), seed=0)


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "hinge"])
def test_padded_evaluation_counts_each_image_once(loss):
    """Keras's evaluation of the padded batches (as this backend's fit reads them) gives
    the loss and the accuracy of the real images alone, computed here from predictions of
    the whole set in one batch."""
    from study.config import load_config
    from study.trainable import compile_model

    config = load_config(None, ["data.dataset=cifar10", "model.width=0.0625", f"loss.name={loss}"])
    images = np.random.default_rng(0).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 10, 37)
    table = target_table(config.loss, 10)
    model = compile_model(config, steps_per_epoch=1, jit_compile=False)
    logs = model.evaluate(
        backend.fit_input(Batches(images, labels, 16, table))[0], verbose=0, return_dict=True
    )
    outputs = keras.ops.convert_to_numpy(model(images, training=False))  # Class scores.
    targets = table[labels]
    if loss == "hinge":  # Keras's Hinge: the mean over classes of max(0, 1 - t * s).
        per_image = np.maximum(0.0, 1.0 - targets * outputs).mean(axis=1)
    else:  # Cross-entropy of the scores' softmax.
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        per_image = -log_p[np.arange(37), labels]
    assert logs["loss"] == pytest.approx(per_image.mean(), rel=1e-4)
    assert logs["accuracy"] == pytest.approx(np.mean(outputs.argmax(axis=1) == labels))


def test_order_depends_only_on_the_seed_and_the_epoch():
    def batches(seed):
        return Batches(_numbered(64), np.zeros(64, int), 16, np.eye(2), seed=seed)

    first = batches(seed=1)
    orders = []
    for epoch in range(3):
        first.set_epoch(epoch)
        orders.append(_epoch(first))
        np.testing.assert_array_equal(orders[-1], epoch_order(64, 1, epoch))
    assert all(sorted(order) == list(range(64)) for order in orders)
    assert not np.array_equal(orders[0], orders[1])  # A new order every epoch ...
    resumed = batches(seed=1)
    resumed.set_epoch(2)  # ... the same one for that epoch, whatever ran before,
    np.testing.assert_array_equal(_epoch(resumed), orders[2])
    other = batches(seed=2)
    assert not np.array_equal(_epoch(other), orders[0])  # and another for another seed.


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_fit_from_a_later_epoch_trains_on_that_epochs_order(steps_per_execution):
    """What the model trains on, as this backend's fit reads it (tf.data on TensorFlow):
    each epoch's order, whole and once, also when fit resumes at epoch 2 (although Keras
    looks at a first batch before it trains) and when an execution of 2 steps would run
    past an epoch of 3 batches."""
    batches = Batches(_numbered(24), np.zeros(24, int), 8, np.eye(2), seed=5)
    seen = []

    class Record(keras.layers.Layer):
        def call(self, images, training=None):
            if training and not isinstance(images, keras.KerasTensor):
                seen.extend(keras.ops.convert_to_numpy(images)[:, 0, 0, 0].tolist())
            return images

    inputs = keras.Input((32, 32, 3), dtype="uint8")
    scaled = keras.layers.Rescaling(1 / 255)(Record()(inputs))
    pooled = keras.layers.GlobalAveragePooling2D()(scaled)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    model.compile(
        optimizer="sgd", loss="categorical_crossentropy", run_eagerly=True,
        steps_per_execution=steps_per_execution,
    )  # fmt: skip
    data, callbacks = backend.fit_input(batches)
    # shuffle=False: Keras would shuffle a PyDataset's batches with Python's own generator.
    model.fit(data, epochs=4, initial_epoch=2, callbacks=callbacks, shuffle=False, verbose=0)
    assert seen == [*epoch_order(24, 5, 2), *epoch_order(24, 5, 3)]


def test_mismatched_images_and_labels_are_refused():
    with pytest.raises(ValueError, match="3 images and 2 labels"):
        Batches(_numbered(3), np.zeros(2, int), 2, np.eye(2))
