"""Writing files: whole or not at all, durably, with the permissions any new file of the user gets.

Every file vqhit writes for later use (exported models, checkpoints, token shards, reference statistics) goes
through `atomic_write`, and every folder written whole (a checkpoint) through `replace_folder`: it is written under
a temporary name and renamed, so a kill never leaves half a file. The file is flushed to disk (fsync) before the
rename and its folder after it, so the new file also survives a crash of the machine or a power loss, where a
renamed but unflushed file can come back empty. Its mode is then what the user's umask gives a new file (0644 under
umask 022, 0640 under 027), whatever the writer did: safetensors creates its files private (0600), which would hide
a model from the colleagues the user's umask shares files with. `give_default_mode` does the same for files written
by others (Accelerate's checkpoint files).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UsageError


def default_file_mode() -> int:
    """The mode a newly created file gets under the process's umask (0o666 minus the umask's bits)."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def give_default_mode(*paths: Path) -> None:
    """Give files (and every file under folders) the mode a new file gets under the umask."""
    mode = default_file_mode()
    for path in paths:
        path = Path(path)
        for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
            os.chmod(file, mode)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (the renames inside it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (and `folder` itself) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), give the file the umask's mode, flush it, rename tmp_path to path (atomic on POSIX),
    then flush the folder so the rename itself is on disk."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    give_default_mode(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a completely written folder `tmp` to `final` by rename (atomic on one file system), durably.

    `tmp`'s contents are flushed to disk first and the parent folder after the rename: once this returns, `final`
    survives a crash of the machine. If `final` exists it is first renamed aside and deleted only after the new
    folder is in place, so a kill at any instant leaves one complete copy under some name.
    """
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.replaced")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)


def check_output_folder(folder, files=(), *, overwrite: bool = False, option: str = "--output-dir") -> Path:
    """Refuse, before any work, an output folder that cannot be written or would lose the user's files: one that is
    a file (or lies under one), or, unless `overwrite`, one that already holds any of `files` (names relative to
    it). `option` is the setting the user named the folder with; the error names it and the fix."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == folder else f"lies under {path}, which is a file"
                raise UsageError(f"{option} {folder} {where}, not a folder; give a folder (new or existing)")
            break
    existing = [name for name in files if (folder / name).exists()] if not overwrite else []
    if existing:
        raise UsageError(f"{option} {folder} already holds {len(existing)} of the {len(files)} files this would "
                         f"write (e.g. {existing[0]}); write into a new folder, or pass --overwrite (overwrite=True) "
                         f"to replace them")
    return folder
