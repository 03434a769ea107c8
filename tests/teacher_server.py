"""A vLLM-like teacher server for the tests: a tiny local model answering ``/v1/completions`` with
``prompt_logprobs`` in vLLM's JSON format, on 127.0.0.1 at an ephemeral port, in a thread.

Faults for the retry tests are scripted: ``server.script`` is a list consumed one entry per request, each
``("status", code)`` (an error answer), ``("raw", bytes)`` (a 200 with that body), ``("truncate",)`` (a 200
cut short), ``("sleep", seconds)`` (then answer normally; ``server.peak_in_flight`` counts how many slept at once) or
``("ok",)``. ``server.requests`` records each request's path and JSON body.
:func:`assert_topk_teacher_contract` checks a result against what the op's top-k teacher inputs accept.
"""
from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def model_prompt_logprobs(model, prompt: list, k: int, temperature: float = 1.0, tokenizer=None) -> list:
    """vLLM's ``prompt_logprobs`` for one prompt from the model's own full logits: None at position 0, then per
    position the top-k tokens (ranks 1..k) plus the prompt's own token with its rank when outside them."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    out = [None]
    for p in range(1, len(prompt)):
        row = logp[p - 1]
        values, ids = row.topk(min(k, row.numel()))
        entry = {}
        for rank, (token, value) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
            entry[str(token)] = _entry(value, rank, token, tokenizer)
        actual = prompt[p]
        if str(actual) not in entry:
            rank = int((row > row[actual]).sum()) + 1
            entry[str(actual)] = _entry(float(row[actual]), rank, actual, tokenizer)
        out.append(entry)
    return out


def _entry(value, rank, token, tokenizer):
    decoded = tokenizer.decode([token]) if tokenizer is not None else str(token)
    return {"logprob": value, "rank": rank, "decoded_token": decoded}


class TeacherServer:
    """Context manager: ``with TeacherServer(model) as server: server.url``."""

    def __init__(self, model, tokenizer=None, name: str = "tiny-teacher"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.script, self.requests = [], []
        self.in_flight = self.peak_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                owner._record(self.path, None)
                if self.path == "/health":  # TRL's VLLMClient waits for this before its first request
                    return self._send(200, b"{}")
                if self.path == "/v1/models":
                    return self._send(200, json.dumps({"object": "list", "data": [{"id": owner.name}]}).encode())
                self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                step = owner._record(self.path, body)
                if step[0] == "status":
                    return self._send(step[1], json.dumps({"error": f"scripted {step[1]}"}).encode())
                if step[0] == "raw":
                    return self._send(200, step[1])
                if step[0] == "truncate":  # promises more bytes than it sends, then closes the connection
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": ')
                    self.close_connection = True
                    return
                if step[0] == "sleep":  # counted in flight while asleep: the tests read the peak concurrency
                    with owner.lock:
                        owner.in_flight += 1
                        owner.peak_in_flight = max(owner.peak_in_flight, owner.in_flight)
                    time.sleep(step[1])
                    with owner.lock:
                        owner.in_flight -= 1
                if self.path != "/v1/completions":
                    return self._send(404, b'{"error": "not found"}')
                self._send(200, json.dumps(owner.complete(body)).encode())

            def _send(self, code, payload):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)

    def _record(self, path, body):
        with self.lock:
            self.requests.append((path, body))
            return self.script.pop(0) if self.script else ("ok",)

    def complete(self, body: dict) -> dict:
        prompts = body["prompt"]
        prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
        k, temperature = int(body.get("prompt_logprobs") or 0), float(body.get("temperature", 1.0))
        with self.lock:  # one forward at a time: the model is shared by the handler threads
            choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": "length",
                        "prompt_logprobs": model_prompt_logprobs(self.model, p, k, temperature, self.tokenizer)}
                       for i, p in enumerate(prompts)]
        return {"id": "cmpl-test", "object": "text_completion", "model": body.get("model"), "choices": choices,
                "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": len(prompts)}}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def assert_topk_teacher_contract(ids, logprobs):
    """What the op's teacher_topk_ids / teacher_topk_logprobs accept: padding is exactly id -1 with -inf, other
    entries are finite log-probs <= 0 with distinct ids per row, in descending order, of total mass <= 1."""
    padding = ids == -1
    assert torch.equal(padding, logprobs == -math.inf)
    assert torch.isfinite(logprobs[~padding]).all() and (logprobs[~padding] <= 0).all() and (ids[~padding] >= 0).all()
    for row_ids, row_lp in zip(ids.tolist(), logprobs.tolist()):
        real = [i for i in row_ids if i != -1]
        assert len(set(real)) == len(real) and row_lp == sorted(row_lp, reverse=True)
    assert (logprobs.double().logsumexp(dim=-1) <= 1e-6).all()
