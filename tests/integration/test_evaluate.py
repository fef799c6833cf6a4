"""`lifecycle evaluate` end to end on a tiny pretrained model: a model dir, adapters, the gate, and fast failures."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch

from lifecycle.errors import CheckpointError, ConfigError, DataError
from lifecycle.evaluate.stage import run

from conftest import TINY, cli, make_cfg

pytestmark = pytest.mark.integration
SMALL = ["data.val_batches=4", "tasks.limit=6", "tasks.max_items=30", "samples.max_new_tokens=4",
         "samples.prompts=[def]"]
LOOSE = "gate.rules=[{metric:eval/general/ppl,change:relative,op:'<=',value:10.0}]"


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


def evaluate_cfg(run_dir: Path, data_dir: Path, model: Path, *overrides: str):
    return make_cfg("evaluate", run_dir, [*TINY, f"data.dir={data_dir}", f"target.model={model}", *SMALL, *overrides])


@pytest.fixture(scope="session")
def base_eval(data_dir, base_dir, outputs) -> Path:
    """The base model evaluated once: the incumbent of the gate tests."""
    run(evaluate_cfg(outputs / "evaluate" / "base", data_dir, base_dir))
    return outputs / "evaluate" / "base"


def lora_adapter(base_dir: Path, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved as fine-tuning saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def test_model_dir_end_to_end(base_eval, base_dir):
    manifest = json.loads((base_eval / "manifest.json").read_text())
    m = manifest["metrics"]
    for name in ("lifecycle_next_line", "lifecycle_docstring_code"):
        assert 0 <= m[f"eval/task/{name}/acc"] <= 1 and 0 <= m[f"eval/task/{name}/acc_norm"] <= 1
        assert m[f"eval/task/{name}/items"] == 6 and 0 <= m[f"eval/task/{name}/contamination"] <= 1
    assert m["eval/general/ppl"] == pytest.approx(2.0 ** (m["eval/general/bpb"] * m["eval/general/bytes"] /
                                                         m["eval/general/tokens"]), rel=1e-3)
    assert m["eval/domain/tokens"] > 0 and m["eval/domain/bpb"] > 0
    # The same windows, in the same order, as pretraining's validation: the same loss.
    pretrain = json.loads((base_dir.parent / "manifest.json").read_text())["metrics"]
    assert m["eval/general/loss"] == pytest.approx(pretrain["val/loss"], abs=2e-3)
    evaluation = json.loads((base_eval / "eval.json").read_text())
    assert evaluation["lm_eval"]["n-samples"]["lifecycle_next_line"]["effective"] == 6
    assert evaluation["samples"][0]["prompt"] == "def" and evaluation["samples"][0]["max_new_tokens"] == 4
    assert (base_eval / "samples.jsonl").is_file()
    assert "| lifecycle_next_line |" in (base_eval / "summary.md").read_text()


def test_adapter_dir_passes_a_gate_against_its_base(base_eval, base_dir, data_dir, outputs):
    adapter = lora_adapter(base_dir, outputs / "adapters" / "lora")
    run_dir = outputs / "evaluate" / "lora"
    metrics = run(evaluate_cfg(run_dir, data_dir, adapter, f"gate.incumbent={base_eval}", LOOSE))
    base = json.loads((base_eval / "manifest.json").read_text())["metrics"]
    assert metrics["eval/general/loss"] != base["eval/general/loss"]  # the adapter is in effect
    assert 0 <= metrics["eval/task/lifecycle_next_line/acc"] <= 1 and metrics["eval/gate/passed"] == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["inputs"]["target"]["base"]["path"] == str(base_dir.resolve())
    [rule] = manifest["metrics"]["gate"]["rules"]
    assert rule["passed"] and rule["margin"] == pytest.approx(10.0 - rule["change"])
    assert (outputs / "evaluate" / "latest").resolve() == run_dir.resolve()


def test_gate_failure_exits_3_and_keeps_latest(base_eval, base_dir, data_dir, outputs, tmp_path):
    latest_before = (outputs / "evaluate" / "latest").resolve()
    run_dir = outputs / "evaluate" / "same"
    out = cli("lifecycle.evaluate", f"paths.output_root={outputs}", f"hydra.run.dir={run_dir}", *TINY,
              f"data.dir={data_dir}", f"target.model={base_dir}", *SMALL, f"gate.incumbent={base_eval}")
    assert out.returncode == 3, out.stderr[-2000:]
    assert "gate failed" in out.stderr and "eval/domain/ppl: relative change +0 is not <= -0.02" in out.stderr
    gate = json.loads((run_dir / "manifest.json").read_text())["metrics"]["gate"]
    assert gate["verdict"] == "fail" and len(gate["rules"]) == 4  # domain, general, and acc of both tasks
    assert [r["passed"] for r in gate["rules"]] == [False, True, True, True]
    assert (outputs / "evaluate" / "latest").resolve() == latest_before


def test_a_prompt_tuning_adapter_is_scored_on_its_real_tokens(base_dir):
    """The logits of the virtual tokens a prompt-learning adapter prepends must not be read as the text's."""
    from lm_eval.api.instance import Instance
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle.evaluate.tasks import harness_model

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    context, continuation = "def main():", "\n    return 0"
    [(got, _)] = harness_model(model, tokenizer, 1).loglikelihood(
        [Instance("loglikelihood", {}, (context, continuation), 0)])
    whole, n_ctx = tokenizer(context + continuation)["input_ids"], len(tokenizer(context)["input_ids"])  # as lm-eval
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0, -len(whole):], -1)
    expected = sum(logp[n_ctx - 1 + i, t].item() for i, t in enumerate(whole[n_ctx:]))
    assert got == pytest.approx(expected, abs=1e-3)


