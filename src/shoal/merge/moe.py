"""``moe``: a sparse mixture-of-experts checkpoint from a dense base and dense experts.

The config file is mergekit-moe's (0.1.5)::

    base_model: ./base                 # attention, embeddings, norms, head come from it
    gate_mode: hidden                  # hidden | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16                    # optional: the output dtype (default: the base's)
    experts_per_token: 2               # top-k routing
    architecture: mixtral              # optional: mixtral | qwen (prefix of the name)
    experts:
      - source_model: ./expert-code    # its MLP becomes expert 0 of every layer
        positive_prompts: ["def f(x):"]
        negative_prompts: ["Once upon a time"]
        noise_scale: 0.01              # optional: Gaussian noise added to its MLP weights
        residual_scale: 0.5            # optional: factor on its down projection
    shared_experts:                    # Qwen MoE only: exactly one, always active
      - source_model: ./base
        positive_prompts: ["..."]

Every layer ``l`` of the output has one expert per ``experts`` entry, whose three
projections are that model's ``model.layers.l.mlp.*``; everything else is the base's.
The router of layer ``l`` is a matrix ``G_l`` (experts × hidden) whose row ``e`` is
expert ``e``'s *gate vector* ``g_{l,e}``; the router scores a token with hidden state
``x`` as ``G_l x`` and sends it to the ``experts_per_token`` best experts. The gate
modes define ``g``:

- ``hidden`` (``hidden_last``): the base model's hidden state at the *input* of layer
  ``l`` (``output_hidden_states[l]``) for the last token of each prompt, averaged over
  the expert's positive prompts, minus the same average over its negative prompts,
  scaled to unit length: ``g = (mean_P h − mean_N h) / ‖·‖``;
- ``hidden_avg``: the same with each prompt's hidden states averaged over its tokens;
- ``cheap_embed``: no forward pass: the sum of the token embeddings of all positive
  prompts, scaled to unit length (likewise for the negative ones, subtracted), the same
  vector for every layer;
- ``random``: ``g ~ N(0, 1)`` entrywise;
- ``uniform_random`` (``uniform``): ``g ~ U(−1/√H, 1/√H)`` entrywise, PyTorch's
  initialisation of a linear layer with ``H`` inputs.

Random gates come from one ``torch.Generator`` seeded with ``seed``, drawn as one
(layers × experts × hidden) tensor, shared experts last: the values mergekit-moe
draws with ``--random-seed seed``. Prompts are tokenized as mergekit does (the BOS
token's text, then the prompt, no other special tokens).

Output architectures, chosen as mergekit does: **Mixtral** (``MixtralForCausalLM``;
Llama or Mistral models, no shared experts) is preferred; **Qwen MoE**
(``Qwen2MoeForCausalLM``; Llama, Mistral or Qwen2 models, exactly one shared expert,
whose gate vector becomes ``shared_expert_gate``). Tensors are written in the layout of
the published checkpoints (``block_sparse_moe.experts.E.w1/w2/w3`` for Mixtral,
``mlp.experts.E.{gate,up,down}_proj`` for Qwen MoE), which transformers 4 and 5 load.

Where shoal differs from mergekit-moe: each prompt runs on its own, unpadded (mergekit
pads a batch on the left); the forward pass of ``hidden`` runs in float32 (mergekit:
bfloat16, so its gate vectors differ in the third decimal); ``hidden_avg`` averages over
the prompt's own tokens (mergekit's average includes the padding); a single expert is
allowed; ``uniform_random`` needs no prompts; unknown config keys are refused (mergekit
ignores them); a Mistral base keeps its ``sliding_window`` in a Mixtral output (mergekit
drops it); Mixtral tensors are written in the hub layout (mergekit 0.1.5 writes
transformers 5's fused ``experts.gate_up_proj``, which transformers 4 cannot read); the
base's tokenizer files are copied unchanged (mergekit re-saves the tokenizer with the
padding settings of its prompt batches); random gates are seeded (default 0).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal._atomic import hold_lock, refuse_output_holding, refuse_working_dir
from shoal._devices import resolve_device
from shoal._progress import counting_bar
from shoal.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    check_finite,
    copy_tokenizer_files,
    open_checkpoint,
    parse_size,
    tokenizer_files,
)
from shoal.errors import CheckpointError, MergeError, OutputExistsError, RecipeError
from shoal.merge.execute import tensor_seed
from shoal.recipe import canonical_dtype
from shoal.recipe.load import read_settings, settings_error

__all__ = [
    "ARCHITECTURES",
    "GATE_MODES",
    "MoEConfig",
    "MoEExpert",
    "MoEResult",
    "build_moe",
    "gate_vectors",
    "load_moe_config",
]

#: gate modes (mergekit's names) → the mode they compute
GATE_MODES = {
    "hidden": "hidden",
    "hidden_last": "hidden",
    "hidden_avg": "hidden_avg",
    "cheap_embed": "cheap_embed",
    "random": "random",
    "uniform_random": "uniform_random",
    "uniform": "uniform_random",
}
#: output architectures, in mergekit's naming (``architecture:`` is a prefix of one)
ARCHITECTURES = ("Mixtral", "Qwen MoE")
_PROJ = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_MLP_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MoEExpert(BaseModel):
    """One dense model whose MLPs become an expert of every layer."""

    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(BaseModel):
    """mergekit-moe's config file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[MoEExpert] = Field(min_length=1)
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[MoEExpert] | None = None
    architecture: str | None = None


