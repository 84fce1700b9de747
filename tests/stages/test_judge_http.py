"""The HTTP judge against loopback servers: a scripted http.server for retries, timeouts, concurrency,
caching and key hygiene, and (slow) a real `transformers serve` with the tiny model."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from common.errors import InputError
from common.tiny import build_tiny_tokenizer, save_tiny_model
from judge import (
    PAIRWISE_LABELS,
    JudgeCache,
    Pair,
    grade_answers,
    judge_config_from_dict,
    judge_pairs,
    summarize_pairwise,
)
from judge.config import build_judge
from judge.http_judge import HTTPJudge, JudgeRequestError

KEY_ENV = "ALIGNLAB_TEST_JUDGE_KEY"


class ScriptedServer:
    """A chat-completions server on 127.0.0.1 whose answer to each request comes from `script`:
    script(n, body) -> ("ok", text) | ("status", code, body_text) | ("stall", seconds, text)."""

    def __init__(self, script):
        self.script = script
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    action = server.script(n, body)
                    if action[0] == "stall":
                        time.sleep(action[1])
                        action = ("ok", action[2])
                    if action[0] == "ok":
                        payload = json.dumps({"choices": [{"index": 0, "message": {
                            "role": "assistant", "content": action[1]}}]}).encode()
                        status = 200
                    else:
                        status, payload = action[1], action[2].encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a stalled request
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def verdict_by_position(n, body):
    """Prefers the answer containing 'good', wherever it is shown."""
    text = body["messages"][-1]["content"]
    first = text.index("Assistant A's answer]")
    good_at = text.find("good answer")
    return ("ok", "[[A]]" if first < good_at < text.index("Assistant B's answer]") else "[[B]]")


PAIRS = [Pair(f"question {i}", "a good answer", f"a weak answer {i}") for i in range(3)]


def make_judge(server, **kw):
    kw = {"max_concurrency": 2, "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01, **kw}
    return HTTPJudge(server.base_url, "judge-model", **kw)


def test_verdicts_concurrency_and_a_cached_rerun_makes_no_request(tmp_path):
    def slow(n, body):
        time.sleep(0.05)  # long enough for requests to overlap
        return verdict_by_position(n, body)

    with ScriptedServer(slow) as server:
        judge = make_judge(server, max_concurrency=2)
        with JudgeCache(tmp_path / "cache.sqlite") as cache:
            verdicts = judge_pairs(judge, PAIRS, cache=cache)
            assert [v.winner for v in verdicts] == ["a"] * 3 and all(v.consistent for v in verdicts)
            assert len(server.requests) == 6 and server.max_in_flight == 2
            assert server.requests[0]["model"] == "judge-model" and server.requests[0]["temperature"] == 0.0
            rerun = make_judge(server)
            assert [v.winner for v in judge_pairs(rerun, PAIRS, cache=cache)] == ["a"] * 3
        assert len(server.requests) == 6 and rerun.requests_sent == 0  # all from the cache


def test_retries_500_then_succeeds():
    script = lambda n, body: ("status", 500, "boom") if n < 2 else ("ok", "B")  # noqa: E731
    with ScriptedServer(script) as server:
        judge = make_judge(server, max_concurrency=1)
        [answer] = judge.ask(["q"], PAIRWISE_LABELS)
        assert answer.label == "B" and len(server.requests) == 3 and judge.requests_sent == 3


def test_stalled_request_times_out_and_is_retried():
    script = lambda n, body: ("stall", 2.0, "A") if n == 0 else ("ok", "A")  # noqa: E731
    with ScriptedServer(script) as server:
        judge = make_judge(server, max_concurrency=1, timeout_s=0.3)
        started = time.monotonic()
        [answer] = judge.ask(["q"], PAIRWISE_LABELS)
        assert answer.label == "A" and len(server.requests) == 2
        assert time.monotonic() - started < 1.5  # did not wait for the stalled answer


def test_exhausted_retries_and_client_errors_fail_clearly(tmp_path):
    with ScriptedServer(lambda n, body: ("status", 503, "overloaded")) as server:
        judge = make_judge(server, max_concurrency=1, max_retries=2)
        with pytest.raises(JudgeRequestError, match=r"1 of 1 judge requests failed.*HTTP 503.*after 2 retries"):
            judge.ask(["q"], PAIRWISE_LABELS)
        assert len(server.requests) == 3
    with ScriptedServer(lambda n, body: ("status", 404, "no such model")) as server:
        judge = make_judge(server)
        with pytest.raises(JudgeRequestError, match=r"HTTP 404: no such model \(not retried\)"):
            judge.ask(["q"], PAIRWISE_LABELS)
        assert len(server.requests) == 1
    # Nothing listening: connection errors are retried, then reported.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = HTTPJudge(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.01, timeout_s=1)
    with pytest.raises(JudgeRequestError, match=r"connection error"):
        judge.ask(["q"], PAIRWISE_LABELS)


def test_partial_failure_keeps_the_answers_that_arrived(tmp_path):
    # The second prompt's requests always fail: the first prompt's answers are cached all the same.
    def script(n, body):
        return ("status", 500, "down") if "question 1" in body["messages"][-1]["content"] else verdict_by_position(
            n, body)

    with ScriptedServer(script) as server, JudgeCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(JudgeRequestError, match=r"2 of 6 judge requests failed.*re-run to resume"):
            judge_pairs(make_judge(server, max_retries=1), PAIRS, cache=cache)
        assert len(cache) == 4


def test_unparseable_answers_are_counted(tmp_path):
    script = lambda n, body: ("ok", "Both are fine, really." if n % 2 else "[[A]]")  # noqa: E731
    with ScriptedServer(script) as server:
        judge = make_judge(server, max_concurrency=1)
        verdicts = judge_pairs(judge, PAIRS[:2])
        grades = grade_answers(judge, ["q"], ["a"])
    unparseable = sum(not a.parsed for v in verdicts for a in (v.ab, v.ba))
    assert unparseable == 2 and all(v.winner is None for v in verdicts)
    assert grades[0].score is None and grades[0].answer.text == "[[A]]"
    metrics = summarize_pairwise([v.winner for v in verdicts], [v.consistent for v in verdicts],
                                 ["x", "y"], ["z", "w"], unparseable_answers=unparseable, n_resamples=50)
    assert metrics["judge/unparseable_pairs"] == 2 and metrics["judge/unparseable_answers"] == 2


def test_api_key_is_sent_but_never_written(tmp_path, monkeypatch, caplog):
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)

    def script(n, body):
        if n == 0:  # a server that echoes the key in an error body must not make us log it
            return ("status", 500, f"bad gateway for key {key}")
        return verdict_by_position(n, body)

    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    with ScriptedServer(script) as server:
        cfg = judge_config_from_dict({"backend": "http", "cache": str(run_dir / "judge.sqlite"), "http": {
            "base_url": server.base_url, "model": "judge-model", "api_key_env": KEY_ENV, "backoff_s": 0.01,
            "max_concurrency": 1}})
        judge = build_judge(cfg)
        with JudgeCache(cfg.cache) as cache:
            verdicts = judge_pairs(judge, PAIRS, cache=cache)
        assert server.auth[0] == f"Bearer {key}"
        with ScriptedServer(lambda n, body: ("status", 401, f"invalid key {key}")) as bad:
            with pytest.raises(JudgeRequestError) as failure:
                HTTPJudge(bad.base_url, "m", api_key_env=KEY_ENV).ask(["q"], PAIRWISE_LABELS)
    report = {"judge_id": judge.judge_id, "repr": repr(judge), "config": str(cfg), "vars": str(vars(judge)),
              "verdicts": [v.winner for v in verdicts]}
    (run_dir / "report.json").write_text(json.dumps(report))
    assert any("retry 1/4" in r.getMessage() for r in caplog.records)
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 2
    for blob in written + [caplog.text.encode(), str(failure.value).encode()]:
        assert key.encode() not in blob
    assert "***" in str(failure.value)


def test_missing_key_variable_is_an_input_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(InputError, match=f"environment variable {KEY_ENV} is not set"):
        HTTPJudge("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_against_a_real_transformers_serve(tmp_path, monkeypatch):
    from transformers.utils.import_utils import is_serve_available

    exe = Path(sys.executable).parent / "transformers"
    assert is_serve_available() and exe.exists(), "transformers serve needs the dev extras (fastapi, uvicorn, openai)"
    model_dir = save_tiny_model(tmp_path / "tiny")
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        base = f"http://127.0.0.1:{port}/v1"
        # The random tiny model babbles, so a logit bias on the token "A" makes it answer "A": whatever is
        # shown first wins, which the protocol must report as position-inconsistent ties.
        a_id = build_tiny_tokenizer()("A", add_special_tokens=False)["input_ids"][0]
        biased = HTTPJudge(base, str(model_dir), api_key_env=KEY_ENV, max_tokens=1, max_concurrency=2,
                           timeout_s=30, extra_body={"logit_bias": {str(a_id): 100.0}})
        with JudgeCache(tmp_path / "cache.sqlite") as cache:
            verdicts = judge_pairs(biased, PAIRS[:2], cache=cache)
            assert [a.text for v in verdicts for a in (v.ab, v.ba)] == ["A"] * 4
            assert all(v.winner == "tie" and v.consistent is False for v in verdicts)
            judge_pairs(biased, PAIRS[:2], cache=cache)
        assert biased.requests_sent == 4  # the re-run came from the cache
        # Unbiased, the random model's text is no verdict: counted as unparseable, never guessed.
        babbling = HTTPJudge(base, str(model_dir), max_tokens=4, timeout_s=30)
        [grade] = grade_answers(babbling, ["q"], ["a"])
        assert grade.score is None and grade.answer.text is not None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    shutil.rmtree(model_dir)