def test_adapter_on_another_base_is_refused(base_dir, data_dir, outputs, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).save_pretrained(other)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(other)
    adapter = lora_adapter(base_dir, outputs / "adapters" / "lora-other")
    with pytest.raises(CheckpointError, match=r"differs from the given base"):
        run(evaluate_cfg(tmp_path / "evaluate" / "r", data_dir, adapter, f"target.base={other}"))


def test_unknown_task_fails_before_any_model_loads(base_dir, data_dir, tmp_path, monkeypatch):
    from lifecycle.evaluate import stage

    monkeypatch.setattr(stage, "load", lambda target: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"unknown task 'no_such_task'.*lifecycle_next_line.*lm_eval --tasks list"):
        run(evaluate_cfg(tmp_path / "evaluate" / "r", data_dir, base_dir,
                         "tasks.names=[lifecycle_next_line,no_such_task]"))


def test_incomplete_model_dir_names_what_is_missing(data_dir, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"target.model=.*model is incomplete: it has no weights"):
        run(evaluate_cfg(tmp_path / "evaluate" / "r", data_dir, tmp_path / "model"))


@pytest.mark.parametrize("args, words", [
    (["target.model=/no/such/model"], ["error: target.model=/no/such/model: no such directory", "outputs/pretrain"]),
    (["target.endpoint=http://127.0.0.1:{port}/v1"], ["error: target.endpoint=", "not reachable", "lifecycle serve"]),
])
def test_cli_fails_fast_on_a_missing_target(args, words, base_dir, tmp_path):
    with socket.socket() as s:  # a free port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    out = cli("lifecycle.evaluate", f"paths.output_root={tmp_path}", f"target.model={base_dir}",
              *(a.format(port=port) for a in args), timeout=60)
    assert out.returncode == 2
    for w in words:
        assert w in out.stderr, out.stderr
    assert time.time() - started < 15 and not list(tmp_path.rglob("manifest.json"))


@pytest.fixture
def fake_endpoint(base_dir):
    """A stand-in for `lifecycle serve` (not written yet): /v1/models and /v1/completions over the tiny model,
    answering what lm-eval's local-completions sends (token-id prompts, echo + logprobs) as NOTES.md records."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(base_dir).eval(), AutoTokenizer.from_pretrained(base_dir)

    def choice(i: int, prompt, request: dict) -> dict:
        ids = prompt if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=request.get("max_tokens", 16), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
            full = ids + new[:1] if request.get("echo") else new
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1)
        picked = [None] + [logp[j - 1, full[j]].item() for j in range(1, len(full))]
        top = [None] + [{tokenizer.decode([int(logp[j - 1].argmax())]): logp[j - 1].max().item()}
                        for j in range(1, len(full))]
        return {"index": i, "text": tokenizer.decode(new), "logprobs": {"token_logprobs": picked, "top_logprobs": top}}

    class Handler(BaseHTTPRequestHandler):
        def reply(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                return self.reply({"data": [{"id": "tiny"}]})
            self.send_error(404)

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompts = request["prompt"] if isinstance(request["prompt"], list) else [request["prompt"]]
            self.reply({"choices": [choice(i, p, request) for i, p in enumerate(prompts)]})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_endpoint_scores_equal_the_local_model(fake_endpoint, base_eval, base_dir, data_dir, tmp_path):
    metrics = run(evaluate_cfg(tmp_path / "evaluate" / "endpoint", data_dir, base_dir,
                               f"target.endpoint={fake_endpoint}", "samples.temperature=0"))
    local = json.loads((base_eval / "manifest.json").read_text())["metrics"]
    assert not any(k.startswith(("eval/general", "eval/domain")) for k in metrics)  # no log-probs of whole texts
    for key in [k for k in local if k.startswith("eval/task/")]:
        assert metrics[key] == pytest.approx(local[key]), key
    manifest = json.loads((tmp_path / "evaluate" / "endpoint" / "manifest.json").read_text())
    assert manifest["inputs"]["target"] == {"endpoint": fake_endpoint, "model": "tiny",
                                            "tokenizer": str(base_dir.resolve())}
