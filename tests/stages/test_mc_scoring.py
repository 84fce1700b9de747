"""The fast scorer against the slow reference (one forward per choice, full logits) on the tiny model."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from common.errors import InputError
from common.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_model, build_tiny_tokenizer
from eval.mc import evaluate_mc
from eval.mc.data import MCQuestion, load_questions
from eval.mc.scoring import ScoreStats, build_prompts, encode_pair, encode_pairs, reference_logprobs, score_prompts

SHIPPED = Path(__file__).resolve().parents[2] / "recipes" / "data" / "mc"
QUESTIONS = [
    MCQuestion("What is 2 + 2?", ("3", "4", "5", "six"), 1, "math"),
    MCQuestion("Capital of France?", ("Paris", "Rome", "Berlin"), 0, "geography"),
    MCQuestion("What is 3 + 3?", ("six", "7", "eight", "9"), 0, "math"),
    MCQuestion("Largest ocean?", ("Pacific", "Atlantic"), 0, "geography"),
    MCQuestion("Is water wet?", ("yes", "no"), 0, "math"),
]
DEV = [
    MCQuestion("What is 1 + 1?", ("2", "3"), 0, "math"),
    MCQuestion("What is 1 + 2?", ("4", "3"), 1, "math"),
    MCQuestion("Capital of Italy?", ("Rome", "Paris"), 0, "geography"),
    MCQuestion("Capital of Spain?", ("Rome", "Madrid", "Lisbon"), 1, "geography"),
]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tiny_tokenizer()
    return build_tiny_model(tok), tok


def letter_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """The tiny byte-level tokenizer plus merges that make " A" ... " E" single tokens, as in real BPE vocabularies."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(vocab) + i for i, ch in enumerate(alphabet)})
    merges = [("Ġ", letter) for letter in "ABCDE"]
    vocab.update({"Ġ" + letter: len(vocab) + i for i, letter in enumerate("ABCDE")})
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    if add_bos:  # like Llama's tokenizers: BOS prepended by the post-processor
        core.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                            special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def assert_close(fast, ref, tol):
    assert [len(r) for r in fast] == [len(r) for r in ref]
    for f_row, r_row in zip(fast, ref, strict=True):
        assert f_row == pytest.approx(r_row, abs=tol)


@pytest.mark.parametrize("mode", ["letter", "cloze"])
@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("chat", [False, True])
def test_fast_matches_reference(tiny, mode, shots, chat):
    model, tok = tiny
    prompts = build_prompts(QUESTIONS, DEV, shots, mode, chat, tok)
    stats = ScoreStats()
    fast = score_prompts(model, tok, prompts, [q.subject for q in QUESTIONS], batch_size=3, stats=stats)
    assert_close(fast, reference_logprobs(model, tok, prompts), 1e-4)
    assert stats.direct_logits  # hidden states + lm_head at scored rows only
    if mode == "letter":
        # Byte-level: " A" is " " + "A"; the choices share all but the last token -> one row per question.
        assert stats.single_forward_questions == len(QUESTIONS) and stats.rows == len(QUESTIONS)


def test_single_token_path_only_when_continuations_differ_in_last_token():
    tok = letter_tokenizer()
    model = build_tiny_model(tok, seed=1)
    prompts = build_prompts(QUESTIONS, DEV, 1, "letter", False, tok)
    for prompt in prompts:
        assert all(len(encode_pair(tok, prompt.context, c)[1]) == 1 for c in prompt.continuations)
    stats = ScoreStats()
    fast = score_prompts(model, tok, prompts, batch_size=4, stats=stats)
    assert stats.as_dict()["path"] == "single" and stats.rows == len(QUESTIONS)
    assert_close(fast, reference_logprobs(model, tok, prompts), 1e-4)

    # Cloze answers of several tokens that differ before the last one: one row per choice.
    cloze = build_prompts(QUESTIONS[:2], None, 0, "cloze", False, tok)
    stats = ScoreStats()
    fast = score_prompts(model, tok, cloze, stats=stats)
    assert stats.as_dict()["path"] == "per_choice"
    assert stats.rows == sum(len(q.choices) for q in QUESTIONS[:2])
    assert_close(fast, reference_logprobs(model, tok, cloze), 1e-4)


