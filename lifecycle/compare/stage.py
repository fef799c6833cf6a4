"""`lifecycle compare`: candidate models side by side, joined by lineage across stages: a table (console, CSV,
markdown) and plots (loss curves overlaid, metric bars); with logger=wandb also a W&B Table."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lifecycle import artifacts, tracking
from lifecycle.compare import lineage, report
from lifecycle.compare.runs import describe, discover, matches
from lifecycle.config import resolved, validate
from lifecycle.errors import LifecycleError

STAGE = "compare"


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    started, config = time.time(), resolved(cfg)
    filters = OmegaConf.to_container(cfg.filters, resolve=True)
    root = Path(cfg.root)
    local = cfg.backend == "local"
    rows, curves = _local(root, filters) if local else _wandb(cfg.wandb_path, filters)
    if not rows:
        where = _found(root) if local else f"W&B {cfg.wandb_path or 'default project'}"
        raise LifecycleError(f"no runs match {describe(filters)} ({where}); loosen the filters or point root= at the "
                             "outputs directory")
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    columns = report.select(rows, list(cfg.columns))
    report.write(run_dir, rows, columns)
    plots = [name for name, made in (("loss.png", report.plot_losses(curves, run_dir / "loss.png")),
                                     ("bars.png", report.plot_bars(rows, report.select(rows, list(cfg.bars)),
                                                                   run_dir / "bars.png"))) if made]
    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    _publish(logger, rows, columns, [run_dir / p for p in plots])
    metrics = {"compare/rows": len(rows), "compare/stages": dict(Counter(r["stage"] for r in rows)),
               "compare/plots": plots}
    inputs = {r["run"]: {"path": str((root / r["run"]).resolve())} for r in rows if local}
    artifacts.finish_run(run_dir, STAGE, inputs, metrics, config, started, tracking.run_id(logger))
    tracking.finish(logger)
    report.print_table(rows, columns, f"lifecycle compare: {len(rows)} candidate(s), {describe(filters)}")
    print(f"-> {run_dir}/compare.md, compare.csv, {', '.join(plots) or 'no plots (no numeric columns, no history)'}")
    return {"compare/rows": len(rows)}


def _local(root: Path, filters: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """Rows and loss histories of the candidate runs under root that pass the filters."""
    runs = discover(root)
    index = lineage.Lineage(runs)
    chosen = [r for r in runs if r.stage in lineage.CANDIDATES and matches(r, root, filters)]
    rows = [lineage.row(index, r, root) for r in chosen]
    return rows, {report.label(row): lineage.history(r) for row, r in zip(rows, chosen)}


def _wandb(path: str | None, filters: dict):
    from lifecycle.compare import wandb_source

    return wandb_source.rows(path, filters)


def _found(root: Path) -> str:
    counts = Counter(r.stage for r in discover(root)) if root.is_dir() else {}
    found = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    return f"runs found under {root}: {found}"


def _publish(logger, rows: list[dict], columns: list[str], images: list[Path]) -> None:
    """The table (and plots) to the experiment tracker when it takes tables (W&B: offline files unless a key is set)."""
    if logger is None or not hasattr(logger, "log_table"):
        return
    logger.log_table(key="compare", columns=columns, data=[[report.cell(r.get(c)) for c in columns] for r in rows])
    if images and hasattr(logger, "log_image"):
        logger.log_image(key="compare/plots", images=[str(p) for p in images])
