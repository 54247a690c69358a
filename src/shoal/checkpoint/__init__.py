"""shoal.checkpoint — reading and writing model weights on disk.

The lowest part of shoal; it knows nothing of merging or search.

* :func:`open_checkpoint` → :class:`CheckpointReader`: lazy, memory-mapped access to
  the tensors of a Hugging Face directory (single or sharded safetensors,
  ``pytorch_model.bin``), a ``.safetensors`` file or a weights-only ``.pt`` file.
  Shapes and dtypes come from headers; data is read one tensor at a time;
  :func:`tensor_shapes` gives a checkpoint's shapes alone, :func:`first_mismatch` where two
  such tables first differ.
* :class:`ShardedWriter`: streams tensors into (sharded) safetensors in a temporary
  sibling directory and renames it into place only when everything is written.
* :func:`copy_model_files`: config (with updates), generation config, tokenizer;
  :func:`copy_config_files` and :func:`copy_tokenizer_files` for one of the two.
* :func:`layer_index`, :func:`rename_layer`, :func:`num_layers`,
  :func:`with_num_layers`: tensor name ↔ transformer block, block count in a config.
* :func:`parse_size`, :func:`check_finite`: small helpers.

Every failure a user can cause is a :class:`~shoal.errors.CheckpointError` whose
message names the file and, where one is at fault, the tensor.
"""

from __future__ import annotations

from shoal.checkpoint.files import (
    copy_config_files,
    copy_model_files,
    copy_tokenizer_files,
    tokenizer_files,
)
from shoal.checkpoint.finite import check_finite
from shoal.checkpoint.layers import layer_index, num_layers, rename_layer, with_num_layers
from shoal.checkpoint.reader import (
    CheckpointReader,
    first_mismatch,
    open_checkpoint,
    tensor_shapes,
)
from shoal.checkpoint.sizes import parse_size
from shoal.checkpoint.st_format import TensorInfo, read_header
from shoal.checkpoint.writer import ShardedWriter, shard_name

__all__ = [
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "check_finite",
    "copy_config_files",
    "copy_model_files",
    "copy_tokenizer_files",
    "first_mismatch",
    "layer_index",
    "num_layers",
    "open_checkpoint",
    "parse_size",
    "read_header",
    "rename_layer",
    "shard_name",
    "tensor_shapes",
    "tokenizer_files",
    "with_num_layers",
]
