"""What `pip install .` (not editable) gives: the package with its default config and
notebook, built and installed here offline, used from outside the checkout."""

import subprocess
import sys

from .conftest import REPO


def test_a_wheel_carries_the_default_config_and_loads_it_outside_the_checkout(tmp_path):
    """configs/ was not in the package: a non-editable install lost configs/default.yaml,
    which a study without --config runs."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", tmp_path / "dist", str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("study-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site,
         wheel], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    code = (
        "import study, study.run, analysis\n"
        "from pathlib import Path\n"
        "from study.search_config import load_study\n"
        "print(study.__file__)\n"
        "print(study.run.DEFAULT_CONFIG)\n"
        "print(load_study(study.run.DEFAULT_CONFIG).search.num_samples)\n"
        "print((Path(analysis.__file__).parent / 'best_trials.ipynb').is_file())\n"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # The test environment's packages (pydantic, PyYAML, ...) beside the installed wheel,
    # which comes first on the path: not the checkout's editable install.
    ran = subprocess.run(
        [sys.executable, "-c", code], cwd=outside, capture_output=True, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    module, config, samples, notebook = ran.stdout.split()
    assert module.startswith(str(site)) and config.startswith(str(site))
    assert config.endswith("study/configs/default.yaml")
    assert samples == "64" and notebook == "True"