@dataclass
class MoEResult:
    """What :func:`build_moe` wrote.

    Attributes:
        out: the checkpoint folder.
        architecture: ``Mixtral`` or ``Qwen MoE``.
        gates: the gate vectors, layers × (experts + shared experts) × hidden, float32,
            before the cast to the output dtype.
    """

    out: Path
    architecture: str
    gates: torch.Tensor


# -- the config ------------------------------------------------------------------------


def load_moe_config(
    source: str | Path | Mapping[str, Any],
) -> tuple[MoEConfig, str, Path]:
    """Read and check a mergekit-moe config.

    Returns:
        ``(config, label, folder)``: the label errors start with (the file name) and the
        folder relative model paths are also looked up in.

    Raises:
        RecipeError: a missing file, bad YAML, an unknown key, a bad value (unknown
            ``gate_mode``, ``experts_per_token`` out of range, unknown ``dtype`` or
            ``architecture``, missing prompts); the message names the key.
    """
    data, label, folder = read_settings(source)
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as exc:
        raise settings_error(exc, label) from None
    _check_config(config, label)
    return config, label, folder


def _check_config(config: MoEConfig, label: str) -> None:
    mode = GATE_MODES.get(config.gate_mode)
    if mode is None:
        raise RecipeError(
            f"{label}: gate_mode: {config.gate_mode!r} is not one of hidden, hidden_avg, "
            "cheap_embed, random, uniform_random (uniform)"
        )
    n = len(config.experts)
    if not 1 <= config.experts_per_token <= n:
        raise RecipeError(
            f"{label}: experts_per_token: {config.experts_per_token} must be between 1 and "
            f"the number of experts ({n})"
        )
    if config.dtype is not None and canonical_dtype(config.dtype) is None:
        raise RecipeError(f"{label}: dtype: {config.dtype!r} is not float32, float16 or bfloat16")
    if config.architecture is not None and not _arch_candidates(config.architecture):
        raise RecipeError(
            f"{label}: architecture: {config.architecture!r} names none of "
            f"{', '.join(ARCHITECTURES)} (the output architectures shoal writes)"
        )
    for what, experts in (("experts", config.experts), ("shared_experts", config.shared_experts)):
        for i, e in enumerate(experts or []):
            for key in ("noise_scale", "residual_scale"):
                value = getattr(e, key)
                if value is not None and not math.isfinite(value):
                    raise RecipeError(f"{label}: {what}[{i}].{key}: must be a finite number")
    if mode in ("random", "uniform_random"):
        return
    for i, e in enumerate(config.experts):
        if not e.positive_prompts:
            raise RecipeError(
                f"{label}: experts[{i}].positive_prompts: needed for gate_mode {config.gate_mode}"
            )
    shared = config.shared_experts or []
    if shared and any(bool(e.positive_prompts) != bool(shared[0].positive_prompts) for e in shared):
        raise RecipeError(
            f"{label}: shared_experts: give positive_prompts to every shared expert or to none"
        )
    if n > 1:
        first = (config.experts[0].positive_prompts, config.experts[0].negative_prompts or [])
        if all((e.positive_prompts, e.negative_prompts or []) == first for e in config.experts):
            raise RecipeError(
                f"{label}: experts: every expert has the same prompts, so every router row "
                "is the same vector; give each expert prompts of its own"
            )


