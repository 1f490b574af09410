"""Real corpora from the project's shared data folder (never fetched at run time).

The folder is `$WELORE_DATA` if set, else the first `shared/data` found beside the working
directory or beside this source tree (`../shared/data` from the project root).

Held-out discipline: C4 documents 0-1799 are for training/calibration, 1800-1999 for evaluation.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from .errors import WeloreError

CORPORA = ("wikitext2", "c4", "c4-train")
C4_EVAL_START = 1800


def data_dir() -> Path:
    env = os.environ.get("WELORE_DATA")
    if env:
        p = Path(env)
        if not p.is_dir():
            raise WeloreError(f"WELORE_DATA={env} is not a directory")
        return p
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *Path.cwd().parents[:2], *here.parents[:4]):
        p = base / "shared" / "data"
        if (p / "text").is_dir():
            return p
    raise WeloreError("shared data folder not found: set WELORE_DATA or run from the project root "
                      "(expects ../shared/data)")


@lru_cache(maxsize=8)
def load_corpus(name: str) -> str:
    """One corpus as a single string, documents joined by blank lines.

    wikitext2: WikiText-2 raw test split (the standard perplexity corpus).
    c4:        C4 validation sample, documents 1800-1999 (held out from training/calibration).
    c4-train:  C4 validation sample, documents 0-1799.
    """
    d = data_dir() / "text"
    if name == "wikitext2":
        path = d / "wikitext2_test.raw"
        # text mode folds the file's CRLF endings; one line per non-empty row of the split
        return "\n\n".join(line.rstrip("\n") for line in _read_lines(path))
    if name in ("c4", "c4-train"):
        import pyarrow.parquet as pq

        path = d / "c4_validation_2k.parquet"
        if not path.is_file():
            raise WeloreError(f"missing corpus file {path}")
        docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        docs = docs[C4_EVAL_START:] if name == "c4" else docs[:C4_EVAL_START]
        return "\n\n".join(docs)
    raise WeloreError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise WeloreError(f"missing corpus file {path}")
    with open(path, encoding="utf-8") as f:
        return f.readlines()
