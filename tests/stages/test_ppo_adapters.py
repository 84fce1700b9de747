"""The one-base design: policy, reference and value as adapters on a single tiny model. After PPO steps the
reference's log-probs and the base weights are bit-identical, the policy's and the value's moved, and only the
trainable roles are in the optimizer; the saved policy reloads with plain peft; QLoRA-PPO trains (on the CPU, or
the GPU where there is one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model

from common.adapters import adapters_off
from common.config import LoraSpec, ModelConfig
from common.generation import response_logprobs
from common.models import load_base_model, load_tokenizer, lora_config, resolve_model
from common.sampling import SamplingParams
from common.tracking import Tracker
from ppo.adapters import POLICY, REFERENCE, VALUE, OneBaseModel
from ppo.config import PPOArgs
from ppo.trainer import PPOTrainer, rollout_prompts
from preferences.scorers import build_scorer
from tests.stages.test_ppo_training import FAST_ARGS, LETTERS, TOPICS

MODEL = ModelConfig(base="tiny-random-llama", dtype="float32", lora=LoraSpec(r=4, alpha=8, dropout=0.0))
# The GPU where there is one (the same tests check the CUDA path), else the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_sft_stand_in(path: Path) -> Path:
    """A stand-in SFT adapter with random (non-zero) A and B, so that the SFT model differs from the base."""
    torch.manual_seed(0)
    base = load_base_model(MODEL, resolve_model(MODEL.base), training=False)
    config = lora_config(MODEL.lora)
    config.init_lora_weights = False
    get_peft_model(base, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory) -> Path:
    return save_sft_stand_in(tmp_path_factory.mktemp("sft") / "adapter")


def make_trainer(model: OneBaseModel, stage_dir: Path, model_cfg: ModelConfig = MODEL, reward_fn=None,
                 accelerator: Accelerator | None = None, **args) -> PPOTrainer:
    """A trainer on the test prompts, rewarded by the letter count (or `reward_fn`), writing into `stage_dir`."""
    tokenizer = load_tokenizer(resolve_model(model_cfg.base))
    prompts = rollout_prompts(tokenizer, [f"Write about {t}." for t in TOPICS], "prompts")
    stage_dir.mkdir(parents=True, exist_ok=True)
    reward_fn = reward_fn or build_scorer(LETTERS).score
    accelerator = accelerator or Accelerator(cpu=DEVICE.type == "cpu")
    return PPOTrainer(PPOArgs(**(FAST_ARGS | args)), model, tokenizer, prompts, reward_fn, accelerator,
                      Tracker(stage_dir, is_main=accelerator.is_main_process), stage_dir, seed=0)


def fixed_batch():
    """Two prompts (different lengths, so left-padded) with fixed 5-token responses."""
    ids = torch.tensor([[0, 0, 40, 41, 42, 70, 71, 72, 73, 74], [50, 51, 52, 53, 54, 80, 81, 82, 83, 84]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    return ids.to(DEVICE), mask.to(DEVICE), 5


def snapshot(model: OneBaseModel, keep) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.peft.named_parameters() if keep(n)}


def changed(before: dict, model: OneBaseModel) -> list[str]:
    params = dict(model.peft.named_parameters())
    return [n for n, v in before.items() if not torch.equal(params[n], v)]


def role_logprobs(model: OneBaseModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's and the policy's log-probs of `fixed_batch`."""
    ids, mask, start = fixed_batch()
    with torch.no_grad():
        return model.reference_logprobs(ids, mask, start, 1.0), model.policy_forward(ids, mask, start, 1.0).logprobs