def test_batched_encoding_equals_lm_eval_pairwise_encoding(tiny):
    _, tiny_tok = tiny
    for tok in (tiny_tok, letter_tokenizer(), letter_tokenizer(add_bos=True)):
        prompts = (build_prompts(QUESTIONS, DEV, 2, "letter", False, tok)
                   + build_prompts(QUESTIONS, DEV, 1, "cloze", True, tok))
        pairs = [(p.context, c) for p in prompts for c in p.continuations]
        pairs.append(("<|endoftext|>Question: x\nAnswer: ", "yes"))  # BOS already written, trailing space moved
        assert encode_pairs(tok, pairs) == [encode_pair(tok, c, k) for c, k in pairs]
    bos_tok = letter_tokenizer(add_bos=True)
    assert encode_pair(bos_tok, "Q:", " A")[0][0] == bos_tok.bos_token_id
    assert encode_pair(bos_tok, "<|endoftext|>Q:", " A")[0].count(bos_tok.bos_token_id) == 1
    assert encode_pair(bos_tok, "Q: ", "A")[1] == encode_pair(bos_tok, "Q:", " A")[1]


def test_prefix_cache_reuse_equals_no_reuse(tiny):
    model, tok = tiny
    for mode in ("letter", "cloze"):
        prompts = build_prompts(QUESTIONS, DEV, 2, mode, False, tok)
        groups = [q.subject for q in QUESTIONS]
        with_cache, without = ScoreStats(), ScoreStats()
        a = score_prompts(model, tok, prompts, groups, batch_size=2, reuse_prefix=True, stats=with_cache)
        b = score_prompts(model, tok, prompts, groups, batch_size=2, reuse_prefix=False, stats=without)
        assert with_cache.prefix_tokens_reused > 0 and without.prefix_tokens_reused == 0
        assert with_cache.tokens < without.tokens
        assert_close(a, b, 1e-5)


def test_batch_size_does_not_change_scores(tiny):
    model, tok = tiny
    prompts = build_prompts(QUESTIONS, DEV, 1, "cloze", False, tok)
    one = score_prompts(model, tok, prompts, batch_size=1)
    many = score_prompts(model, tok, prompts, batch_size=16)
    assert_close(one, many, 1e-5)


def test_peft_adapter(tiny):
    import peft

    _, tok = tiny
    base = build_tiny_model(tok, seed=2)
    prompts = build_prompts(QUESTIONS, DEV, 1, "letter", False, tok)
    before = score_prompts(base, tok, prompts)
    # init_lora_weights=False: B is random, so the adapter really changes the outputs.
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    fast = score_prompts(model, tok, prompts)
    assert_close(fast, reference_logprobs(model, tok, prompts), 1e-4)
    assert any(abs(a - b) > 1e-3 for fa, ba in zip(fast, before, strict=True) for a, b in zip(fa, ba, strict=True))
    with model.disable_adapter():
        assert_close(score_prompts(model, tok, prompts), before, 1e-5)


def test_4bit_bitsandbytes_model_with_adapter(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from common.tiny import save_tiny_model

    tok = build_tiny_tokenizer()
    save_tiny_model(tmp_path / "tiny", seed=4)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=quant, device_map="cpu")
    assert "4bit" in type(model.model.layers[0].self_attn.q_proj).__name__.lower()
    prompts = build_prompts(QUESTIONS[:3], DEV, 1, "cloze", False, tok)
    stats = ScoreStats()
    assert_close(score_prompts(model, tok, prompts, stats=stats), reference_logprobs(model, tok, prompts), 1e-4)
    assert stats.direct_logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    assert_close(score_prompts(lora, tok, prompts), reference_logprobs(lora, tok, prompts), 1e-4)


