"""The output vocabulary of a merge, and embedding / head rows realigned to it.

When a recipe names a tokenizer source (``tokenizer_source`` or ``tokenizer.source``),
the output vocabulary is that model's tokenizer, or for ``union`` the base model's
(the first model's without a base) plus every token another model has, plus the
``tokenizer.tokens`` it lacks, added as in mergekit; and every *vocabulary tensor*
(input embeddings, output head: :data:`VOCAB_TENSOR`) of every model is rebuilt row
by row in the output's token order before the merge method sees it. The rules are
mergekit 0.1.5's (``PermutedVocabulary``):

- a model that has the token gives its own row (unless the token's entry says ``force``);
- otherwise the row is, for a token with an entry in ``tokenizer.tokens``, that entry's
  source (zeros, a model's row of the same token, or a model's row of a named token);
  else, by how many of the tensor's models have the token: one → that model's row;
  none → zeros; several → the base model's row when the base has it, else the mean of
  the rows of the models that have it;
- rows past the vocabulary (``pad_to_multiple_of``) are the mean of the model's
  realigned rows.

The merge then runs unchanged on the realigned tensors: weights are not renormalised
and no model is left out of a row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shoal.errors import MergeError, RecipeError
from shoal.recipe import Recipe

#: tensors indexed by token id along their first axis (embeddings, output heads)
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings)"
    r"\.(weight|bias)$"
)


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name`` is indexed by token id along its first axis."""
    return bool(VOCAB_TENSOR.search(name))


@dataclass(frozen=True)
class TokenRule:
    """Where the rows of one output token come from (a ``tokenizer.tokens`` entry).

    Attributes:
        kind: ``zero``, ``model`` (that model's row of the same token) or
            ``model_token`` (that model's row ``row``, its own numbering).
        model: the model reference (``model`` / ``model_token``).
        row: ``model_token``: the row in the model's own tensor.
        force: use the rule even for models that have the token.
    """

    kind: str
    model: str | None = None
    row: int | None = None
    force: bool = False


