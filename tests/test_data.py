"""Tests for trainables.data (docs/theory.md §1, "Data")."""

import os
import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from trainables.data import (SHAPES, DatasetUnavailable, load_cifar_batch, load_dataset,
                             sample_batch_indices)

C10_MEAN, C10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
C100_MEAN, C100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


# -----------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_normalisation(digits):
    d = digits
    assert d.name == "digits" and d.num_classes == 10 and d.in_channels == 1
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_test.shape[1:] == (1, 8, 8)
    n_tr, n_te = len(d.y_train), len(d.y_test)
    assert n_tr + n_te == 1797 and abs(n_te / 1797 - 0.2) < 0.01
    # stratified: every class is ~20% test
    for c in range(10):
        frac = (d.y_test == c).sum().item() / ((d.y_test == c).sum() + (d.y_train == c).sum()).item()
        assert abs(frac - 0.2) < 0.02
    assert abs(d.x_train.mean().item()) < 1e-5
    assert abs(d.x_train.std().item() - 1) < 1e-4
    assert abs(d.x_test.mean().item()) > 1e-6  # test set normalised with *train* statistics


def test_digits_round_trip_to_raw_pixels(digits):
    # normalised values are an affine map of k/16, k = 0..16: recover the map from the grid spacing
    # and check every image (with its label) is one of sklearn's raw digits
    x = torch.cat([digits.x_train, digits.x_test]).double()
    y = torch.cat([digits.y_train, digits.y_test])
    u = torch.unique(x)
    step = (u[1:] - u[:-1]).min()
    k = torch.round((x - u[0]) / step)
    assert torch.allclose(u[0] + k * step, x, atol=1e-5)
    raw = load_digits()
    lookup = {img.astype(np.int64).tobytes(): int(t) for img, t in zip(raw.images, raw.target)}
    keys = [row.numpy().astype(np.int64).tobytes() for row in k.squeeze(1).long()]
    assert [lookup[key] for key in keys] == y.tolist()


def test_digits_split_depends_on_seed(digits):
    again = load_dataset("digits", data_seed=1)
    other = load_dataset("digits", data_seed=2)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    assert again.x_train.shape == other.x_train.shape
    assert not torch.equal(other.x_train, digits.x_train)


def _row_index(full, sub):
    keys = {row.numpy().tobytes(): i for i, row in enumerate(full)}
    return [keys[row.numpy().tobytes()] for row in sub]


def test_samples_per_label(digits):
    a = load_dataset("digits", samples_per_label=5, data_seed=1)
    b = load_dataset("digits", samples_per_label=5, data_seed=1)
    c = load_dataset("digits", samples_per_label=5, data_seed=3)
    assert torch.bincount(a.y_train, minlength=10).tolist() == [5] * 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    # a subset of the full training split (the split itself uses data_seed=1 too), no repeats
    idx = _row_index(digits.x_train, a.x_train)
    assert len(set(idx)) == 50
    assert torch.equal(digits.y_train[idx], a.y_train)
    assert torch.equal(a.x_test, digits.x_test)  # the test set is untouched


def test_samples_per_label_too_many(digits):
    available = (digits.y_train == 0).sum().item()
    with pytest.raises(ValueError, match=f"only {available}"):
        load_dataset("digits", samples_per_label=available + 1)
    with pytest.raises(ValueError, match="samples_per_label"):
        load_dataset("digits", samples_per_label=0)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="digits.*cifar10.*cifar100.*synthetic"):
        load_dataset("mnist")


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_shapes_table_matches_what_loads(name):
    # the planner sizes trials from SHAPES without loading; it must be what load_dataset gives
    d = load_dataset(name)
    assert SHAPES[name] == (len(d.y_train), len(d.y_test), d.in_channels, d.x_train.shape[-1], d.num_classes)
    # CIFAR (files absent here): the papers' splits, 3×32×32 images, 10 / 100 classes
    assert SHAPES["cifar10"] == (50000, 10000, 3, 32, 10) and SHAPES["cifar100"] == (50000, 10000, 3, 32, 100)


def test_synthetic():
    a = load_dataset("synthetic", synthetic_size=(40, 12), data_seed=5)
    b = load_dataset("synthetic", synthetic_size=(40, 12), data_seed=5)
    c = load_dataset("synthetic", synthetic_size=(40, 12), data_seed=6)
    assert a.x_train.shape == (40, 3, 32, 32) and a.x_test.shape == (12, 3, 32, 32)
    assert a.num_classes == 10 and a.in_channels == 3 and a.y_train.dtype == torch.int64
    assert int(a.y_train.min()) >= 0 and int(a.y_train.max()) < 10
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


# -----------------------------------------------------------------------------
# CIFAR from fake files in the real python-pickle format


