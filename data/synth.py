"""The bundled dataset: synthetic EHR-style notes dense with abbreviations, and their summaries.

    python -m data.synth --out data --seed 0            # writes train/val/test/test_ood.json
    python -m data.synth --out data --seed 0 --check    # regenerates in memory, compares (exit 1)

A record's source fields are written the way clinicians write ("65 yo M with h/o HTN. Denies CP.
Rx: ASA 81 mg PO QD."); its summary is `summarise()` of those fields: every abbreviation of
data/abbreviations.py written "expansion (ABBR)", headers spelled out ("Treatment:",
"Follow-up:"), every other word copied. The summary is therefore a function of the source that a
small model can learn, while ages, sexes, vitals, doses, complaints, negations and sentence
templates vary from record to record.

Eight in-domain specialties fill train/val/test (80/10/10 within each specialty); three
out-of-domain specialties, whose own abbreviations never occur in-domain, fill test_ood.json.
Everything is drawn from `random.Random` seeded from `--seed`, so a seed gives the same bytes on
every machine. Files are JSON arrays (indent 1, UTF-8, trailing newline), written atomically.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from data.abbreviations import ABBREVIATIONS, expand_text, find_abbreviations
from data.errors import DataError, exit_on_data_error
from data.specialties import GENERAL_DENIALS, GENERAL_HISTORY, SPECIALTIES, Specialty
from models.atomic import atomic_write_text

IN_DOMAIN = ("cardiology", "pulmonology", "oncology", "endocrinology", "gastroenterology",
             "nephrology", "infectious disease", "hematology")
OUT_OF_DOMAIN = ("neurology", "rheumatology", "psychiatry")
SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json", "test_ood": "test_ood.json"}
SOURCE_WORDS = (30, 90)  # of the source text the model sees, field labels included
SUMMARY_WORDS = (40, 140)


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    per_specialty: int = 400  # in-domain records per specialty; a multiple of 10 keeps 80/10/10 exact
    ood_per_specialty: int = 100


# ------------------------------------------------------------------------------ content language
# Pool items and templates are plain clinical text with two kinds of choice, drawn at use:
#   {a|b|c}   one of the alternatives        {lo..hi}   a number, as many decimals as lo or hi
# and "(F) " / "(M) " in front of items that fit only one sex. Templates also take $slots.

_CHOICE = re.compile(r"\{([^{}]*)\}")
_SLOT = re.compile(r"\$([a-z_][a-z0-9_]*)")


def _number(lo: str, hi: str, rng: random.Random) -> str:
    decimals = max(len(x.partition(".")[2]) for x in (lo, hi))
    scale = 10 ** decimals
    value = rng.randint(round(float(lo) * scale), round(float(hi) * scale))
    return f"{value / scale:.{decimals}f}" if decimals else str(value)


def resolve(text: str, rng: random.Random) -> str:
    """Draw every {a|b} choice and {lo..hi} number in `text`, left to right."""
    def draw(m: re.Match) -> str:
        body = m.group(1)
        if ".." in body and "|" not in body:
            return _number(*body.split(".."), rng)
        return rng.choice(body.split("|"))
    return _CHOICE.sub(draw, text)


def fill(template: str, rng: random.Random, **slots: str) -> str:
    """A template with its $slots filled (slot values are used as given), then its choices drawn."""
    parts = _SLOT.split(template)  # odd positions are slot names
    return "".join(slots[p] if i % 2 else resolve(p, rng) for i, p in enumerate(parts))


def fits(item: str, sex: str) -> bool:
    return not (item.startswith("(F) ") and sex != "F") and not (item.startswith("(M) ") and sex != "M")


def pick(pool: tuple[str, ...], rng: random.Random, sex: str, k: int = 1) -> list[str]:
    """k distinct items that fit `sex`, choices drawn."""
    usable = [item.removeprefix("(F) ").removeprefix("(M) ") for item in pool if fits(item, sex)]
    return [resolve(item, rng) for item in rng.sample(usable, min(k, len(usable)))]


def join(items: list[str], rng: random.Random, last: str | None = None) -> str:
    """'a', 'a and b', 'a, b and c' (or 'a, b, c'); `last` fixes the final joiner ('or')."""
    if len(items) == 1:
        return items[0]
    if last is None:
        last = rng.choice([" and ", ", "]) if len(items) > 2 else " and "
    return ", ".join(items[:-1]) + last + items[-1]


_MINOR_WORDS = {"a", "an", "the", "of", "on", "to", "with", "in", "from", "prior", "recurrent",
                "home", "years", "ago", "stage", "use", "chronic"}


def mentioned(item: str, text: str) -> bool:
    """Whether a significant word of `item` already occurs in `text` (so not to deny it)."""
    words = set(re.findall(r"[A-Za-z0-9/]+", text))
    return any(w in words for w in re.findall(r"[A-Za-z0-9/]+", item) if w not in _MINOR_WORDS)


# ------------------------------------------------------------------------------ templates

OPENERS = (
    "$age yo $sex with h/o $pmh.",
    "$age y/o $sex with $pmh.",
    "$age-year-old $sexword with a history of $pmh.",
    "$age yo $sex. PMH: $pmh.",
    "$age yo $sex s/p $proc, also with $pmh.",
    "Patient is a $age yo $sex with h/o $pmh.",
    "$age yo $sex with no significant past history.",
    "$age-year-old $sexword, s/p $proc.",
    "$age y/o $sex with h/o $pmh, s/p $proc.",
    "This is a $age yo $sex known to have $pmh.",
)
PRESENTATIONS = (
    "Now c/o $sx for $dur.",
    "The pt p/w $sx over the past $dur.",
    "Presented to the ED with $sx.",
    "Reports $sx for $dur.",
    "CC: $sx.",
    "HPI: $dur of $sx.",
    "Seen in clinic for $sx, ongoing for $dur.",
    "Sent from clinic to the ED for $sx.",
    "Has had $sx for $dur.",
    "The pt reports $sx, worse over the past $dur.",
    "Admitted with $sx.",
    "Comes in with {new|worsening|persistent|intermittent} $sx.",
)
NEGATIONS = (
    "Denies $neg.",
    "No $neg.",
    "Full ROS neg for $neg.",
    "The pt denies $neg.",
    "Negative for $neg.",
    "No h/o $hneg.",
    "Denies $neg; no h/o $hneg.",
    "Has not had $neg.",
    "No $neg, w/o $neg2.",
    "$pronoun denies $neg.",
)
OBSERVATIONS = (
    "On arrival, BP $sbp/$dbp, HR $hr, RR $rr, SpO2 $spo2%.",
    "Vitals: BP $sbp/$dbp mmHg, HR $hr bpm, SpO2 $spo2% on room air.",
    "Vitals: Tmax $fever C, HR $hr, BP $sbp/$dbp.",
    "Afebrile, VSS.",
    "In NAD, BP $sbp/$dbp, HR $hr.",
    "Current BMI $bmi.",
    "Exam notable for $exam.",
    "On exam, $exam and $exam2.",
    "Labs notable for $lab.",
    "Labs: $lab and $lab2.",
    "Labs: CBC WNL, $lab.",
    "Allergies: NKDA.",
    "Exam with $exam; labs with $lab.",
)
DIAGNOSES = (
    "$cond.",
    "$cond, likely d/t $cause.",
    "$cond; r/o $cond2.",
    "Suspected $cond.",
    "$cond c/b $cond2.",
    "New diagnosis of $cond.",
    "Worsening $cond.",
    "$cond in a pt with $hist.",
    "Primary: $cond. Secondary: $cond2.",
    "$cond d/t $cause, r/o $cond2.",
)
# (head in the source, kept in the summary?): a label is replaced by the summary's section
# header, a verb is part of the sentence and stays.
TREATMENT_HEADS = (("Rx: ", False), ("Tx: ", False), ("Plan: ", False), ("Start ", True),
                   ("Started ", True), ("Will start ", True), ("Begin ", True),
                   ("Continue home meds and add ", True))
FOLLOW_UP_HEADS = (("F/u: ", False), ("Follow-up: ", False), ("Recheck ", True), ("Repeat ", True),
                   ("Check ", True), ("Obtain ", True), ("Order ", True), ("Monitor ", True))
TIMINGS = ("in {2..14} days", "in {2..6} weeks", "in {2..6} months", "at the next visit",
           "before discharge", "tomorrow morning", "in 48 hours", "in 1 week", "in 1 month")
PLAN_EXTRAS = ("Return to the ED if sx worsen.", "Schedule a PCP visit in {2|4|6} weeks.",
               "Admit to {telemetry|the floor|the ICU}.", "Discussed plan with the pt.", "")


def duration(rng: random.Random) -> str:
    unit = rng.choice(["hours", "days", "days", "weeks", "months"])
    n = {"hours": (2, 48), "days": (2, 14), "weeks": (2, 8), "months": (2, 11)}[unit]
    return f"{rng.randint(*n)} {unit}" if rng.random() < 0.9 else rng.choice(["1 day", "1 week", "1 month"])


def vitals(rng: random.Random) -> dict[str, str]:
    sbp = rng.randint(88, 196)
    return {"sbp": str(sbp), "dbp": str(rng.randint(48, min(112, sbp - 25))),
            "hr": str(rng.randint(48, 138)), "rr": str(rng.randint(12, 32)),
            "spo2": str(rng.randint(82, 100)), "fever": _number("38.0", "40.2", rng),
            "bmi": _number("17.5", "46.0", rng)}


# ------------------------------------------------------------------------------ records


def summarise(patient_history: str, diagnosis: str, treatment_plan: str) -> str:
    """The reference summary of a record's source fields; a pure function of them."""
    treatment, follow_up = split_plan(treatment_plan)
    return (f"{expand_text(patient_history)} Diagnosis: {expand_text(diagnosis)} "
            f"Treatment: {expand_text(treatment)} Follow-up: {expand_text(follow_up)}")


