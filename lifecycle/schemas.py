"""Typed schemas of the stages' settings: types and ranges, checked before any model loads (lifecycle.config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from lifecycle.errors import ConfigError


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {reason}")


@dataclass
class TrainerSchema:
    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    max_steps: int = 500
    max_epochs: int = -1
    val_check_interval: int = 100
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    log_every_n_steps: int = 10
    num_sanity_val_steps: int = 0
    use_distributed_sampler: bool = False
    enable_model_summary: bool = True
    deterministic: bool = False

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {self.max_steps}")
        _require(self.val_check_interval >= 1, "trainer.val_check_interval", "must be >= 1 (steps)")
        _require(self.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", "must be >= 1")
        _require(self.num_nodes >= 1, "trainer.num_nodes", "must be >= 1")
        clip = self.gradient_clip_val
        _require(clip is None or clip >= 0, "trainer.gradient_clip_val", "must be >= 0 or null")


@dataclass
class OptimizerSchema:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    fused: Optional[bool] = True

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 "optimizer.betas", f"must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, "optimizer.eps", "must be > 0")


@dataclass
class SchedulerSchema:
    _target_: str = "lifecycle.training.schedule.warmup_cosine"
    _partial_: bool = True
    warmup_steps: int = 20
    total_steps: int = 500
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "scheduler.warmup_steps", "must be >= 0")
        _require(self.total_steps >= 1, "scheduler.total_steps", "must be >= 1")
        _require(0 <= self.min_lr_ratio <= 1, "scheduler.min_lr_ratio", "must be in [0, 1]")


@dataclass
class DataModuleSchema:
    _target_: str = "lifecycle.training.datamodule.PackedDataModule"
    dir: str = "outputs/data/latest"
    seq_len: int = 256
    batch_size: int = 8
    val_batches: int = 16
    num_workers: int = 0
    seed: int = 1234

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.val_batches >= 1, "data.val_batches", "must be >= 1")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")


@dataclass
class InstructDataSchema(DataModuleSchema):
    _target_: str = "lifecycle.training.instruct_data.InstructDataModule"
    packing: bool = False


@dataclass
class EarlyStoppingSchema:
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _require(self.patience >= 1, "early_stopping.patience", "must be >= 1 (validations without improvement)")
        _require(self.min_delta >= 0, "early_stopping.min_delta", "must be >= 0")


@dataclass
class FinetuneSettingsSchema:
    epochs: Optional[float] = 2

    def __post_init__(self) -> None:
        _require(self.epochs is None or self.epochs > 0, "epochs", f"must be > 0 or null, got {self.epochs}")


class NonFinitePolicy(Enum):
    halt = "halt"
    skip = "skip"


@dataclass
class TrainSchema:
    ckpt_every_n_steps: int = 100
    nonfinite: NonFinitePolicy = NonFinitePolicy.halt
    max_skipped_steps: int = 5
    restore_rng: bool = True
    peak_flops: Optional[float] = None
    compile: bool = False
    fused_ops: bool = True

    def __post_init__(self) -> None:
        _require(self.ckpt_every_n_steps >= 1, "train.ckpt_every_n_steps", "must be >= 1")
        _require(self.max_skipped_steps >= 0, "train.max_skipped_steps", "must be >= 0")
        _require(self.peak_flops is None or self.peak_flops > 0, "train.peak_flops", "must be > 0 or null")


@dataclass
class SamplesSchema:
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, "samples.max_new_tokens", "must be >= 1")
        _require(self.temperature >= 0, "samples.temperature", "must be >= 0 (0 = greedy)")
        _require(self.top_k >= 0, "samples.top_k", "must be >= 0 (0 = off)")


@dataclass
class DecontamSchema:
    references: list[str] = field(default_factory=list)
    ngram: int = 13

    def __post_init__(self) -> None:
        _require(self.ngram >= 5, "decontam.ngram", f"must be >= 5 words (short n-grams match everything), got {self.ngram}")


@dataclass
class InstructSchema:
    from_code: bool = True
    files: list[str] = field(default_factory=list)
    min_body_lines: int = 3
    max_chars: int = 2000
    val_fraction: float = 0.05
    scrub: bool = False

    def __post_init__(self) -> None:
        _require(0 <= self.val_fraction < 1, "instruct.val_fraction", "must be in [0, 1)")
        _require(self.min_body_lines >= 1 and self.max_chars >= 64, "instruct",
                 "min_body_lines must be >= 1 and max_chars >= 64")


@dataclass
class PartitionSchema:
    index: int = 0
    count: int = 1
    only_units: bool = False

    def __post_init__(self) -> None:
        _require(self.count >= 1 and 0 <= self.index < self.count, "partition",
                 f"needs 0 <= partition.index < partition.count, got index {self.index}, count {self.count}")


@dataclass
class DataSettingsSchema:
    """The data stage's own top-level settings."""
    workers: int = 2
    max_bytes: Optional[int] = None
    cache_dir: str = "outputs/data/.cache"
    exact_dedup: bool = True
    val_fraction: float = 0.02

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        _require(self.max_bytes is None or self.max_bytes > 0, "max_bytes", "must be > 0 or null")
        _require(0 < self.val_fraction <= 0.5, "val_fraction", f"must be in (0, 0.5], got {self.val_fraction}")


