"""Files that appear whole or not at all, written safely in folders that other people can also write.

Every file the package writes goes through `atomic_write` (or a folder through `staged_folder`): the content is
written to a temporary name that `tempfile` makes fresh (O_CREAT | O_EXCL: an existing name, a planted symlink
included, is never opened), in the target's own folder, then renamed over the target with `os.replace`. A kill
at any moment leaves the old file or the new one, never half of one, and never a fixed temporary name that a
later run would trip over or that someone could plant a link at.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from Utils.errors import UsageError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: mkstemp makes 0600 files, the finished file gets the usual mode


def atomic_write(path: Path, write: Callable[[Path], object], then: Optional[str] = None) -> None:
    """Write `path` through a fresh temporary file in the same folder and rename it into place.

    `write(tmp_path)` writes the content (the file exists, empty, when it is called); `then` ends the
    one-sentence error (default: resume the run the file belongs to).
    """
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UsageError(f"cannot write {path} ({e.strerror or e}); free some space or make the folder writable, "
                         f"then {then or f'resume with --resume {path.parent}'}.") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, then: Optional[str] = None) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), then)


def atomic_write_bytes(path: Path, data: bytes, then: Optional[str] = None) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), then)


def atomic_torch_save(obj: object, path: Path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def staged_folder(target: Path, then: str) -> Iterator[Path]:
    """A fresh folder beside `target` to write into; renamed to `target` when the block ends without an error.

    So a folder of several files (a dataset, `prepare.py`'s outputs) appears whole or not at all: after a kill
    `target` does not exist and the same command runs again (a left-over `.NAME.partial-*` folder is hidden and
    holds nothing anyone reads). `target` must not exist, or be an empty folder (which the rename replaces).
    `then` ends the one-sentence error when the folder cannot be written.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as e:
        raise UsageError(f"cannot create {target} ({e.strerror or e}); make {target.parent} writable, then "
                         f"{then}.") from None
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_UMASK)
        os.replace(staging, target)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UsageError(f"cannot write {target} ({e.strerror or e}); free some space or make the folder "
                         f"writable, then {then}.") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
