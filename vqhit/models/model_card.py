"""The model card of a saved model (its README.md): the card save_pretrained writes, and the evaluation figures that
scripts/eval_rfid.py adds, tied to the weights they were measured on by a hash of those weights' content."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open

from ..files import atomic_write

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"  # a saved model's files
PAPER_URL = "https://arxiv.org/abs/2106.07631"
LIBRARY = "vqhit"
TAGS = ["vqhit", "image-generation"]
TRAINING_STEP_KEY = "training_step"  # in model.safetensors' metadata, when a training run exported the weights

DEFAULT_CARD = """---
{{ card_data }}
---

# {{ model_type }}{% if preset %} ({{ preset }}){% endif %}

A vqhit model ([HiT, Zhao et al. 2021](""" + PAPER_URL + """)), saved with `save_pretrained`.

```python
from vqhit import {{ class_name }}
model = {{ class_name }}.from_pretrained("<this folder or Hub repository>")
```
"""
# The figures of one set of weights, between markers that record which: save_pretrained removes the section when
# the weights it writes are others (a resumed run's new export), and keeps the rest of the card.
EVALUATION_SECTION = """
<!-- vqhit-evaluation weights-sha256: {{ sha256 }} -->
## Evaluation

Measured on the weights `model.safetensors` with sha256 `{{ sha256[:16] }}`{% if step is not none %} (after
{{ step }} training steps){% endif %}, on the data and with the protocol below. A later save of other weights into
this folder removes these figures.

{{ metrics }}

## Measured with

{{ settings }}
<!-- end vqhit-evaluation -->
"""
EVALUATION_PATTERN = re.compile(r"\n*<!-- vqhit-evaluation weights-sha256: (\w+) -->.*?<!-- end vqhit-evaluation -->\n?",
                         re.DOTALL)


def weights_sha256(folder: str | os.PathLike) -> str:
    """sha256 of the content of a saved model's model.safetensors, which names the weights a model card's figures
    belong to: its header with the keys in sorted order, then the tensors' bytes. The file's own bytes would not do:
    safetensors writes its metadata map in an arbitrary order, so the same weights saved twice can differ."""
    path = Path(folder) / WEIGHTS_NAME
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        digest.update(json.dumps(json.loads(f.read(length)), sort_keys=True).encode())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_step(folder: str | os.PathLike) -> int | None:
    """The training step a saved model's weights come from (None when no training run exported them)."""
    with safe_open(str(Path(folder) / WEIGHTS_NAME), framework="pt") as f:
        step = (f.metadata() or {}).get(TRAINING_STEP_KEY)
    return int(step) if step is not None and step.isdigit() else None


def weights_signature(folder: str | os.PathLike) -> tuple[int, int, int]:
    """What changes when model.safetensors is replaced or rewritten (its inode, size and modification time), to
    check without hashing again that the weights an evaluation hashed are still there when it ends."""
    stat = (Path(folder) / WEIGHTS_NAME).stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def write_model_card(folder: str | os.PathLike, metrics: dict, settings: dict, sha256: str | None = None) -> Path:
    """Write the evaluation figures (e.g. {"rFID": 6.37, "PSNR": ...}) and the settings they were measured with
    (e.g. {"data": ..., "images": 50000}) into `folder/README.md`, naming the weights they belong to: the sha256 of
    the folder's model.safetensors and, for a training run's export, its step (the caller checks that the file is
    still the one it evaluated, and may pass the hash it took). The figures are one section between HTML comment markers: an existing card (the
    user's text, or one save_pretrained wrote) is kept and that section replaced in place, or appended; a folder
    with no card gets a Hub model card holding it. Atomic."""
    folder = Path(folder)
    card_path = folder / CARD_NAME

    def table(rows: dict) -> str:
        lines = ["| | |", "|---|---|"]
        for key, value in rows.items():
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        return "\n".join(lines)

    figures = dict(metrics=table(metrics), settings=table(settings), sha256=sha256 or weights_sha256(folder),
                   step=training_step(folder))
    if card_path.is_file():
        import jinja2  # huggingface_hub renders its model cards with it too

        text = card_path.read_text()
        section = "\n\n" + jinja2.Template(EVALUATION_SECTION).render(**figures).strip("\n") + "\n"
        found = EVALUATION_PATTERN.search(text)
        if found:  # replaced where it stands: the text around it is the user's
            text = text[:found.start()] + section + text[found.end():]
        else:
            text = text.rstrip("\n") + section
        atomic_write(card_path, lambda p: p.write_text(text))
        return card_path

    try:  # the card names the model when the folder's config says what it is; it is written either way
        meta = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    model_type = meta.get("model_type", "model")
    data = ModelCardData(library_name=LIBRARY, tags=sorted({*TAGS, "model_hub_mixin", "pytorch_model_hub_mixin"}))
    card = ModelCard.from_template(data, template_str=DEFAULT_CARD + EVALUATION_SECTION, model_type=model_type,
                                   preset=meta.get("preset"),
                                   class_name={"hit-generator": "HiTGenerator"}.get(model_type, "VQHiT"), **figures)
    atomic_write(card_path, lambda p: card.save(p))
    return card_path
