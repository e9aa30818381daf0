"""How a trial stands, in the words of trials.csv, confirm.csv and the trackers: one
constant for each, used everywhere."""

PENDING = "pending"
RUNNING = "running"
RESTARTING = "restarting"  # Its worker died; Tune restores it from its checkpoint.
COMPLETED = "completed"  # It ran every epoch.
EARLY_STOPPED = "early_stopped"  # ASHA stopped it at a rung.
DIVERGED = "diverged"  # A non-finite loss stopped it.
DEAD = "dead"  # Its network learned nothing (study/health.py).
ERROR = "error"  # It failed with no retries left.
# Recorded by a driver that died before Tune saved the trial in its state: Tune does not
# know it and never runs it on, and its share of the study goes to a new trial.
ORPHANED = "orphaned"

UNFINISHED = (PENDING, RUNNING, RESTARTING)
DONE = (COMPLETED, EARLY_STOPPED, DIVERGED, DEAD, ERROR)  # A trial of the study that ended.