@dataclass
class OutputVocabulary:
    """The output tokenizer and, per model, where each output token's row lies.

    Attributes:
        tokenizer: the output tokenizer (transformers).
        size: tokens in the output vocabulary.
        rows: rows of every vocabulary tensor (``size`` padded to ``pad_to_multiple_of``).
        index: model reference → ``(size,)`` long tensor: the model's row of each output
            token, ``-1`` where the model lacks it.
        rules: output token id → its ``tokenizer.tokens`` rule (entries with a source).
        base: the recipe's base model.
        added: tokens added to the source tokenizer (the ``union``'s new tokens, then
            the ``tokenizer.tokens`` it lacks).
        source_dir: the directory the output tokenizer was read from.
        stripped: the source's tokens past its model's ``vocab_size`` were removed.
    """

    tokenizer: Any
    size: int
    rows: int
    index: dict[str, torch.Tensor]
    rules: dict[int, TokenRule] = field(default_factory=dict)
    base: str | None = None
    added: list[str] = field(default_factory=list)
    source_dir: Path | None = None
    stripped: bool = False

    @property
    def rewritten(self) -> bool:
        """Whether the output tokenizer differs from the source's files (write it anew)."""
        return bool(self.added) or self.stripped

    def realign(self, name: str, members: Sequence[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each model's tensor ``name`` rebuilt with one row per output token.

        Args:
            name: the tensor's name (for messages).
            members: ``(model reference, tensor)`` of every input, base included, all
                in one dtype (the compute dtype).

        Returns:
            The realigned tensors, ``(rows, *rest)`` each, in ``members`` order.
        """
        refs = [ref for ref, _ in members]
        tensors = [t for _, t in members]
        rest = tuple(tensors[0].shape[1:])
        for ref, t in members:
            if t.ndim == 0 or tuple(t.shape[1:]) != rest:
                raise MergeError(
                    f"tensor {name!r}: shape {list(t.shape)} in model {ref} differs from "
                    f"{list(tensors[0].shape)} in model {refs[0]} beyond the vocabulary axis"
                )
        dtype, device = tensors[0].dtype, tensors[0].device
        index = []
        for ref, t in members:
            idx = self.index[ref].to(device)
            index.append(torch.where(idx < t.shape[0], idx, torch.full_like(idx, -1)))
        present = torch.stack([i >= 0 for i in index])  # (models, size)
        forced = torch.zeros(self.size, dtype=torch.bool, device=device)
        ruled = torch.zeros(self.size, dtype=torch.bool, device=device)
        for tid, rule in self.rules.items():
            ruled[tid] = True
            forced[tid] = rule.force
        need = forced | ~present.all(0)  # tokens some model takes from elsewhere
        need_ids = need.nonzero().squeeze(1)
        sub_index = [i[need_ids] for i in index]
        default = torch.zeros((len(need_ids), *rest), dtype=dtype, device=device)
        self._automatic(default, ~ruled[need_ids], refs, tensors, sub_index, present[:, need_ids])
        slot = {int(tid): k for k, tid in enumerate(need_ids.tolist())}
        for tid, rule in self.rules.items():
            if tid in slot:
                default[slot[tid]] = self._ruled_row(name, tid, rule, refs, tensors, index)
        out = []
        for t, idx, has in zip(tensors, index, present, strict=True):
            new = torch.zeros((self.rows, *rest), dtype=dtype, device=device)
            keep = has & ~forced
            new[: self.size][keep] = t[idx[keep]]
            fill = ~keep[need_ids]  # every token a model does not keep is a needed one
            new[need_ids[fill]] = default[fill]
            if self.rows > self.size:  # padding rows: the mean of the real ones, as mergekit
                new[self.size :] = torch.mean(new[: self.size], dim=0)
            out.append(new)
        return out

    def _automatic(
        self,
        default: torch.Tensor,
        todo: torch.Tensor,
        refs: list[str],
        tensors: list[torch.Tensor],
        index: list[torch.Tensor],
        present: torch.Tensor,
    ) -> None:
        """Rows of tokens some models lack and no rule covers (mergekit's defaults).

        ``default``, ``todo``, ``index`` and ``present`` cover the needed tokens only."""
        count = present.sum(0)
        one = todo & (count == 1)
        many = todo & (count > 1)
        from_base = torch.zeros_like(many)
        if self.base in refs:
            from_base = many & present[refs.index(self.base)]
        average = many & ~from_base
        total = torch.zeros_like(default[average])
        for i, (t, idx, has) in enumerate(zip(tensors, index, present, strict=True)):
            donor = one & has  # the only model that has the token
            default[donor] = t[idx[donor]]
            if self.base is not None and refs[i] == self.base:
                default[from_base] = t[idx[from_base]]
            take = has[average]
            rows = idx[average]
            total[take] = total[take] + t[rows[take]]
        if bool(average.any()):
            shape = (-1,) + (1,) * (default.ndim - 1)
            default[average] = total / count[average].view(shape).to(default.dtype)
        # count == 0: zeros, as allocated

    def _ruled_row(
        self,
        name: str,
        tid: int,
        rule: TokenRule,
        refs: list[str],
        tensors: list[torch.Tensor],
        index: list[torch.Tensor],
    ) -> torch.Tensor:
        if rule.kind == "zero":
            return torch.zeros_like(tensors[0][0])
        token = self.tokenizer.convert_ids_to_tokens(tid)
        if rule.model not in refs:
            raise MergeError(
                f"tokenizer.tokens.{token}: model {rule.model} is not an input of tensor {name!r}"
            )
        i = refs.index(rule.model)
        if rule.kind == "model_token":
            assert rule.row is not None
            if rule.row >= tensors[i].shape[0]:
                raise MergeError(
                    f"tokenizer.tokens.{token}: row {rule.row} is past the "
                    f"{tensors[i].shape[0]} rows of {name!r} in model {rule.model}"
                )
            return tensors[i][rule.row]
        row = int(index[i][tid])
        if row < 0:
            raise MergeError(
                f"tokenizer.tokens.{token}: token {token!r} is not in the vocabulary of "
                f"model {rule.model}"
            )
        return tensors[i][row]


def _load_tokenizer(directory: Path, key: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as exc:  # any failure of transformers to read the files
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise RecipeError(f"{key}: cannot load the tokenizer in {directory}: {text}") from None


def _vocab_size(config: Mapping[str, Any] | None) -> int | None:
    if not config:
        return None
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), Mapping):
        value = config["text_config"].get("vocab_size")
    return int(value) if isinstance(value, int) else None


def build_vocabulary(
    recipe: Recipe,
    model_dirs: Mapping[str, Path | None],
    configs: Mapping[str, Mapping[str, Any] | None],
    has_tokenizer: Mapping[str, bool],
) -> OutputVocabulary | None:
    """The output vocabulary a recipe asks for, ``None`` when it names no tokenizer source.

    Args:
        recipe: a validated recipe.
        model_dirs: model reference → its directory (``None`` when not a directory).
        configs: model reference → its ``config.json`` content.
        has_tokenizer: model reference → whether its directory holds tokenizer files.

    A model without tokenizer files is taken to share the base model's vocabulary (the
    first model's without a base), as mergekit does. For ``base`` and ``union`` the base
    tokenizer loses its tokens past its model's ``vocab_size`` (:func:`_strip_past`).

    Raises:
        RecipeError: a tokenizer cannot be loaded or stripped; a ``model_token`` source
            names a token its model lacks.
    """
    source = recipe.vocabulary_source()
    if source is None:
        return None
    key = "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"
    refs = recipe.model_refs()
    base = recipe.base_model
    lead = base or refs[0]
    source_ref = lead if source in ("base", "union") else source

    def load(ref: str, what: str) -> Any:
        directory = model_dirs.get(ref)
        if directory is None or not has_tokenizer.get(ref):
            where = directory or ref
            raise RecipeError(f"{what}: {ref!r} ({where}) holds no tokenizer files")
        return _load_tokenizer(directory, what)

    out_tok = load(source_ref, key)
    vocabs: dict[str, dict[str, int]] = {}
    tokenizers: dict[str, Any] = {}
    for ref in refs:
        if model_dirs.get(ref) is not None and has_tokenizer.get(ref):
            tok = out_tok if ref == source_ref else load(ref, f"{key} (model {ref})")
            tokenizers[ref] = tok
            vocabs[ref] = dict(tok.get_vocab())
    fallback = vocabs.get(lead) or dict(out_tok.get_vocab())
    for ref in refs:
        vocabs.setdefault(ref, fallback)
    stripped = False
    if source in ("base", "union"):
        limit = _vocab_size(configs.get(source_ref))
        beyond = [t for t, i in vocabs[source_ref].items() if limit is not None and i >= limit]
        if beyond and limit is not None:  # tokens the base model has no rows for
            directory = model_dirs[source_ref]
            assert directory is not None
            out_tok = _strip_past(directory, limit, key)
            stripped = True
            vocabs[source_ref] = dict(out_tok.get_vocab())
            if source_ref in tokenizers:
                tokenizers[source_ref] = out_tok
    added = []
    if source == "union":
        added = _add_union(out_tok, [(tokenizers[r], configs.get(r)) for r in tokenizers])
    block = recipe.tokenizer
    entries = (block.tokens or {}) if block is not None else {}
    existing = set(out_tok.get_vocab())
    for token in entries:
        if token not in existing:
            out_tok.add_tokens(token)
            existing.add(token)
            added.append(token)
    vocab = out_tok.get_vocab()
    size = len(vocab)
    if sorted(vocab.values()) != list(range(size)):
        raise RecipeError(f"{key}: the tokenizer of {source_ref} does not number its tokens 0..n-1")
    rows = size
    pad = block.pad_to_multiple_of if block is not None else None
    if pad and rows % pad:
        rows += pad - rows % pad
    index: dict[str, torch.Tensor] = {}
    for ref in refs:
        own = vocabs[ref]
        limit = _vocab_size(configs.get(ref))
        idx = torch.full((size,), -1, dtype=torch.long)
        for token, new in vocab.items():
            old = own.get(token, -1)
            if old >= 0 and (limit is None or old < limit):
                idx[new] = old
        index[ref] = idx
    rules: dict[int, TokenRule] = {}
    for token, entry in entries.items():
        rule = _rule(f"tokenizer.tokens.{token}", entry.source, entry.force, refs, vocabs)
        if rule is not None:
            rules[vocab[token]] = rule
    return OutputVocabulary(
        out_tok, size, rows, index, rules, base, added, model_dirs.get(source_ref), stripped
    )


def _strip_past(directory: Path, limit: int, key: str) -> Any:
    """The tokenizer of ``directory`` without its tokens numbered ``limit`` or more.

    mergekit's rule for the base tokenizer of ``base`` and ``union``: tokens past the
    model's ``vocab_size`` have no embedding row, so they leave the vocabulary (with the
    BPE merges that make them). Done on a copy of the files through transformers' own
    formats: ``tokenizer.json`` (vocabulary, added tokens, merges) and the
    ``added_tokens_decoder`` of ``tokenizer_config.json``, which transformers would
    otherwise add back on loading.

    Raises:
        RecipeError: no ``tokenizer.json`` (a slow tokenizer), or a model type other than
            BPE or word level.
    """
    import json
    import shutil
    import tempfile

    from shoal.checkpoint import tokenizer_files

    if not (directory / "tokenizer.json").is_file():
        raise RecipeError(
            f"{key}: {directory} has tokens past its vocab_size and no tokenizer.json to strip "
            "them from (name the base model's path instead)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for rel in tokenizer_files(directory):
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / rel, Path(tmp) / rel)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
        model = spec["model"]
        if model.get("type") not in ("BPE", "WordLevel"):
            raise RecipeError(
                f"{key}: {directory}: a {model.get('type')} tokenizer with tokens past its "
                "vocab_size cannot be stripped (BPE and word-level can)"
            )
        gone = {t for t, i in model["vocab"].items() if i >= limit}
        gone |= {e["content"] for e in spec.get("added_tokens", []) if e["id"] >= limit}
        model["vocab"] = {t: i for t, i in model["vocab"].items() if i < limit}
        spec["added_tokens"] = [e for e in spec.get("added_tokens", []) if e["id"] < limit]
        if "merges" in model:  # "a b" strings or [a, b] pairs
            pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
            model["merges"] = [
                m for m, pair in zip(model["merges"], pairs, strict=True) if not set(pair) & gone
            ]
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        config_file = Path(tmp) / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            decoder = config.get("added_tokens_decoder") or {}
            config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < limit}
            config_file.write_text(json.dumps(config, ensure_ascii=False))
        return _load_tokenizer(Path(tmp), key)


def _add_union(out_tok: Any, members: Sequence[tuple[Any, Mapping[str, Any] | None]]) -> list[str]:
    """Add to ``out_tok`` (the lead model's tokenizer) every token of ``members`` it lacks.

    mergekit's ``union``: a model's tokens count up to its ``vocab_size`` (rows it has);
    plain tokens are added first, then the added (special) tokens with the settings of
    the first model that has them. mergekit walks each vocabulary in hash order, so its
    new tokens' ids change from run to run; shoal walks each model's ids in order and the
    members in recipe order, so the same recipe always numbers the tokens alike.

    Returns:
        The tokens added, in id order.
    """
    have = set(out_tok.get_vocab())
    plain: dict[str, None] = {}
    special: dict[str, Any] = {}
    for tok, config in members:
        limit = _vocab_size(config) or tok.vocab_size
        decoder = tok.added_tokens_decoder  # id -> AddedToken
        contents = {info.content for info in decoder.values()}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if idx < limit and token not in contents and token not in have:
                plain.setdefault(token)
        for idx, info in sorted(decoder.items()):
            if idx < limit and info.content not in have:
                special.setdefault(info.content, info)
    before = len(out_tok)
    out_tok.add_tokens([t for t in plain if t not in special])
    out_tok.add_tokens(list(special.values()))
    vocab = out_tok.get_vocab()
    return sorted((t for t, i in vocab.items() if i >= before), key=vocab.__getitem__)


def _rule(
    where: str, source: Any, force: bool, refs: list[str], vocabs: Mapping[str, dict[str, int]]
) -> TokenRule | None:
    if source is None:
        return None  # the automatic rule (the recipe check refused force without source)
    if isinstance(source, str):
        if source == "zero" and source not in refs:
            return TokenRule("zero", force=force)
        return TokenRule("model", model=source, force=force)
    if source.get("kind") == "zero":
        return TokenRule("zero", force=force)
    model = str(source["model"])
    row = source.get("token_id")
    if row is None:
        token = source["token"]
        row = vocabs[model].get(token)
        if row is None:
            raise RecipeError(
                f"{where}.source.token: {token!r} is not in the vocabulary of model {model}"
            )
    return TokenRule("model_token", model=model, row=int(row), force=force)


def recipe_vocabulary(recipe: Recipe, sources: Mapping[str, Any]) -> OutputVocabulary | None:
    """:func:`build_vocabulary` for the opened sources of a recipe (their directories
    and configs); ``None`` when the recipe names no tokenizer source."""
    if recipe.vocabulary_source() is None:
        return None
    from shoal.checkpoint import tokenizer_files
    from shoal.merge.sources import resolve_model_path

    dirs: dict[str, Path | None] = {}
    for ref in recipe.model_refs():
        path = getattr(sources.get(ref), "path", None)
        if not isinstance(path, Path):
            try:
                path = resolve_model_path(ref, recipe)
            except Exception:  # a state dict given in memory: no directory
                path = None
        dirs[ref] = path if path is not None and path.is_dir() else None
    configs = {ref: getattr(sources.get(ref), "config", None) for ref in dirs}
    has = {ref: bool(d is not None and tokenizer_files(d)) for ref, d in dirs.items()}
    return build_vocabulary(recipe, dirs, configs, has)
