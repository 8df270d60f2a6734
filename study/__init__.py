"""The study: a grid of stage-2 runs (main_downstream.py), run and tracked.

grid (grid file -> runs, expected runs per group), rundirs (locks, failure records, run state),
local (long-lived worker processes), slurm (a job array through submitit), status (progress and
the verdicts of finished groups). script/sweep.py is their command line.

May import utils, the entry points (main_downstream, lazily, to run or check a run), pruning_utils
(to read a ticket directory) and, in status only, analysis.table for the verdicts. Nothing of the
project imports study except script/, the demo and analysis.table (the grid model).
"""
