"""The dataset card of a Parquet token folder (README.md): its metadata tell `datasets` and the Hub where the shards
are and hold the folder's manifest under `vqhit:`; its text says what the tokens are and how to read and decode
them. The folder's format is described in `vqhit.token_files`.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .errors import UsageError

CARD_NAME = "README.md"               # the dataset card of a Parquet folder: its metadata hold the manifest
CARD_KEY = "vqhit"                    # the card metadata's key of the manifest, and the Parquet shards' metadata key
PARQUET_SPLIT = "train"               # the split `datasets.load_dataset` gives a Parquet folder's tokens
PARQUET_DATA = f"data/{PARQUET_SPLIT}-*.parquet"

_FRONT_MATTER = re.compile(r"---\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", re.S)


def token_card(manifest: dict) -> str:
    """The dataset card of a Parquet folder: metadata that tell `datasets` and the Hub where the shards are and
    hold the manifest (under `vqhit:`), then what the tokens are and how to read and decode them."""
    metadata = {"configs": [{"config_name": "default",
                             "data_files": [{"split": PARQUET_SPLIT, "path": PARQUET_DATA}]}],
                "tags": ["vqhit", "image-tokens"], CARD_KEY: manifest}
    data, grid, labels, size = manifest["data"], manifest["grid"], manifest["label_column"], manifest["resolution"]
    columns = ["`indices`: the token grid", "`id`: the source image's file name", "`dataset_index`: its position "
               "in the source dataset"] + ([f"`label`: the source's `{labels}` column"] if labels is not None else [])
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()}
---

# Image tokens of {data['data']}

The images of `{data['data']}` (split `{data['split']}`), {manifest['preprocessing']['transform']} to {size}x{size},
encoded by the VQ-HiT tokenizer `{manifest['model']}` (preset `{manifest['preset']}`): each image is a {grid}x{grid}
grid of indices into its codebook of {manifest['codebook_size']} codes. One row per image: {'; '.join(columns)}.
Unreadable images have no row.

```python
from datasets import load_dataset
tokens = load_dataset("path/or/repo-id", split="{PARQUET_SPLIT}").with_format("torch")
tokens[0]["indices"]   # ({grid}, {grid}) codes
```

The tokens mean images only to the tokenizer that made them, whose encoder and codebook have the fingerprint
`{manifest['tokenizer_fingerprint']}` (sha256). vqhit decodes them with it:

```bash
python scripts/decode.py --model {manifest['model']} --tokens path/to/this/folder --output-dir decoded/
```

The metadata above (`{CARD_KEY}:`) are the manifest: the tokenizer, the preprocessing, the data and how the shards
were cut. Written by vqhit's `scripts/encode.py --format parquet`.
"""


def is_token_card(path: Path) -> bool:
    """Whether `path` is a dataset card whose metadata have a `vqhit:` key (without judging its contents)."""
    if not path.is_file():
        return False
    match = _FRONT_MATTER.match(path.read_text(errors="replace"))
    return bool(match and re.search(rf"^{CARD_KEY}:", match.group(1), re.M))


def card_manifest(path: Path, text: str, rewrite: str):
    """The `vqhit:` entry of a dataset card's metadata (checked by the caller); `rewrite`: how to rewrite the card
    when it is damaged."""
    match = _FRONT_MATTER.match(text)
    try:
        metadata = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is damaged (its metadata are not YAML: {' '.join(str(err).split())}); "
                         f"{rewrite}.") from err
    if not isinstance(metadata, dict) or CARD_KEY not in metadata:
        raise UsageError(_not_a_token_card(path, rewrite))
    return metadata[CARD_KEY]


def _not_a_token_card(path: Path, rewrite: str) -> str:
    return (f"{path} is not a vqhit token card (no `{CARD_KEY}:` manifest in its metadata): if it is your own file, "
            f"encode into another folder; if it was the tokens' card, {rewrite}.")