class TokenizerKind(Enum):
    bpe = "bpe"
    pretrained = "pretrained"


@dataclass
class TokenizerSchema:
    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: Optional[int] = 8192
    min_frequency: Optional[int] = 2
    name_or_path: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind == TokenizerKind.bpe:
            _require(self.vocab_size is not None and 260 <= self.vocab_size <= 2**31 - 1,
                     "tokenizer.vocab_size", f"must be >= 260 (256 bytes + special tokens), got {self.vocab_size}")


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclass
class PrecisionSchema:
    value: str = "auto"

    def __post_init__(self) -> None:
        _require(self.value in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}; got {self.value!r}")


# ---- evaluate: what is evaluated, on which held-out data, which tasks, and the promotion gate ----
@dataclass
class TargetSchema:
    model: str = "???"
    base: Optional[str] = None
    endpoint: Optional[str] = None
    endpoint_model: Optional[str] = None
    endpoint_key_env: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.endpoint is None or self.endpoint.startswith(("http://", "https://")), "target.endpoint",
                 f"must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.endpoint!r}")


@dataclass
class EvalDataSchema:
    dir: str = "outputs/data/latest"
    seq_len: int = 256
    batch_size: int = 8
    val_batches: Optional[int] = 16

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.val_batches is None or self.val_batches >= 1, "data.val_batches", "must be >= 1 or null (all)")


@dataclass
class EvalTasksSchema:
    names: list[str] = field(default_factory=list)
    num_fewshot: int = 0
    limit: Optional[int] = None
    batch_size: int = 8
    max_items: int = 500
    context_lines: int = 6
    choices: int = 4

    def __post_init__(self) -> None:
        _require(self.num_fewshot >= 0, "tasks.num_fewshot", "must be >= 0")
        _require(self.limit is None or self.limit >= 1, "tasks.limit", "must be >= 1 or null (every item)")
        _require(self.batch_size >= 1 and self.max_items >= 1, "tasks", "batch_size and max_items must be >= 1")
        _require(self.context_lines >= 1, "tasks.context_lines", "must be >= 1")
        _require(self.choices >= 2, "tasks.choices", f"must be >= 2 (the answer and a distractor), got {self.choices}")


@dataclass
class ContaminationSchema:
    ngram: int = 13

    def __post_init__(self) -> None:
        _require(self.ngram >= 5, "contamination.ngram", f"must be >= 5 words, got {self.ngram}")


class Change(Enum):
    absolute = "absolute"
    relative = "relative"


GATE_OPS = ("<=", ">=", "<", ">")


@dataclass
class GateRuleSchema:
    metric: str = "???"
    change: Change = Change.absolute
    op: str = ">="
    value: float = 0.0

    def __post_init__(self) -> None:
        _require(self.metric.startswith("eval/"), "gate.rules", f"metric must name an eval/... metric (a glob such as "
                 f"eval/task/*/acc is allowed), got {self.metric!r}")
        _require(self.op in GATE_OPS, "gate.rules", f"op must be one of {', '.join(GATE_OPS)}; got {self.op!r} "
                 f"in the rule for {self.metric}")


