"""Random configs, overrides and config text: each is refused with one line naming the
problem, or accepted, and never ends in a traceback (property-based, tests/strategies.py)."""

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from study.config import ConfigError
from study.search_config import load_study

from .strategies import configs, overrides


def _refused_in_one_line(call) -> None:
    try:
        call()
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message, message


@settings(max_examples=200, deadline=None)
@given(overrides=overrides)
def test_random_overrides_never_end_in_a_traceback(overrides):
    study_file = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    _refused_in_one_line(lambda: load_study(study_file, overrides))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, overrides=overrides)
def test_random_config_files_never_end_in_a_traceback(config, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        _refused_in_one_line(lambda: load_study(path, overrides))


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_random_config_text_never_ends_in_a_traceback(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        _refused_in_one_line(lambda: load_study(path))
