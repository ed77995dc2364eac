"""Optuna sweeps over recipe keys: ``nlplatform sweep SWEEP.yaml [--n-trials N] [--storage URL] [--workers K]``.

A sweep file (``sweeps/*.yaml``) names a base recipe, fixed overrides, a search space over any recipe key, the
objective and the search machinery::

    recipe: recipes/hope/tiny.yaml
    overrides: [trainer.max_steps=40]            # every trial; the same key=value strings `nlplatform train` takes
    objective: {metric: val_loss, direction: minimize}
    space:
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.memory_chunk_size: [8, 16, 32]       # a plain list is a categorical choice
      model.cms_chunk_sizes:                     # a ladder: base * ratio^i for i < levels
        {type: ladder, levels: {type: int, low: 1, high: 3}, base: [32, 64], ratio: [2, 4]}
    sampler: {name: tpe, seed: 0}
    pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 20}
    n_trials: 8
    heartbeat: {interval_s: 60, grace_period_s: 180, retries: 2}   # a killed worker's trial is failed, then rerun

Each trial becomes ``key=value`` overrides of the same strict recipe loader a manual run uses, so any trial is
reproduced by the ``nlplatform train`` command the study prints. The study lives in persistent Optuna storage
(``sqlite:///sweeps.db`` by default, any SQLAlchemy URL for many machines) under a name fixed by the sweep file, so a
second call continues it. MLflow gets one parent run per study (the sweep file, the plots) with one nested run per
trial (the trial's own training run). Pruning reports the validation loss at ``trainer.global_step``.

The package: ``spec.py`` reads and checks the sweep file, ``study.py`` runs the trials, ``report.py`` summarises,
plots and logs the study; the pruning callback a trial trains with is ``train/callbacks.py``'s ``TrialPruning``.
"""

from nlplatform.sweep.spec import Sweep, format_value, load_sweep
from nlplatform.sweep.study import DEFAULT_STORAGE, follow_trial, run_sweep

__all__ = ["DEFAULT_STORAGE", "Sweep", "follow_trial", "format_value", "load_sweep", "run_sweep"]