def _arch_candidates(name: str | None) -> list[str]:
    if name is None:
        return list(ARCHITECTURES)
    return [a for a in ARCHITECTURES if a.lower().startswith(name.strip().lower())]


def _resolve(ref: str, folder: Path, label: str, key: str) -> Path:
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, folder / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise CheckpointError(f"{label}: {key}: model {ref!r} not found (looked in {looked})")


# -- the models ------------------------------------------------------------------------


@dataclass
class _Models:
    base: CheckpointReader
    base_dir: Path
    experts: list[CheckpointReader]
    shared: list[CheckpointReader]
    config: dict[str, Any]  # the base's config.json
    layers: int


def _why_not(arch: str, config: MoEConfig, model_type: str) -> str | None:
    """Why ``arch`` cannot hold this MoE (``None``: it can)."""
    shared = config.shared_experts or []
    if arch == "Mixtral":
        if shared:
            return "Mixtral has no shared experts"
        if model_type not in ("llama", "mistral"):
            return f"Mixtral is built from llama or mistral models, not {model_type}"
        return None
    if len(shared) != 1:
        return "Qwen MoE needs exactly one shared expert"
    if model_type not in ("llama", "mistral", "qwen2"):
        return f"Qwen MoE is built from llama, mistral or qwen2 models, not {model_type}"
    prompt_mode = GATE_MODES[config.gate_mode] not in ("random", "uniform_random")
    if prompt_mode and not shared[0].positive_prompts:
        return f"Qwen MoE's shared expert needs positive_prompts for gate_mode {config.gate_mode}"
    return None


def _select_architecture(config: MoEConfig, model_type: str, label: str) -> str:
    reasons = []
    for arch in _arch_candidates(config.architecture):
        why = _why_not(arch, config, model_type)
        if why is None:
            return arch  # Mixtral first, as mergekit prefers it
        reasons.append(why)
    raise RecipeError(f"{label}: no output architecture fits: {'; '.join(reasons)}")


def _check_base_config(arch: str, cfg: dict[str, Any], where: Path) -> None:
    """Refuse base settings the output architecture cannot represent."""
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise MergeError(
                f"{where}/config.json: {key} is true; {arch} has no such biases "
                "(only Qwen MoE's q/k/v biases)"
            )
    if arch == "Qwen MoE":
        heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
        head_dim = cfg.get("head_dim")
        if head_dim and heads and hidden and head_dim * heads != hidden:
            raise MergeError(
                f"{where}/config.json: head_dim {head_dim} × {heads} heads ≠ hidden_size "
                f"{hidden}; Qwen MoE has no head_dim of its own"
            )


def _layer_count(cfg: dict[str, Any], where: Path) -> int:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    n = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{where}/config.json: no num_hidden_layers")
    return n


