"""Writing files and folders so that a crash leaves the earlier version or nothing, never half of one, and
saved folders readable as the umask allows."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) on a temporary name next to `path` (same suffix, for writers that read it), then rename it
    into place (a failed write leaves an earlier file as it was)."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    tmp.replace(path)


def readable(folder: Path) -> None:
    """Give `folder` and its files the permissions the umask allows (mkdtemp makes 0700 and safetensors writes
    0600, which would keep a saved adapter or model from other users and serving processes)."""
    mask = _umask()
    try:
        folder.chmod(0o777 & ~mask)
        for item in folder.rglob("*"):
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
    except OSError:  # a filesystem without permissions (vfat, some network mounts): nothing to widen
        pass


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_dir(path: Path, write: Callable[[Path], object]) -> None:
    """Write a folder under a temporary name next to `path`, then swap it in, so no half-written folder remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        readable(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
