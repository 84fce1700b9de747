"""Write the sentiment task's prompts: prompts_train.jsonl (200) and prompts_heldout.jsonl (40).

Each prompt asks for (or begins) a review of an invented film, worded so that the review can go either
way: the film's description is neutral, and the openings stop before they commit to a verdict. The gold
reward (VADER sentiment of the completion) is then decided by what the model writes, not by the prompt.

60 hand-written films x 4 prompts each; the 4 are drawn, with a seeded `random.Random`, from the
instruction templates and review openings below. The held-out prompts are about 10 films that no
training prompt mentions, so evaluation measures the behaviour on films the policy never saw.

    python recipes/data/sentiment/make_prompts.py           # rewrite the two files
    python recipes/data/sentiment/make_prompts.py --check   # exit 1 if the files differ from the output
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20240611
PROMPTS_PER_FILM = 4
HELDOUT_FILMS = 10
HERE = Path(__file__).resolve().parent

# (title, genre, what it is about). Invented titles; the descriptions say what happens, not how well.
FILMS = [
    ("The Harbor Light", "drama", "a lighthouse keeper's daughter who returns home after twenty years"),
    ("Paper Satellites", "science-fiction film", "two teenagers who build a radio telescope in a barn"),
    ("The Last Tram to Vell", "thriller", "a night-shift driver who finds a briefcase on the final tram"),
    ("Salt and Cedar", "family drama", "three sisters deciding whether to sell their father's sawmill"),
    ("Gravel Road Serenade", "musical", "a touring bluegrass band stranded in a small Kansas town"),
    ("The Orchard Keeper's Code", "mystery", "a retired cryptographer who finds messages carved into apple trees"),
    ("Neon Tide", "crime film", "a harbour detective chasing a smuggling ring through a coastal city"),
    ("Winter at Halden Pass", "survival drama", "a mountain rescue team caught by an early blizzard"),
    ("Mrs. Okafor's Garden", "comedy", "a widow who enters the village flower show against her neighbour"),
    ("The Cartographer's Son", "period drama", "a young mapmaker charting an island in the 1790s"),
    ("Static Bloom", "horror film", "a radio host who starts hearing callers from the future"),
    ("Ten Minutes to Midnight", "heist film", "a crew planning to rob a casino during a power cut"),
    ("The Weight of Feathers", "romance", "two rival falconers who meet at a county fair"),
    ("Copper Sky", "western", "a surveyor and a rancher disputing a river's new course"),
    ("Little Engines", "animated film", "a toy train that runs away from a department store"),
    ("The Glass Menders", "documentary", "the people who restore damaged stained-glass windows"),
    ("Second Shift", "workplace comedy", "the staff of an all-night diner over one long weekend"),
    ("Under the Quiet Hill", "fantasy film", "a boy who discovers a door in his grandmother's cellar"),
    ("A Ledger of Small Debts", "drama", "an accountant who tries to repay everyone he ever owed"),
    ("Iron Orchard", "war film", "a field hospital stationed in a French orchard in 1917"),
    ("The Understudy", "backstage drama", "an actress who gets one night to replace the star"),
    ("Frequency of Rain", "romantic drama", "a meteorologist and a farmer during a long drought"),
    ("Parallel Parking", "romantic comedy", "two driving instructors who share one car"),
    ("The Ninth Floor", "psychological thriller", "an office worker who notices a floor missing from the lift"),
    ("Saltwater Kings", "sports drama", "a rowing crew from a fishing town entering a national race"),
    ("Echoes of Marrow Street", "ghost story", "a family that moves into a terraced house in Leeds"),
    ("The Long Quiet", "science-fiction drama", "the crew of a generation ship who wake up early"),
    ("Pepper and Ash", "cooking comedy", "a chef who loses her sense of taste before a competition"),
    ("Borrowed Thunder", "superhero film", "a courier who absorbs the powers of whoever she touches"),
    ("The Violinist of Ostrava", "biographical drama", "a self-taught violinist in a mining town"),
    ("North of Nowhere", "road movie", "a father and son driving to Alaska in an old camper van"),
    ("Clockwork Hearts", "steampunk adventure", "an inventor who builds a mechanical companion"),
    ("The Vanishing Tenant", "detective film", "a landlady investigating a lodger who disappeared"),
    ("Blue Hour", "coming-of-age film", "four friends during the last summer before university"),
    ("Quarry", "neo-noir", "a stonemason who witnesses a crime at the bottom of a quarry"),
    ("The Beekeeper's Almanac", "quiet drama", "a beekeeper writing down everything she knows for her grandson"),
    ("Monsoon Letters", "epistolary romance", "two pen pals in Mumbai and Glasgow over ten years"),
    ("Dead Reckoning Bay", "adventure film", "a sailing race that goes off course near an uncharted reef"),
    ("Chalk Lines", "school drama", "a substitute teacher assigned to a class nobody else will take"),
    ("The Lantern Festival", "anthology film", "five stories set on the same night in a river town"),
    ("Hollow Crown Lane", "satire", "a suburban street that declares itself an independent kingdom"),
    ("Signal Lost", "disaster film", "a city that loses all communications for a week"),
    ("The Tailor of Mirrors", "magical-realist film", "a tailor whose suits show people who they could be"),
    ("Overtime", "basketball film", "a coach given one season to save a closing school's team"),
    ("Fields of Static", "experimental film", "a farmer recording the sounds of his land for a year"),
    ("The Inheritance Game", "ensemble comedy", "cousins competing over a great-aunt's puzzling will"),
    ("Red Ledger", "political thriller", "a junior clerk who finds a second set of government accounts"),
    ("Whistling in the Dark", "horror comedy", "a night watchman at a wax museum"),
    ("Starling Season", "nature documentary", "the starling murmurations over a Danish marsh"),
    ("The Midnight Ferry", "romantic mystery", "strangers who keep meeting on the same late ferry crossing"),
    ("Iron Lung Blues", "music biopic", "a jazz singer who performed from a hospital ward in the 1950s"),
    ("A Map of Small Towns", "indie drama", "a census taker travelling through the Scottish Highlands"),
    ("The Glass Orchard", "fairy tale", "a princess who has to grow a tree made of glass"),
    ("Deep Field", "space thriller", "an astronomer who detects a signal from a nearby star"),
    ("Sunday Leagues", "sports comedy", "an amateur football team of retired postmen"),
    ("The Clockmaker's Apprentice", "historical drama", "an orphan apprenticed to a clockmaker in Prague"),
    ("Kite Day", "family film", "a girl who enters a kite-flying contest with her grandfather"),
    ("Shadow Tariff", "spy film", "a customs officer recruited to track a shipping company"),
    ("After the Flood", "post-apocalyptic drama", "a village rebuilding after the river changes course"),
    ("The Puppeteer's Daughter", "gothic drama", "a young woman who inherits a travelling puppet theatre"),
]

# An instruction; the model writes the whole review.
TEMPLATES = [
    "Write a short review of the film '{title}', {a_genre} about {premise}.",
    "Write a two-paragraph review of '{title}', {a_genre} about {premise}.",
    "You have just seen '{title}', {a_genre} about {premise}. Write a short review saying what you thought.",
    "Review the {genre} '{title}' in a few sentences. It is about {premise}.",
    "Write a review of '{title}' for a local newspaper. The film is {a_genre} about {premise}.",
    "Someone asks you whether to see '{title}', the new {genre} about {premise}. Write your review.",
]

# The start of a review that has not yet taken a side; the model continues it.
OPENINGS = [
    "I went into this movie expecting",
    "I went into '{title}' not knowing what to expect, and",
    "Halfway through '{title}', I realised",
    "The first thing you notice about '{title}' is",
    "I have seen many films of this type, and '{title}'",
    "People had told me that '{title}'",
    "Going by the trailer, I thought '{title}' would be",
    "By the end of '{title}', I",
    "It is hard to say exactly how I feel about '{title}', but",
    "The story of '{title}' is simple:",
    "Watching '{title}' on a Sunday afternoon,",
    "There is a scene about twenty minutes into '{title}' where",
    "If you are wondering whether to see '{title}',",
    "The ending of '{title}'",
    "I watched '{title}' twice, and the second time",
]
CONTINUE = "Continue this review of '{title}', {a_genre} about {premise}: \"{opening}\""


def make_prompts(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    films = list(FILMS)
    rng.shuffle(films)
    heldout_titles = {title for title, _, _ in films[:HELDOUT_FILMS]}
    rows = []
    for title, genre, premise in sorted(FILMS):
        fill = {"title": title, "genre": genre, "premise": premise}
        article = {"a_genre": ("an " if genre[0] in "aeiou" else "a ") + genre}
        # Two instructions and two openings per film, none repeated within the film.
        for template in rng.sample(TEMPLATES, PROMPTS_PER_FILM // 2):
            rows.append({"prompt": template.format(**fill, **article), "style": "review", **fill})
        for opening in rng.sample(OPENINGS, PROMPTS_PER_FILM - PROMPTS_PER_FILM // 2):
            text = opening.format(**fill)
            rows.append({"prompt": CONTINUE.format(opening=text, **fill, **article), "style": "continue",
                         "opening": text, **fill})
    for i, row in enumerate(rows):
        row["id"] = f"sent-{i:03d}"
    train = [r for r in rows if r["title"] not in heldout_titles]
    heldout = [r for r in rows if r["title"] in heldout_titles]
    return train, heldout


def _jsonl(rows: list[dict]) -> str:
    keys = ("id", "prompt", "style", "title", "genre", "premise", "opening")
    return "".join(json.dumps({k: r[k] for k in keys if k in r}, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    train, heldout = make_prompts()
    files = {args.out / "prompts_train.jsonl": _jsonl(train), args.out / "prompts_heldout.jsonl": _jsonl(heldout)}
    if args.check:
        stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run {Path(__file__).name} to rewrite", file=sys.stderr)
            return 1
        return 0
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {text.count(chr(10))} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
