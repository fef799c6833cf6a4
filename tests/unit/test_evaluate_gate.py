"""The evaluation gate's rules, the evaluate config's checks, and a dead endpoint failing in seconds."""
from __future__ import annotations

import socket
import time

import pytest

from lifecycle.config import validate
from lifecycle.errors import ConfigError
from lifecycle.evaluate import gate, report
from lifecycle.evaluate.target import resolve

from conftest import cli, make_cfg

INCUMBENT = {"eval/domain/ppl": 100.0, "eval/general/ppl": 50.0, "eval/task/a/acc": 0.50, "eval/task/b/acc": 0.40,
             "eval/task/a/acc_norm": 0.5, "gate": None}
RULES = [{"metric": "eval/domain/ppl", "change": "relative", "op": "<=", "value": -0.02},
         {"metric": "eval/general/ppl", "change": "relative", "op": "<=", "value": 0.01},
         {"metric": "eval/task/*/acc", "change": "absolute", "op": ">=", "value": -0.01}]


def test_gate_passes_and_reports_every_rule_with_its_margin():
    candidate = {"eval/domain/ppl": 90.0, "eval/general/ppl": 50.25, "eval/task/a/acc": 0.55, "eval/task/b/acc": 0.40,
                 "eval/task/a/acc_norm": 0.1}
    verdict = gate.check(candidate, INCUMBENT, RULES)
    assert verdict["verdict"] == "pass"
    rows = {r["metric"]: r for r in verdict["rules"]}
    assert list(rows) == ["eval/domain/ppl", "eval/general/ppl", "eval/task/a/acc", "eval/task/b/acc"]  # glob: acc only
    assert rows["eval/domain/ppl"]["change"] == pytest.approx(-0.10)
    assert rows["eval/domain/ppl"]["margin"] == pytest.approx(0.08)        # -0.02 - (-0.10)
    assert rows["eval/general/ppl"]["margin"] == pytest.approx(0.005)      # 0.01 - 0.005
    assert rows["eval/task/a/acc"]["change"] == pytest.approx(0.05)
    assert rows["eval/task/b/acc"]["margin"] == pytest.approx(0.01)


def test_gate_fails_naming_the_rule_and_by_how_much():
    candidate = {**INCUMBENT, "eval/domain/ppl": 99.0, "eval/task/b/acc": 0.30}
    verdict = gate.check(candidate, INCUMBENT, RULES)
    assert verdict["verdict"] == "fail"
    failed = [r for r in verdict["rules"] if not r["passed"]]
    assert [r["metric"] for r in failed] == ["eval/domain/ppl", "eval/task/b/acc"]
    assert failed[0]["margin"] == pytest.approx(-0.01)  # improved 1%, 2% required
    assert failed[1]["margin"] == pytest.approx(-0.09)
    message = gate.failures(verdict)
    assert "eval/domain/ppl: relative change -0.01 is not <= -0.02" in message and "eval/task/b/acc" in message
    assert "FAIL" in report.markdown(candidate, {"incumbent": "x", **verdict}, "model")


@pytest.mark.parametrize("rule, reason", [
    ({"metric": "eval/domain/bpb", "change": "absolute", "op": "<=", "value": 0}, "missing in the candidate run"),
    ({"metric": "eval/task/*/f1", "change": "absolute", "op": ">=", "value": 0}, "no metric matches in both runs"),
    ({"metric": "eval/task/a/acc", "change": "relative", "op": ">=", "value": 0}, "incumbent is 0"),
])
def test_a_rule_that_cannot_compare_fails(rule, reason):
    incumbent = {**INCUMBENT, "eval/task/a/acc": 0.0}
    verdict = gate.check(dict(incumbent), incumbent, [rule])
    assert verdict["verdict"] == "fail" and reason in verdict["rules"][0]["reason"]


def test_incumbent_must_be_a_finished_evaluate_run(tmp_path):
    with pytest.raises(ConfigError, match=r"gate.incumbent: .*no manifest.json.*lifecycle evaluate"):
        gate.incumbent_metrics(str(tmp_path))


@pytest.mark.parametrize("override, words", [
    ("gate.rules=[{metric:eval/x,change:relative,op:'=<',value:0}]", ["gate.rules", "op must be one of", "=<"]),
    ("gate.rules=[{metric:val/loss,change:absolute,op:'<=',value:0}]", ["gate.rules", "eval/"]),
    ("gate.rules=[{metric:eval/x,change:percent,op:'<=',value:0}]", ["percent", "absolute, relative"]),
    ("target.endpoint=localhost:8000", ["target.endpoint", "http"]),
    ("tasks.choices=1", ["tasks.choices", ">= 2"]),
    ("data.val_batches=0", ["data.val_batches", ">= 1"]),
])
def test_bad_evaluate_settings_name_the_key(override, words, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("evaluate", tmp_path / "evaluate" / "run", [override]), "evaluate")
    for w in words:
        assert w in str(err.value), str(err.value)


def test_cfg_job_composes_the_evaluate_config():
    out = cli("lifecycle.evaluate", "--cfg", "job", "experiment=smoke", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "endpoint_model: null" in out.stdout and "metric: eval/task/*/acc" in out.stdout
    assert "seq_len: 64" in out.stdout  # the smoke recipe shrinks evaluation too


def test_an_endpoint_that_never_answers_fails_in_seconds(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with socket.socket() as server:  # accepts connections (backlog) but never replies
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/v1"
        started = time.time()
        with pytest.raises(ConfigError, match=r"target.endpoint=.*not reachable.*timed out"):
            resolve(str(tmp_path), None, url, None)
        assert time.time() - started < 6
