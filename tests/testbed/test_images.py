"""The image testbed: published digits split, MNIST split, the MLP, the experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.errors import TaskError
from shoal.testbed.images import (
    EXPERT_GROUPS_3,
    accuracy,
    build_mlp,
    digits_mlp,
    load_digits_data,
    load_image_data,
    load_mnist_data,
    train_expert,
    train_experts,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: avoid oversubscription under pytest -n 2
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


def test_digits_split_as_published(digits) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    # first 80 % train, last 20 % test, no shuffling, raw 0-16 pixels (reference code)
    np.testing.assert_array_equal(digits.x_train.numpy(), raw.data[:1437])
    np.testing.assert_array_equal(digits.x_test.numpy(), raw.data[1437:])
    np.testing.assert_array_equal(digits.y_test.numpy(), raw.target[1437:])
    assert float(digits.x_train.max()) == 16.0 and digits.n_classes == 10
    assert float(load_digits_data(scale=1 / 16).x_train.max()) == 1.0


def test_mnist_split_balanced_and_disjoint() -> None:
    data = load_mnist_data()
    assert data.x_train.shape == (4000, 784) and data.x_test.shape == (1000, 784)
    assert torch.bincount(data.y_train).tolist() == [400] * 10
    assert torch.bincount(data.y_test).tolist() == [100] * 10
    assert float(data.x_train.max()) <= 1.0
    # no test image is also a training image
    tr = {bytes(r.numpy().tobytes()) for r in data.x_train}
    assert not any(bytes(r.numpy().tobytes()) in tr for r in data.x_test)
    with pytest.raises(TaskError, match="unknown image data set 'cifar'"):
        load_image_data("cifar")


def test_mlp_size_and_init() -> None:
    m = digits_mlp(seed=0)
    assert sum(p.numel() for p in m.parameters()) == 64 * 256 + 256 + 256 * 10 + 10 == 19210
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    assert abs(float(flat.std()) - 0.01) < 0.0005 and abs(float(flat.mean())) < 0.0005
    again = torch.cat([p.detach().reshape(-1) for p in digits_mlp(seed=0).parameters()])
    assert torch.equal(flat, again)
    assert not torch.equal(
        flat, torch.cat([p.detach().reshape(-1) for p in build_mlp(seed=1).parameters()])
    )
    assert all(float(p.detach().abs().sum()) == 0 for p in digits_mlp().parameters())


def test_experts_specialise_and_are_deterministic(digits) -> None:
    experts = train_experts(digits)
    assert list(experts) == ["expert-0-4", "expert-5-9"]
    lo = digits.y_test < 5
    e04, e59 = experts["expert-0-4"], experts["expert-5-9"]
    # each expert is better on its own classes than on the other's, and than the other expert
    assert accuracy(e04, digits.x_test[lo], digits.y_test[lo]) > 0.7
    assert accuracy(e04, digits.x_test[~lo], digits.y_test[~lo]) < 0.1
    assert accuracy(e59, digits.x_test[~lo], digits.y_test[~lo]) > 0.7
    assert accuracy(e59, digits.x_test[lo], digits.y_test[lo]) < 0.1
    again = train_expert(digits, (0, 1, 2, 3, 4))
    for p, q in zip(e04.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    # the two experts start from different draws of the seed-42 generator
    other = train_expert(digits, (0, 1, 2, 3, 4), init_index=1)
    assert not torch.equal(next(other.parameters()), next(e04.parameters()))
    assert len(EXPERT_GROUPS_3) == 3 and sorted(sum(EXPERT_GROUPS_3, ())) == list(range(10))
    with pytest.raises(TaskError, match="no training images"):
        train_expert(digits, (11,))


def test_shared_init_experts_are_fine_tunes_of_the_written_base(tmp_path) -> None:
    from safetensors.torch import load_file

    from shoal.testbed.images import write_image_experts

    paths = write_image_experts(tmp_path, "mnist", steps=3, shared_init=True)
    assert set(paths) == {"base", "expert-0-4", "expert-5-9"}
    base, a, b = (load_file(str(paths[k])) for k in ("base", "expert-0-4", "expert-5-9"))
    # trained for 0 steps the experts would be the base itself: same draw, same shapes
    zero = write_image_experts(tmp_path / "zero", "mnist", steps=0, shared_init=True)
    for k in base:
        assert torch.equal(load_file(str(zero["expert-0-4"]))[k], base[k])
        assert not torch.equal(a[k], base[k]) and not torch.equal(a[k], b[k])