_FOLLOW_UP_START = re.compile(r"\. (?=" + "|".join(re.escape(h) for h, _ in FOLLOW_UP_HEADS) + ")")


def split_plan(treatment_plan: str) -> tuple[str, str]:
    """(treatment, follow-up) sentences of a plan, each without a bare label such as 'Rx:'."""
    parts = _FOLLOW_UP_START.split(treatment_plan, maxsplit=1)
    if len(parts) != 2:
        raise DataError(f"treatment plan {treatment_plan!r}: no follow-up sentence "
                        f"(one starting {', '.join(repr(h.strip()) for h, _ in FOLLOW_UP_HEADS)})")
    treatment, follow_up = parts[0] + ".", parts[1]
    for head, kept in TREATMENT_HEADS:
        if not kept and treatment.startswith(head):
            treatment = treatment[len(head):]
    for head, kept in FOLLOW_UP_HEADS:
        if not kept and follow_up.startswith(head):
            follow_up = follow_up[len(head):]
    return treatment, follow_up


def _negation(spec: Specialty, rng: random.Random, sex: str, said: str) -> str:
    """One pertinent-negative sentence that denies nothing already said."""
    denials = tuple(d for d in spec.denials + GENERAL_DENIALS if not mentioned(d, said))
    negs = pick(denials, rng, sex, rng.randint(2, 4))
    # Only bare conditions read well after "no h/o": not "a 30 pack-year ..." or "X on Y".
    past = tuple(h for h in spec.history + ("HTN", "DM2", "HLD")
                 if not re.search(r"^a |^\(|\{| on ", h) and not mentioned(h, said)) or ("similar sx",)
    return fill(rng.choice(NEGATIONS), rng, neg=join(negs[:-1], rng, " or "), neg2=negs[-1],
                hneg=join(pick(past, rng, sex, rng.randint(1, 2)), rng, " or "),
                pronoun={"M": "He", "F": "She"}[sex])