def assert_reference_fixed_and_policy_moved(model: OneBaseModel, before: tuple, frozen: list[dict]) -> None:
    """After training: `before` (role_logprobs before it) shows the reference where it was and the policy moved, and
    no weight of the `frozen` snapshots (the base's, the reference adapter's) changed."""
    ref_after, policy_after = role_logprobs(model)
    assert torch.equal(ref_after, before[0]), "the reference must not move"
    assert (policy_after - before[1]).abs().max() > 1e-3, "the policy must move"
    assert all(changed(weights, model) == [] for weights in frozen)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_roles_after_ppo_steps(sft_adapter, tmp_path, value_model):
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), sft_adapter, value_model, DEVICE)
    ids, mask, start = fixed_batch()
    with torch.no_grad(), adapters_off(model.peft):
        base_logprobs = response_logprobs(model.peft, ids, mask, start, 1.0).logprobs
    ref_before, policy_before = role_logprobs(model)
    # The policy starts as the SFT adapter, which is the reference; the base itself differs from both.
    assert torch.equal(policy_before, ref_before)
    assert (base_logprobs - ref_before).abs().max() > 1e-3

    base = snapshot(model, lambda n: "lora_" not in n)
    reference = snapshot(model, lambda n: f".{REFERENCE}." in n)
    trainable = snapshot(model, lambda n: f".{POLICY}." in n or f".{VALUE}." in n)
    head = model.value_head.weight.detach().clone()
    trainer = make_trainer(model, tmp_path, learning_rate=1e-2)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for n, p in model.peft.named_parameters() if n in trainable}
    assert optimized == expected | {id(p) for p in model.value_head.parameters()}
    trainer.train()

    assert_reference_fixed_and_policy_moved(model, (ref_before, policy_before), [base, reference])
    moved = changed(trainable, model)
    assert any(f".{POLICY}." in n for n in moved)
    assert not torch.equal(model.value_head.weight, head)
    if value_model == "separate":
        assert any(f".{VALUE}." in n for n in moved), "the value adapter trains too"
    # Switching roles left the trainable set as it was.
    grads = {n: p.requires_grad for n, p in model.peft.named_parameters()}
    assert all(grads[n] for n in trainable) and not any(grads[n] for n in reference) and not any(grads[n] for n in base)

    # The saved policy is a plain PEFT adapter: reloaded on a fresh base it gives the same log-probs.
    model.save_adapter(POLICY, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base_model(MODEL, resolve_model(MODEL.base), training=False),
                                         tmp_path / "adapter").eval().to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(reloaded, ids, mask, start, 1.0).logprobs,
                                   role_logprobs(model)[1])


def test_without_sft_the_reference_is_the_base_with_adapters_disabled(tmp_path):
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "shared", DEVICE)
    ids, mask, start = fixed_batch()
    plain = load_base_model(MODEL, resolve_model(MODEL.base), training=False).eval().to(DEVICE)
    with torch.no_grad():
        expected = response_logprobs(plain, ids, mask, start, 1.0).logprobs
        torch.testing.assert_close(model.reference_logprobs(ids, mask, start, 1.0), expected)
    make_trainer(model, tmp_path, learning_rate=1e-2).train()
    with torch.no_grad():
        torch.testing.assert_close(model.reference_logprobs(ids, mask, start, 1.0), expected)
        assert (model.policy_forward(ids, mask, start, 1.0).logprobs - expected).abs().max() > 1e-3


def test_dropout_kept_in_the_model_config_is_off_too_so_train_mode_log_probs_are_eval_mode_ones(tmp_path):
    """Llama keeps attention dropout as a float copied from its config, not as an nn.Dropout module: a model saved
    with attention_dropout 0.5 must still give the first PPO ratio exactly 1."""
    from common.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tiny = build_tiny_model(tokenizer)
    tiny.config.attention_dropout = 0.5
    tiny.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cfg = ModelConfig(base=str(tmp_path / "model"), dtype="float32", lora=MODEL.lora)
    model = OneBaseModel.build(cfg, resolve_model(cfg.base), None, "shared", DEVICE)
    ids, mask, start = fixed_batch()
    with torch.no_grad():
        model.eval()
        expected = model.policy_forward(ids, mask, start, 1.0).logprobs
        model.train()
        for _ in range(2):
            torch.testing.assert_close(model.policy_forward(ids, mask, start, 1.0).logprobs, expected, atol=0, rtol=0)
    assert model.lm.config.attention_dropout == 0.0


