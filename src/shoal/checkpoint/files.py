"""Copy the non-weight files of a Hugging Face model: config and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.errors import CheckpointError

if TYPE_CHECKING:
    from shoal.checkpoint.writer import ShardedWriter

# exact names, then glob patterns (tokenizer models, vocabularies, chat templates)
MODEL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
)
MODEL_FILE_GLOBS = ("vocab.*", "*.model", "chat_template*")


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in a model's ``config.json``.

    Raises:
        CheckpointError: the file cannot be read, is not valid JSON, or holds no object.
    """
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return loaded


def copy_model_files(
    src_dir: str | Path, writer: ShardedWriter, *, config_updates: dict[str, Any] | None = None
) -> list[str]:
    """Copy config, generation config and tokenizer files of a model into a writer.

    Args:
        src_dir: the source model directory (a file path means its directory holds
            no extra files: nothing is copied).
        writer: an open :class:`~shoal.checkpoint.writer.ShardedWriter`.
        config_updates: keys merged (shallowly) into ``config.json`` before writing.

    Returns:
        The relative paths written, in order.

    Raises:
        CheckpointError: ``config.json`` is not a valid JSON object, or a copy fails.
    """
    src = Path(src_dir)
    if not src.is_dir():
        return []
    written: list[str] = []
    cfg = src / "config.json"
    if cfg.is_file():
        config = read_config(cfg)
        config.update(config_updates or {})
        writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
        written.append("config.json")
    names = [n for n in MODEL_FILES if (src / n).is_file()]
    for pattern in MODEL_FILE_GLOBS:
        names += sorted(p.name for p in src.glob(pattern) if p.is_file() and p.name not in names)
    for name in names:
        writer.copy_file(src / name, name)
        written.append(name)
    return written
