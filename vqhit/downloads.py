"""Pretrained weights come from the network when there is one; when there is none, say how to go without."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def explain_download_failure(what: str, offline_option: str):
    """Turn a failed download (urllib's URLError is an OSError) into an error that names the local-file option."""
    try:
        yield
    except OSError as err:
        raise RuntimeError(f"could not download {what} ({err}). On a machine without network, fetch the file "
                           f"elsewhere and pass its path: {offline_option}") from err