def _open_models(
    config: MoEConfig, label: str, folder: Path, stack: ExitStack
) -> tuple[_Models, str]:
    base_dir = _resolve(config.base_model, folder, label, "base_model")
    if not base_dir.is_dir():
        raise CheckpointError(f"{base_dir}: base_model must be a model folder with config.json")
    base = stack.enter_context(open_checkpoint(base_dir))
    if base.config is None:
        raise CheckpointError(f"{base_dir}: no config.json (the base model's architecture)")
    base_type = base.config.get("model_type")
    arch = _select_architecture(config, str(base_type), label)
    _check_base_config(arch, base.config, base_dir)
    layers = _layer_count(base.config, base_dir)
    opened: dict[Path, CheckpointReader] = {base_dir.resolve(): base}

    def reader(ref: str, key: str) -> CheckpointReader:
        path = _resolve(ref, folder, label, key)
        if path.resolve() not in opened:
            opened[path.resolve()] = stack.enter_context(open_checkpoint(path))
        r = opened[path.resolve()]
        if r.config is not None and r.config.get("model_type") != base_type:
            raise MergeError(
                f"{label}: {key}: {path} is a {r.config.get('model_type')} model, the base "
                f"{base_dir} a {base_type} model; experts must share the base's architecture"
            )
        if r.config is not None and _layer_count(r.config, path) != layers:
            raise MergeError(
                f"{label}: {key}: {path}/config.json has num_hidden_layers "
                f"{_layer_count(r.config, path)}, the base {layers}"
            )
        for layer in range(layers):
            for proj in _PROJ:
                name = f"model.layers.{layer}.mlp.{proj}.weight"
                if name not in base:
                    raise MergeError(f"{base_dir}: no tensor {name!r} (the base's MLP)")
                if name not in r:
                    raise MergeError(f"{label}: {key}: {path} has no tensor {name!r}")
                if r.shape(name) != base.shape(name):
                    raise MergeError(
                        f"{label}: {key}: tensor {name!r} is {list(r.shape(name))} in {path}, "
                        f"{list(base.shape(name))} in the base {base_dir}"
                    )
        return r

    experts = [reader(e.source_model, f"experts[{i}]") for i, e in enumerate(config.experts)]
    shared = [
        reader(e.source_model, f"shared_experts[{i}]")
        for i, e in enumerate(config.shared_experts or [])
    ]
    return _Models(base, base_dir, experts, shared, base.config, layers), arch


# -- gate vectors ----------------------------------------------------------------------


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _tokenize(tokenizer: Any, prompt: str, where: str) -> torch.Tensor:
    text = (tokenizer.bos_token or "") + prompt
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        raise RecipeError(f"{where}: the prompt {prompt!r} is no tokens")
    return ids


