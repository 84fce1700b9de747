"""`alignlab eval mc | gen | contamination`, `alignlab judge` and `alignlab arena`: the eval stage's suites on any
model, from the command line. The work is the eval stage's engine (eval/stage.py); here arguments become its plans,
and results become tables. Heavy imports happen when a command runs, so `alignlab --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from common.errors import InputError

MODELS_HELP = """\
A model (M) is one of:
  ALIAS | DIR | HUB_ID   an alias (smollm2-135m-instruct, tiny-random-llama), a local transformers model
                         directory, or a hub id (needs internet)
  ADAPTER_DIR            a PEFT adapter directory (with adapter_config.json), on the base it names
  RUN_DIR:STAGE          the model a stage of a run saved (its adapter, on the run's base model, dtype and
                         quantization), e.g. runs/sentiment/20250101-120000:sft; RUN_DIR:base is the run's
                         base model itself
"""

ARENA_HELP = """\
Every pair of models that answered the same prompts in the runs' eval stages (their samples.jsonl) is judged on
every shared (prompt, sample), in both orders (a flip is a tie); the number of judge calls is printed before they
start, and with --cache a second run makes none. The outcomes are fitted with a Bradley-Terry model (Chatbot
Arena's logistic regression; ties half a win each way) on an Elo-like scale with --baseline at 1000, with 95%
intervals from a bootstrap over prompts and, with --style-control, ratings with answer length (and markdown)
held equal. A model found in several runs is named RUN_ID:NAME after the first.
"""

JUDGE_HELP = """\
A and B are models (see below) answering --prompts, or samples.jsonl files written by `alignlab eval gen
--output` or an eval stage (RUN_DIR/eval/NAME/samples.jsonl). Answers are paired by prompt and sample number,
each pair is judged in both orders (a flip counts as a tie), and A's win rate against B is printed with its
bootstrap 95% interval and the length-controlled win rate.

""" + MODELS_HELP


def add_parsers(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    ev = sub.add_parser("eval", help="evaluate models: multiple-choice (mc) or generations (gen)")
    suites = ev.add_subparsers(dest="suite", required=True)

    mc = suites.add_parser("mc", help="multiple-choice log-likelihood accuracy (MMLU-style)", epilog=MODELS_HELP,
                           formatter_class=fmt)
    _model_args(mc)
    mc.add_argument("--data", required=True, help="questions: a folder with <split>.jsonl (e.g. recipes/data/mc), "
                    "MMLU CSVs, one jsonl/json/csv/parquet file, or a hub dataset in the cais/mmlu layout")
    mc.add_argument("--split", default="test", help="the split to score (default: test)")
    mc.add_argument("--dev", help="k-shot examples (default: the dev split of --data)")
    mc.add_argument("--dev-split", default="dev")
    mc.add_argument("--subject", help="only this subject's questions")
    mc.add_argument("--limit", type=int, help="score the first N questions")
    mc.add_argument("--shots", type=int, default=0, help="worked examples before each question (default: 0)")
    mc.add_argument("--mode", choices=["letter", "cloze"], default="letter",
                    help="letter: score ' A'/' B'/...; cloze: score each answer's text (default: letter)")
    mc.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    mc.add_argument("--batch-size", type=int, default=8)
    mc.add_argument("--circular", action="store_true", help="CircularEval: also score every rotation of each "
                    "question's options; a question counts only if all are right")

    con = suites.add_parser("contamination", help="test-set contamination: does the model prefer the set's canonical "
                            "order? (Oren et al. 2023, sharded test)", epilog=MODELS_HELP, formatter_class=fmt)
    _model_args(con)
    con.add_argument("--data", required=True, help="the test set: multiple-choice questions (as for `eval mc`), or "
                     "any jsonl with --field")
    con.add_argument("--field", help="score this string field of each jsonl row instead of MC questions")
    con.add_argument("--limit", type=int, help="use the first N examples")
    con.add_argument("--shards", type=int, default=10, help="contiguous shards of the canonical order (default: 10)")
    con.add_argument("--permutations", type=int, default=20, help="random orders per shard (default: 20)")
    con.add_argument("--seed", type=int, default=0)
    con.add_argument("--batch-size", type=int, default=1)

    gen = suites.add_parser("gen", help="sample completions and score them: gold reward, reward model, KL, "
                            "length, distinct-n", epilog=MODELS_HELP, formatter_class=fmt)
    _model_args(gen)
    _prompt_args(gen)
    gen.add_argument("--scorer", help="a gold scorer: a name (vader) or a YAML spec, e.g. "
                     "'{scorer: length, unit: words}' (see preferences/scorers.py)")
    gen.add_argument("--reward-model", help="a saved reward model: RUN_DIR:STAGE of a reward_model stage, or its "
                     "reward_model directory")
    gen.add_argument("--reference", help="a model (M) to estimate KL(model || reference) against")

    arena = sub.add_parser("arena", help="arena leaderboard: every pair of models judged on the same prompts, "
                           "Bradley-Terry ratings with bootstrap intervals", description=ARENA_HELP,
                           formatter_class=fmt)
    arena.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                       help="run directories whose eval stage wrote samples.jsonl")
    arena.add_argument("--models", nargs="+", metavar="NAME", help="only these models (default: every model found)")
    arena.add_argument("--baseline", help="the model anchored at 1000 (default: the first model)")
    arena.add_argument("--style-control", action="store_true",
                       help="also fit ratings with answer length (and markdown counts) held equal")
    arena.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of prompts (default: 1000)")
    _judge_args(arena)
    arena.add_argument("--output", type=Path, metavar="FILE", help="write the leaderboard to this JSON file")

    judge = sub.add_parser("judge", help="pairwise LLM-as-judge win rate of answers A against answers B",
                           description=JUDGE_HELP, formatter_class=fmt)
    judge.add_argument("--a", required=True, metavar="M_OR_SAMPLES", help="a model or a samples.jsonl file")
    judge.add_argument("--b", required=True, metavar="M_OR_SAMPLES", help="a model or a samples.jsonl file")
    _prompt_args(judge, required=False)
    judge.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _judge_args(judge)
    judge.add_argument("--output", type=Path, metavar="FILE", help="write the win-rate metrics to this JSON file")


def _judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", choices=["local", "http"], default="local",
                   help="local: a causal LM read through its verdict-token probabilities; http: an "
                   "OpenAI-compatible endpoint (default: local)")
    p.add_argument("--judge-model", help="local: the judge model, an alias or directory (default: "
                   "smollm2-135m-instruct); http: the served model's name (required)")
    p.add_argument("--base-url", help="http: the endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", help="http: the NAME of the environment variable holding the API key")
    p.add_argument("--cache", help="an SQLite file caching verdicts across runs")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="models", action="append", required=True, metavar="M",
                   help="a model to evaluate (repeat for several; see below)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of models loaded by name (a run's models keep the run's)")
    p.add_argument("--output", type=Path, metavar="DIR",
                   help="write DIR/results.json and DIR/NAME/{results.json,samples.jsonl}, the eval stage's layout")


def _prompt_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--prompts", required=required, type=Path,
                   help="prompts: a jsonl/json/csv/parquet file with a 'prompt' column (text or chat messages)")
    p.add_argument("--prompt-field", default="prompt", help="the column holding the prompt (default: prompt)")
    p.add_argument("--limit", type=int, help="use the first N prompts")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens a sampling batch may hold: rows x (prompt + max new tokens); default: the sampler's")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every model)")


# --- arguments -> plans -------------------------------------------------------------------------------

def model_source(spec: str, dtype: str):
    """The ModelSource a model argument names (see MODELS_HELP)."""
    from common.config import ModelConfig
    from common.models import resolve_model
    from eval.stage import BASE, ModelSource, stage_model_source

    run_dir, sep, stage = spec.rpartition(":")
    if sep and Path(run_dir).is_dir():
        model = run_model_config(Path(run_dir))
        if stage == BASE:
            source = ModelSource(BASE, model, None, f"base model {model.base} of {run_dir}")
        else:
            source = stage_model_source(stage, model, Path(run_dir) / stage, stage_outputs(Path(run_dir), stage))
    elif (Path(spec) / "adapter_config.json").is_file():
        base = json.loads((Path(spec) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise InputError(f"{spec}/adapter_config.json names no base_model_name_or_path; use RUN_DIR:STAGE or a "
                             "merged model directory")
        source = ModelSource(spec, ModelConfig(base=base, dtype=dtype), Path(spec), f"adapter {spec} on {base}")
    else:
        source = ModelSource(spec, ModelConfig(base=spec, dtype=dtype), None, f"model {spec}")
    resolve_model(source.model.base)  # an unknown model fails now, before anything loads
    return source


def run_model_config(run_dir: Path):
    import yaml

    from common.config import ModelConfig
    from common.schema import build

    resolved = run_dir / "resolved.yaml"
    if not resolved.is_file():
        raise InputError(f"{run_dir}: not a run directory (no resolved.yaml); give RUN_DIR:STAGE with a directory "
                         "under runs/<recipe>/")
    return build(ModelConfig, yaml.safe_load(resolved.read_text()).get("model"), "model", str(resolved))


def stage_outputs(run_dir: Path, stage: str) -> dict[str, str]:
    done = run_dir / stage / "done.json"
    if not done.is_file():
        finished = sorted(p.parent.name for p in run_dir.glob("*/done.json"))
        raise InputError(f"{run_dir}:{stage}: no finished stage '{stage}' in this run (finished: "
                         f"{', '.join(finished) or 'none'}, or 'base')")
    return json.loads(done.read_text())["outputs"]


def model_sources(specs: list[str], dtype: str) -> list:
    """Sources with distinct names: a run's stage is named after the stage, anything else after the argument."""
    sources = []
    for spec in specs:
        source = model_source(spec, dtype)
        if source.name in {s.name for s in sources}:
            source = dataclasses.replace(source, name=spec)
        if source.name in {s.name for s in sources}:
            raise InputError(f"--model {spec} is given twice; name each model once")
        sources.append(source)
    return sources


def reward_model_source(spec: str, dtype: str):
    from common.config import ModelConfig
    from eval.stage import RewardModelSource

    run_dir, sep, stage = spec.rpartition(":")
    if sep and Path(run_dir).is_dir():
        outputs = stage_outputs(Path(run_dir), stage)
        if "reward_model" not in outputs:
            raise InputError(f"--reward-model {spec}: stage '{stage}' saved no reward model (its outputs: "
                             f"{', '.join(outputs)}); name a reward_model stage")
        return RewardModelSource(Path(run_dir) / stage / outputs["reward_model"], run_model_config(Path(run_dir)))
    config = Path(spec) / "adapter_config.json"
    if not config.is_file():
        raise InputError(f"--reward-model {spec}: not a saved reward model (no adapter_config.json); give "
                         "RUN_DIR:STAGE of a reward_model stage or its reward_model directory")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    return RewardModelSource(Path(spec), ModelConfig(base=base, dtype=dtype))


def generation_plan(args: argparse.Namespace, scorer=None, reward_model=None, reference: str | None = None):
    from common.config import DataSpec, Recipe
    from eval.generation import SamplingSettings
    from eval.stage import GenerationPlan, check_sampling, load_prompts

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    settings = SamplingSettings(args.samples_per_prompt, args.max_new_tokens, args.temperature,
                                args.token_budget or SamplingSettings.token_budget, args.seed)
    check_sampling(settings, lambda key: "--" + key.replace("_", "-"))
    recipe = Recipe(name="cli", seed=args.seed)
    spec = DataSpec(path=str(args.prompts.resolve()), fields={"prompt": args.prompt_field}, limit=args.limit)
    prompts = load_prompts(spec, recipe, "--prompts")
    return GenerationPlan(prompts, settings, scorer, reward_model, reference)


# --- commands -----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    if args.command == "judge":
        judge_command(args)
    elif args.command == "arena":
        arena_command(args)
    elif args.suite == "mc":
        mc_command(args)
    elif args.suite == "contamination":
        contamination_command(args)
    else:
        gen_command(args)


def mc_command(args: argparse.Namespace) -> None:
    from eval.stage import MCPlan, ModelPool, evaluate_models, load_mc_questions

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    questions, dev = load_mc_questions(args.data, args.split, args.dev, args.dev_split, args.shots, args.subject,
                                       args.limit, "command line")
    sources = model_sources(args.models, args.dtype)
    plan = MCPlan(questions, dev, args.shots, args.mode, args.chat_template, args.batch_size, args.circular)
    results = evaluate_models(ModelPool(sources), [s.name for s in sources], mc=plan)
    _finish(results, args, mc_table(results))


def gen_command(args: argparse.Namespace) -> None:
    import yaml

    from eval.stage import ModelPool, evaluate_models
    from preferences.scorers import build_scorer

    scorer = build_scorer(yaml.safe_load(args.scorer), "--scorer", "command line") if args.scorer else None
    reward_model = reward_model_source(args.reward_model, args.dtype) if args.reward_model else None
    sources = model_sources(args.models, args.dtype)
    in_pool = list(sources)
    reference = None
    if args.reference:
        # The reference is one of the models, or one more model in the pool that is not itself evaluated.
        match = next((s for s, spec in zip(sources, args.models, strict=True) if spec == args.reference), None)
        if match is None:
            match = dataclasses.replace(model_source(args.reference, args.dtype), name=f"reference:{args.reference}")
            in_pool.append(match)
        reference = match.name
    plan = generation_plan(args, scorer, reward_model, reference)
    results = evaluate_models(ModelPool(in_pool), [s.name for s in sources], gen=plan)
    _finish(results, args, gen_table(results, reference))


def contamination_command(args: argparse.Namespace) -> None:
    from rich.console import Console

    from eval.contamination import check_size, contamination_test, example_texts
    from eval.stage import ModelPool

    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        raise InputError(f"--limit and --batch-size must be >= 1, got {args.limit} and {args.batch_size}")
    texts = example_texts(args.data, args.field)[:args.limit]
    check_size(len(texts), args.shards, args.permutations, str(args.data))  # before any model loads
    sources = model_sources(args.models, args.dtype)
    pool = ModelPool(sources)
    results = {}
    for source in sources:
        with pool.use(source.name) as (model, tokenizer):
            results[source.name] = contamination_test(model, tokenizer, texts, args.shards, args.permutations,
                                                      args.seed, args.batch_size, str(args.data))
    pool.close()
    Console().print(contamination_table(results))
    if args.output:
        from common.runs import atomic_write_json

        atomic_write_json(args.output / "contamination.json", {"data": str(args.data), "models": results})


def judge_config(args: argparse.Namespace, command: str):
    """The judge of `alignlab judge` / `alignlab arena` from their --judge* flags."""
    from judge import judge_config_from_dict

    if args.judge == "http" and not (args.base_url and args.judge_model):
        raise InputError(f"alignlab {command} --judge http needs --base-url (an OpenAI-compatible endpoint, e.g. "
                         "http://127.0.0.1:8000/v1) and --judge-model (the served model's name)")
    block: dict[str, Any] = {"backend": args.judge, "cache": args.cache}
    if args.judge == "http":
        block["http"] = {"base_url": args.base_url, "model": args.judge_model, "api_key_env": args.api_key_env}
    else:
        block["local"] = {"model": args.judge_model or "smollm2-135m-instruct"}
        from common.models import check_model_base

        try:  # now, not after the answers are sampled
            check_model_base(block["local"]["model"])
        except InputError as e:
            raise InputError(f"alignlab {command} --judge-model: {e}") from None
    return judge_config_from_dict(block, "judge")


def arena_command(args: argparse.Namespace) -> None:
    from rich.console import Console

    from eval.stage import run_arena

    samples: dict[str, list[dict]] = {}
    for run_dir in args.runs:
        for name, rows in run_samples(run_dir).items():
            key = name if name not in samples else f"{run_dir.name}:{name}"
            samples[key] = rows
    if args.models:
        missing = [m for m in args.models if m not in samples]
        if missing:
            raise InputError(f"--models: {', '.join(missing)} not found in the runs (found: {', '.join(samples)})")
        samples = {m: samples[m] for m in args.models}
    if len(samples) < 2:
        raise InputError(f"alignlab arena: an arena needs at least 2 models, found {len(samples)} "
                         f"({', '.join(samples) or 'none'}) in {', '.join(map(str, args.runs))}; give runs whose "
                         "eval stage sampled two or more models")
    baseline = args.baseline or next(iter(samples))
    if baseline not in samples:
        raise InputError(f"--baseline {baseline}: not among the models ({', '.join(samples)})")
    if args.bootstrap < 1:
        raise InputError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    board = run_arena(judge_config(args, "arena"), samples, baseline, style_control=args.style_control,
                      n_resamples=args.bootstrap)
    Console().print(arena_table(board))
    if args.output:
        from common.runs import atomic_write_json

        atomic_write_json(args.output, board)


def run_samples(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every model's samples.jsonl that a run's eval stages wrote, by model name."""
    if not (run_dir / "manifest.json").is_file():
        raise InputError(f"{run_dir}: not a run directory (no manifest.json); give runs/<recipe>/<run-id> folders")
    found = {}
    for results in sorted(run_dir.glob("*/results.json")):
        for name in json.loads(results.read_text()).get("models", {}):
            path = results.parent / name / "samples.jsonl"
            if path.is_file():
                found[name] = read_samples(path)
    return found


def judge_command(args: argparse.Namespace) -> None:
    from eval.stage import ModelPool, evaluate_models, judge_samples

    config = judge_config(args, "judge")

    sides = {}
    models = [spec for spec in (args.a, args.b) if not _is_samples_file(spec)]
    if models:
        if args.prompts is None:
            raise InputError(f"alignlab judge: {models[0]} is a model, so it needs --prompts to answer (or give a "
                             "samples.jsonl file instead)")
        if args.a == args.b:
            raise InputError("alignlab judge: --a and --b are the same model; compare two different ones")
        sources = model_sources(models, args.dtype)
        results = evaluate_models(ModelPool(sources), [s.name for s in sources], gen=generation_plan(args))
        sides = {spec: results[s.name].samples for spec, s in zip(models, sources, strict=True)}
    rows_a = sides.get(args.a) or read_samples(Path(args.a))
    rows_b = sides.get(args.b) or read_samples(Path(args.b))
    entry = judge_samples(config, rows_a, rows_b, vs=args.b)
    from rich.console import Console

    Console().print(judge_table(args.a, entry))
    if args.output:
        from common.runs import atomic_write_json

        atomic_write_json(args.output, {"a": args.a, **entry})


def _is_samples_file(spec: str) -> bool:
    return spec.endswith(".jsonl") and Path(spec).is_file()


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Rows of a samples.jsonl: each needs `prompt` (text or chat messages) and `completion`."""
    if not path.is_file():
        raise InputError(f"{path}: samples file not found; give a samples.jsonl file or a model")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {lineno} is not valid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str) or \
                not isinstance(row.get("prompt"), str | list):
            raise InputError(f"{path}: line {lineno}: expected an object with 'prompt' (text or messages) and "
                             "'completion' (text), as eval's samples.jsonl has")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no samples in the file")
    return rows


# --- tables -------------------------------------------------------------------------------------------

def _finish(results: dict, args: argparse.Namespace, table) -> None:
    from rich.console import Console

    from eval.stage import write_results

    Console().print(table)
    if args.output:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_results(args.output, {_dir_name(n): r for n, r in results.items()}, config)
        Console().print(f"results: {args.output / 'results.json'}")


def _dir_name(name: str) -> str:
    """A model's name as a folder name: RUN_DIR:STAGE arguments are named after the stage already; paths and hub
    ids (a/b) lose their separators."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "model"


def _ci(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    low, high = stat["ci"]
    return f"{stat['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def gen_table(results: dict, reference: str | None):
    from rich.table import Table

    table = Table(title="generations (mean [95% CI])")
    for col in ("model", "gold reward", "reward model", f"KL to {reference}" if reference else "KL", "tokens",
                "words", "distinct-1", "distinct-2"):
        table.add_column(col)
    for name, r in results.items():
        g = r.gen
        table.add_row(name, _ci(g["gold_reward"]), _ci(g["rm_reward"]), _ci(g["kl_to_ref"], 2),
                      _ci(g["length_tokens"], 1), _ci(g["length_words"], 1), f"{g['distinct_1']:.3f}",
                      f"{g['distinct_2']:.3f}")
    return table


def mc_table(results: dict):
    from rich.table import Table

    table = Table(title="multiple choice")
    for col in ("model", "accuracy ± stderr", "acc_norm", "questions", "ECE"):
        table.add_column(col)
    for name, r in results.items():
        acc, norm = r.mc["acc"], r.mc.get("acc_norm")
        table.add_row(name, f"{acc['accuracy']:.3f} ± {acc['stderr']:.3f}",
                      f"{norm['accuracy']:.3f}" if norm else "-", str(r.mc["n_questions"]),
                      f"{r.mc['metrics'].get('mc/ece', float('nan')):.3f}")
    return table


def contamination_table(results: dict):
    from rich.table import Table

    table = Table(title="contamination (Oren et al. 2023): canonical order vs random orders")
    for col in ("model", "p-value", "test", "mean log-prob gap", "examples", "shards x permutations"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(name, f"{r['p_value']:.4g}", r["test"], f"{r['mean_logprob_gap']:+.3f}", str(r["n_examples"]),
                      f"{r['shards']} x {r['permutations']}")
    return table


def arena_table(board: dict):
    from rich.table import Table

    from eval.report import arena_table as leaderboard_rows

    header, rows = leaderboard_rows(board)
    table = Table(title=f"arena: {board['n_battles']} battles on {board['n_prompts']} prompts, {board['baseline']} "
                  f"= {board['anchor']:.0f}; {board['judge_calls']} judge calls in {board['judge_seconds']:.1f} s",
                  caption=board["note"] or None)
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table


def judge_table(a: str, entry: dict):
    from rich.table import Table

    table = Table(title=f"judge: {a} vs {entry['vs']} ({entry['n']} pairs, both orders)")
    for col in ("win rate [95% CI]", "length-controlled", "wins / ties / losses", "position consistency",
                "gold agreement"):
        table.add_column(col)
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    low, high = entry["ci"]
    table.add_row(f"{num(entry['win_rate'])} [{num(low)}, {num(high)}]", num(entry["lc_win_rate"]),
                  f"{entry['wins']} / {entry['ties']} / {entry['losses']}", num(entry["position_consistency"]),
                  num(entry["gold_agreement"]))
    return table
