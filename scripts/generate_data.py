"""Write the project's own preference pairs (orca schema) to data/.

Nothing here comes from a public data set: every question and answer is built from the small word
lists below, so the files can be regenerated bit for bit and shipped with the course.

Four kinds of preference, each one a tiny model can learn and carry over to unseen questions:

- ``correct_vs_wrong``: the chosen answer is right (a comparison of numbers, a fact stated in the
  question), the rejected one is wrong in the same words.
- ``helpful_vs_evasive``: the chosen answer helps, the rejected one dodges the question.
- ``concise_vs_rambling``: the same answer, plain or wrapped in filler.
- ``follows_system``: the system prompt sets a rule (start with a word); chosen follows it, rejected ignores it.

Files written (run ``python scripts/generate_data.py``):

- ``data/train.jsonl`` and ``data/heldout.jsonl``: system, question, chosen, rejected, kind. No
  held-out question appears in train.
- ``data/sft.jsonl``: the short instruction-tuning set for the tiny base model. Every train prompt
  appears once with its chosen OR its rejected answer (a coin flip), plus neutral statements, so the
  base model speaks ChatML but does not already hold the preference DPO will teach.
- ``data/train_noisy.jsonl`` (notebook 11): a noisy twin of train, from fresh rows of the same generator (another
  seed; no row of train, no held-out question except the planted overlaps), with the defects the best-known audit of
  orca_dpo_pairs found (argilla re-judged its 12,859 pairs: about 2,000 swapped, about 4,000 ties) at those rates,
  and a length bias: every tie's chosen answer is the longer one. Its ``defect`` column records the truth ("none",
  "swapped", "tie", "identical", "duplicate", "eval_overlap"); it is for scoring the judges, never for filtering.
- ``data/SHA256SUMS``: checksums, verified by the tests (only the lines of the files written here are replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

SEED = 2024
TRAIN_PER_KIND = 200
HELDOUT_PER_KIND = 40
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
GENERIC_SYSTEM = "You are a helpful assistant."

NAMES = [
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo",
    "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf", "Zoe", "Omar",
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "gray", "orange"]
THINGS = ["car", "hat", "bike", "cup", "book", "bag", "coat", "kite", "ball", "lamp", "door", "chair"]

# (object, what it is used for) - everyday knowledge written for this course
USES = [
    ("spoon", "eating soup"), ("broom", "sweeping the floor"), ("pen", "writing notes"),
    ("umbrella", "staying dry in the rain"), ("ladder", "reaching high places"), ("key", "opening a lock"),
    ("map", "finding the way"), ("clock", "telling the time"), ("towel", "drying your hands"),
    ("kettle", "boiling water"), ("hammer", "driving nails"), ("scissors", "cutting paper"),
    ("pillow", "resting your head"), ("oven", "baking bread"), ("bucket", "carrying water"),
    ("saw", "cutting wood"), ("net", "catching fish"), ("fan", "cooling the air"), ("rope", "tying things"),
    ("brush", "painting walls"), ("needle", "sewing cloth"), ("shovel", "digging holes"),
    ("wallet", "keeping money"), ("mirror", "seeing yourself"), ("basket", "holding fruit"),
    ("candle", "giving light"), ("blanket", "keeping warm"), ("lock", "keeping a door shut"),
    ("glass", "drinking water"), ("plate", "serving food"), ("whistle", "calling a dog"),
    ("tent", "sleeping outside"), ("fork", "eating pasta"), ("knife", "slicing bread"),
    ("compass", "finding north"), ("stove", "cooking meals"), ("sponge", "washing dishes"),
    ("bottle", "holding milk"), ("helmet", "protecting your head"), ("glove", "keeping hands warm"),
]
# (task, helpful answer)
TASKS = [
    ("keep a plant alive", "Water it when the soil is dry and keep it near a window."),
    ("fall asleep faster", "Go to bed at the same time each night and keep the room dark."),
    ("boil an egg", "Put the egg in boiling water for nine minutes, then cool it in cold water."),
    ("learn new words", "Read every day and write down each new word with its meaning."),
    ("save money", "Write down what you spend and set aside a little each week."),
    ("clean a window", "Wipe it with soapy water, then dry it with a soft cloth."),
    ("make tea", "Pour hot water over a tea bag and wait three minutes."),
    ("stay calm", "Breathe in slowly, count to four, and breathe out slowly."),
    ("remember a list", "Say the list out loud and link each item to a picture."),
    ("fix a flat tire", "Find the hole, put a patch on it, and pump the tire up again."),
    ("start running", "Run slowly for ten minutes, three times a week, and add a little more each week."),
    ("write a letter", "Start with a greeting, say what you want to say, and end with your name."),
    ("cook rice", "Use two cups of water for one cup of rice and simmer it for fifteen minutes."),
    ("tie a knot", "Make a loop, pass the end through it, and pull both ends tight."),
    ("wash a shirt", "Wash it in warm water with a little soap and hang it up to dry."),
    ("plan a trip", "Pick the dates, book a place to stay, and make a list of what to pack."),
    ("study for a test", "Study a little every day and test yourself with questions."),
    ("make a friend", "Ask questions, listen well, and meet again soon."),
    ("paint a room", "Cover the floor, paint the edges first, and then fill in the walls."),
    ("grow tomatoes", "Plant them in a sunny spot and water them every morning."),
    ("bake a cake", "Mix flour, sugar, eggs and butter, then bake it for thirty minutes."),
    ("keep food fresh", "Keep it cold in the fridge and close the box after use."),
    ("warm up before sport", "Walk for five minutes and then stretch your legs and arms."),
    ("find a lost key", "Think back to where you last used it and look there first."),
    ("speak in public", "Practice out loud, speak slowly, and look at the people in the room."),
    ("sort your files", "Make one folder for each topic and give every file a clear name."),
    ("cool a hot room", "Close the curtains during the day and open the windows at night."),
    ("clean a pan", "Soak it in hot water, then scrub it with a sponge."),
    ("learn to swim", "Start in shallow water, practice floating, and then learn to kick."),
    ("walk a dog", "Use a short leash, walk at a steady pace, and bring water."),
    ("build a fire", "Start with small sticks, light them, and add bigger wood slowly."),
    ("read faster", "Read every day and try not to say the words in your head."),
    ("make a sandwich", "Put cheese and salad between two slices of bread."),
    ("pack a bag", "Roll your clothes and put heavy things at the bottom."),
    ("care for a cat", "Give it fresh water, good food, and a clean box every day."),
    ("fold a shirt", "Lay it flat, fold the sleeves in, and fold it in half."),
    ("keep a diary", "Write a few lines every evening about your day."),
    ("draw a circle", "Tie a string to a pencil, hold the other end still, and turn the pencil."),
    ("wake up early", "Go to bed earlier and put the alarm far from the bed."),
    ("clean a carpet", "Vacuum it slowly and dab any stains with soapy water."),
]
EVASIVE = [
    "I'm sorry, but I can't help with that.",
    "That is not something I can answer.",
    "You should ask someone else about that.",
    "I would rather not say.",
    "I don't know. Try to find it yourself.",
    "I can't answer questions like that.",
]
RAMBLE_OPEN = [
    "Well, that is a really good question, and I am glad that you asked it.",
    "Let me think about this for a moment, because there is a lot that could be said here.",
    "Okay, so, before I answer, I want to say that this is an interesting topic.",
    "Hmm, people ask this a lot, and there are many ways to look at it.",
    "Great question! I have thought about this many times, so here is what I think.",
]
RAMBLE_CLOSE = [
    "I hope that this helps you, and please let me know if you have more questions.",
    "Anyway, that is just what I think, and other people may think other things too.",
    "So, in the end, that is more or less the answer, as far as I can tell.",
    "There is much more to say, but I think that covers the main point for now.",
    "Of course, you could read more about it, but that is the short story.",
]
RULE_WORDS = ["Sure", "Indeed", "Okay", "Yes", "Well", "Certainly", "Right", "Absolutely", "Alright", "Great"]


def _compare_row(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1, 100), 2)
    if rng.random() < 0.5:
        q = rng.choice(["Which number is larger, {a} or {b}?", "Which is bigger: {a} or {b}?"]).format(a=a, b=b)
        hi, lo = max(a, b), min(a, b)
        return q, f"{hi} is larger than {lo}.", f"{lo} is larger than {hi}."
    q = rng.choice(["Which number is smaller, {a} or {b}?", "Which is less: {a} or {b}?"]).format(a=a, b=b)
    hi, lo = max(a, b), min(a, b)
    return q, f"{lo} is smaller than {hi}.", f"{hi} is smaller than {lo}."


def _lookup_row(rng: random.Random) -> tuple[str, str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    color, wrong = rng.sample(COLORS, 2)
    q = rng.choice(
        [
            "{n} has a {c} {t}. What color is the {t} of {n}?",
            "The {t} of {n} is {c}. What color is it?",
            "{n} bought a {c} {t} today. Which color is the {t}?",
        ]
    ).format(n=name, c=color, t=thing)
    return q, f"The {thing} of {name} is {color}.", f"The {thing} of {name} is {wrong}."


def _use_question(rng: random.Random) -> tuple[str, str]:
    obj, use = rng.choice(USES)
    q = rng.choice(
        [
            "What is a {o} used for?",
            "What do people use a {o} for?",
            "Why would I need a {o}?",
            "What is the point of a {o}?",
            "Tell me what a {o} is for.",
        ]
    )
    return q.format(o=obj), f"A {obj} is used for {use}."


def _task_question(rng: random.Random) -> tuple[str, str]:
    task, answer = rng.choice(TASKS)
    q = rng.choice(
        [
            "How do I {t}?",
            "Can you tell me how to {t}?",
            "What is a good way to {t}?",
            "What should I do to {t}?",
            "Give me one tip to {t}.",
        ]
    )
    return q.format(t=task), answer


def _plain_question(rng: random.Random) -> tuple[str, str]:
    return _use_question(rng) if rng.random() < 0.5 else _task_question(rng)


def _system(rng: random.Random) -> str:
    """Empty for about 40% of rows: the recipe's formatter must handle a missing system turn."""
    return "" if rng.random() < 0.4 else GENERIC_SYSTEM


