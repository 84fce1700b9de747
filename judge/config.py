"""The `judge` recipe section, key for key, and building a judge from it.

```yaml
judge:
  backend: http                 # or local
  http:
    base_url: http://127.0.0.1:8000/v1
    model: my-judge
    api_key_env: JUDGE_API_KEY  # the variable's NAME; the key itself never goes in a recipe
  pairwise_template: prompts/my_pairwise.j2   # optional; defaults in judge/templates/
  cache: runs/judge-cache.sqlite
```
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InputError

from .base import Judge
from .cache import JudgeCache
from .templates import JudgeTemplate, load_template


@dataclass
class LocalJudgeConfig:
    model: str                      # a local model directory
    gguf_file: str | None = None    # a GGUF file inside `model` (dequantised on load)
    batch_size: int = 8
    dtype: str = "auto"
    device: str | None = None


@dataclass
class HTTPJudgeConfig:
    base_url: str                   # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str | None = None  # NAME of the environment variable holding the key
    max_concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    max_tokens: int = 512
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # extra request fields (e.g. seed)


@dataclass
class JudgeConfig:
    backend: str = "local"          # "local" or "http"
    local: LocalJudgeConfig | None = None
    http: HTTPJudgeConfig | None = None
    system_prompt: str | None = None
    pairwise_template: str | None = None   # file paths; None = the project's defaults
    single_template: str | None = None
    reference_template: str | None = None
    cache: str | None = None        # SQLite cache file; None = no cache
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except InputError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise InputError(f"{where}: expected {getattr(expected, '__name__', expected)}, got {value!r}; "
                         f"fix the recipe")
    return value


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of keys, got {data!r}; fix the recipe")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key; expected one of {sorted(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise InputError(f"{where}.{missing[0]}: required key is missing; add it to the recipe")
    return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def judge_config_from_dict(data: dict[str, Any], where: str = "judge") -> JudgeConfig:
    """Strictly parse the judge section: unknown keys, wrong types and a missing backend block are errors."""
    cfg = _from_dict(JudgeConfig, data, where)
    if cfg.backend not in ("local", "http"):
        raise InputError(f"{where}.backend: expected 'local' or 'http', got {cfg.backend!r}; fix the recipe")
    if getattr(cfg, cfg.backend) is None:
        raise InputError(f"{where}.{cfg.backend}: backend '{cfg.backend}' needs a '{cfg.backend}:' block; "
                         f"add it to the recipe")
    for key in ("pairwise_template", "single_template", "reference_template"):
        path = getattr(cfg, key)
        if path is not None and not Path(path).is_file():
            raise InputError(f"{where}.{key}: template file {path} not found; give an existing file or "
                             f"remove the key to use the default")
    return cfg


def build_judge(cfg: JudgeConfig) -> Judge:
    """The judge backend a config describes (loads the local model, or checks the API key is set)."""
    if cfg.backend == "http":
        h = cfg.http
        assert h is not None
        from .http_judge import HTTPJudge

        return HTTPJudge(base_url=h.base_url, model=h.model, api_key_env=h.api_key_env,
                         max_concurrency=h.max_concurrency, timeout_s=h.timeout_s, max_retries=h.max_retries,
                         backoff_s=h.backoff_s, backoff_max_s=h.backoff_max_s, max_tokens=h.max_tokens,
                         temperature=h.temperature, system_prompt=cfg.system_prompt, extra_body=h.extra_body)
    loc = cfg.local
    assert loc is not None
    if not Path(loc.model).is_dir():
        raise InputError(f"judge.local.model: {loc.model} is not a local model directory; give a directory "
                         f"with config.json (or a GGUF file named by gguf_file)")
    from .local import LocalJudge

    return LocalJudge.from_pretrained(loc.model, gguf_file=loc.gguf_file, dtype=loc.dtype, device=loc.device,
                                      batch_size=loc.batch_size, system_prompt=cfg.system_prompt)


def build_templates(cfg: JudgeConfig) -> dict[str, JudgeTemplate]:
    return {
        "pairwise": load_template("pairwise", cfg.pairwise_template),
        "single": load_template("single", cfg.single_template),
        "single_reference": load_template("single_reference", cfg.reference_template),
    }


def open_cache(cfg: JudgeConfig) -> JudgeCache | None:
    return JudgeCache(cfg.cache) if cfg.cache else None
