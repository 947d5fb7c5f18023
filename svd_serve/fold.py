"""``svd-serve fold``: a standalone HF checkpoint equal to base + adapter, in the base's dtype."""

from __future__ import annotations

import shutil
from pathlib import Path

from .adapter import AdapterSet
from .io import atomic_dir, check_out
from .model import load_base

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def fold(base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    check_out(out, [base, adapter], overwrite)
    model = load_base(base, dtype="auto")
    adapters = AdapterSet.load(adapter, model)
    adapters.fold_into(model)
    with atomic_dir(out, [base, adapter], overwrite) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(Path(base), tmp)
    return Path(out)
