"""The autotuner's disk cache: ``$TINYMEG_CACHE_DIR/autotune.json`` (default ``~/.cache/tinymeg``).

One JSON object ``{"version": CACHE_VERSION, "entries": {key: choice}}``, written atomically
(temp file + os.replace) with the permissions of a file created by ``open`` (or the file's own,
when it exists: a shared cache directory stays readable). A corrupt file is ignored with a
warning and rewritten; a file of another version is ignored (its choices were made by another
rule) and rewritten at the next choice.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from pathlib import Path

# 2: keys of path choices; interleaved, budgeted timing. 3: a pick must beat the default beyond
# the noise (autotune_timing.pick), and data-dependent dims left out of keys: a choice made by
# an earlier rule may be one that loses to the default, so it is not read.
CACHE_VERSION = 3


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The disk cache: ``cache_dir``, else ``$TINYMEG_CACHE_DIR``, else the user cache dir."""
    root = cache_dir or os.environ.get("TINYMEG_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinymeg"
    return Path(root) / "autotune.json"


def read(path: Path) -> dict[str, str]:
    """The cached choices ({} if there is no file, or one of another version)."""
    try:
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and isinstance(data.get("entries"), dict)):
            raise ValueError("not a tinymeg autotune cache")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        warnings.warn(f"ignoring the corrupt autotune cache {path} ({e}); it will be rewritten",
                      RuntimeWarning, stacklevel=3)
        return {}
    if data.get("version") != CACHE_VERSION:
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, str)}


def write(path: Path, key: str, choice: str) -> None:
    """Merge key into the file and replace it atomically: a reader never sees half a file, and
    concurrent writers lose at most each other's newest entries, never the file. A cache that
    cannot be written is warned about, never an error (a read-only home must not stop training)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a corrupt file was reported when it was read
            entries = read(path)
        entries[key] = choice
        tmp = path.parent / f".autotune.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        # os.open applies the umask to 0o666 as open() does (tempfile.mkstemp would make it
        # 0o600, and os.replace would then hide a shared cache from every other user).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            with contextlib.suppress(FileNotFoundError):  # keep the mode someone gave the file
                os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"could not write the autotune cache {path}: {e}", RuntimeWarning, stacklevel=3)
