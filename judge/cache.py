"""On-disk cache of judge answers, so an interrupted evaluation resumes without paying twice.

SQLite rather than jsonl: every answer is committed as it arrives, a crash can never leave a torn
line, and look-ups stay fast on large evaluations. The key is a SHA-256 of
(judge id, template hash, label set, the rendered fields, the presentation order); the stored value is
the answer only. Neither contains credentials: judge ids are built without them (see http.py).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from common.errors import InputError

from .base import RawAnswer

SCHEMA_VERSION = 1


def cache_key(judge_id: str, template_hash: str, labels: str, fields: dict[str, str], order: str) -> str:
    """Key for one judge call. `fields` are the template's values in the order they were shown;
    `order` ("AB", "BA", or "" for single grading) is kept explicitly for readability of dumps."""
    payload = json.dumps(
        {"v": SCHEMA_VERSION, "judge": judge_id, "template": template_hash, "labels": labels,
         "fields": fields, "order": order},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """A key -> RawAnswer store in one SQLite file. Safe to share between threads of one process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, judge_id TEXT, value TEXT)"
            )
        except sqlite3.DatabaseError as exc:
            raise InputError(
                f"{self.path}: not a usable judge cache ({exc}); delete it or point `cache` elsewhere"
            ) from None
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> RawAnswer | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM judgements WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return RawAnswer.from_json(json.loads(row[0]))

    def put(self, key: str, judge_id: str, answer: RawAnswer) -> None:
        value = json.dumps(answer.to_json(), ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgements (key, judge_id, value) VALUES (?, ?, ?)",
                             (key, judge_id, value))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
