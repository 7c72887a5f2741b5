"""The demo corpus: real dialect voices from espeak-ng, written like a contributor upload.

A corpus that can teach: many distinct speakers and sentences per dialect, so that more training
keeps helping on *unseen* speakers and sentences instead of memorising a few.

- **Speakers** are (voice variant, pitch, speed, word gap) combinations of one dialect voice:
  34 human-sounding espeak variants × 5 pitches × 4 speeds × 2 word gaps (1,360 per dialect), drawn
  deterministically per (seed, dialect), each variant as ~3 speakers. The default of 40 speakers
  per dialect (14 variants) gives ≥ 5 dev and ≥ 5 test speakers under the default split policy
  (``core/data/splits.py``).
- **Sentences** are 3–10 words from a vocabulary of a few hundred common words: half random word
  strings (no language model can guess them), half drawn from ~20 grammatical templates (closer to
  speech). A held-out pool is spoken only by the speakers that the dataset's speaker-disjoint split
  puts in dev/test, so evaluation sentences never appear in training.

espeak-ng takes ~10 ms per utterance; synthesis runs ``workers`` processes at once.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mloc_dagster.core.data.splits import assign_splits

WORDS = """
the a an and or but if then so because when where while after before over under into out of
on in at to from with without about for by up down near far here there this that these those
i you he she we they it my your his her our their me him us them who what which how why
is are was were be been being have has had do does did can could will would shall should may
might must go goes went come comes came see saw look looks take took make made give gave find
found think know knew want need like love help tell told ask asked call work play run ran walk
talk say said read write keep hold bring bought build built open close start stop turn move live
time year day night week morning evening today tomorrow people man woman child children friend
family mother father brother sister house home room door window table chair bed kitchen garden
street road town city country river sea lake hill mountain tree forest field flower grass stone
water fire air sun moon star sky rain snow wind cloud weather cold warm hot dry wet green blue
red white black brown yellow grey bright dark light heavy small big little large long short
high low old new young good bad best better happy sad quiet loud fast slow early late first last
next other every each many much more most some any few all both one two three four five six
seven eight nine ten hundred dog cat horse cow sheep bird fish boat ship train car bus bike
bread milk tea coffee apple cake soup dinner lunch breakfast money book letter paper story song
music picture game school teacher class lesson question answer idea word name place way thing
hand head eye face heart back foot feet arm voice sound very just only also still again never
always often sometimes soon now once almost really together outside inside across around along
""".split()

DIALECT_VOICES = {
    "en-us": "en-us",
    "en-gb-scotland": "en-gb-scotland",
    "en-gb-x-gbclan": "en-gb-x-gbclan",
    "en-gb-x-gbcwmd": "en-gb-x-gbcwmd",
    "en-029": "en-029",
    "en-us-nyc": "en-us-nyc",
}
# espeak-ng variants that sound like people: robots, croaks and whispers left out (also the nearly
# unvoiced Alicia, Annie and caleb: voicing ≤ 38, one Alicia test speaker had CER 0.74 where the
# others had 0.06–0.14).
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "adam", "Alex", "Andrea", "Andy", "antonio", "belinda", "benjamin", "david", "ed", "edward",
            "john", "linda", "max", "Michael", "paul", "quincy", "rob", "robert", "steph", "travis", "victor")
PITCHES = (30, 40, 50, 60, 70)
SPEEDS = (140, 160, 180, 200)  # words per minute
WORD_GAPS = (0, 2)  # extra pause between words, in units of 10 ms
DEFAULT_SPEAKERS = 40
# A voice variant speaks as this many speakers (different pitch, speed, word gap), so an unseen test
# speaker is usually a known voice at new settings — like a person on another day — rather than
# a voice type training never heard.
SPEAKERS_PER_VARIANT = 3

# Grammatical templates over the same vocabulary: {category} slots are filled from CATEGORIES.
CATEGORIES = {
    "det": "the a this that my your his her our their every each some".split(),
    "adj": ("old new young good bad happy sad quiet loud fast slow early late small big little large long "
            "short high low cold warm hot dry wet green blue red white black brown yellow grey bright dark "
            "light heavy").split(),
    "noun": ("man woman child friend mother father brother sister house room door window table chair bed "
             "kitchen garden street road town city country river sea lake hill mountain tree forest field "
             "flower stone fire sun moon star sky dog cat horse cow sheep bird fish boat ship train car bus "
             "bike bread milk tea coffee apple cake soup dinner lunch breakfast book letter paper story song "
             "picture game school teacher class lesson question answer idea word name place thing").split(),
    "pron": "i you he she we they".split(),
    "verb_past": "saw took made gave found knew told asked built bought said ran went came".split(),
    "verb": "see take make give find help tell ask call keep hold bring build open close start stop".split(),
    "modal": "can could will would should may might must".split(),
    "prep": "on in at to from with near under over into across around along".split(),
    "time": ["today", "tomorrow", "again", "now", "soon", "often", "sometimes", "always", "once",
             "in the morning", "in the evening", "at night", "after dinner", "before breakfast"],
    "adv": "very really also still just only almost".split(),
    "num": "two three four five six seven eight nine ten".split(),
}
TEMPLATES = (
    "{det} {adj} {noun} {verb_past} {det} {noun}",
    "{pron} {verb_past} {det} {adj} {noun} {prep} the {noun}",
    "{pron} {modal} {verb} the {noun} {time}",
    "{det} {noun} is {adv} {adj}",
    "{det} {noun} was {adj} and {adj}",
    "{pron} {verb_past} {num} {noun} {prep} the {noun}",
    "where is the {adj} {noun}",
    "{modal} {pron} {verb} {det} {noun}",
    "the {noun} {prep} the {noun} is {adj}",
    "{pron} {adv} {verb_past} the {noun} {time}",
    "{det} {noun} and {det} {noun} {verb_past} home",
    "{pron} {modal} never {verb} the {adj} {noun}",
    "why did {pron} {verb} the {noun}",
    "{pron} went to the {noun} {prep} the {adj} {noun}",
    "there are {num} {adj} {noun} {prep} the {noun}",
    "{det} {adj} {noun} {modal} {verb} the {noun}",
    "{pron} {verb_past} that the {noun} was {adj}",
    "how {adj} is {det} {noun}",
    "{pron} {modal} {verb} {det} {noun} {prep} the {noun} {time}",
    "{det} {noun} {verb_past} {prep} the {adj} {noun} {time}",
)


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str
    variant: str
    pitch: int
    speed: int
    word_gap: int = 0

    def espeak_args(self) -> list[str]:
        return ["-v", f"{self.voice}+{self.variant}", "-p", str(self.pitch), "-s", str(self.speed),
                "-g", str(self.word_gap)]


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed: run `make setup` (apt-get install espeak-ng)")
    return path


def _template_sentence(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    words = template.format_map(_Fill(rng)).split()
    return " ".join(words)


class _Fill(dict):
    def __init__(self, rng: random.Random):
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        return self.rng.choice(CATEGORIES[key])


def make_sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct sentences of 3–10 words: alternately random word strings and templates."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        if len(out) % 2:
            sentence = _template_sentence(rng)
            if not 3 <= len(sentence.split()) <= 10:
                continue
        else:
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


def sentence_pools(seed: int, train_size: int = 20000, heldout_size: int = 3000) -> tuple[list[str], list[str]]:
    """Disjoint train and held-out pools; the same for every dialect for a given seed."""
    sentences = make_sentences(train_size + heldout_size, seed)
    return sentences[heldout_size:], sentences[:heldout_size]


def make_speakers(dialect: str, n: int, seed: int) -> list[Speaker]:
    """``n`` distinct speakers of a dialect, deterministic for (dialect, seed): ``ceil(n / 3)``
    voice variants (shuffled per dialect), each speaking as ~3 speakers at different settings."""
    voice = DIALECT_VOICES.get(dialect, dialect)
    settings = [(p, s, g) for p in PITCHES for s in SPEEDS for g in WORD_GAPS]
    if n > len(VARIANTS) * len(settings):
        raise ValueError(f"at most {len(VARIANTS) * len(settings)} distinct speakers per dialect, asked for {n}")
    rng = random.Random(f"{seed}:{dialect}")
    variants = list(VARIANTS)
    rng.shuffle(variants)
    variants = variants[:min(len(variants), max(1, math.ceil(n / SPEAKERS_PER_VARIANT)))]
    if n > len(variants) * len(settings):
        variants = list(VARIANTS)
    per_variant = {v: rng.sample(settings, len(settings)) for v in variants}
    prefix = dialect.replace("en-gb-x-", "").replace("en-gb-", "").replace("en-", "")
    out = []
    for i in range(n):
        v = variants[i % len(variants)]
        p, s, g = per_variant[v][i // len(variants)]
        out.append(Speaker(f"{prefix}-{v.lower()}-p{p}-s{s}-g{g}", voice, v, p, s, g))
    return out


def synthesize(text: str, speaker: Speaker, out_wav: Path) -> None:
    subprocess.run([espeak_binary(), *speaker.espeak_args(), "-w", str(out_wav), text],
                   check=True, capture_output=True)


def synth_dialect(dialect: str, utterances: int, out_dir: Path, seed: int = 0, speakers: int = DEFAULT_SPEAKERS,
                  batch_id: str | None = None, contributor: str = "espeak-demo", workers: int = 4) -> Path:
    """Write one incoming batch ``out_dir/<dialect>/<batch_id>/`` with wavs and manifest.jsonl.

    Deterministic for a seed. The manifest is written last (atomically), because a batch is
    complete when its manifest exists.
    """
    espeak_binary()
    batch_id = batch_id or f"synth-s{seed}-n{utterances}"
    batch_dir = out_dir / dialect / batch_id
    (batch_dir / "audio").mkdir(parents=True, exist_ok=True)
    train_pool, heldout_pool = sentence_pools(seed)
    voices = make_speakers(dialect, speakers, seed)
    # The split the dataset will make (same policy, same per-speaker row counts).
    counts = {v.id: len(range(i, utterances, len(voices))) for i, v in enumerate(voices)}
    eval_speakers = {s for s, split in assign_splits(dialect, counts).items() if split != "train"}

    rng = random.Random(f"{seed}:{dialect}:utts")
    # Draw without replacement (cycling when a pool runs out) so no utterance is a duplicate.
    draws = {id(p): rng.sample(p, len(p)) for p in (train_pool, heldout_pool)}
    used = {id(train_pool): 0, id(heldout_pool): 0}
    rows = []
    for i in range(utterances):
        speaker = voices[i % len(voices)]
        pool = heldout_pool if speaker.id in eval_speakers else train_pool
        order = draws[id(pool)]
        text = order[used[id(pool)] % len(order)]
        used[id(pool)] += 1
        rows.append({"audio": f"audio/{i:06d}.wav", "text": text,
                     "speaker": speaker.id, "contributor": contributor, "_speaker": speaker})

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda r: synthesize(r["text"], r["_speaker"], batch_dir / r["audio"]), rows))

    tmp = batch_dir / "manifest.jsonl.tmp"
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")
    tmp.rename(batch_dir / "manifest.jsonl")
    return batch_dir
