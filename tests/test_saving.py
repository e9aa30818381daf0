"""A saved model.keras of every loss loads in a fresh Python process, as docs/local.md says."""

import subprocess
import sys

import numpy as np

from study.config import load_config
from study.losses import LOSSES
from study.trainable import compile_model

from .conftest import REPO

# The docs' recipe (docs/local.md), word for word: one import, then Keras's own loader.
README_LOAD = "import study.keras_objects\nimport keras\nmodel = keras.models.load_model(path)\n"


def test_every_loss_saves_and_loads_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    paths = {}
    for name in LOSSES:
        config = load_config(
            None, ["model.width=0.0625", "data.dataset=cifar10", f"loss.name={name}"]
        )
        model = compile_model(config, steps_per_epoch=1, jit_compile=False)
        targets = np.eye(10)[rng.integers(0, 10, 8)]
        model.fit(images, targets, epochs=1, verbose=0)  # So the optimizer has state too.
        paths[name] = tmp_path / f"{name}.keras"
        model.save(paths[name])
        np.save(tmp_path / f"{name}.npy", model.predict(images, verbose=0))
    np.save(tmp_path / "images.npy", images)
    check = (
        "import sys, numpy as np\n"
        "folder = sys.argv[1]\n"
        f"for name in {list(LOSSES)!r}:\n"
        "    path = f'{folder}/{name}.keras'\n"
        + "".join(f"    {line}\n" for line in README_LOAD.splitlines())
        + "    expected = np.load(f'{folder}/{name}.npy')\n"
        "    got = model.predict(np.load(f'{folder}/images.npy'), verbose=0)\n"
        "    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)\n"
        "    print(name, type(model.loss).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = dict(line.split() for line in done.stdout.splitlines())
    assert set(loaded) == set(LOSSES)
    assert loaded["categorical_hinge"] == "CrammerSingerHinge"


def test_the_readme_shows_this_recipe():
    """Each line of the recipe that the test above runs stands in the docs' example."""
    readme = (REPO / "docs" / "local.md").read_text()
    example = readme[readme.index("**Loading a saved model**") :].split("```")[1]
    for line in README_LOAD.splitlines():
        assert line.replace("(path)", '("') in example, line


def test_the_drivers_config_checking_does_not_import_the_custom_objects():
    code = (
        "import sys\n"
        "from study.search_config import load_study\n"
        "load_study('configs/default.yaml')\n"
        "assert 'study.keras_objects' not in sys.modules\n"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