def _history(spec: Specialty, rng: random.Random, age: int, sex: str) -> str:
    exam, exam2 = pick(spec.exam, rng, sex, 2)
    lab, lab2 = pick(spec.labs, rng, sex, 2)
    slots = {
        "age": str(age), "sex": sex,
        "sexword": rng.choice({"M": ["man", "male"], "F": ["woman", "female"]}[sex]),
        "pmh": join(pick(spec.history + GENERAL_HISTORY, rng, sex, rng.randint(1, 3)), rng),
        "proc": pick(spec.procedures, rng, sex)[0],
        "sx": join(pick(spec.symptoms, rng, sex, rng.choice([1, 1, 2, 2, 3, 4])), rng),
        "dur": duration(rng), "exam": exam, "exam2": exam2, "lab": lab, "lab2": lab2,
        **vitals(rng),
    }
    sentences = [fill(rng.choice(OPENERS), rng, **slots), fill(rng.choice(PRESENTATIONS), rng, **slots)]
    if rng.random() < 0.75:
        sentences.append(_negation(spec, rng, sex, " ".join(sentences)))
    sentences += [fill(t, rng, **slots) for t in rng.sample(OBSERVATIONS, rng.choice([1, 1, 2]))]
    if rng.random() < 0.2:  # a second pertinent negative, after the findings
        sentences.append(_negation(spec, rng, sex, " ".join(sentences)))
    return " ".join(sentences)


