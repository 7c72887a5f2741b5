"""The demo corpus: real dialect voices from espeak-ng, written like a contributor upload.

Sentences are 3–10 words drawn from a vocabulary of a few hundred common words, so a small CTC
model can learn the task in CPU-minutes. Speakers are (voice variant, pitch, speed) combinations.
A held-out sentence pool is spoken only by speakers that the dataset's speaker-disjoint split puts
in dev/test, so evaluation sentences never appear in training.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mloc_dagster.core.splits import assign_splits

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
VARIANTS = ("m1", "m3", "f1", "f3", "m7", "f4")
PITCHES = (35, 50, 65)
SPEEDS = (150, 175)


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str
    variant: str
    pitch: int
    speed: int

    def espeak_args(self) -> list[str]:
        return ["-v", f"{self.voice}+{self.variant}", "-p", str(self.pitch), "-s", str(self.speed)]


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed: run `make setup` (apt-get install espeak-ng)")
    return path


def make_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


def sentence_pools(seed: int, train_size: int = 6000, heldout_size: int = 800) -> tuple[list[str], list[str]]:
    """Disjoint train and held-out pools; the same for every dialect for a given seed."""
    sentences = make_sentences(train_size + heldout_size, seed)
    return sentences[heldout_size:], sentences[:heldout_size]


def make_speakers(dialect: str, n: int, seed: int) -> list[Speaker]:
    voice = DIALECT_VOICES.get(dialect, dialect)
    combos = [(v, p, s) for v in VARIANTS for p in PITCHES for s in SPEEDS]
    random.Random(f"{seed}:{dialect}").shuffle(combos)
    prefix = dialect.replace("en-gb-x-", "").replace("en-gb-", "").replace("en-", "")
    return [Speaker(f"{prefix}-{v}-p{p}-s{s}", voice, v, p, s) for v, p, s in combos[:n]]


def synthesize(text: str, speaker: Speaker, out_wav: Path) -> None:
    subprocess.run([espeak_binary(), *speaker.espeak_args(), "-w", str(out_wav), text],
                   check=True, capture_output=True)


def synth_dialect(dialect: str, utterances: int, out_dir: Path, seed: int = 0, speakers: int = 12,
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
    eval_speakers = {s for s, split in assign_splits(dialect, [v.id for v in voices]).items() if split != "train"}

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
