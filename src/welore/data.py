"""Real corpora from the project's shared data folder (never fetched at run time).

The folder is `$WELORE_DATA` if set, else the first `shared/data` found beside the working
directory or beside this source tree (`../shared/data` from the project root).

Held-out discipline: C4 documents 0-1799 are for training/calibration, 1800-1999 for evaluation.

Besides the named corpora, a corpus can be any local file: `.txt` (read as it is), or `.jsonl`,
`.json` or `.parquet` records (read with the `datasets` library; `text_field` names the column, and
documents are joined by blank lines, as C4's are). `corpus_info` gives its name and sha256, so a
perplexity says which text it was measured on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from .errors import WeloreError, one_line
from .files import atomic_file, cache_dir

CORPORA = ("wikitext2", "c4", "c4-train")
C4_EVAL_START = 1800
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


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


def corpus_path(name: str) -> Path:
    """The file a corpus is read from: a named corpus' file in the data folder, or the path itself."""
    if name == "wikitext2":
        return data_dir() / "text" / "wikitext2_test.raw"
    if name in ("c4", "c4-train"):
        return data_dir() / "text" / "c4_validation_2k.parquet"
    path = Path(name).expanduser()
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise WeloreError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)} or a "
                          f"{', '.join(FILE_SUFFIXES)} file")
    if not path.is_file():
        raise WeloreError(f"no such corpus file: {name}")
    return path


def corpus_info(name: str, text_field: str = "text") -> dict:
    """What a perplexity was measured on: the corpus' name, its file and the file's sha256."""
    path = corpus_path(name)
    if not path.is_file():
        raise WeloreError(f"missing corpus file {path}")
    st = path.stat()
    info = {"corpus": name, "file": str(path), "sha256": _sha256(str(path), st.st_mtime_ns, st.st_size)}
    if name not in CORPORA and path.suffix.lower() != ".txt":
        info["text_field"] = text_field
    return info


