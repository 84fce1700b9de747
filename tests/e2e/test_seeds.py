"""Seeds as an axis: `seeds: [...]` (or `--seeds`) runs one complete replica of the chain per seed in RUN/seed-<seed>/,
each with every random stream drawn from its own seed; a failed replica does not stop the others and `--resume`
finishes it; bad seeds are one line, exit 2, nothing written. The chain is the preferences stage on the tiny model
(sampling, split and label noise: three of the seeded streams), so a replica takes seconds."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from recipes.cli import main
from recipes.runner import load
from tests.e2e.test_bad_inputs import one_error_line
from tests.stages.test_preferences_stage import read_jsonl, write_recipe

# case -> (--set overrides, --seeds words or None, the one line expected after "error: ")
BAD = {
    "seeds empty": (["seeds=[]"], None, r"recipe\.yaml: seeds is empty; name at least one seed, e\.g\. seeds: "
                                        r"\[42, 43, 44\]"),
    "seed repeated": (["seeds=[42, 43, 42]"], None,
                      r"recipe\.yaml: seeds names seed 42 more than once; each seed is one replica, list it once$"),
    "seed not an integer": (["seeds=[42, 4.5]"], None,
                            r"recipe\.yaml: seeds must be list\[int\] \| null, got \[42, 4\.5\] \(list\)"),
    "seed out of range": (["seeds=[-1]"], None, r"recipe\.yaml: seeds\[0\] must be in \[0, 2\*\*32\), got -1"),
    "seed and seeds disagree": (["seed=7", "seeds=[42, 43]"], None,
                                r"recipe\.yaml: seed is 7 but seeds is \[42, 43\]; one replica runs per seed in seeds: "
                                r"remove seed, or make it one of them$"),
    "--seeds not an integer": ([], ["42", "x"], r"^command line: --seeds\[1\] must be an integer seed, got 'x'; "
                                                r"e\.g\. --seeds 42 43 44$"),
    "--seeds repeated": ([], ["1", "1"], r"^command line: --seeds names seed 1 more than once"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_seeds_are_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    overrides, seeds, expected = BAD[case]
    runs = tmp_path / "runs"
    args = ["run", str(write_recipe(tmp_path, {})), "--output-dir", str(runs)]
    args += [a for o in overrides for a in ("--set", o)] + (["--seeds", *seeds] if seeds else [])
    assert main(args) == 2
    assert re.search(expected, one_error_line(capsys))
    assert not runs.exists()


def test_replicas_are_independent_single_seed_recipes(tmp_path):
    recipe, _ = load(write_recipe(tmp_path, {}), ["seeds=[3, 1, 42]"])  # seed: 42 in the file is one of them
    replicas = recipe.replicas()
    assert [(r.seed, r.seeds) for r in replicas] == [(3, None), (1, None), (42, None)]
    assert len({r.stage_hash("prefs") for r in replicas}) == 3, "the seed enters every stage's config hash"
    replicas[0].stages["prefs"].samples_per_prompt = 99
    assert replicas[1].stages["prefs"].samples_per_prompt == recipe.stages["prefs"].samples_per_prompt == 4


def flips_of(replica) -> list[bool]:
    stage = replica / "prefs" / "data"
    records = sorted(read_jsonl(stage / "train.jsonl") + read_jsonl(stage / "test.jsonl"),
                     key=lambda r: r["prompt_index"])
    return [r["flipped"] for r in records]


def test_each_seed_is_a_complete_replica_with_its_own_random_streams(tmp_path):
    path, runs = write_recipe(tmp_path, {}), tmp_path / "runs"
    assert main(["run", str(path), "--output-dir", str(runs), "--run-id", "m", "--seeds", "1", "2"]) == 0
    root = runs / "t" / "m"
    assert sorted(p.name for p in root.iterdir()) == ["seed-1", "seed-2"]
    for seed in (1, 2):
        replica = root / f"seed-{seed}"
        assert json.loads((replica / "manifest.json").read_text())["seed"] == seed
        resolved = yaml.safe_load((replica / "resolved.yaml").read_text())
        assert (resolved["seed"], resolved["seeds"]) == (seed, None)
        assert json.loads((replica / "prefs" / "done.json").read_text())["kind"] == "preferences"
        # Label noise: one Bernoulli(0.5) draw per pair, in pair order, from the replica's own seed.
        flips = flips_of(replica)
        assert flips == (np.random.default_rng(seed).random(len(flips)) < 0.5).tolist()
    one, two = (read_jsonl(root / f"seed-{s}" / "prefs" / "samples.jsonl") for s in (1, 2))
    assert [g["completions"] for g in one] != [g["completions"] for g in two], "two seeds sample differently"

    # The same seed again, in a run of its own, samples the same completions and flips the same labels.
    assert main(["run", str(path), "--output-dir", str(runs), "--run-id", "again", "--seeds", "1"]) == 0
    again = runs / "t" / "again" / "seed-1"
    assert read_jsonl(again / "prefs" / "samples.jsonl") == one
    assert flips_of(again) == flips_of(root / "seed-1")


def test_a_failed_replica_does_not_stop_the_next_and_resume_finishes_it(tmp_path, capsys):
    path, runs = write_recipe(tmp_path, {}), tmp_path / "runs"
    root = runs / "t" / "r"
    (root / "seed-1").mkdir(parents=True)
    (root / "seed-1" / "prefs").write_text("a file where seed 1's stage folder goes")
    args = ["run", str(path), "--output-dir", str(runs), "--run-id", "r", "--seeds", "1", "2", "--resume"]
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"alignlab: error: 1 of 2 replicas of {root} failed (seed-1: ")
    assert last.endswith(f"the 1 finished are kept: fix the cause, then continue the failed ones: alignlab run {path} "
                         f"--seeds 1 2 --output-dir {runs} --resume --run-id r")
    assert not (root / "seed-1" / "prefs").is_dir() and (root / "seed-2" / "prefs" / "done.json").is_file()
    finished = (root / "seed-2" / "prefs" / "done.json").read_text()

    (root / "seed-1" / "prefs").unlink()
    assert main(args) == 0
    assert "done, skipped" in capsys.readouterr().err
    assert (root / "seed-1" / "prefs" / "done.json").is_file()
    assert (root / "seed-2" / "prefs" / "done.json").read_text() == finished, "the finished replica is not rerun"
