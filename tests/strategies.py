"""Hypothesis strategies for random input: config files, `--set` overrides and command
lines made of the project's own keys, words and tricky YAML values, nested at random."""

import json

from hypothesis import strategies as st

from study.config import TrialConfig
from study.search_config import SearchConfig


def _dotted_keys(model, prefix="") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        inner = field.annotation
        if isinstance(inner, type) and hasattr(inner, "model_fields"):
            keys += _dotted_keys(inner, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


TRIAL_KEYS = _dotted_keys(TrialConfig)
SEARCH_KEYS = [f"search.{key}" for key in SearchConfig.model_fields]
WORDS = [
    *TRIAL_KEYS,
    *(key.rpartition(".")[2] for key in TRIAL_KEYS),
    *SearchConfig.model_fields,
    *("choice", "uniform", "loguniform", "integer", "by", "ranges", "when"),
    *("hinge", "focal", "categorical_crossentropy", "adam", "sgd", "cifar10", "cifar100"),
]
TRICKY_VALUES = [
    "", "null", "~", ".nan", ".inf", "-.inf", "1e400", "0x1F", "0o17", "2020-01-01",
    "!!binary aGVsbG8=", "!!set {a, b}", "!!python/name:os.system", "&a [*a]", "*undefined",
    "{", "[", "'", '"', "{choice: []}", "{uniform: [1, 0]}", "{choice: [hinge], when: {}}",
    "[" * 200 + "]" * 200, "- a", "a: b", "yes", "on", "1_000", "-0", "1.", ".5",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(WORDS)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
keys = (
    st.sampled_from(TRIAL_KEYS + SEARCH_KEYS)
    | st.sampled_from(TRIAL_KEYS).map(lambda key: f"search.space.{key}")
    | st.sampled_from(TRIAL_KEYS).map(lambda key: f"search.baseline.{key}")
    | st.lists(st.sampled_from(WORDS) | st.text(max_size=6), min_size=1, max_size=4).map(".".join)
)
value_texts = (
    values.map(lambda value: json.dumps(value, allow_nan=True))
    | st.sampled_from(TRICKY_VALUES)
    | st.text(max_size=30)
)
overrides = st.lists(
    st.builds(lambda key, text: f"{key}={text}", keys, value_texts) | st.text(max_size=30),
    max_size=4,
)


def _section_dict():
    return st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=8), values, max_size=5)


numbers = st.integers(-5, 300) | st.floats(allow_nan=True, allow_infinity=True)
pairs = st.lists(numbers, min_size=1, max_size=3)
distributions = st.fixed_dictionaries(
    {},
    optional={
        "choice": st.lists(scalars, max_size=4),
        "uniform": pairs,
        "loguniform": pairs,
        "integer": pairs,
        "by": st.sampled_from(TRIAL_KEYS),
        "ranges": st.dictionaries(st.sampled_from(WORDS), pairs, max_size=3),
        "when": st.dictionaries(st.sampled_from(TRIAL_KEYS), st.lists(scalars, max_size=3)),
    },
)

configs = st.dictionaries(
    st.sampled_from(["seed", "data", "model", "loss", "optimizer", "training", "search"])
    | st.text(max_size=8),
    _section_dict() | values,
    max_size=6,
) | st.fixed_dictionaries(
    {
        "search": st.fixed_dictionaries(
            {
                "space": st.dictionaries(
                    st.sampled_from(TRIAL_KEYS) | st.text(max_size=8),
                    distributions | values,
                    max_size=4,
                ),
                "baseline": st.dictionaries(st.sampled_from(TRIAL_KEYS), values, max_size=3),
            }
        )
    }
)


FLAG_TOKENS = [
    "--local", "--resume", "--no-dashboard", "--gpus", "--gpus-per-trial", "--cpus-per-trial",
    "--searcher", "--scheduler", "--num-samples", "--name", "--set", "--address",
    "--dashboard-host", "--config", "--storage-path",
]  # fmt: skip
argument_tokens = st.lists(
    st.sampled_from(FLAG_TOKENS)
    | st.sampled_from(["0", "1", "-1", "0.5", "nan", "inf", "optuna", "fifo", "earlier", "a/b"])
    | st.builds(lambda key, text: f"{key}={text}", keys, value_texts)
    | st.text(max_size=10),
    max_size=8,
)