def _diagnosis(spec: Specialty, rng: random.Random, sex: str) -> str:
    cond, cond2 = pick(spec.conditions, rng, sex, 2)
    return fill(rng.choice(DIAGNOSES), rng, cond=cond, cond2=cond2,
                cause=pick(spec.causes, rng, sex)[0],
                hist=pick(spec.history + GENERAL_HISTORY, rng, sex)[0])


def _plan(spec: Specialty, rng: random.Random, sex: str) -> str:
    treatments = join(pick(spec.treatments, rng, sex, rng.choice([1, 2, 2, 3])), rng)
    tests = join(pick(spec.tests, rng, sex, rng.choice([1, 2, 2, 3])), rng)
    head = rng.choice(TREATMENT_HEADS)[0]
    follow = rng.choice(FOLLOW_UP_HEADS)[0]
    extra = resolve(rng.choice(PLAN_EXTRAS), rng)
    plan = f"{head}{treatments}. {follow}{tests} {resolve(rng.choice(TIMINGS), rng)}."
    return f"{plan} {extra}" if extra else plan


def source_text(record: dict) -> str:
    """The text the model sees, as data/records.py builds it from the three source fields."""
    return (f"Patient history: {record['patient_history']} Diagnosis: {record['diagnosis']} "
            f"Treatment plan: {record['treatment_plan']}")


def make_record(specialty: str, rng: random.Random) -> dict:
    """One record of `specialty` (no id yet), within the word bounds."""
    spec = SPECIALTIES[specialty]
    for _ in range(1000):
        sex = rng.choice("MF")
        age = rng.randint(18, 95)
        history = _history(spec, rng, age, sex)
        diagnosis = _diagnosis(spec, rng, sex)
        plan = _plan(spec, rng, sex)
        record = {"specialty": specialty, "patient_history": history, "diagnosis": diagnosis,
                  "treatment_plan": plan, "summary": summarise(history, diagnosis, plan)}
        source_words = len(source_text(record).split())
        summary_words = len(record["summary"].split())
        if (SOURCE_WORDS[0] <= source_words <= SOURCE_WORDS[1]
                and SUMMARY_WORDS[0] <= summary_words <= SUMMARY_WORDS[1]):
            found = find_abbreviations(f"{history} {diagnosis} {plan}")
            record["expansions"] = {a: ABBREVIATIONS[a].expansion for a in found}
            return record
    raise RuntimeError(f"{specialty}: no record within the word bounds after 1000 draws")


