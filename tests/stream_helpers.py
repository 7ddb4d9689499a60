"""A tiny text stream for engine tests that need no embedded data package."""

from __future__ import annotations

import json
import random
from pathlib import Path


def tiny_text_stream(path: Path) -> None:
    """Two tasks of two intents each, as a data file (text, label, task, split) with distinct
    keywords per intent: 16 train, 4 val and 8 test rows per intent."""
    rng = random.Random(0)
    intents = {"weather": {"rain": "umbrella rain storm", "sun": "sunny hot beach"},
               "music": {"play": "play song album", "stop": "stop pause silence"}}
    fill = "please could you tell me now today about the thing for my friend".split()
    rows = []
    for task, labels in intents.items():
        for label, words in labels.items():
            for split, n in (("train", 16), ("val", 4), ("test", 8)):
                for _ in range(n):
                    text = " ".join(rng.sample(words.split() + rng.sample(fill, 4), 7))
                    rows.append({"text": text, "label": label, "task": task, "split": split})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
