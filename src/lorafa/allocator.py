"""glibc malloc settings that give freed activation memory back to the OS when training on CPU.

PyTorch's CPU tensors come from glibc malloc. By default glibc serves a block above the mmap threshold
(128 KiB) with its own mmap and unmaps it on free, but it *raises* that threshold to the size of every such
block freed (up to 32 MiB): after the first step, activation-sized tensors are carved from the heap arenas
instead, and a freed block in the middle of an arena stays in the process. Activations of different sizes are
freed in a different order than allocated, so the arenas fragment and peak RSS can grow by as much as the
activations themselves (issue 7, item 4; measured in the benchmark issue). Fixing the thresholds explicitly
(``MALLOC_MMAP_THRESHOLD_``, which also turns the dynamic adjustment off, and ``MALLOC_TRIM_THRESHOLD_``) keeps
every block of 64 KiB or more on its own mapping, returned to the OS on free; the price is an mmap/munmap and
fresh page faults per large allocation.

glibc reads these variables once, at start-up, so a running process has to re-execute itself to use them:
:func:`reexec_with_malloc_tuning` does that for the CLI on CPU, unless ``LORAFA_NO_MALLOC_TUNING=1`` or the
user has set any ``MALLOC_*`` threshold already.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

__all__ = ["OPT_OUT_ENV", "malloc_settings", "reexec_with_malloc_tuning", "should_tune_malloc"]

OPT_OUT_ENV = "LORAFA_NO_MALLOC_TUNING"


def malloc_settings() -> dict[str, str]:
    """Environment variables that make glibc return blocks of 64 KiB or more to the OS when freed."""
    return {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def should_tune_malloc(device: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a process training on ``device`` should re-execute itself with :func:`malloc_settings`.

    True only on CPU, on Linux with glibc, when ``LORAFA_NO_MALLOC_TUNING`` is not set to a true value and none of
    the settings is present already (the user's own values win, and the re-executed process stops here).
    """
    env = os.environ if environ is None else environ
    if not device.startswith("cpu") or not sys.platform.startswith("linux"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    if env.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return not any(name in env for name in malloc_settings())


def reexec_with_malloc_tuning(device: str, argv: list[str] | None = None) -> None:
    """Replace this process by the same command with :func:`malloc_settings` in its environment, if needed.

    Call it first thing in a CLI command, before any work, e.g. ``reexec_with_malloc_tuning(args.device)``.
    Returns normally (doing nothing) when :func:`should_tune_malloc` is False.

    Args:
        device: The device the command will train on ("cpu", "cuda", "cuda:0", ...).
        argv: Arguments after the interpreter; defaults to how this interpreter was started
            (``sys.orig_argv[1:]``, e.g. the ``lorafa`` script path and its arguments).
    """
    if not should_tune_malloc(device):
        return
    args = sys.orig_argv[1:] if argv is None else argv
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], {**os.environ, **malloc_settings()})
