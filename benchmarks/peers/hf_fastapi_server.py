"""The naive baseline of benchmark B4: FastAPI + HF `generate()`, one generation per request in a worker thread.

What many teams write first: `/v1/completions` (OpenAI shape, SSE streaming through TextIteratorStreamer) and
`/v1/models`, no batching, no KV-cache sharing. Not part of lifecycle; started by benchmarks/serve_sweep.py.

    python benchmarks/peers/hf_fastapi_server.py outputs/pretrain/latest/model --port 8009 --threads 2
"""
from __future__ import annotations

import argparse
import json
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def build(model_dir: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_dir, "object": "model"}]}

    @app.post("/v1/completions")
    def completions(body: dict) -> StreamingResponse:
        ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        temperature = float(body.get("temperature", 1.0))
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "max_new_tokens": body.get("max_tokens", 16), "streamer": streamer, "do_sample": temperature > 0, "pad_token_id": tokenizer.pad_token_id}
        if temperature > 0:
            kwargs["temperature"] = temperature

        def run() -> None:
            with torch.inference_mode():
                model.generate(**kwargs)

        threading.Thread(target=run, daemon=True).start()
        rid = f"cmpl-{uuid.uuid4().hex}"

        def events():
            for text in streamer:
                if text:
                    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()),
                             "choices": [{"index": 0, "text": text, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--port", type=int, default=8009)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(build(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