@lru_cache(maxsize=32)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a file, cached per (path, mtime, size): every perplexity asks, the file is read once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_corpus(name: str, text_field: str = "text") -> str:
    """One corpus as a single string, documents joined by blank lines.

    wikitext2: WikiText-2 raw test split (the standard perplexity corpus).
    c4:        C4 validation sample, documents 1800-1999 (held out from training/calibration).
    c4-train:  C4 validation sample, documents 0-1799.
    a path:    a .txt file, or the `text_field` of every record of a .jsonl / .json / .parquet file.
    """
    path = corpus_path(name)
    if not path.is_file():
        raise WeloreError(f"missing corpus file {path}")
    st = path.stat()  # in the cache key, so an edited file is read again
    return _load_corpus(name, text_field if name not in CORPORA else "text", str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _load_corpus(name: str, text_field: str, path_str: str, mtime_ns: int, size: int) -> str:
    if name not in CORPORA:
        return _load_file(Path(path_str), text_field)
    d = data_dir() / "text"
    if name == "wikitext2":
        path = d / "wikitext2_test.raw"
        # text mode folds the file's CRLF endings; one line per non-empty row of the split
        return "\n\n".join(line.rstrip("\n") for line in _read_lines(path))
    if name in ("c4", "c4-train"):
        return "\n\n".join(c4_documents(name))
    raise WeloreError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")


def c4_documents(name: str) -> list[str]:
    """The documents of `c4` (1800-1999, held out) or `c4-train` (0-1799) of the C4 sample, in order."""
    import pyarrow.parquet as pq

    path = corpus_path(name)
    if not path.is_file():
        raise WeloreError(f"missing corpus file {path}")
    docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return docs[C4_EVAL_START:] if name == "c4" else docs[:C4_EVAL_START]


def _load_file(path: Path, text_field: str) -> str:
    if path.stat().st_size == 0:
        raise WeloreError(f"corpus file {path} is empty")
    if path.suffix.lower() == ".txt":
        raw = path.read_bytes()
        if b"\x00" in raw[:8192]:
            raise WeloreError(f"corpus file {path} is binary, not text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WeloreError(f"corpus file {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
        text = text.replace("\r\n", "\n")  # as text mode would read it
    else:
        text = "\n\n".join(_records(path, text_field))
    if not text.strip():
        raise WeloreError(f"corpus file {path} holds no text")
    return text


def _records(path: Path, text_field: str) -> list[str]:
    """The `text_field` of every record, via `datasets` (JSON lines, a JSON list, or parquet)."""
    import datasets

    builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for a malformed file
        raise WeloreError(f"cannot read {path} as {builder}: {one_line(e, 200)}") from e
    if text_field not in ds.column_names:
        raise WeloreError(f"{path} has no field {text_field!r} (fields: {', '.join(ds.column_names) or 'none'}); "
                          f"use --text-field")
    docs = ds[text_field]
    if not all(isinstance(d, str) or d is None for d in docs):
        raise WeloreError(f"field {text_field!r} of {path} is not text")
    return [d for d in docs if d]


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise WeloreError(f"missing corpus file {path}")
    with open(path, encoding="utf-8") as f:
        return f.readlines()


# ---------------------------------------------------------------------------------------------
# tokenised corpora and windows: every reader of text goes through these

_ENCODED: dict[tuple, torch.Tensor] = {}


def encode_corpus(tokenizer, corpus: str, max_tokens: int | None = None, text_field: str = "text") -> torch.Tensor:
    """Token ids of a whole corpus (cached per tokenizer: the same tokenizer loaded twice hits the cache)."""
    text = load_corpus(corpus, text_field)  # cached itself; read first so an edited file is a new key
    key = (_tokenizer_key(tokenizer), corpus, text_field, max_tokens, hash(text))
    if key not in _ENCODED:
        ids = None
        if max_tokens is not None and len(text) > max_tokens * 8:
            # tokenizing 1 MB for 4k tokens wastes seconds: tokenize a prefix of ~8 characters per
            # token, keeping it only if it holds a comfortable margin past max_tokens (the tokens
            # near the cut may differ from the full tokenization; those far before it do not)
            ids = _tokenize(tokenizer, text[: max_tokens * 8])
            if len(ids) < max_tokens + 256:
                ids = None
        _ENCODED[key] = torch.tensor(ids, dtype=torch.long) if ids is not None else \
            _tokens_on_disk(key[0], corpus, text_field, lambda: _tokenize(tokenizer, text))
    return _ENCODED[key]


def _tokens_on_disk(tokenizer_key: str, corpus: str, text_field: str, tokenize: Callable[[], list[int]]
                    ) -> torch.Tensor:
    """A whole corpus' token ids, kept in welore's cache by (tokenizer, corpus, file content): every
    process that trains on C4 (each of a comparison's runs, each rank of a launch) otherwise tokenises
    the same 1.1 MB again, seconds each. No cache (WELORE_CACHE=off): tokenised here, nothing written."""
    root = cache_dir()
    if root is None:
        return torch.tensor(tokenize(), dtype=torch.long)
    sha = corpus_info(corpus, text_field)["sha256"]
    name = hashlib.blake2b(f"{tokenizer_key}:{corpus}:{text_field}:{sha}".encode(), digest_size=16).hexdigest()
    path = root / "tokens" / f"{name}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["ids"].long()
        except Exception:  # a damaged entry is made again
            pass
    ids = torch.tensor(tokenize(), dtype=torch.long)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"ids": ids.int()}, str(tmp))
    except (OSError, WeloreError):  # a read-only cache costs the next process the tokenisation, nothing more
        pass
    return ids


def is_text_file(name: str) -> bool:
    """Whether `name` names a text file (by its suffix) rather than a named corpus or a task."""
    return Path(name).suffix.lower() in FILE_SUFFIXES


def check_training_text(name: str) -> None:
    """Refuse a training text file that is missing or is one of the evaluation corpora's files."""
    path = corpus_path(name)  # refuses a missing file
    try:
        held_out = {corpus_path(c).resolve() for c in ("wikitext2", "c4")}
    except WeloreError:  # no shared data folder: there is no evaluation file to collide with
        held_out = set()
    if path.resolve() in held_out:
        raise WeloreError(f"{name} holds evaluation text (WikiText-2 test or the held-out C4 documents); "
                          "train on other text")


def training_corpus(data: str) -> str:
    """The corpus a fine-tuning run's `data` trains on: C4's training documents for "c4", else the file."""
    return "c4-train" if data == "c4" else data


def training_text(tokenizer, corpus: str, held_out: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training ids, held-out ids) of a fine-tuning text: for "c4", C4 train documents and None (its
    held-out documents are evaluated by name); for a text file, the file with its last `held_out`
    tokens set apart, so a run on the user's own text is judged on unseen text of the same kind."""
    if corpus == "c4":
        return encode_corpus(tokenizer, training_corpus(corpus)), None
    check_training_text(corpus)
    ids = encode_corpus(tokenizer, corpus)
    if ids.numel() < 2 * held_out:
        raise WeloreError(f"{corpus} has {ids.numel():,} tokens; fine-tuning on it needs at least "
                          f"{2 * held_out:,} (its last {held_out:,} are held out for evaluation)")
    return ids[:-held_out], ids[-held_out:]


def _tokenizer_key(tokenizer) -> str:
    """Content hash of a fast tokenizer's definition (else its identity)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"id:{id(tokenizer)}"
    return hashlib.blake2b(backend.to_str().encode(), digest_size=16).hexdigest()


def _tokenize(tokenizer, text: str) -> list[int]:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than model max" for a whole corpus
    try:
        return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)


def random_windows(ids: torch.Tensor, count: int, seqlen: int, generator: torch.Generator,
                   high: int | None = None) -> torch.Tensor:
    """`count` windows of `seqlen` tokens at uniformly random starts in [0, high) (default: every
    start that fits), drawn from `generator`: (count x seqlen)."""
    high = ids.numel() - seqlen if high is None else high
    starts = torch.randint(0, high, (count,), generator=generator)
    return torch.stack([ids[s: s + seqlen] for s in starts])


def text_batches(tokenizer, seqlen: int, batch_size: int, corpus: str = "c4-train",
                 seed: int = 0) -> tuple[Callable[[int], dict], dict]:
    """(batch_for_step, fixed measurement batch): random windows of the corpus; the measurement batch
    is drawn apart from the training stream (a different generator)."""
    ids = encode_corpus(tokenizer, corpus)
    n = ids.numel() - seqlen - 1
    if n <= 0:
        raise WeloreError(f"{corpus} is shorter than one sequence of {seqlen} tokens")

    def take(gen) -> dict:
        x = random_windows(ids, batch_size, seqlen, gen, high=n)
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

    measure = take(torch.Generator().manual_seed(10_000 + seed))
    return (lambda step: take(torch.Generator().manual_seed(seed * 1_000_003 + step))), measure
