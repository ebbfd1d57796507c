"""`emi sweep`: many Stage II runs from one file, as one Slurm job array (or on this machine), ending in one table.

    emi sweep --config configs/sweeps/ablation.yaml [--local] [--collect] [key=value ...]

    emi sweep --config configs/sweeps/ablation.yaml [--local] [--collect] [key=value ...]

A sweep file (emi.config.SweepConfig) names the Stage II config every cell starts from (`base`), the feature shards
(`data`, by name), settings common to every cell (`overrides`), named variants (`cells`) and a `grid` (the
cartesian product of its values, crossed with the named cells), and `repeat` axes (seeds, folds) every variant runs
over and the table aggregates. `expand` turns it into cells, each one Stage II run in its own folder,
<sweep>/cells/<variant>[/<repeat>], named from its settings (`modules-tfe/seed-2`, `fusion-mean_lr-0.001`).

A cell is finished when its run folder says so: the trainer writes `export/` once, when the run ends, and `best/`
(with the val metrics in trainer.json) at its best epoch. The other cells go to Slurm as one submitit job array
(at most `slurm.parallelism` at once), each task emi.launch's NodeJob running `accelerate launch -m
emi.stages.stage2 --config BASE --resume latest OVERRIDES`, so a preempted, requeued or timed-out cell continues
from its last checkpoint; `--local` runs them with submitit's LocalExecutor on this machine instead. The command
waits until no cell is queued or running, then `collect` writes <sweep>/results.{csv,md} (per variant: mean and
std over the repeats of every val metric; the best variant and the best cell), cells.csv, the top-k ensemble
(ensemble.json) and TensorBoard HParams (<sweep>/hparams). Run again, it runs only the cells not finished (and
waits for those still queued from an earlier submission, which <sweep>/jobs.json records); `--collect` only
writes the table from the cells finished so far.

plan.py expands the file into cells (light: `emi config show` reads sweep files with it), run.py runs them,
report.py writes the table.
"""
