"""Pretrained weights come from the network when there is one; when there is none, say how to go without."""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from .errors import NotFoundError, UnavailableError


@contextmanager
def explain_download_failure(what: str, offline_option: str):
    """Turn a failed download (urllib's URLError is an OSError) into an error that names the local-file option
    (an UnavailableError: a RuntimeError, and a user's error the scripts print in one line)."""
    try:
        yield
    except OSError as err:
        raise UnavailableError(f"could not download {what} ({err}). On a machine without network, fetch the file "
                               f"elsewhere and pass its path: {offline_option}") from err


# A Hub repository id: `name` or `org/name`, of [A-Za-z0-9._-], at most 96 characters, no `--` or `..`.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9._-]+/)?[A-Za-z0-9._-]+$")


def _could_be_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and len(text) <= 96 and "--" not in text and ".." not in text


def _looks_like_path(text: str) -> bool:
    """What no one types for a Hub id: `/x`, `./x`, `~/x`, `a/b/c`, `x/`, `C:\\x`, backslashes."""
    return (text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith("/") or "\\" in text
            or bool(re.match(r"^[A-Za-z]:", text)))


def local_or_hub(text: str | os.PathLike, what: str, fetch=None):
    """Resolve a command-line "local folder or Hub id" argument without sending a mistyped path to the Hub.

    Returns the Path when it exists. Otherwise, when `text` looks like a path (or is a PathLike) or cannot be a
    Hub id, raises NotFoundError (a FileNotFoundError) "no such folder". Otherwise it is a Hub id: returned as a
    str, or, when `fetch` is given, `fetch(id)` is returned, and its failure becomes an error that names both
    readings.
    """
    path = Path(text).expanduser()
    if path.exists():
        return path
    if isinstance(text, os.PathLike) or _looks_like_path(str(text)) or not _could_be_hub_id(str(text)):
        raise NotFoundError(f"no such folder: {text} (the {what}); check the path")
    text = str(text)
    if fetch is None:
        return text
    try:
        return fetch(text)
    except Exception as err:  # RepositoryNotFoundError, LocalEntryNotFoundError, network errors alike
        raise NotFoundError(f"no local folder {text} and the Hub has no repository {text} / is unreachable: "
                                f"{type(err).__name__}: {err}. Check the path of the {what}, or the repository "
                                f"id and the network") from err
