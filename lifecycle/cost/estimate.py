"""The cost arithmetic: 6·N·D training FLOPs at the measured MFU, $ per 1K tokens served, MISSION.md's total cost,
benefit, ROI and payback period, and the projection of pretraining to a target scale."""
from __future__ import annotations

from lifecycle.cost.figures import Figures

TRAIN_STATE_BYTES_PER_PARAM = 16  # bf16 weights + grads, fp32 master weights + Adam's two moments


def training_flops(params: float, tokens: float) -> float:
    """6·N·D: forward (2N) and backward (4N) FLOPs per token, times the tokens trained on."""
    return 6 * params * tokens


def device_hours(flops: float, mfu: float, peak_flops: float) -> float:
    """Device-hours to do `flops` at a utilisation `mfu` of a device peaking at `peak_flops` FLOP/s."""
    return flops / (mfu * peak_flops) / 3600


def usd_per_1k_tokens(usd_per_hour: float, tokens_per_s: float) -> float:
    """What 1K generated tokens cost on a device billed `usd_per_hour` serving `tokens_per_s` under load."""
    return usd_per_hour / (tokens_per_s * 3600) * 1000


def roi(benefit: float, cost: float) -> float:
    """(benefit - cost) / cost (MISSION.md)."""
    return (benefit - cost) / cost


def payback_months(cost: float, benefit_per_year: float) -> float:
    """cost / (benefit / 12) months (MISSION.md), the benefit being a year's."""
    return cost / (benefit_per_year / 12)


def derive(fig: Figures, hw: dict, measured_on: dict, business: dict, projection: dict) -> None:
    """Every derived figure, from the measured ones in `fig`; a figure whose inputs are missing is missing too."""
    rate, where = measured_on["usd_per_hour"], f"{measured_on['name']} ${measured_on['usd_per_hour']}/h"
    for stage in ("pretrain", "finetune"):
        _training(fig, stage, hw, rate, where)
    fig.derive("cost/data/usd", ("data/wall_hours",), lambda h: h * rate, f"data/wall_hours x {where}")
    per_example = business["labelling_usd_per_example"]
    fig.derive("cost/labelling/usd", ("finetune/examples",), lambda n: n * per_example,
               f"finetune/examples x ${per_example}/example (business.labelling_usd_per_example)")
    _inference(fig, business, rate, where)
    _totals(fig, business)
    _projection(fig, hw, projection)


def _peak(fig: Figures, hw: dict, measured_key: str) -> str:
    """The key of the peak FLOP/s to use on `hw`: its datasheet figure, or the run's measured GEMM peak."""
    if hw["peak_flops"] is not None:
        fig.put("hardware/peak_flops", hw["peak_flops"], f"conf/cost/hardware/{hw['name']}.yaml peak_flops")
        return "hardware/peak_flops"
    return measured_key  # a profile without a datasheet peak is the machine the runs ran on


def _training(fig: Figures, stage: str, hw: dict, rate: float, where: str) -> None:
    p = f"cost/{stage}"
    fig.derive(f"{p}/flops", (f"{stage}/params", f"{stage}/tokens"), training_flops, "6 x params x tokens")
    peak = _peak(fig, hw, f"{stage}/peak_flops_measured")
    fig.derive(f"{p}/device_hours", (f"{p}/flops", f"{stage}/mfu", peak), device_hours,
               f"flops / ({stage}/mfu x {peak}) on {hw['name']}")
    fig.derive(f"{p}/usd", (f"{p}/device_hours",), lambda h: h * hw["usd_per_hour"],
               f"device_hours x {hw['name']} ${hw['usd_per_hour']}/h")
    fig.derive(f"{p}/as_run_usd", (f"{stage}/wall_hours",), lambda h: h * rate,
               f"the run's measured wall time x {where}")


def _inference(fig: Figures, business: dict, rate: float, where: str) -> None:
    fig.derive("cost/inference/usd_per_1k", ("serve/tokens_per_s",), lambda t: usd_per_1k_tokens(rate, t),
               f"{where} / (serve/tokens_per_s x 3600) x 1000")
    tokens = business["requests_per_month"] * business["tokens_per_request"]
    fig.put("business/tokens_per_month", tokens, "business.requests_per_month x business.tokens_per_request")
    fig.derive("cost/inference/usd_per_month", ("cost/inference/usd_per_1k", "business/tokens_per_month"),
               lambda usd, n: usd * n / 1000, "usd_per_1k x tokens_per_month / 1000")


def _totals(fig: Figures, business: dict) -> None:
    months = business["horizon_months"]
    fig.derive("cost/pretraining_usd", ("cost/data/usd", "cost/pretrain/usd"), lambda a, b: a + b,
               "data processing + pretraining compute")
    fig.derive("cost/finetuning_usd", ("cost/finetune/usd", "cost/labelling/usd"), lambda a, b: a + b,
               "fine-tuning compute + data labelling")
    fig.derive("cost/inference_usd", ("cost/inference/usd_per_month",), lambda m: months * m,
               f"{months} x monthly inference")
    fig.derive("cost/total_usd", ("cost/pretraining_usd", "cost/finetuning_usd", "cost/inference_usd"),
               lambda a, b, c: a + b + c, "pretraining + fine-tuning + inference (MISSION.md)")
    per_year = sum(business[k] for k in ("revenue_increase_usd_per_year", "cost_savings_usd_per_year",
                                         "efficiency_gain_usd_per_year"))
    fig.put("benefit/usd_per_year", per_year, "business: revenue increase + cost savings + efficiency gain")
    fig.put("cost/benefit_usd", per_year * months / 12, f"benefit/usd_per_year over {months} months")
    if fig.get("cost/total_usd") == 0:
        fig.miss("cost/roi", "total cost is 0")
    else:
        fig.derive("cost/roi", ("cost/benefit_usd", "cost/total_usd"), roi, "(benefit - cost) / cost")
    if per_year <= 0:
        fig.miss("cost/payback_months", "no benefit configured (business.*_usd_per_year)")
    else:
        fig.derive("cost/payback_months", ("cost/total_usd", "benefit/usd_per_year"), payback_months,
                   "cost / (benefit per year / 12)")


def _projection(fig: Figures, hw: dict, projection: dict) -> None:
    params, tokens, devices = projection["params"], projection["tokens"], projection["devices"]
    fig.put("projection/flops", training_flops(params, tokens), f"6 x {params:.3g} params x {tokens:.3g} tokens")
    peak = _peak(fig, hw, "pretrain/peak_flops_measured")
    fig.derive("projection/device_hours", ("projection/flops", "pretrain/mfu", peak), device_hours,
               f"flops / (pretrain/mfu, as measured, x {peak}) on {hw['name']}")
    fig.derive("projection/usd", ("projection/device_hours",), lambda h: h * hw["usd_per_hour"],
               f"device_hours x {hw['name']} ${hw['usd_per_hour']}/h")
    fig.derive("projection/days", ("projection/device_hours",), lambda h: h / devices / 24,
               f"device_hours / {devices} devices / 24")
    fig.put("projection/train_state_gb_per_device", TRAIN_STATE_BYTES_PER_PARAM * params / devices / 1e9,
            f"{TRAIN_STATE_BYTES_PER_PARAM} B/param sharded over {devices} devices (activations extra)"
            + (f"; {hw['name']} has {hw['memory_gb']} GB" if hw.get("memory_gb") else ""))
