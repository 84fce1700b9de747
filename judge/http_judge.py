"""Any OpenAI-compatible chat-completions endpoint as judge (vLLM, TGI, `transformers serve`, OpenAI ...).

The judge generates free text, parsed by `parsing.parse_label`; an answer that cannot be parsed is
kept (and cached) with label None and counted in the results, never guessed.

Requests run in a thread pool of `max_concurrency`; each has a timeout and is retried with exponential
backoff (backoff_s * 2**attempt, capped at backoff_max_s, or the server's Retry-After when longer) on
connection errors, timeouts, HTTP 429 and 5xx. Other 4xx answers (a wrong model name, a bad key) are not
retried. Requests that still fail are reported together after the others finished, so every answer that
did arrive is already in the cache and a re-run resumes.

The API key is read from the environment variable the recipe names (`api_key_env`), held privately,
sent only in the Authorization header, and scrubbed from every message this module writes; it is not
part of the judge id, hence of no cache key, log or report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import requests

from common.errors import InputError

from .base import LabelSet, OnResult, RawAnswer
from .parsing import parse_label

log = logging.getLogger("alignlab.judge.http")

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class _Secret:
    """Holds the API key so that repr(), str(), vars() dumps and pickles of a judge never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "<secret>" if self._value else "<none>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("the judge's API key is not picklable; read it from the environment again")


class JudgeRequestError(RuntimeError):
    """Judge requests that failed after all retries (or could not be retried)."""


class HTTPJudge:
    """Judge through `POST {base_url}/chat/completions` (base_url as OpenAI's clients take it, e.g.
    "http://127.0.0.1:8000/v1")."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, max_concurrency: int = 4,
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 1.0,
                 backoff_max_s: float = 30.0, max_tokens: int = 512, temperature: float = 0.0,
                 system_prompt: str | None = None, extra_body: dict[str, Any] | None = None,
                 judge_id: str | None = None):
        if max_concurrency < 1:
            raise InputError(f"judge max_concurrency: expected an integer >= 1, got {max_concurrency}; "
                             f"set it to the number of parallel requests the endpoint allows")
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise InputError("judge max_retries, timeout_s, backoff_s: expected max_retries >= 0, "
                             f"timeout_s > 0, backoff_s >= 0, got {max_retries}, {timeout_s}, {backoff_s}; "
                             "fix the recipe")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})
        self._key = _Secret(_read_key(api_key_env))
        self._local = threading.local()
        self.requests_sent = 0  # every HTTP attempt, retries included
        self._count_lock = threading.Lock()
        settings = json.dumps({"temperature": temperature, "max_tokens": max_tokens, "system": system_prompt,
                               "extra": self.extra_body}, sort_keys=True)
        self.judge_id = judge_id or (
            f"http:{base_url.rstrip('/')}|{model}|{hashlib.sha256(settings.encode()).hexdigest()[:16]}"
        )

    def __repr__(self) -> str:  # never the key
        return f"HTTPJudge(url={self.url!r}, model={self.model!r})"

    # ----- one request -----

    def _scrub(self, text: str) -> str:
        key = self._key.reveal()
        return text.replace(key, "***") if key else text

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _body(self, query: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": query})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "stream": False}
        body.update(self.extra_body)
        return body

    def _delay(self, attempt: int, response: requests.Response | None) -> float:
        delay = min(self.backoff_s * 2 ** attempt, self.backoff_max_s)
        if response is not None:
            try:  # Retry-After in seconds (RFC 9110 sec. 10.2.3); the HTTP-date form is ignored
                delay = max(delay, min(float(response.headers.get("Retry-After", "")), self.backoff_max_s))
            except ValueError:
                pass
        return delay

    def _complete(self, query: str, labels: LabelSet) -> RawAnswer:
        headers = {"Content-Type": "application/json"}
        if self._key.reveal():
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        body = self._body(query)
        problem = ""
        for attempt in range(self.max_retries + 1):
            response = None
            with self._count_lock:
                self.requests_sent += 1
            try:
                response = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except requests.Timeout:
                problem = f"no answer within timeout_s={self.timeout_s}"
            except requests.ConnectionError as exc:
                problem = f"connection error ({self._scrub(type(exc).__name__)})"
            else:
                if response.status_code == 200:
                    return self._parse_response(response, labels)
                detail = self._scrub(response.text[:200].replace("\n", " "))
                problem = f"HTTP {response.status_code}: {detail}"
                if response.status_code not in RETRY_STATUS:
                    raise JudgeRequestError(f"{self.url}: {problem} (not retried)")
            if attempt < self.max_retries:
                delay = self._delay(attempt, response)
                log.warning("judge request to %s failed (%s); retry %d/%d in %.2fs", self.url, problem,
                            attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise JudgeRequestError(f"{self.url}: {problem} (after {self.max_retries} retries)")

    def _parse_response(self, response: requests.Response, labels: LabelSet) -> RawAnswer:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeRequestError(
                f"{self.url}: HTTP 200 but not a chat-completions answer: "
                f"{self._scrub(response.text[:200])!r}"
            ) from None
        text = content if isinstance(content, str) else ""
        return RawAnswer(label=parse_label(text, labels), text=text)

    # ----- many requests -----

    def ask(self, queries: Sequence[str], labels: LabelSet, on_result: OnResult | None = None) -> list[RawAnswer]:
        answers: list[RawAnswer | None] = [None] * len(queries)
        failures: list[str] = []
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="judge-http")
        try:
            futures = {pool.submit(self._complete, q, labels): i for i, q in enumerate(queries)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    answers[i] = future.result()
                except JudgeRequestError as exc:
                    failures.append(str(exc))
                    continue
                if on_result is not None:
                    on_result(i, answers[i])
        finally:
            # On Ctrl-C, drop the queued requests; those in flight finish on their own timeout.
            pool.shutdown(wait=True, cancel_futures=True)
        if failures:
            raise JudgeRequestError(
                f"{len(failures)} of {len(queries)} judge requests failed; first: {failures[0]}. "
                f"The {len(queries) - len(failures)} answers received are cached; re-run to resume"
            )
        return answers  # type: ignore[return-value]


def _read_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise InputError(
            f"judge api_key_env: environment variable {env_name} is not set or empty; "
            f"export it with the API key (the recipe holds only the variable's name)"
        )
    return value