class SoftcappedLlama(LlamaForCausalLM):
    """A model whose forward post-processes the logits (as Gemma 2's soft-capping does)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


def test_models_that_post_process_logits_fall_back_to_their_forward(tiny):
    _, tok = tiny
    plain = build_tiny_model(tok, seed=3)
    model = SoftcappedLlama(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    prompts = build_prompts(QUESTIONS, DEV, 1, "cloze", False, tok)
    stats = ScoreStats()
    fast = score_prompts(model, tok, prompts, [q.subject for q in QUESTIONS], stats=stats)
    assert not stats.direct_logits
    assert_close(fast, reference_logprobs(model, tok, prompts), 1e-4)


def test_evaluate_mc_on_shipped_set(tiny):
    model, tok = tiny
    test = load_questions(SHIPPED, "test")[:24]
    dev = load_questions(SHIPPED, "dev")
    model.train()  # evaluate_mc must score in eval mode and give the mode back
    out = evaluate_mc(model, tok, test, dev, shots=1, mode="letter", batch_size=8, progress=False)
    assert model.training
    model.eval()
    json.dumps(out, allow_nan=False)
    assert out["n_questions"] == 24 and out["scoring"]["path"] == "single"
    assert out["scoring"]["prefix_tokens_reused"] > 0
    for key in ("mc/acc", "mc/acc_stderr", "mc/acc_macro", "mc/ece", "mc/chance", "mc/pred_share/A"):
        assert key in out["metrics"]
    assert out["letters"]["chance"] == 0.25
    assert sum(out["letters"]["predicted"].values()) == 24
    assert len(out["calibration"]["bins"]) == 10
    cloze = evaluate_mc(model, tok, test[:6], None, shots=0, mode="cloze", progress=False)
    assert "acc_norm" in cloze and "acc_bytes" in cloze


def test_evaluate_mc_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(InputError, match="1 dev question"):
        evaluate_mc(model, tok, QUESTIONS, DEV[:1], shots=2, progress=False)
    with pytest.raises(InputError, match="needs a dev split"):
        evaluate_mc(model, tok, QUESTIONS, None, shots=1, progress=False)
    with pytest.raises(InputError, match="mode"):
        evaluate_mc(model, tok, QUESTIONS, mode="generate", progress=False)
    with pytest.raises(InputError, match="empty"):
        evaluate_mc(model, tok, [], progress=False)


TEN = [MCQuestion(f"Which number is {n}?", tuple(str(k) for k in range(n, n + 10)), 0, "count") for n in (1, 30)] + \
    [MCQuestion("Two options?", ("yes", "no"), 1, "count")]


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_ten_option_questions_fast_matches_reference_and_letters_take_one_row(tiny, mode):
    model, tok = tiny
    prompts = build_prompts(TEN, None, 0, mode)
    stats = ScoreStats()
    fast = score_prompts(model, tok, prompts, batch_size=2, stats=stats)
    assert_close(fast, reference_logprobs(model, tok, prompts), 1e-4)
    if mode == "letter":
        assert stats.single_forward_questions == len(TEN) and stats.rows == len(TEN)


def test_circular_eval_scores_every_rotation(tiny):
    from eval.mc.results import circular_correct, rotations

    model, tok = tiny
    out = evaluate_mc(model, tok, TEN, mode="letter", circular=True, progress=False)
    rotated = [r for q in TEN for r in rotations(q)]
    reference = reference_logprobs(model, tok, build_prompts(rotated, None, 0, "letter"))
    expected = circular_correct(TEN, reference)
    assert out["circular"]["accuracy"] == pytest.approx(sum(expected) / len(TEN))
    assert out["scoring"]["questions"] == 10 + 10 + 2
    plain = evaluate_mc(model, tok, TEN, mode="letter", progress=False)
    assert out["acc"] == plain["acc"] and "circular" not in plain