def gate_vectors(
    config: MoEConfig,
    base_dir: Path,
    *,
    label: str = "config",
    hidden_size: int,
    layers: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The gate vectors of every layer and expert (shared experts last), float32.

    Args:
        config: the MoE config.
        base_dir: the base model folder (its tokenizer and weights for prompt modes).
        label: how errors name the config.
        hidden_size: the base's hidden size.
        layers: the base's number of layers.
        seed: seed of the ``random`` / ``uniform_random`` draws.
        device: where the base model runs (``hidden`` modes).

    Returns:
        A (layers × gated experts × hidden) tensor: the experts, then the shared experts
        when they have prompts or the mode is random (as mergekit).
    """
    mode = GATE_MODES[config.gate_mode]
    gated = list(config.experts)
    shared = config.shared_experts or []
    if shared and (shared[0].positive_prompts or mode in ("random", "uniform_random")):
        gated += shared
    shape = (layers, len(gated), hidden_size)
    if mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden_size)
        draw = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        return draw * 2 * scale - scale
    if not tokenizer_files(base_dir):
        raise RecipeError(
            f"{label}: base_model: {base_dir} holds no tokenizer files; gate_mode "
            f"{config.gate_mode} tokenizes the prompts with the base's tokenizer"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    if mode == "cheap_embed":
        with open_checkpoint(base_dir) as reader:
            embed = reader.get("model.embed_tokens.weight", dtype=torch.float32)

        def prompt_sum(ids: torch.Tensor) -> torch.Tensor:
            return embed[ids[0]].sum(dim=0).expand(layers, -1)

        def summary(prompts: list[str], where: str) -> torch.Tensor:
            total = sum(prompt_sum(_tokenize(tokenizer, p, where)) for p in prompts)
            return _unit(torch.as_tensor(total))

    else:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # shoal draws its own
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                base_dir, dtype=torch.float32, local_files_only=True
            )
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        model.to(torch.device(device)).eval()

        def prompt_state(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = model(input_ids=ids.to(device), output_hidden_states=True)
            states = torch.stack(out.hidden_states[:-1])[:, 0]  # layers × tokens × hidden
            if states.shape[0] != layers:
                raise MergeError(f"{base_dir}: {states.shape[0]} hidden states, {layers} layers")
            return states.mean(dim=1) if mode == "hidden_avg" else states[:, -1]

        def summary(prompts: list[str], where: str) -> torch.Tensor:
            states = [prompt_state(_tokenize(tokenizer, p, where)) for p in prompts]
            return torch.stack(states).mean(dim=0).float().cpu()

    vectors = []
    for i, expert in enumerate(gated):
        what = f"experts[{i}]" if i < len(config.experts) else "shared_experts[0]"
        v = summary(expert.positive_prompts or [], f"{label}: {what}.positive_prompts")
        if expert.negative_prompts:
            v = v - summary(expert.negative_prompts, f"{label}: {what}.negative_prompts")
        vectors.append(_unit(v))
    gates = torch.stack(vectors, dim=1)  # layers × experts × hidden
    degenerate = [
        layer
        for layer in range(layers)
        if len(gated) > 1 and float(torch.linalg.cond(gates[layer].double())) > 5.0
    ]
    if degenerate:
        warnings.warn(
            f"gate vectors of layer(s) {', '.join(map(str, degenerate))} are nearly linearly "
            "dependent (condition number > 5): the prompts may be too alike, and some "
            "experts will see few tokens",
            stacklevel=2,
        )
    return gates


# -- the output ------------------------------------------------------------------------


def _out_config(
    arch: str, base_cfg: dict[str, Any], config: MoEConfig, dtype: str | None
) -> dict[str, Any]:
    """The output's config.json, built with transformers' own config class."""
    import transformers

    source = transformers.AutoConfig.for_model(**base_cfg).to_dict()
    cls: Any = transformers.MixtralConfig if arch == "Mixtral" else transformers.Qwen2MoeConfig
    known = set(cls().to_dict())
    drop = {
        "model_type",
        "architectures",
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
    }
    fields = {k: v for k, v in source.items() if k in known and k not in drop}
    n, k = len(config.experts), config.experts_per_token
    if arch == "Mixtral":
        window = source.get("sliding_window") if base_cfg.get("model_type") == "mistral" else None
        out = cls(**fields, num_local_experts=n, num_experts_per_tok=k, sliding_window=window)
    else:
        if source.get("sliding_window") is not None and source.get("use_sliding_window", True):
            warnings.warn(
                "the base's sliding_window is dropped: the Qwen MoE output attends to the "
                "whole context (as mergekit's)",
                stacklevel=3,
            )
        size = source["intermediate_size"]
        out = cls(
            **fields,
            num_experts=n,
            num_experts_per_tok=k,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            moe_intermediate_size=size,
            shared_expert_intermediate_size=size,
            use_sliding_window=False,
            sliding_window=None,
            mlp_only_layers=[],
        )
    out.architectures = ["MixtralForCausalLM" if arch == "Mixtral" else "Qwen2MoeForCausalLM"]
    if dtype is not None:
        out.dtype = dtype
    result: dict[str, Any] = json.loads(out.to_json_string(use_diff=True))
    return result


@dataclass
class _Out:
    """One output tensor: its name, shape, dtype and how to compute it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # ("copy", name) | ("expert" / "shared", index, name) | ("gate", layer, lo, hi) | ("zeros",)
    source: tuple[Any, ...]


def _plan(
    arch: str,
    models: _Models,
    config: MoEConfig,
    gates: torch.Tensor,
    out_dtype: torch.dtype | None,
) -> list[_Out]:
    base = models.base
    n = len(config.experts)

    def dt(name: str, reader: CheckpointReader | None = None) -> torch.dtype:
        if out_dtype is not None:
            return out_dtype
        stored = (reader or base).dtype(name)
        return stored if stored.is_floating_point else torch.float32

    hidden = gates.shape[-1]
    gate_dtype = out_dtype or base.dtype("model.layers.0.mlp.gate_proj.weight")
    plan: list[_Out] = []
    done: set[int] = set()
    for key in base:
        match = _MLP_KEY.match(key)
        if match is None:
            plan.append(_Out(key, base.shape(key), dt(key), ("copy", key)))
            continue
        layer = int(match.group(1))
        if layer in done or layer >= models.layers:
            continue
        done.add(layer)
        pre = f"model.layers.{layer}"
        if arch == "Mixtral":
            moe = f"{pre}.block_sparse_moe"
            plan.append(_Out(f"{moe}.gate.weight", (n, hidden), gate_dtype, ("gate", layer, 0, n)))
            for e in range(n):
                for proj in _PROJ:
                    src = f"{pre}.mlp.{proj}.weight"
                    name = f"{moe}.experts.{e}.{_MIXTRAL_NAMES[proj]}.weight"
                    shape = base.shape(src)
                    plan.append(_Out(name, shape, dt(src), ("expert", e, src)))
        else:
            plan.append(
                _Out(f"{pre}.mlp.gate.weight", (n, hidden), gate_dtype, ("gate", layer, 0, n))
            )
            for e in range(n):
                for proj in _PROJ:
                    src = f"{pre}.mlp.{proj}.weight"
                    name = f"{pre}.mlp.experts.{e}.{proj}.weight"
                    plan.append(_Out(name, base.shape(src), dt(src), ("expert", e, src)))
            for proj in _PROJ:
                src = f"{pre}.mlp.{proj}.weight"
                name = f"{pre}.mlp.shared_expert.{proj}.weight"
                plan.append(_Out(name, base.shape(src), dt(src), ("shared", 0, src)))
            rows = gates.shape[1] - n
            plan.append(
                _Out(
                    f"{pre}.mlp.shared_expert_gate.weight",
                    (1, hidden),
                    gate_dtype,
                    ("gate", layer, n, n + 1) if rows >= 1 else ("zeros",),
                )
            )
    if arch == "Qwen MoE":  # Qwen MoE has q/k/v biases: zeros where the base has none
        present = {p.name for p in plan}
        for layer in range(models.layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                w = f"model.layers.{layer}.self_attn.{proj}.weight"
                b = f"model.layers.{layer}.self_attn.{proj}.bias"
                if b not in present and w in base:
                    plan.append(_Out(b, (base.shape(w)[0],), dt(w), ("zeros",)))
    return plan


def _compute(
    item: _Out,
    models: _Models,
    config: MoEConfig,
    gates: torch.Tensor,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    kind = item.source[0]
    if kind == "copy":
        value = models.base.get(item.source[1], device=device)
    elif kind == "zeros":
        value = torch.zeros(item.shape, device=device)
    elif kind == "gate":
        _, layer, lo, hi = item.source
        value = gates[layer, lo:hi]
    else:
        idx, src = item.source[1], item.source[2]
        spec = (config.experts if kind == "expert" else config.shared_experts or [])[idx]
        reader = (models.experts if kind == "expert" else models.shared)[idx]
        value = reader.get(src, device=device)
        check_finite(value, name=src, source=reader.path)
        if spec.noise_scale is not None:
            # drawn on the CPU: the same noise whatever the device
            gen = torch.Generator().manual_seed(tensor_seed(seed, item.name))
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float32)
            value = value.float() + noise.to(device) * spec.noise_scale
        if spec.residual_scale is not None and src.endswith("down_proj.weight"):
            value = value.float() * spec.residual_scale
    return value.to(item.dtype).contiguous()


def _card(config_text: str, arch: str, config: MoEConfig) -> str:
    return (
        "---\ntags: [moe, shoal]\n---\n\n"
        f"# {arch} mixture of experts built by shoal\n\n"
        f"{len(config.experts)} experts per layer, {config.experts_per_token} active per "
        f"token, gate mode `{config.gate_mode}`; base model `{config.base_model}`.\n\n"
        "Config (`shoal_moe.yaml`):\n\n```yaml\n" + config_text.rstrip() + "\n```\n"
    )


def build_moe(
    source: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    out_shard_size: str | int = "2GB",
    overwrite: bool = False,
    allow_same_experts: bool = False,
    progress: bool = True,
) -> MoEResult:
    """Build a mixture-of-experts checkpoint as a mergekit-moe config says.

    Args:
        source: the config (a YAML path, or a mapping).
        out_dir: the folder to create (safetensors shards, config.json, the base's
            tokenizer and generation config, ``shoal_moe.yaml``, ``README.md``).
        device: where the ``hidden`` forward pass and the copies run.
        seed: seed of random gates and of ``noise_scale`` noise.
        out_shard_size: largest shard, e.g. ``"2GB"``.
        overwrite: replace ``out_dir`` if it exists.
        allow_same_experts: build even if every expert is the same model (the MoE then
            computes what one of them does, at a higher cost; useful only to train).
        progress: show a progress bar on stderr.

    Returns:
        A :class:`MoEResult`.

    Raises:
        RecipeError: the config is malformed (the message names the key).
        CheckpointError: a model is missing or unreadable.
        MergeError: models that do not fit together (architecture, layer count, a missing
            MLP tensor, a shape); nothing is left at ``out_dir``.
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    config, label, folder = load_moe_config(source)
    dev = resolve_device(device)
    out = Path(out_dir)
    refuse_working_dir(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output exists (pass --overwrite to replace it)")
    max_bytes = parse_size(out_shard_size)
    with ExitStack() as stack:
        models, arch = _open_models(config, label, folder, stack)
        paths = [models.base.path, *(r.path for r in models.experts + models.shared)]
        inputs: dict[str, str | Path] = {f"the input model {p}": p for p in paths}
        if isinstance(source, str | Path):
            inputs[f"the config {source}"] = source
        refuse_output_holding(out, inputs)
        if len(models.experts) > 1 and not allow_same_experts:
            first = Path(models.experts[0].path).resolve()
            if all(Path(r.path).resolve() == first for r in models.experts):
                raise RecipeError(
                    f"{label}: experts: all are the same model ({first}); the MoE would compute "
                    "what it does at a higher cost (pass --allow-same-experts to build it "
                    "anyway, e.g. to train it)"
                )
        hidden = models.base.shape("model.layers.0.mlp.gate_proj.weight")[1]
        gates = gate_vectors(
            config,
            models.base_dir,
            label=label,
            hidden_size=hidden,
            layers=models.layers,
            seed=seed,
            device=dev,
        )
        canonical = canonical_dtype(config.dtype) if config.dtype else None
        if canonical is None:  # the base's dtype, as mergekit's select_dtype
            stored = models.config.get("dtype") or models.config.get("torch_dtype")
            canonical = canonical_dtype(str(stored)) if stored else None
        out_dtype = _DTYPES.get(canonical) if canonical else None
        plan = _plan(arch, models, config, gates, out_dtype)
        out_cfg = _out_config(arch, models.config, config, canonical)
        text = (
            Path(source).read_text(encoding="utf-8")
            if isinstance(source, str | Path)
            else json.dumps(dict(source), indent=2)
        )
        target = Path(out.absolute())
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OutputExistsError(f"{out}: cannot create its folder ({reason})") from None
        lock = target.with_name(f".{target.name}.lock")
        writer_plan = {p.name: (p.shape, p.dtype) for p in plan}
        bar = counting_bar(progress)
        with (
            hold_lock(lock, str(out), remove=True),
            ShardedWriter(
                out, plan=writer_plan, max_shard_bytes=max_bytes, overwrite=overwrite
            ) as writer,
            bar,
            torch.no_grad(),
        ):
            task = bar.add_task(f"building {arch}", total=len(plan)) if progress else None
            for item in plan:
                writer.add(item.name, _compute(item, models, config, gates, seed, dev))
                if task is not None:
                    bar.advance(task)
            writer.write_text("config.json", json.dumps(out_cfg, indent=2) + "\n")
            gen_cfg = models.base_dir / "generation_config.json"
            if gen_cfg.is_file():
                writer.copy_file(gen_cfg, "generation_config.json")
            copy_tokenizer_files(models.base_dir, writer)
            writer.write_text("shoal_moe.yaml", text)
            writer.write_text("README.md", _card(text, arch, config))
    return MoEResult(out, arch, gates)