def _fake_batch(rng, n, label_keys, protocol, bytes_keys):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    batch = {"batch_label": "fake batch", "data": data, "filenames": [f"img{i}.png" for i in range(n)]}
    for key, num in label_keys.items():
        batch[key] = rng.integers(0, num, size=n).tolist()
    if bytes_keys:  # what Python 2 wrote: byte-string keys
        batch = {k.encode(): v for k, v in batch.items()}
    return batch, protocol


def _write(path, batch_protocol):
    batch, protocol = batch_protocol
    blob = pickle.dumps(batch, protocol=protocol)
    if protocol == 2:  # name numpy's module as numpy 1.x (and the real CIFAR files) do
        blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(blob)
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}


def _expected(batches, label_key, mean, std):
    data = np.concatenate([b["data"] for b in batches]).astype(np.float64) / 255.0
    # row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32
    x = np.stack([data[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)], axis=1)
    x = (x - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    y = np.concatenate([b[label_key] for b in batches])
    return torch.from_numpy(x), torch.from_numpy(y)


def test_cifar10_from_python_format_files(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [_write(folder / f"data_batch_{i}",
                    _fake_batch(rng, 3, {"labels": 10}, protocol=[2, 4, 5][i % 3], bytes_keys=i % 2 == 0))
             for i in range(1, 6)]
    test = [_write(folder / "test_batch", _fake_batch(rng, 4, {"labels": 10}, 2, True))]
    d = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert d.num_classes == 10 and d.in_channels == 3 and d.name == "cifar10"
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    x, y = _expected(train, "labels", C10_MEAN, C10_STD)
    assert torch.allclose(d.x_train.double(), x, atol=1e-5) and torch.equal(d.y_train, y)
    x, y = _expected(test, "labels", C10_MEAN, C10_STD)
    assert torch.allclose(d.x_test.double(), x, atol=1e-5) and torch.equal(d.y_test, y)
    # spot-check one pixel by hand: image 1 of batch 1, green channel, row 2, column 5
    raw = train[0]["data"][1, 1024 + 2 * 32 + 5] / 255.0
    assert abs(d.x_train[1, 1, 2, 5].item() - (raw - 0.4822) / 0.1994) < 1e-5


def test_cifar100_uses_fine_labels_and_own_constants(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    keys = {"fine_labels": 100, "coarse_labels": 20}
    train = [_write(folder / "train", _fake_batch(rng, 6, keys, 2, True))]
    test = [_write(folder / "test", _fake_batch(rng, 2, keys, 4, False))]
    d = load_dataset("cifar100", data_dir=str(tmp_path), download=False)
    assert d.num_classes == 100 and d.x_train.shape == (6, 3, 32, 32)
    x, y = _expected(train, "fine_labels", C100_MEAN, C100_STD)
    assert torch.allclose(d.x_train.double(), x, atol=1e-5) and torch.equal(d.y_train, y)
    x, y = _expected(test, "fine_labels", C100_MEAN, C100_STD)
    assert torch.allclose(d.x_test.double(), x, atol=1e-5) and torch.equal(d.y_test, y)


def test_cifar_samples_per_label_error_names_available(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = {"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 0, 1, 1]}
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with pytest.raises(ValueError, match="class 2 has only 0"):
        load_dataset("cifar100", data_dir=tmp_path, download=False, samples_per_label=2)


def test_missing_cifar_raises_with_directory(tmp_path, monkeypatch):
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert str(tmp_path) in msg and "cifar-10-batches-py" in msg and "network" in msg
    # default data_dir comes from $THERMOSWEEP_DATA
    monkeypatch.setenv("THERMOSWEEP_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetUnavailable, match="elsewhere.*cifar-100-python"):
        load_dataset("cifar100", download=False)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


class _EvilSystem:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil"
    with open(path, "wb") as f:
        pickle.dump({"data": _Evil(str(marker))}, f)
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        load_cifar_batch(path)
    assert not marker.exists()
    with open(path, "wb") as f:
        pickle.dump({"data": _EvilSystem()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_cifar_batch(path)


# -----------------------------------------------------------------------------
# batch indices


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_sample_batch_indices(device):
    g = torch.Generator(device=device).manual_seed(7)
    idx = sample_batch_indices(5, 200, g)
    assert idx.device.type == device and idx.dtype == torch.int64 and idx.shape == (200,)
    assert int(idx.min()) >= 0 and int(idx.max()) < 5
    assert torch.unique(idx).numel() == 5  # with replacement: 200 draws cover all 5, with repeats
    again = sample_batch_indices(5, 200, torch.Generator(device=device).manual_seed(7))
    other = sample_batch_indices(5, 200, torch.Generator(device=device).manual_seed(8))
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    # consecutive draws advance the generator
    assert not torch.equal(sample_batch_indices(5, 200, g), idx)
    with pytest.raises(ValueError):
        sample_batch_indices(0, 4, g)
