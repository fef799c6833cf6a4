"""The monitoring loop end to end: a served domain-A adapter meets domain-B traffic, drift fires, retraining runs,
the gate passes and the server answers with the new version; a strict gate keeps the incumbent; faults leave
production untouched. Domain A: the corpus's code (the data stage's function-body pairs); domain B: legal English
(the paragraphs of Python's LICENSE.txt, a file the stdlib source reads none of)."""
from __future__ import annotations

import contextlib
import json
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
from omegaconf import OmegaConf

from conftest import TINY, free_port, make_cfg, serve_process
from lifecycle.monitor import drift, registry, retrain
from lifecycle.serve.usage import UsageMeter, UsageRecord

pytestmark = pytest.mark.integration
USER, ADMIN = "sk-loop-user-NOT-A-REAL-KEY", "sk-loop-admin-NOT-A-REAL-KEY"
SMALL = ["experiment=smoke", "logger=none"]
N = 36  # requests per traffic window


@pytest.fixture(scope="module")
def adapter_a(base_dir, data_dir, tmp_path_factory) -> Path:
    """Domain A: a LoRA adapter fine-tuned on the corpus's code pairs, inside the loop's output root."""
    from lifecycle.finetune.stage import run

    run_dir = tmp_path_factory.mktemp("loop") / "finetune" / "a"
    run(make_cfg("finetune", run_dir, [*TINY, f"data.dir={data_dir}", f"base.name_or_path={base_dir}"]))
    return run_dir / "adapter"


def monitor_cfg(root: Path, data_dir: Path, url: str | None, *overrides: str):
    cfg = make_cfg("monitor", root / "monitor" / "run", [
        f"db=sqlite:///{root / 'usage.db'}", f"drift.profile={data_dir / 'profile.json'}",
        f"registry.server.url={url}" if url else "registry.server.url=null", "registry.server.key_env=LOOP_ADMIN",
        "registry.wandb.enabled=false", "retrain.min_pairs=20", f"retrain.shared_overrides={SMALL}",
        # smoke's 64-token sequences cut the answers off, and its one epoch is too little to move the model
        "retrain.finetune_overrides=['data.seq_len=192','epochs=6','strategy.lr=3e-3']", *overrides])
    OmegaConf.set_struct(cfg, False)
    return cfg


