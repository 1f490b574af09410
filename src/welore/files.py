"""Writing outputs safely: every directory and file is written to a temporary sibling and renamed
into place, so a failure (a full disk, a killed process) never leaves a half-written output, and an
existing output is replaced only when asked. Also a cheap identity for large files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import WeloreError, one_line


def hash_file_heads(h, files, names: bool = False) -> None:
    """Feed each file's size and first MiB (and its name, with `names`) to the hash `h`: a cheap
    identity for weight files that never reads them whole."""
    for f in files:
        h.update((f"{f.name}:{f.stat().st_size}" if names else str(f.stat().st_size)).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))


def check_output(out: str | Path | None, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite`: called before minutes of work, and again by
    `atomic_dir` just before writing."""
    if out is not None and Path(out).exists() and not overwrite:
        raise WeloreError(f"output {out} already exists (use --overwrite to replace it)")


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir`; on success it replaces `out_dir` in one rename."""
    out = Path(out_dir)
    check_output(out, overwrite)
    if out.exists() and not out.is_dir():
        raise WeloreError(f"output {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        try:
            yield tmp
        except (OSError, SafetensorError) as e:  # a full disk, a read-only folder: the user's to fix
            raise WeloreError(f"cannot write {out}: {one_line(e)}") from e
        _public_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    if path.is_dir():
        raise WeloreError(f"output {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
        except OSError as e:
            raise WeloreError(f"cannot write {path}: {one_line(e)}") from e
        tmp.chmod(0o666 & ~_umask())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _public_permissions(root: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; give the output the usual umask modes."""
    umask = _umask()
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def cache_dir() -> Path | None:
    """welore's cache (converted GGUF models, tokenised corpora): $WELORE_CACHE, else
    $XDG_CACHE_HOME/welore, else ~/.cache/welore. WELORE_CACHE=off (or 0, or empty): none, nothing written."""
    env = os.environ.get("WELORE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none") else Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "welore"
