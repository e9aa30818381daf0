"""How each compared value (loss) learned in a study: what ASHA did to its trials at each
rung, and whether it starts slowly enough that the early rungs may have cut its good
configurations. From the study's tables alone."""

import numpy as np
import pandas as pd

from analysis.results import StudyResults, confirmation
from study.config import METRIC


def rungs(results: StudyResults) -> list[int]:
    """ASHA's rungs, in epochs: grace, grace x factor, ... below the full budget."""
    search, epochs = results.config.search, results.max_epochs
    found, rung = [], min(search.grace_period, epochs)
    while rung < epochs:
        found.append(int(rung))
        rung = int(round(rung * search.reduction_factor))
    return found


def stopped_at_rungs(results: StudyResults) -> pd.DataFrame:
    """Per compared value: how many of its trials ASHA stopped at each rung (columns
    "stopped at epoch N") and how many ran the full budget."""
    key, trials = results.key, results.trials
    if results.config.search.scheduler != "asha" or trials.empty or key not in trials:
        return pd.DataFrame()
    rows = []
    for value in dict.fromkeys([*results.values, *trials[key]]):
        group = trials[trials[key] == value]
        stopped = group[group.status == "early_stopped"]
        row = {key: value, "trials": len(group)}
        for rung in rungs(results):
            row[f"stopped at epoch {rung}"] = int((stopped.epochs_run == rung).sum())
        row["full budget"] = int((group.epochs_run >= results.max_epochs).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def slow_starters(results: StudyResults) -> list[str]:
    """One line per compared value whose confirmed configuration's validation accuracy at
    the first rung ranks below trials of its own that ASHA stopped there: it starts slowly,
    so the early rungs may have cut configurations as good as the one confirmed."""
    table, _ = confirmation(results)
    rung_list = rungs(results)
    if table.empty or not rung_list or results.epochs.empty:
        return []
    first, key, trials, epochs = rung_list[0], results.key, results.trials, results.epochs
    at_rung = epochs[(epochs.epoch == first) & (epochs.get("rerun", 0) == 0)]
    at_rung = at_rung.set_index("trial_id")[METRIC]
    lines = []
    for row in table.to_dict("records"):
        confirmed = at_rung.get(str(row["config_id"]), np.nan)
        group = trials[(trials[key] == row[key]) & (trials.status == "early_stopped")]
        stopped = at_rung[at_rung.index.isin(group[group.epochs_run == first].trial_id)]
        above = int((stopped > confirmed).sum())
        if np.isnan(confirmed) or not above:
            continue
        lines.append(
            f"{row[key]} starts slowly: at the first rung (epoch {first}) its confirmed "
            f"configuration scored {confirmed:.4f}, below {above} of the {len(stopped)} "
            "trials that ASHA stopped there; the early rungs may have cut configurations "
            "as good as it (a larger search.grace_period would keep them longer)"
        )
    return lines