def prose_prompts(n: int) -> list[str]:
    """Domain B: paragraphs of Python's license, first 30 words each."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    paragraphs = [" ".join(p.split()[:30]) for p in text.split("\n\n") if len(p.split()) >= 12]
    assert len(paragraphs) >= n
    return paragraphs[:n]


def code_prompts(data_dir: Path, n: int) -> list[str]:
    rows = [json.loads(x) for x in (data_dir / "instruct" / "train.jsonl").read_text().splitlines()]
    return [r["messages"][0]["content"] for r in rows][:n]


@contextlib.contextmanager
def server(root: Path, base_dir: Path):
    """`python -m lifecycle.serve` over the base model, text logging on, an admin key; yields its URL."""
    overrides = [f"hydra.run.dir={root / 'serve'}", f"paths.output_root={root}", f"deploy.engine.model={base_dir}",
                 "usage.log_text=true", f"usage.db=sqlite:///{root / 'usage.db'}", "auth.admin_key_ids=[ops]",
                 "deploy.frontends=[rest]"]
    with serve_process(free_port(), overrides, f"user:{USER},ops:{ADMIN}") as (url, _):
        yield url


def send(url: str, prompts: list[str], max_tokens: int = 24) -> list[dict]:
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {USER}"}, timeout=60) as c:
        out = []
        for i, p in enumerate(prompts):
            r = c.post("/v1/completions", json={"model": "production", "prompt": p, "max_tokens": max_tokens,
                                                "temperature": 0.7, "seed": i})
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out


@pytest.mark.slow
def test_drift_fires_retraining_promotes_and_a_strict_gate_keeps_the_incumbent(base_dir, data_dir, adapter_a,
                                                                               monkeypatch, capsys):
    from lifecycle.monitor.rules import Rule

    root = adapter_a.parent.parent.parent
    monkeypatch.setenv("LOOP_ADMIN", ADMIN)
    with server(root, base_dir) as url:
        cfg = monitor_cfg(root, data_dir, url, f"drift.model={adapter_a}", f"drift.base={base_dir}")
        registry.promote(cfg.registry, registry.register(cfg.registry, str(adapter_a), str(base_dir)))
        t0 = time.time()
        send(url, code_prompts(data_dir, N))
        t1 = time.time()
        answers = send(url, prose_prompts(N))  # windows of equal size: token_js depends on sample size
        t2 = time.time() + 1
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {USER}"}) as c:
            for a in answers[:5]:  # users dislike five answers: they are left out of retraining
                assert c.post("/v1/feedback", json={"id": a["id"], "rating": -1}).status_code == 200
        home, away = drift.measure(cfg.drift, cfg.db, t0, t1), drift.measure(cfg.drift, cfg.db, t1, t2)
        # The threshold calibrated on in-domain traffic, as one would: 15% over its token distance.
        rule = Rule("domain_drift", "drift/token_js", ">", 1.15 * home["drift/token_js"], action="retrain")
        assert not rule.holds(home) and rule.holds(away), (home, away)
        assert away["drift/ppl"] > home["drift/ppl"] and away["quality/negative_feedback_share"] == 5 / N

        timeline = retrain.run(cfg, {"rule": rule.name, "metric": rule.metric, "value": away[rule.metric]})
        assert timeline["outcome"] == "promoted", timeline["error"]
        assert timeline["steps"]["collect"]["pairs"] == 2 * N - 5  # every answer but the disliked ones
        gate = json.loads((Path(timeline["steps"]["candidate"]["run_dir"]) / "manifest.json").read_text())
        cand, inc = gate["metrics"]["eval/domain/ppl"], gate["metrics"]["gate"]["rules"][0]["incumbent"]
        assert cand < inc  # held-out domain-B traffic: the new version fits it better
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}) as c:
            assert c.get("/admin/aliases").json()["aliases"]["production"] == "production-v2"
        assert registry.production(cfg.registry)["path"] == timeline["steps"]["promote"]["run_dir"]
        t3 = time.time()
        send(url, prose_prompts(N))
        after = drift.measure(OmegaConf.merge(cfg.drift, {"model": timeline["steps"]["promote"]["run_dir"]}),
                              cfg.db, t3, time.time() + 1)
        with capsys.disabled():
            print(f"\nloop: token_js home {home['drift/token_js']:.3f} away {away['drift/token_js']:.3f} "
                  f"(baselines {home['drift/token_js_baseline']:.3f}, {away['drift/token_js_baseline']:.3f}), "
                  f"ppl home {home['drift/ppl']:.1f}; "
                  f"ppl on B prompts v1 {away['drift/ppl']:.1f} -> v2 {after['drift/ppl']:.1f}; gate domain ppl "
                  f"{inc:.2f} -> {cand:.2f}; steps " + ", ".join(f"{k} {v['seconds']} s"
                                                               for k, v in timeline["steps"].items()))

        strict = monitor_cfg(root, data_dir, url, "retrain.min_pairs=20",
                             "retrain.gate_rules=[{metric: eval/domain/ppl, change: relative, op: '<=', value: -0.9}]")
        failed = retrain.run(strict, {"rule": "manual"})
        assert failed["outcome"] == "gate_failed" and "eval/domain/ppl" in failed["error"]
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}) as c:
            assert c.get("/admin/aliases").json()["aliases"]["production"] == "production-v2"
        reg = registry.load(strict.registry.path)  # a rejected candidate is never registered
        assert sorted(reg["versions"]) == ["v1", "v2"] and reg["aliases"]["production"] == "v2"


def log_traffic(root: Path, n: int, text: bool) -> None:
    meter = UsageMeter(f"sqlite:///{root / 'usage.db'}", log_text=text)
    for i in range(n):
        prompt = f"The parser reads option number {i} and stores it in the namespace."
        meter.record(UsageRecord("user", "production", "rest", "/v1/completions", 200, 12, 8, request_id=f"c-{i}",
                                 stats={"prompt_token_ids": [1, 2], "output_token_ids": [3]},
                                 text={"prompt": prompt, "output": f" Value {i} is kept until the next call."}))
    meter.close()


def test_faults_are_reported_and_production_stays(base_dir, data_dir, adapter_a, tmp_path):
    root = adapter_a.parent.parent.parent
    reg_path = tmp_path / "registry.json"
    cfg = monitor_cfg(root, data_dir, None, f"registry.path={reg_path}", f"db=sqlite:///{tmp_path / 'usage.db'}")
    with pytest.raises(retrain.RetrainError, match="no production model"):
        retrain.run(cfg, {"rule": "manual"})
    registry.promote(cfg.registry, registry.register(cfg.registry, str(adapter_a), str(base_dir)))
    with pytest.raises(Exception, match="no usage recorded"):
        retrain.run(cfg, {"rule": "manual"})
    log_traffic(tmp_path, 30, text=False)
    with pytest.raises(retrain.RetrainError, match="usage.log_text=true"):
        retrain.run(cfg, {"rule": "manual"})
    (tmp_path / "usage.db").unlink()
    log_traffic(tmp_path, 30, text=True)
    crash = monitor_cfg(root, data_dir, "http://127.0.0.1:9", f"registry.path={reg_path}",
                        f"db=sqlite:///{tmp_path / 'usage.db'}", "retrain.finetune_overrides=['trainer.max_steps=-3']")
    timeline = retrain.run(crash, {"rule": "manual"})
    assert timeline["outcome"] == "failed" and "step finetune" in timeline["error"]
    assert "max_steps" in timeline["error"] and timeline["steps"]["data"]["exit"] == 0
    assert registry.load(reg_path)["aliases"] == {"production": "v1", "previous": None, "candidate": None}