def generate(config: SynthConfig = SynthConfig()) -> dict[str, list[dict]]:
    """All four splits, keyed as SPLIT_FILES; records in each sorted by id."""
    rng = random.Random(config.seed)
    seen: set[tuple[str, str]] = set()
    made: dict[str, list[dict]] = {s: [] for s in IN_DOMAIN + OUT_OF_DOMAIN}
    # Round-robin over specialties so ids interleave; in-domain ids come first.
    for specialties, count in ((IN_DOMAIN, config.per_specialty), (OUT_OF_DOMAIN, config.ood_per_specialty)):
        for _ in range(count):
            for specialty in specialties:
                for _ in range(100):
                    record = make_record(specialty, rng)
                    key = (source_text(record), record["summary"])
                    if key not in seen:
                        break
                else:
                    raise RuntimeError(f"{specialty}: 100 duplicate records in a row; add variety")
                seen.add(key)
                made[specialty].append({"id": f"synth-{len(seen) - 1:06d}", **record})
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for specialty in IN_DOMAIN:  # 80/10/10 within each specialty, so every split has all eight
        records = made[specialty]
        rng.shuffle(records)
        n_held = len(records) // 10
        splits["val"] += records[:n_held]
        splits["test"] += records[n_held:2 * n_held]
        splits["train"] += records[2 * n_held:]
    splits["test_ood"] = [r for s in OUT_OF_DOMAIN for r in made[s]]
    return {name: sorted(records, key=lambda r: r["id"]) for name, records in splits.items()}


def render(records: list[dict]) -> str:
    """A split file's exact text."""
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def render_all(config: SynthConfig = SynthConfig()) -> dict[str, str]:
    """File name -> exact text, for every split."""
    return {SPLIT_FILES[name]: render(records) for name, records in generate(config).items()}


def ood_coverage(splits: dict[str, list[dict]]) -> tuple[int, int]:
    """(OOD abbreviations never used in train, OOD abbreviations in all), counted as distinct keys."""
    seen = {a for r in splits["train"] for a in r["expansions"]}
    ood = {a for r in splits["test_ood"] for a in r["expansions"]}
    return len(ood - seen), len(ood)


# ------------------------------------------------------------------------------ CLI


def write(out: Path, texts: dict[str, str], force: bool) -> None:
    existing = [str(out / name) for name in texts if (out / name).exists()]
    if existing and not force:
        raise DataError(f"{', '.join(existing)}: already exist{'s' if len(existing) == 1 else ''}; "
                        "pass --force to overwrite")
    for name, text in texts.items():
        try:
            atomic_write_text(out / name, text)
        except OSError as e:
            raise DataError(f"{out / name}: cannot write: {e.strerror or e}") from None


def differences(out: Path, texts: dict[str, str]) -> list[str]:
    """One line per file on disk that differs from the regenerated text."""
    problems = []
    for name, text in texts.items():
        path = out / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.read_bytes() != text.encode("utf-8"):
            problems.append(f"{path}: differs from what --seed regenerates")
    return problems


@exit_on_data_error()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory for the four JSON files (default: the data/ package)")
    parser.add_argument("--seed", type=int, default=SynthConfig.seed)
    parser.add_argument("--per-specialty", type=int, default=SynthConfig.per_specialty,
                        help="in-domain records per specialty (default: %(default)s)")
    parser.add_argument("--ood-per-specialty", type=int, default=SynthConfig.ood_per_specialty,
                        help="out-of-domain records per specialty (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the files on disk differ from a regeneration")
    args = parser.parse_args(argv)
    if args.per_specialty < 10 or args.ood_per_specialty < 1:
        raise DataError("--per-specialty must be at least 10 and --ood-per-specialty at least 1")
    splits = generate(SynthConfig(args.seed, args.per_specialty, args.ood_per_specialty))
    texts = {SPLIT_FILES[name]: render(records) for name, records in splits.items()}
    if args.check:
        problems = differences(args.out, texts)
        for line in problems:
            print(f"mismatch: {line}", file=sys.stderr)
        if not problems:
            print(f"{args.out}: all {len(texts)} files match seed {args.seed}")
        return 1 if problems else 0
    write(args.out, texts, args.force)
    unseen, total = ood_coverage(splits)
    print(", ".join(f"{file}: {len(splits[name])}" for name, file in SPLIT_FILES.items())
          + f" records in {args.out}; {unseen} of {total} abbreviations in {SPLIT_FILES['test_ood']} "
          "never occur in training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