def test_shared_value_comes_from_the_policy_forward_pass(tmp_path):
    """The shared head reads the hidden state that feeds the LM head: equal to running the trunk by hand."""
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "shared", DEVICE)
    torch.nn.init.normal_(model.value_head.weight)
    ids, mask, start = fixed_batch()
    with torch.no_grad():
        values = model.policy_forward(ids, mask, start, 1.0).values
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = model.lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        expected = model.value_head(hidden[:, start - 1:-1]).squeeze(-1)
    torch.testing.assert_close(values, expected)


def test_qlora_4bit_ppo_keeps_gradients_through_the_base_after_rollouts(tmp_path):
    import bitsandbytes as bnb

    cfg = ModelConfig(base="tiny-random-llama", lora=LoraSpec(r=4, alpha=8, dropout=0.0), quantization="4bit",
                      compute_dtype="float32")
    model = OneBaseModel.build(cfg, resolve_model(cfg.base), None, "shared", DEVICE)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.peft.modules())
    ids, mask, start = fixed_batch()
    # Layer 0's query LoRA: its gradient reaches it only through the 4-bit o_proj (the LoRA B beside it is 0).
    first_b = next(p for n, p in model.peft.named_parameters() if "layers.0.self_attn.q_proj.lora_B.policy" in n)

    def first_layer_grad() -> torch.Tensor:
        model.train()
        model.policy_forward(ids, mask, start, 1.0).logprobs.sum().backward()
        grad = first_b.grad.clone()
        model.peft.zero_grad(set_to_none=True)
        return grad

    before = first_layer_grad()
    assert before.abs().max() > 0
    model.sample(load_tokenizer(resolve_model(cfg.base)), [[40, 41, 42]], SamplingParams(max_new_tokens=3))  # eval mode
    torch.testing.assert_close(first_layer_grad(), before)

    lora_b = snapshot(model, lambda n: "lora_B" in n)
    metrics = make_trainer(model, tmp_path, cfg).train()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert len(changed(lora_b, model)) == len(lora_b), "every policy LoRA B moved"


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state, which fixes mixed precision at the first Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_runs_every_rollout_forward_pass_in_bf16_and_the_update_trains(tmp_path,
                                                                                      fresh_accelerator_state):
    """mixed_precision: bf16 (ppo.stage gives the Accelerator mixed_precision="bf16"): sampling, old log-probs,
    values and the update's forward passes all autocast, so the ratio starts near 1; log-probs and values stay
    float32."""
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "shared", DEVICE)
    accelerator = Accelerator(cpu=DEVICE.type == "cpu", mixed_precision="bf16")
    trainer = make_trainer(model, tmp_path, accelerator=accelerator)
    dtypes = set()
    model.lm.get_decoder().layers[0].mlp.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))

    rollout, _, _ = trainer.rollout(trainer.prompts[:4], step=1)
    assert dtypes == {torch.bfloat16}, "every forward pass of the rollout ran in bf16"
    assert rollout.logprobs.dtype == rollout.values.dtype == torch.float32
    mb = rollout.micro_batch(torch.arange(4))
    model.train()
    with accelerator.autocast():
        new = model.policy_forward(mb.ids, mb.attention, mb.start, FAST_ARGS["temperature"]).logprobs
    mask = mb.mask.bool()
    # Not bit-equal as in float32: bf16 kernels with and without autograd round differently (seen: up to 6e-3),
    # a ratio within 1% of 1, far inside the clip range.
    torch.testing.assert_close(new[mask], mb.logprobs[mask], rtol=0, atol=1e-2)

    lora_b = snapshot(model, lambda n: "lora_B" in n)
    metrics = trainer.train()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert len(changed(lora_b, model)) == len(lora_b), "every policy LoRA B moved"
