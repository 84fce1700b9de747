"""How much the safetensors cache saves when loading the embedded SmolLM2-135M-Instruct.

Each load runs in a fresh subprocess against an empty cache directory: the first converts the wheel's GGUF
(dequantise, rebuild, save), the second reads the cache. Prints wall times side by side and their ratio.

    .venv/bin/python benchmarks/embedded_model_cache.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

LOAD = """
import json, time
t = time.perf_counter()
from common.config import ModelConfig
from common.models import EMBEDDED_ALIAS, load_for_inference, load_tokenizer, resolve_model
resolved = resolve_model(EMBEDDED_ALIAS)
load_tokenizer(resolved)
load_for_inference(ModelConfig(base=EMBEDDED_ALIAS, dtype="float32"), resolved)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def timed_load(cache: str) -> float:
    env = dict(os.environ, ALIGNLAB_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(cache)
        second = timed_load(cache)
    print(f"{'load':<28}{'seconds':>10}")
    print(f"{'first (GGUF -> cache)':<28}{first:>10.1f}")
    print(f"{'second (from cache)':<28}{second:>10.1f}")
    print(f"cached load is {first / second:.1f}x faster (both include Python and library start-up)")


if __name__ == "__main__":
    main()
