"""`lifecycle cost`: measured runs x hardware prices -> $ per stage, $ per 1K tokens served, total cost, benefit, ROI,
payback and a projection to a target scale (MISSION.md's cost analysis); and per-API-key bills from the usage meter."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lifecycle import artifacts, tracking
from lifecycle.config import resolved, validate
from lifecycle.cost import billing, estimate, measured, report
from lifecycle.cost.figures import Figures

STAGE = "cost"


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    started, config = time.time(), resolved(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)

    fig, inputs = Figures(), {}
    pre_dir, pre, why_pre = measured.manifest(cfg.runs.pretrain, "pretrain")
    ft_dir, ft, why_ft = measured.manifest(cfg.runs.finetune, "finetune")
    data_dir, data, why_data = measured.manifest(cfg.runs.data or _data_of(pre, why_pre), "data")
    measured.training(fig, "pretrain", pre_dir, pre, why_pre)
    measured.training(fig, "finetune", ft_dir, ft, why_ft)
    measured.data(fig, data_dir, data, why_data)
    measured.examples(fig, ft_dir, ft, why_ft)
    s = cfg.serving
    measured.serving(fig, s.run, s.benchmark, s.throughput_key, s.latency_key)
    estimate.derive(fig, plain["hardware"], plain["measured_on"], plain["business"], plain["projection"])
    for name, path in (("data", data_dir), ("pretrain", pre_dir), ("finetune", ft_dir)):
        if path is not None:
            inputs[name] = {"path": str(path)}

    title = f"lifecycle cost: training on {cfg.hardware.name}, measured on {cfg.measured_on.name}"
    notes = _notes(fig, plain)
    report.write(run_dir, fig, title, notes)
    metrics = {k: fig.values.get(k) for keys in report.SECTIONS.values() for k in keys if k.startswith(("cost/",
                                                                                                       "projection/"))}
    metrics["hardware"] = cfg.hardware.name
    if cfg.billing.db:
        metrics["billing/total_usd"], inputs["billing"] = _bill(cfg, run_dir), {"db": _safe_url(cfg.billing.db)}
    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    if logger is not None:
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    artifacts.finish_run(run_dir, STAGE, inputs, {**metrics, "missing": fig.missing}, config, started,
                         tracking.run_id(logger))
    tracking.finish(logger)
    report.print_table(fig, title)
    for note in notes:
        print(f"note: {note}")
    print(f"-> {run_dir}/cost.md, cost.json, cost.png")
    return metrics


def _data_of(pre: dict | None, why: str) -> str | None:
    """The data run the pretrain run read, from its manifest's inputs."""
    return pre["inputs"]["data"]["path"] if pre else None


def _notes(fig: Figures, cfg: dict) -> list[str]:
    """What a reader must know to read the figures right."""
    hw, runs_on = cfg["hardware"], cfg["measured_on"]
    notes = [f"Training cost on {hw['name']} is 6·N·D FLOPs at the MFU each run measured (MFU against the measured "
             "GEMM peak of the machine it ran on); `as_run_usd` is the run's measured wall time at "
             f"{runs_on['name']}'s price."]
    if hw["name"] != runs_on["name"]:
        notes.append(f"The MFU was measured on {runs_on['name']}; reaching it on {hw['name']} (against its datasheet "
                     "peak) is an assumption until a run there measures it.")
    notes.append("Inference is priced by usage: the measured throughput under load at the price of the machine it "
                 "was measured on (a fully used server); an idle always-on server costs more.")
    if "serve/tokens_per_s" in fig.missing:
        notes.append(fig.missing["serve/tokens_per_s"])
    return notes


def _bill(cfg: DictConfig, run_dir: Path) -> float:
    """Price the usage meter's statement for the period; write and print the bill; return the total."""
    b = cfg.billing
    since, until = billing.period(b.since, b.until)
    lines = billing.bill(billing.statement(b.db, since, until), b.prompt_usd_per_1k, b.completion_usd_per_1k,
                         OmegaConf.to_container(b.models, resolve=True))
    due = billing.totals(lines)
    iso = [datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds") for t in (since, until)]
    print(report.write_bill(run_dir, lines, due, *iso))
    return round(sum(due.values()), 6)


def _safe_url(url: str) -> str:
    """A database URL without its password."""
    head, sep, tail = url.rpartition("@")
    return f"{head.split(':')[0]}:***@{tail}" if sep and "://" in head and head.count(":") > 1 else url
