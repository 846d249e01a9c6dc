"""Writing files: whole or not at all, with the permissions any new file of the user gets.

Every file vqhit writes for later use (exported models, checkpoints, token shards, reference statistics) goes
through `atomic_write`: it is written under a temporary name and renamed, so a kill never leaves half a file. Its
mode is then what the user's umask gives a new file (0644 under umask 022, 0640 under 027), whatever the writer
did: safetensors creates its files private (0600), which would hide a model from the colleagues the user's umask
shares files with. `give_default_mode` does the same for files written by others (Accelerate's checkpoint files).
"""
from __future__ import annotations

import os
from pathlib import Path


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


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), give the file the umask's mode, then rename tmp_path to path (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    give_default_mode(tmp)
    os.replace(tmp, path)
