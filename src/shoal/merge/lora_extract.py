"""``extract-lora``: a PEFT LoRA adapter holding the difference between two checkpoints.

For a fine-tuned model M and its base B, every ``nn.Linear`` weight whose difference
Δ = W_M − W_B is non-zero is factorised by a truncated SVD, Δ ≈ U_r Σ_r V_rᵀ, and written
as the LoRA pair PEFT applies as ``W_B + lora_B @ lora_A`` (``lora_alpha = r``, so the
scale is 1)::

    lora_A = Σ_r^½ V_rᵀ      (r × in)        lora_B = U_r Σ_r^½   (out × r)

(``distribute_scale=False`` puts all of Σ_r on ``lora_A``: ``lora_A = Σ_r V_rᵀ``,
``lora_B = U_r``). ``r`` is the rank asked for, capped per module at ``min(out, in)``
and at the number of singular values above ``sv_epsilon``; modules with a smaller rank
than the largest are listed in ``rank_pattern`` / ``alpha_pattern``.

What is not an ``nn.Linear`` weight follows mergekit 0.1.5's ``mergekit-extract-lora``:

- token embeddings and the output head are saved whole (PEFT ``modules_to_save``), or
  with ``embed_lora`` factorised like the linears (``lora_embedding_A/B``, on Δᵀ, for an
  ``nn.Embedding``);
- any other module whose tensors differ (norms, GPT-2's ``Conv1D``) is saved whole,
  or left out with ``skip_undecomposable``;
- ``save_modules`` names modules (full name or last component) always saved whole;
  ``include`` / ``exclude`` regular expressions pick the modules to consider.

Where shoal differs: modules whose tensors equal the base's are left out (mergekit
saves every norm and embedding whole, changed or not); and a linear whose *bias*
differs is saved whole, since PEFT's ``lora_bias`` holds for every target of an
adapter at once and forbids merging those without a bias (mergekit writes the bias
difference as ``lora_B.bias`` without enabling ``lora_bias``, so PEFT drops it).

Tensors are read one module at a time and the adapter is streamed into
``adapter_model.safetensors``; ``OUT`` appears only complete. ``lora_report.json``
records, per module, what was written, its rank and the relative reconstruction error
‖Δ − lora_B·lora_A‖_F / ‖Δ‖_F of the factors as written (in the output dtype).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shoal._atomic import (
    atomic_dir,
    hold_lock,
    refuse_output_holding,
    refuse_working_dir,
    remove_stale_temp_siblings,
)
from shoal._devices import resolve_device
from shoal._progress import counting_bar
from shoal.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    check_finite,
    first_mismatch,
    open_checkpoint,
)
from shoal.errors import CheckpointError, MergeError, OutputExistsError, ShoalError, first_line

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "REPORT_FILE",
    "LoraExtraction",
    "ModuleResult",
    "extract_lora",
    "factorize",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "lora_report.json"
_PREFIX = "base_model.model."
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModuleResult:
    """What became of one module of the fine-tuned model.

    Attributes:
        name: the module's name in the model (``model.layers.0.self_attn.q_proj``).
        kind: ``lora`` (factorised), ``lora_embedding`` (factorised embedding),
            ``full`` (saved whole, PEFT ``modules_to_save``) or ``skipped``.
        shape: shape of its weight (of its first tensor when it has no ``weight``).
        rank: the rank written (``lora`` kinds), else ``None``.
        relative_error: ‖Δ − written‖_F / ‖Δ‖_F of the weight, with the written tensors
            as stored (after the cast to the output dtype); ``None`` when skipped.
        reason: why it is saved whole or skipped (empty for ``lora`` kinds).
        layer: what the module is: ``linear``, ``embedding`` (input), ``head`` (output
            embedding), ``other`` (norms…) or ``unknown`` (no module of the model).
        tied_head: the output head that shares this input embedding's weight (the
            checkpoint has no tensor of its own for it), saved whole with it.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None = None
    relative_error: float | None = None
    reason: str = ""
    layer: str = ""
    tied_head: str | None = None


