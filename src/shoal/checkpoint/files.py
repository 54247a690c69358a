"""Copy the non-weight files of a Hugging Face model: config and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.errors import CheckpointError

if TYPE_CHECKING:
    from shoal.checkpoint.writer import ShardedWriter

# what a model's folder holds besides its weights: its configuration ...
CONFIG_FILES = ("generation_config.json",)
# ... and its tokenizer: exact names, then glob patterns (models, vocabularies, templates)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
)
TOKENIZER_GLOBS = ("vocab.*", "*.model", "chat_template*")


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
    return copy_config_files(src_dir, writer, config_updates=config_updates) + (
        copy_tokenizer_files(src_dir, writer)
    )


def copy_config_files(
    src_dir: str | Path, writer: ShardedWriter, *, config_updates: dict[str, Any] | None = None
) -> list[str]:
    """Copy ``config.json`` (with ``config_updates``) and the generation config of a model.

    Returns:
        The relative paths written, in order (none for a file path).

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
    return written + _copy(src, writer, _present(src, CONFIG_FILES, ()))


def tokenizer_files(src_dir: str | Path) -> list[str]:
    """The tokenizer files of a model folder (vocabularies, merges, chat templates)."""
    src = Path(src_dir)
    return _present(src, TOKENIZER_FILES, TOKENIZER_GLOBS) if src.is_dir() else []


def copy_tokenizer_files(src_dir: str | Path, writer: ShardedWriter) -> list[str]:
    """Copy every tokenizer file of a model.

    Returns:
        The relative paths written, in order; empty when the model has no tokenizer.
    """
    return _copy(Path(src_dir), writer, tokenizer_files(src_dir))


def _present(src: Path, names: tuple[str, ...], patterns: tuple[str, ...]) -> list[str]:
    found = [n for n in names if (src / n).is_file()]
    for pattern in patterns:
        found += sorted(p.name for p in src.glob(pattern) if p.is_file() and p.name not in found)
    return found


def _copy(src: Path, writer: ShardedWriter, names: list[str]) -> list[str]:
    for name in names:
        writer.copy_file(src / name, name)
    return names
