"""The study: a grid of stage-2 runs (main_downstream.py), run and tracked.

grid (grid file -> runs, expected runs per group), rundirs (locks, failure records, run state),
local (long-lived worker processes), slurm (a job array through submitit), status (progress and
the verdicts of finished groups). script/sweep.py is their command line.

May import utils, the entry points (main_downstream, lazily, to run a run), stage 2's command line
(training.downstream_args: to check and price a run without torch), pruning_utils (to read a ticket
directory) and masks.family, and, in status only, analysis.table for the verdicts. Nothing of the
project imports study except script/, benchmarks/, the demo and analysis.table (the grid model).
"""
