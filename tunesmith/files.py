"""Atomic file and folder writes: nothing half-written is ever left under the final name; written files get the
mode any other file of the user gets (the umask); no command writes over its own input."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tunesmith.errors import TunesmithError

# the process's umask, read once at import (os.umask can only be read by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def check_outputs(inputs: dict[str, str | os.PathLike | None], outputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, before anything is written, a command whose output is one of its inputs (or lies inside an input
    folder) or whose two outputs are the same path. Keys name the arguments in the message."""
    def resolved(items):
        return [(name, Path(p).expanduser().resolve()) for name, p in items.items() if p not in (None, "")]

    ins, outs = resolved(inputs), resolved(outputs)
    for i, (a_name, a) in enumerate(outs):
        for b_name, b in outs[i + 1:]:
            if a == b:
                raise TunesmithError(f"{a_name} and {b_name} are the same path ({a}): one would overwrite the other",
                                     "give each output its own name")
        for in_name, src in ins:
            if a == src or (src.is_dir() and src in a.parents):
                raise TunesmithError(f"{a_name} ({a}) would overwrite the input {in_name} ({src})",
                                     "write the output somewhere else")


def make_parent(path: Path) -> None:
    """Create ``path``'s folder, or say in one line what is in the way."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), path.parent)
        raise TunesmithError(f"cannot write {path}: {blocker} is a file, not a folder",
                             "choose another output path, or move that file away") from None
    except PermissionError:
        raise TunesmithError(f"cannot write {path}: no permission to create {path.parent}",
                             "choose a folder you can write to") from None


def _disk_full_error(path: Path, exc: OSError) -> TunesmithError:
    return TunesmithError(
        f"no space left on the device while writing {path}",
        "free some disk space (earlier files are intact) and run the command again",
    )


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto `final`, on failure delete it.

    Write the file (or fill the folder, with is_dir=True) at the yielded path. An existing `final`
    is replaced only once the new content is complete.
    """
    final = Path(final)
    make_parent(final)
    prefix = f".{final.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's private 0700 is for the temporary name only
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would have made it
    try:
        yield tmp
        if is_dir:
            if final.exists():
                # swap: move the old folder aside first so the final name is never missing content
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                old.rmdir()
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        if exc.errno == errno.ENOSPC:
            raise _disk_full_error(final, exc) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
