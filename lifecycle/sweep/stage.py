"""`lifecycle sweep <file>`: Optuna over stage runs, its study in SQLite (run again to continue); a W&B sweep file
runs as a W&B agent when online and through Optuna offline."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lifecycle import tracking
from lifecycle.config import build
from lifecycle.errors import ConfigError, LifecycleError
from lifecycle.sweep import report, spec as specs, trial as trials

COUNTED = ("COMPLETE", "PRUNED")


def run(file: str, overrides: list[str] = (), n_trials: int | None = None, local: bool = False) -> dict:
    """Run the sweep to `n_trials` trials in all; return the best trial's metrics."""
    spec = specs.load(specs.locate(file), n_trials)
    cfg = specs.check(spec, list(overrides))
    sweep_dir = Path(OmegaConf.select(cfg, "paths.output_root")).resolve() / "sweep" / spec.name
    if spec.wandb is not None and not local and tracking.online():
        from lifecycle.sweep import online

        return online.run(spec, list(overrides), cfg, sweep_dir)
    study = open_study(spec, sweep_dir)
    space = trials.distributions(spec.params)
    while _done(study) < spec.n_trials:
        trial = study.ask(space)
        run_dir = sweep_dir / f"trial-{trial.number:03d}"
        args = [*spec.fixed, *overrides, *trials.overrides(spec.params, trial.params)]
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", args)
        outcome = trials.launch(trials.command(spec.stage, run_dir, args), run_dir, spec.metric, trial)
        _tell(study, trial, outcome, spec)
    summary = report.write(study, spec, sweep_dir)
    report.show(summary, sweep_dir)
    best = summary["best"]
    if best is None:
        raise LifecycleError(f"sweep {spec.name}: no trial finished; see {sweep_dir}/summary.md for the errors")
    return {**best["metrics"], "sweep/best_trial": best["number"], "sweep/trials": len(summary["trials"])}


def open_study(spec: specs.Spec, sweep_dir: Path):
    """Create or load the study; trials a killed sweep left running are failed and queued again."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=spec.name, storage=f"sqlite:///{sweep_dir / 'study.db'}",
                                direction=spec.direction, load_if_exists=True)
    if study.direction.name.lower() != spec.direction:
        raise ConfigError(f"objective direction: the study in {sweep_dir} was made to "
                          f"{study.direction.name.lower()}; use another sweep name or delete study.db")
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
        study.enqueue_trial(stale.params)
    sampler = {**spec.sampler, "_convert_": "all"}
    if "seed" in sampler:  # a resumed study must not replay the samples of its first run
        sampler["seed"] = int(sampler["seed"]) + len(study.trials)
    study.sampler = build(OmegaConf.create(sampler))
    study.pruner = build(OmegaConf.create({**spec.pruner, "_convert_": "all"})) if spec.pruner else optuna.pruners.NopPruner()
    return study


def _done(study) -> int:
    """Trials that count towards n_trials: finished, pruned, or failed on their own (not interrupted)."""
    return sum(t.state.name in COUNTED or (t.state.name == "FAIL" and "error" in t.user_attrs)
               for t in study.get_trials(deepcopy=False))


def _tell(study, trial, outcome: trials.Outcome, spec: specs.Spec) -> None:
    from optuna.trial import TrialState

    if outcome.error:
        trial.set_user_attr("error", outcome.error)
    if outcome.state == "complete" and spec.metric not in outcome.metrics:
        trial.set_user_attr("error", f"no metric {spec.metric}")
        study.tell(trial, state=TrialState.FAIL)
        raise ConfigError(f"objective metric {spec.metric!r}: the {spec.stage} stage reports no such metric; it "
                          f"reports {', '.join(sorted(outcome.metrics))}")
    if outcome.state == "complete":
        trial.set_user_attr("metrics", {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))})
        study.tell(trial, float(outcome.metrics[spec.metric]))
    else:
        study.tell(trial, state=TrialState.PRUNED if outcome.state == "pruned" else TrialState.FAIL)