@dataclass
class LoraExtraction:
    """The result of :func:`extract_lora`.

    Attributes:
        out: the adapter folder.
        rank: ``r`` of the adapter config (the largest rank written).
        modules: every changed module (LoRA, whole or skipped), in model order.
        unchanged: how many modules equal the base's and were left out.
        config: the ``adapter_config.json`` written.
    """

    out: Path
    rank: int
    modules: list[ModuleResult]
    unchanged: int
    config: dict[str, Any] = field(default_factory=dict)

    def max_error(self) -> float:
        """The largest relative error of a factorised module (0 when none)."""
        errs = [m.relative_error or 0.0 for m in self.modules if m.kind.startswith("lora")]
        return max(errs, default=0.0)


def factorize(
    delta: torch.Tensor,
    rank: int,
    *,
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` LoRA factors of ``delta`` (out × in): ``delta ≈ b @ a``.

    Computed in float32 by ``torch.linalg.svd``; ``a = Σ^½ Vᵀ``, ``b = U Σ^½`` (or
    ``a = Σ Vᵀ``, ``b = U`` without ``distribute_scale``). The rank is capped at
    ``min(delta.shape)`` and at the count of singular values above ``sv_epsilon``.

    Returns:
        ``(a, b)`` in float32: ``a`` is r × in, ``b`` is out × r (r may be 0).
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(r, int((s > sv_epsilon).sum()))
    s = s[:r]
    if distribute_scale:
        root = s.sqrt()
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    return s[:, None] * vh[:r], u[:, :r].clone()


# -- the model's modules ---------------------------------------------------------------


@dataclass
class _Module:
    name: str
    kind: str  # linear | embedding | head | other | unknown
    params: list[str] = field(default_factory=list)  # checkpoint keys of this module


@dataclass
class _Arch:
    """The modules of the model a config describes."""

    kinds: dict[str, tuple[str, set[str]]]  # module name → (kind, its own parameter names)
    embed: str | None  # the input embedding module (model.embed_tokens)
    head: str | None  # the output embedding module (lm_head)
    tied: bool  # the head shares the input embedding's weight


def _architecture(config: dict[str, Any], where: Path) -> _Arch:
    """Module kinds of an empty (meta-device) model built from ``config`` by transformers."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the llm extra
        raise ShoalError("extract-lora needs transformers (pip install 'shoal[llm]')") from exc
    arch = (config.get("architectures") or [None])[0]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        with torch.device("meta"):
            if cls is not None and hasattr(cls, "_from_config"):
                model = cls._from_config(cfg)
            else:
                model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:
        first = first_line(exc)
        raise CheckpointError(
            f"{where}: transformers cannot build the model its config.json describes "
            f"({arch or config.get('model_type')}: {first})"
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    special = {id(m) for m in (out_emb, in_emb) if isinstance(m, torch.nn.Module)}
    kinds: dict[str, tuple[str, set[str]]] = {}
    head = embed = None
    for name, module in model.named_modules(remove_duplicate=False):
        if out_emb is not None and module is out_emb:
            head = name
        if in_emb is not None and module is in_emb:
            embed = name
        own = {n for n, _ in module.named_parameters(recurse=False)}
        if not own:
            continue
        if isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif id(module) in special:
            kind = "head"  # an output head (a Linear) or another kind of input embedding
        elif type(module) is torch.nn.Linear:
            kind = "linear"
        else:
            kind = "other"
        kinds[name] = (kind, own)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    tied = bool(getattr(text_cfg, "tie_word_embeddings", False)) and None not in (head, embed)
    return _Arch(kinds, embed, head, tied)


def _group(keys: Sequence[str], kinds: dict[str, tuple[str, set[str]]]) -> list[_Module]:
    """The checkpoint's tensors grouped by the module that owns them, in the model's module
    order (tensors of no module last, in file order)."""
    groups: dict[str, _Module] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        known = kinds.get(module)
        if known is not None and param in known[1]:
            groups.setdefault(module, _Module(module, known[0])).params.append(key)
        else:
            groups.setdefault(key, _Module(key, "unknown")).params.append(key)
    order = {name: i for i, name in enumerate(kinds)}
    return sorted(groups.values(), key=lambda g: order.get(g.name, len(order)))


# -- checks before any work ------------------------------------------------------------


def _check_options(
    rank: int, sv_epsilon: float, include: Sequence[str], exclude: Sequence[str]
) -> tuple[list[re.Pattern[str]], list[re.Pattern[str]]]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ShoalError(f"--rank: must be a positive integer, got {rank!r}")
    if not (sv_epsilon >= 0 and math.isfinite(sv_epsilon)):
        raise ShoalError(f"--sv-epsilon: must be a finite number ≥ 0, got {sv_epsilon!r}")

    def compile_all(patterns: Sequence[str], option: str) -> list[re.Pattern[str]]:
        out = []
        for p in patterns:
            try:
                out.append(re.compile(p))
            except re.error as exc:
                raise ShoalError(f"{option}: {p!r} is not a regular expression ({exc})") from None
        return out

    return compile_all(include, "--include"), compile_all(exclude, "--exclude")


def _check_pair(base: CheckpointReader, model: CheckpointReader) -> dict[str, Any]:
    """Refuse a base and model that are not the same architecture; the model's config."""
    for reader in (model, base):
        if reader.config is None:
            raise CheckpointError(
                f"{reader.path}: no config.json (extract-lora needs the architecture)"
            )
    assert model.config is not None and base.config is not None
    for key in ("model_type", "architectures"):
        if model.config.get(key) != base.config.get(key):
            raise MergeError(
                f"{model.path}/config.json: {key} is {model.config.get(key)!r}, but the "
                f"base's ({base.path}/config.json) is {base.config.get(key)!r}"
            )
    found = first_mismatch(
        {k: tuple(model.shape(k)) for k in model}, {k: tuple(base.shape(k)) for k in base}
    )
    if found is None:
        return model.config
    key, how = found
    if how == "missing":
        raise MergeError(f"tensor {key!r}: in {model.path} but not in the base {base.path}")
    if how == "shape":
        raise MergeError(
            f"tensor {key!r}: shape {list(model.shape(key))} in {model.path} but "
            f"{list(base.shape(key))} in the base {base.path}"
        )
    raise MergeError(f"tensor {key!r}: in the base {base.path} but not in {model.path}")


def _check_out(out: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    refuse_working_dir(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    refuse_output_holding(out, {f"the input {path}": path for path in inputs})


# -- the extraction --------------------------------------------------------------------


def _matches(name: str, names: Sequence[str]) -> bool:
    return name in names or name.rsplit(".", 1)[-1] in names


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(torch.linalg.vector_norm(ref.double()))
    num = float(torch.linalg.vector_norm(err.double()))
    return num / denom if denom > 0 else 0.0


class _Extractor:
    def __init__(
        self,
        base: CheckpointReader,
        model: CheckpointReader,
        *,
        rank: int,
        distribute_scale: bool,
        embed_lora: bool,
        save_modules: Sequence[str],
        include: list[re.Pattern[str]],
        exclude: list[re.Pattern[str]],
        sv_epsilon: float,
        skip_undecomposable: bool,
        dtype: torch.dtype | None,
        device: torch.device,
        arch: _Arch,
    ) -> None:
        self.base, self.model = base, model
        # a tied head has no tensor of its own: it is saved whole beside its embedding
        tied = arch.tied and arch.head is not None and f"{arch.head}.weight" not in model
        self.embed, self.tied_head = arch.embed, (arch.head if tied else None)
        self.rank, self.distribute_scale, self.embed_lora = rank, distribute_scale, embed_lora
        self.save_modules, self.include, self.exclude = list(save_modules), include, exclude
        self.sv_epsilon, self.skip_undecomposable = sv_epsilon, skip_undecomposable
        self.dtype, self.device = dtype, device

    def _read(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.base.get(key, device=self.device, dtype=torch.float32)
        m = self.model.get(key, device=self.device, dtype=torch.float32)
        check_finite(b, name=key, source=self.base.path)
        check_finite(m, name=key, source=self.model.path)
        return b, m

    def _out_dtype(self, key: str) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        stored = self.model.dtype(key)
        return stored if stored.is_floating_point else torch.float32

    def _considered(self, mod: _Module) -> bool:
        if self.include and not any(p.search(mod.name) for p in self.include):
            return False
        return not any(p.search(mod.name) for p in self.exclude)

    def run(self, mod: _Module) -> Iterator[tuple[str, torch.Tensor] | ModuleResult | None]:
        """Yield the adapter tensors of one module, then its result (``None``: unchanged)."""
        deltas = {}
        for key in mod.params:
            b, m = self._read(key)
            deltas[key] = m - b
            del b, m
        if not any(bool(d.any()) for d in deltas.values()):
            yield None
            return
        weight_key = f"{mod.name}.weight"
        first = weight_key if weight_key in mod.params else mod.params[0]
        shape = self.model.shape(first)

        tied = self.tied_head if mod.name == self.embed else None

        def whole(reason: str) -> Iterator[tuple[str, torch.Tensor] | ModuleResult]:
            written = {}
            for key in mod.params:
                value = self.model.get(key, device=self.device).to(self._out_dtype(key))
                written[key] = value
                yield _PREFIX + key, value
            if tied is not None and weight_key in written:
                yield f"{_PREFIX}{tied}.weight", written[weight_key]
            w_base = self.base.get(first, device=self.device, dtype=torch.float32)
            err = _rel(written[first].float() - w_base - deltas[first], deltas[first])
            yield ModuleResult(mod.name, "full", shape, None, err, reason, tied_head=tied)

        if mod.kind == "unknown":
            warnings.warn(
                f"{mod.name}: differs from the base but is not a parameter of any module of "
                "the model transformers builds from config.json; left out of the adapter",
                stacklevel=2,
            )
            yield ModuleResult(mod.name, "skipped", shape, reason="not a module parameter")
            return
        if _matches(mod.name, self.save_modules):
            yield from whole("--save-module")
            return
        is_emb = mod.kind in ("embedding", "head")
        if is_emb and not any(p.search(mod.name) for p in self.exclude):
            if not self.embed_lora:
                yield from whole("embedding (no --embed-lora)")
                return
            if tied is not None:  # PEFT runs or merges a factorised tied embedding, not both
                yield from whole(f"embedding tied to {tied}")
                return
        if not self._considered(mod):
            yield ModuleResult(mod.name, "skipped", shape, reason="--include/--exclude")
            return
        if mod.kind == "other" or (is_emb and len(shape) != 2):
            if self.skip_undecomposable:
                yield ModuleResult(mod.name, "skipped", shape, reason="--skip-undecomposable")
                return
            yield from whole("not a linear layer")
            return
        # linear (or head / embedding with --embed-lora)
        bias_key = f"{mod.name}.bias"
        if bias_key in deltas and bool(deltas[bias_key].any()):
            yield from whole("bias differs")
            return
        delta = deltas[weight_key]
        transpose = mod.kind == "embedding"
        target = delta.T if transpose else delta
        a, b = factorize(
            target, self.rank, distribute_scale=self.distribute_scale, sv_epsilon=self.sv_epsilon
        )
        r = a.shape[0]
        if r == 0:
            yield ModuleResult(mod.name, "skipped", shape, reason="every σ ≤ --sv-epsilon")
            return
        dt = self._out_dtype(weight_key)
        a, b = a.to(dt).contiguous(), b.to(dt).contiguous()
        err = _rel(target - b.float() @ a.float(), target)
        if transpose:
            yield f"{_PREFIX}{mod.name}.lora_embedding_A", a
            yield f"{_PREFIX}{mod.name}.lora_embedding_B", b
            yield ModuleResult(mod.name, "lora_embedding", shape, r, err)
        else:
            yield f"{_PREFIX}{mod.name}.lora_A.weight", a
            yield f"{_PREFIX}{mod.name}.lora_B.weight", b
            yield ModuleResult(mod.name, "lora", shape, r, err)


def _adapter_config(
    base_path: Path, config: dict[str, Any], results: list[ModuleResult]
) -> tuple[dict[str, Any], int]:
    lora = [m for m in results if m.kind.startswith("lora")]
    full = [n for m in results if m.kind == "full" for n in (m.name, m.tied_head) if n]
    r = max((m.rank or 0 for m in lora), default=0) or 1
    pattern = {m.name: m.rank for m in lora if m.rank != r}
    arch = (config.get("architectures") or [""])[0]
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if str(arch).endswith("ForCausalLM") else None,
        "base_model_name_or_path": str(base_path.resolve()),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": [m.name for m in lora],
        "modules_to_save": full or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if any(m.tied_head for m in results):  # the head's copy stays tied to the embedding's
        cfg["ensure_weight_tying"] = True
    return cfg, r


def _card(base: Path, model: Path, result_cfg: dict[str, Any], n_lora: int, n_full: int) -> str:
    return (
        "---\n"
        "library_name: peft\n"
        f"base_model: {base.resolve()}\n"
        "tags: [lora, shoal, extract-lora]\n"
        "---\n\n"
        "# LoRA extracted by shoal\n\n"
        f"The difference between `{model.resolve()}` and its base `{base.resolve()}`, as a\n"
        f"PEFT LoRA adapter of rank {result_cfg['r']}: {n_lora} factorised modules, "
        f"{n_full} saved whole. Per-module ranks and reconstruction errors are in "
        f"`{REPORT_FILE}`.\n"
    )


def extract_lora(
    base: str | Path,
    model: str | Path,
    out: str | Path,
    *,
    rank: int = 128,
    distribute_scale: bool = True,
    embed_lora: bool = False,
    save_modules: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    sv_epsilon: float = 0.0,
    skip_undecomposable: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> LoraExtraction:
    """Write a PEFT LoRA adapter of ``model − base`` to the folder ``out``.

    Args:
        base: the base checkpoint (a folder with ``config.json``).
        model: the fine-tuned checkpoint, same architecture and tensor shapes.
        out: the adapter folder to create (``adapter_config.json``,
            ``adapter_model.safetensors``, ``lora_report.json``, ``README.md``).
        rank: the largest LoRA rank (each module's is capped at ``min(out, in)``).
        distribute_scale: split Σ as Σ^½ on both factors (else all on ``lora_A``).
        embed_lora: factorise embeddings and the output head instead of saving them whole.
        save_modules: modules (full name or last component) to save whole.
        include: regular expressions; when given, only modules matching one are considered.
        exclude: regular expressions; modules matching one are left out.
        sv_epsilon: drop singular values at or below this.
        skip_undecomposable: leave out changed modules that are not linear layers
            (norms) instead of saving them whole.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the adapter tensors (default:
            the model's dtype of each tensor).
        device: where to compute the SVDs.
        overwrite: replace ``out`` if it exists.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`LoraExtraction` (per-module ranks and errors).

    Raises:
        ShoalError: bad options (rank ≤ 0, bad regex); a missing or unreadable
            checkpoint (:class:`~shoal.errors.CheckpointError`); base and model of
            different architectures or tensor names/shapes, or no difference at all
            (:class:`~shoal.errors.MergeError`); ``out`` exists
            (:class:`~shoal.errors.OutputExistsError`). Nothing is left at ``out``.
    """
    inc, exc = _check_options(rank, sv_epsilon, include, exclude)
    out_dtype = None
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ShoalError(f"--dtype: {dtype!r} is not float32, float16 or bfloat16")
        out_dtype = _DTYPES[dtype]
    dev = resolve_device(device)
    base_p, model_p, out_p = Path(base), Path(model), Path(out)
    _check_out(out_p, overwrite, [base_p, model_p])
    with open_checkpoint(base_p) as base_r, open_checkpoint(model_p) as model_r:
        config = _check_pair(base_r, model_r)
        arch = _architecture(config, model_p)
        modules = _group(model_r.keys(), arch.kinds)
        unmatched = [n for n in save_modules if not any(_matches(m.name, [n]) for m in modules)]
        if unmatched:
            raise ShoalError(
                f"--save-module {unmatched[0]!r}: no module of {model_p} has that name (full "
                f"or last component), e.g. {modules[0].name!r}"
            )
        ex = _Extractor(
            base_r,
            model_r,
            rank=rank,
            distribute_scale=distribute_scale,
            embed_lora=embed_lora,
            save_modules=save_modules,
            include=inc,
            exclude=exc,
            sv_epsilon=sv_epsilon,
            skip_undecomposable=skip_undecomposable,
            dtype=out_dtype,
            device=dev,
            arch=arch,
        )
        results: list[ModuleResult] = []
        unchanged = 0
        out_p.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_siblings(out_p.absolute())  # a killed run's half-written folder
        lock = out_p.absolute().with_name(f".{out_p.absolute().name}.lock")
        bar = counting_bar(progress)
        with hold_lock(lock, str(out_p), remove=True), atomic_dir(out_p) as tmp:
            tmp.mkdir()
            weights_dir = tmp / ".weights"
            with (
                bar,
                torch.no_grad(),
                ShardedWriter(weights_dir, max_shard_bytes=2**62) as writer,
            ):
                task = bar.add_task("extracting LoRA", total=len(modules)) if progress else None
                for mod in modules:
                    for item in ex.run(mod):
                        if item is None:
                            unchanged += 1
                        elif isinstance(item, ModuleResult):
                            item.layer = mod.kind
                            results.append(item)
                        else:
                            writer.add(*item)
                    if task is not None:
                        bar.advance(task)
                if not any(m.kind != "skipped" for m in results):
                    raise MergeError(
                        f"{model_p}: no tensor differs from the base {base_p} in a module "
                        "the adapter can hold; nothing to extract"
                    )
                if not any(m.kind.startswith("lora") for m in results):
                    whole = ", ".join(m.name for m in results if m.kind == "full")
                    raise MergeError(
                        f"{model_p}: only modules saved whole differ from the base ({whole}); "
                        "PEFT loads no adapter without a LoRA layer"
                        + (" (--embed-lora factorises embeddings)" if not embed_lora else "")
                    )
            (weights_dir / "model.safetensors").rename(tmp / ADAPTER_WEIGHTS)
            weights_dir.rmdir()
            cfg, r = _adapter_config(base_p, config, results)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            report = {
                "base": str(base_p.resolve()),
                "model": str(model_p.resolve()),
                "rank": rank,
                "adapter_r": r,
                "distribute_scale": distribute_scale,
                "unchanged_modules": unchanged,
                "modules": [{**asdict(m), "shape": list(m.shape)} for m in results],
            }
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            n_lora = sum(m.kind.startswith("lora") for m in results)
            n_full = sum(m.kind == "full" for m in results)
            (tmp / "README.md").write_text(
                _card(base_p, model_p, cfg, n_lora, n_full), encoding="utf-8"
            )
    return LoraExtraction(out_p, r, results, unchanged, cfg)