@dataclass
class GateSchema:
    incumbent: Optional[str] = None
    rules: list[GateRuleSchema] = field(default_factory=list)


# ---- optimize: the model a variant starts from and how speed is measured ----
@dataclass
class OptimizeSourceSchema:
    model: str = "???"
    base: Optional[str] = None


@dataclass
class BenchSchema:
    prompt_tokens: int = 32
    new_tokens: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 3
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.prompt_tokens >= 1, "bench.prompt_tokens", "must be >= 1")
        _require(self.new_tokens >= 2, "bench.new_tokens", "must be >= 2 (decode speed excludes the first token)")
        _require(bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes), "bench.batch_sizes",
                 f"must be a non-empty list of sizes >= 1, got {self.batch_sizes}")
        _require(self.repeats >= 1, "bench.repeats", "must be >= 1")
        _require(self.threads is None or self.threads >= 1, "bench.threads", "must be >= 1 or null (torch's default)")


# ---- cost: the runs priced, the serving measurement, hardware profiles, the business case, projection, billing ----
@dataclass
class CostRunsSchema:
    data: Optional[str] = None
    pretrain: Optional[str] = None
    finetune: Optional[str] = None


@dataclass
class ServingSchema:
    run: Optional[str] = None
    benchmark: Optional[str] = None
    throughput_key: str = "serve/tokens_per_s"
    latency_key: str = "serve/latency_ms_p50"


@dataclass
class HardwareSchema:
    name: str = "???"
    accelerator: str = "cpu"
    usd_per_hour: Optional[float] = None
    peak_flops: Optional[float] = None
    memory_gb: Optional[float] = None

    def __post_init__(self) -> None:
        where = f"hardware profile {self.name!r} (conf/cost/hardware/{self.name}.yaml)"
        _require(self.usd_per_hour is not None, "usd_per_hour", f"missing in {where}: set the price per device-hour, "
                 "e.g. usd_per_hour: 2.99")
        _require(self.usd_per_hour > 0, "usd_per_hour", f"must be > 0 in {where}, got {self.usd_per_hour}")
        _require(self.peak_flops is None or self.peak_flops > 0, "peak_flops", f"must be > 0 or null in {where}")


@dataclass
class BusinessSchema:
    revenue_increase_usd_per_year: float = 0.0
    cost_savings_usd_per_year: float = 0.0
    efficiency_gain_usd_per_year: float = 0.0
    requests_per_month: float = 0.0
    tokens_per_request: float = 0.0
    labelling_usd_per_example: float = 0.0
    horizon_months: int = 12

    def __post_init__(self) -> None:
        _require(min(self.requests_per_month, self.tokens_per_request, self.labelling_usd_per_example) >= 0,
                 "business", "traffic and labelling figures must be >= 0")
        _require(self.horizon_months >= 1, "business.horizon_months", "must be >= 1")


@dataclass
class ProjectionSchema:
    params: float = 1e9
    tokens: float = 2e10
    devices: int = 8

    def __post_init__(self) -> None:
        _require(self.params > 0 and self.tokens > 0, "projection", "params and tokens must be > 0")
        _require(self.devices >= 1, "projection.devices", "must be >= 1")


@dataclass
class BillingSchema:
    db: Optional[str] = None
    since: Optional[str] = None
    until: Optional[str] = None
    prompt_usd_per_1k: float = 0.0
    completion_usd_per_1k: float = 0.0
    models: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.prompt_usd_per_1k >= 0 and self.completion_usd_per_1k >= 0, "billing",
                 "prices per 1K tokens must be >= 0")


# ---- compare: which runs are put side by side, and what is shown ----
class CompareSource(Enum):
    local = "local"
    wandb = "wandb"


@dataclass
class CompareSettingsSchema:
    backend: CompareSource = CompareSource.local
    root: str = "outputs"
    columns: list[str] = field(default_factory=list)
    bars: list[str] = field(default_factory=list)
    wandb_path: Optional[str] = None


