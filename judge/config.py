"""The `judge` block of a recipe (an eval stage's `judge:`, a preferences stage's `labeller.judge:`), typed key for
key and read by `common.schema` like every other block, and building a judge from it.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.errors import InputError
from common.schema import build

from .base import Judge
from .cache import JudgeCache
from .templates import JudgeTemplate, load_template

TEMPLATE_KEYS = ("pairwise_template", "single_template", "reference_template")


@dataclass
class LocalJudgeConfig:
    model: str | None = None        # a model directory (an alias too, in the eval stage); None = the context's
                                    # default: the eval stage judges with the recipe's base model
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
    backend: Literal["local", "http"] = "local"
    local: LocalJudgeConfig | None = None  # backend local without a block: every default
    http: HTTPJudgeConfig | None = None
    system_prompt: str | None = None
    pairwise_template: str | None = None   # file paths; None = the project's defaults
    single_template: str | None = None
    reference_template: str | None = None
    cache: str | None = None        # SQLite cache file; None = no cache
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.backend == "local" and self.local is None:
            self.local = LocalJudgeConfig()
        if self.backend == "http" and self.http is None:
            # common.schema.build turns this into one line naming the block.
            raise ValueError("backend 'http' needs an 'http:' block with base_url and model; add it")


def with_paths(cfg: JudgeConfig, resolve: Callable[[str], Path], where: str, source: str = "recipe") -> JudgeConfig:
    """A copy of `cfg` with its template and cache paths passed through `resolve` (a recipe's are relative to the
    recipe file), each template checked to exist."""
    cfg = dataclasses.replace(cfg, **{key: str(resolve(getattr(cfg, key))) for key in (*TEMPLATE_KEYS, "cache")
                                      if getattr(cfg, key) is not None})
    for key in TEMPLATE_KEYS:
        path = getattr(cfg, key)
        if path is not None and not Path(path).is_file():
            raise InputError(f"{source}: {where}.{key}: template file {path} not found; give an existing file or "
                             f"remove the key to use the default")
    return cfg


def judge_config_from_dict(data: dict[str, Any], where: str = "judge", source: str = "recipe") -> JudgeConfig:
    """A judge block given as a mapping (the `alignlab judge` command's flags): read as a recipe's is, relative
    paths relative to the working directory."""
    return with_paths(build(JudgeConfig, data, where, source), Path, where, source)


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
    if loc.model is None or not Path(loc.model).is_dir():
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