def make_row(kind: str, rng: random.Random) -> dict[str, str]:
    """One preference pair of the given kind, in the orca schema plus ``kind``."""
    if kind == "correct_vs_wrong":
        question, chosen, rejected = (_compare_row if rng.random() < 0.5 else _lookup_row)(rng)
        system = _system(rng)
    elif kind == "helpful_vs_evasive":
        question, chosen = _plain_question(rng)
        rejected, system = rng.choice(EVASIVE), _system(rng)
    elif kind == "concise_vs_rambling":
        question, chosen = _plain_question(rng)
        rejected = f"{rng.choice(RAMBLE_OPEN)} {chosen} {rng.choice(RAMBLE_CLOSE)}"
        system = _system(rng)
    elif kind == "follows_system":
        question, answer = _plain_question(rng)
        word = rng.choice(RULE_WORDS)
        system = f"{GENERIC_SYSTEM} Always begin your answer with the word '{word}'."
        chosen, rejected = f"{word}, {answer[0].lower()}{answer[1:]}", answer
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return {"system": system, "question": question, "chosen": chosen, "rejected": rejected, "kind": kind}


KINDS = ("correct_vs_wrong", "helpful_vs_evasive", "concise_vs_rambling", "follows_system")


def make_splits(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out pairs; a held-out (system, question) never occurs in train."""
    rng = random.Random(seed)
    heldout_questions: set[str] = set()
    heldout: list[dict[str, str]] = []
    train: list[dict[str, str]] = []
    # All held-out rows first, so that no train row of any kind can reuse a held-out question.
    for target, wanted in ((heldout, HELDOUT_PER_KIND), (train, TRAIN_PER_KIND)):
        for kind in KINDS:
            seen: set[tuple[str, str]] = set()  # a question may carry different preferences in different kinds
            made = 0
            while made < wanted:
                row = make_row(kind, rng)
                key = (row["system"], row["question"])
                if key in seen or (target is train and row["question"] in heldout_questions):
                    continue
                seen.add(key)
                if target is heldout:
                    heldout_questions.add(row["question"])
                target.append(row)
                made += 1
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def make_sft(train: list[dict[str, str]], seed: int = SEED) -> list[dict[str, object]]:
    """Instruction-tuning conversations: each train prompt once, answered by chosen or rejected at random."""
    rng = random.Random(seed + 1)
    rows: list[dict[str, object]] = []
    for row in train:
        messages = [{"role": "system", "content": row["system"]}] if row["system"] else []
        answer = row["chosen"] if rng.random() < 0.5 else row["rejected"]
        messages += [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    # Neutral statements, as pretraining would give: how things are used, what tasks involve, counting.
    for obj, use in USES:
        rows.append({"text": f"A {obj} is used for {use}."})
    for task, answer in TASKS:
        rows.append({"text": f"To {task}: {answer}"})
    for start in range(1, 90, 7):
        rows.append({"text": "Counting up: " + " ".join(str(n) for n in range(start, start + 10)) + "."})
    rng.shuffle(rows)
    return rows

# The noisy twin (notebook 11). argilla/distilabel-intel-orca-dpo-pairs re-judged Intel/orca_dpo_pairs' 12,859 pairs
# and reported about 2,000 swapped (the judge preferred the rejected answer) and about 4,000 ties: those rates here.
NOISY_SEED = SEED + 11
ORCA_PAIRS, ORCA_SWAPPED, ORCA_TIES = 12_859, 2_000, 4_000
NOISY_PLANTED = {"eval_overlap": 16, "duplicate": 16, "identical": 8}  # rows of 800: 2%, 2%, 1%
COURTESY = ["I hope this helps.", "Let me know if you have another question.", "Happy to help with more.",
            "That should answer it."]


def _tie(row: dict[str, str], rng: random.Random) -> dict[str, str]:
    """Two answers of the same quality, the chosen one longer: the good answer with and without a courtesy line
    (for ``concise_vs_rambling``: two rambling answers, the chosen one with one sentence more)."""
    good = row["rejected"] if row["kind"] == "concise_vs_rambling" else row["chosen"]
    return {**row, "chosen": f"{good} {rng.choice(COURTESY)}", "rejected": good}


def make_noisy_twin(train: list[dict[str, str]], heldout: list[dict[str, str]], seed: int = NOISY_SEED
                    ) -> list[dict[str, str]]:
    """As many rows as ``train``, drawn afresh, with swapped pairs and ties at argilla's orca rates, planted identical
    pairs, exact duplicates and held-out prompts; the ``defect`` column says which row is which."""
    rng = random.Random(seed)
    train_rows = {tuple(r[k] for k in ("system", "question", "chosen", "rejected")) for r in train}
    heldout_questions = {r["question"] for r in heldout}
    fresh_count = len(train) - NOISY_PLANTED["eval_overlap"] - NOISY_PLANTED["duplicate"]
    fresh: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for index in range(fresh_count):
        kind = KINDS[index % len(KINDS)]
        while True:
            row = make_row(kind, rng)
            key = (row["system"], row["question"])
            if key not in seen and row["question"] not in heldout_questions and \
                    tuple(row[k] for k in ("system", "question", "chosen", "rejected")) not in train_rows:
                break
        seen.add(key)
        fresh.append({**row, "defect": "none"})
    order = list(range(fresh_count))
    rng.shuffle(order)
    swapped = round(len(train) * ORCA_SWAPPED / ORCA_PAIRS)
    ties = round(len(train) * ORCA_TIES / ORCA_PAIRS)
    for position, i in enumerate(order):
        row = fresh[i]
        if position < swapped:
            fresh[i] = {**row, "chosen": row["rejected"], "rejected": row["chosen"], "defect": "swapped"}
        elif position < swapped + ties:
            fresh[i] = {**_tie(row, rng), "defect": "tie"}
        elif position < swapped + ties + NOISY_PLANTED["identical"]:
            fresh[i] = {**row, "rejected": row["chosen"], "defect": "identical"}
    planted = [{**r, "defect": "eval_overlap"} for r in rng.sample(heldout, NOISY_PLANTED["eval_overlap"])]
    clean = [r for r in fresh if r["defect"] == "none"]  # planted rows carry correct labels: one defect each
    planted += [{**r, "defect": "duplicate"} for r in rng.sample(clean, NOISY_PLANTED["duplicate"])]
    rows = fresh + planted
    rng.shuffle(rows)
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    """The rows as JSON lines, through a temporary file and a rename (a crash leaves the old file whole)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def update_checksums(names: list[str], folder: Path = DATA_DIR) -> None:
    """Replace (or add) the SHA256SUMS lines of ``names``; every other line (the tiny model's) stays as it is."""
    sums = folder / "SHA256SUMS"
    new = {name: f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}" for name in names}
    lines = sums.read_text().splitlines() if sums.is_file() else []
    lines = [new.pop(line.split("  ", 1)[-1], line) for line in lines]  # in place, in their order
    sums.write_text("\n".join(lines + list(new.values())) + "\n")


def main() -> None:
    """Write train/heldout/sft/train_noisy JSONL and their checksums."""
    DATA_DIR.mkdir(exist_ok=True)
    train, heldout = make_splits()
    files = {"train.jsonl": train, "heldout.jsonl": heldout, "sft.jsonl": make_sft(train),
             "train_noisy.jsonl": make_noisy_twin(train, heldout)}
    for name, rows in files.items():
        _write_jsonl(DATA_DIR / name, rows)
    update_checksums(list(files))
    print(f"train: {len(train)} pairs, heldout: {len(heldout)} pairs, sft: {len(files['sft.jsonl'])} rows, "
          f"train_noisy: {len(files['train_noisy.jsonl'])} pairs")


if __name__ == "__main__":
    main()