CANDIDATE_STAGES = ("pretrain", "finetune", "optimize")


@dataclass
class CompareFiltersSchema:
    stage: Optional[str] = None
    group: Optional[str] = None
    strategy: Optional[str] = None
    since: Optional[str] = None
    until: Optional[str] = None
    glob: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.stage is None or self.stage in CANDIDATE_STAGES, "filters.stage",
                 f"must be one of {', '.join(CANDIDATE_STAGES)} (the stages that make a model) or null; "
                 f"got {self.stage!r}")


# ---- usage: the per-key statement of the serving usage meter ----
class StatementFormat(Enum):
    table = "table"
    csv = "csv"
    json = "json"


@dataclass
class UsageSettingsSchema:
    db: str = "???"
    since: str = "30d"
    until: Optional[str] = None
    key: Optional[str] = None
    format: StatementFormat = StatementFormat.table

    def __post_init__(self) -> None:
        _require("://" in self.db, "db", f"a SQLAlchemy URL, e.g. sqlite:///outputs/serve/usage.db; got {self.db!r}")


# ---- serve: where it listens and which front ends run over the deploy profile's engine ----
@dataclass
class ServeSettingsSchema:
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", f"must be a TCP port (0-65535), got {self.port}")


@dataclass
class ServeCheckSchema:
    requests: int = 0
    concurrency: int = 4
    max_tokens: int = 32
    model: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.requests >= 0, "check.requests", "must be >= 0 (0: serve until stopped)")
        _require(self.concurrency >= 1, "check.concurrency", "must be >= 1")
        _require(self.max_tokens >= 2, "check.max_tokens", "must be >= 2 (time per token needs two)")


@dataclass
class DeploySchema:
    frontends: list[str] = field(default_factory=lambda: ["rest"])
    engine: Any = None
    vllm: Any = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.frontends) - {"rest", "grpc"})
        _require(not unknown, "deploy.frontends", f"unknown front end(s) {unknown}; choose from rest, grpc")
        _require((self.vllm is None) == bool(self.frontends), "deploy",
                 "a profile either runs our front ends (frontends + engine) or vLLM (vllm), not both or neither")
        _require(self.vllm is not None or self.engine is not None, "deploy.engine", "required with front ends")


# ---- monitor: what is read, how often, over which window; alert rules are checked by lifecycle.monitor.rules ----
class MonitorMode(Enum):
    report = "report"
    daemon = "daemon"
    export = "export"
    rollback = "rollback"


@dataclass
class MonitorSettingsSchema:
    mode: MonitorMode = MonitorMode.report
    interval_s: float = 15.0
    max_ticks: Optional[int] = None
    window_s: float = 300.0
    export_dir: Optional[str] = None
    db: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.interval_s > 0, "interval_s", f"must be > 0 seconds, got {self.interval_s}")
        _require(self.window_s > 0, "window_s", f"must be > 0 seconds, got {self.window_s}")
        _require(self.max_ticks is None or self.max_ticks >= 1, "max_ticks", "must be >= 1 or null (until stopped)")
        _require(self.db is None or "://" in self.db, "db", f"a SQLAlchemy URL, e.g. sqlite:///outputs/serve/usage.db "
                 f"(or null); got {self.db!r}")


def _http(key: str, url: Optional[str]) -> None:
    _require(url is None or url.startswith(("http://", "https://")), key, f"must be an http(s) URL, got {url!r}")


@dataclass
class MonitorServerSchema:
    url: str = "http://127.0.0.1:8000"
    key_env: Optional[str] = None
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _http("server.url", self.url)
        _require(self.timeout_s > 0, "server.timeout_s", "must be > 0")


@dataclass
class PrometheusSourceSchema:
    url: Optional[str] = None
    selector: str = 'job="lifecycle"'
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _http("prometheus.url", self.url)
        _require(self.timeout_s > 0, "prometheus.timeout_s", "must be > 0")


@dataclass
class WebhookSchema:
    url: Optional[str] = None
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _http("webhook.url", self.url)
        _require(self.timeout_s > 0, "webhook.timeout_s", "must be > 0")
