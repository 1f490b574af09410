"""A checkpoint's tensors in safetensors files, one (`model.safetensors`) or several with the index
transformers reads (`model.safetensors.index.json`).

`ShardReader` reads lazily: `safe_open` maps the files and a tensor is read only when asked for, so
a block of a model larger than memory can be processed on its own. `write_shard` / `write_index`
write a sharded checkpoint shard by shard (each file appears whole or not at all), which is what
lets a streaming job resume from its last finished shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import WeloreError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


class ShardReader:
    """Lazy read access to the safetensors weights of a model directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if (self.dir / INDEX).is_file():
            try:
                self.weight_map: dict[str, str] = json.loads((self.dir / INDEX).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise WeloreError(f"{self.dir / INDEX} is corrupt: {e}") from e
        elif (self.dir / SINGLE).is_file():
            with self._open(SINGLE) as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise WeloreError(f"{self.dir} has no safetensors weights ({SINGLE} or {INDEX})")
        self._check()
        self.stored = {k: k for k in self.weight_map}  # the model's name -> the name in the files

    def _check(self) -> None:
        """Every file the index names opens (exists, is not truncated) and holds the tensors the index
        puts in it: found now, from the headers alone, rather than blocks into a long job."""
        wanted: dict[str, set[str]] = {}
        for key, file in self.weight_map.items():
            wanted.setdefault(file, set()).add(key)
        for file, keys in wanted.items():
            with self._open(file) as f:
                missing = keys - set(f.keys())
            if missing:
                raise WeloreError(f"{self.dir / INDEX} puts {min(missing)} in {file}, which does not hold it")

    def missing(self, model) -> list[str]:
        """`model`'s parameters that the checkpoint does not hold, in `name_as` names."""
        model.tie_weights()  # a tied head is stored once, under the embedding's name
        return [n for n, _ in model.named_parameters() if n not in self.stored]

    def name_as(self, model) -> ShardReader:
        """Use `model`'s tensor names: transformers renames some checkpoint keys on load (GPT-NeoX's
        `embed_out` is its `lm_head`); its own renaming rules are applied here."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming, rename_source_key
            renames = [m for m in get_model_conversion_mapping(model) if isinstance(m, WeightRenaming)]
            self.stored = {rename_source_key(k, renames, [])[0]: k for k in self.weight_map}
        except ImportError:  # a transformers without renaming rules stores the model's own names
            pass
        return self

    def _open(self, file: str):
        try:
            return safe_open(str(self.dir / file), framework="pt")
        except (SafetensorError, OSError) as e:
            raise WeloreError(f"{self.dir / file} is missing or corrupt: {e}") from e

    def keys(self) -> list[str]:
        return list(self.stored)

    def __contains__(self, key: str) -> bool:
        return key in self.stored

    def get(self, key: str) -> torch.Tensor:
        # The file is opened for each tensor and closed at once: pages read through a file's map count
        # in the process' RSS until the map is closed, so a handle kept open grows the RSS by what was
        # read (a whole single-file checkpoint; a shard). Opening reads only the header.
        try:
            stored = self.stored[key]
            with self._open(self.weight_map[stored]) as f:
                return f.get_tensor(stored)
        except KeyError:
            raise WeloreError(f"{self.dir} has no tensor {key}") from None
        except SafetensorError as e:  # changed on disk since it was checked
            raise WeloreError(f"{self.dir}: cannot read {key}: {e}") from e

    def all(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.stored}

    def files(self) -> list[Path]:
        return [self.dir / f for f in dict.fromkeys(self.weight_map.values())]


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file so that it appears whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # a full disk: what was finished before stays, for --resume
        tmp.unlink(missing_ok=True)
        raise WeloreError(f"cannot write {path}: {e}; the blocks finished so far are kept for --resume") from e


def write_index(directory: Path, total: int) -> None:
    """The index of shards 1..total in `directory`, read back from the shards themselves (so a resumed
    job indexes what is on disk); total_size is the shards' file size, headers included."""
    weight_map, size = {}, 0
    for i in range(total):
        name = shard_name(i, total)
        with safe_open(str(directory / name), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = name
        size += (directory / name).stat().st_size
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map},
                                              indent=1))
