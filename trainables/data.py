"""Datasets held entirely on the device, and iid minibatch indices (docs/theory.md §1, "Data").

Public API:
    Dataset                                    dataclass of train/test tensors
    load_dataset(name, ...) -> Dataset         'digits', 'cifar10', 'cifar100', 'synthetic'
    sample_batch_indices(n, batch_size, gen)   iid indices with replacement
    load_cifar_batch(path) -> dict             restricted unpickler for CIFAR python-format files
    DatasetUnavailable                         raised when CIFAR files are missing and cannot be fetched
"""

import functools
import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# what each dataset holds once loaded: training images, test images, channels, side, classes (the launch
# planner sizes models and memory from it without loading anything; tests/test_data.py checks it)
SHAPES = {"digits": (1437, 360, 1, 8, 10), "cifar10": (50000, 10000, 3, 32, 10),
          "cifar100": (50000, 10000, 3, 32, 100), "synthetic": (5000, 1000, 3, 32, 10)}
DATASETS = tuple(SHAPES)

# per-channel normalisation constants, docs/theory.md §1
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}

# folder inside data_dir, training files, test files, label key, number of classes
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


class DatasetUnavailable(RuntimeError):
    """The dataset files are not on disk and could not be downloaded."""


@dataclass
class Dataset:
    x_train: torch.Tensor  # float32, NCHW, normalised
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    name: str


def default_data_dir():
    """$THERMOSWEEP_DATA, else ~/.cache/thermosweep/data."""
    return Path(os.environ.get("THERMOSWEEP_DATA", "~/.cache/thermosweep/data")).expanduser()


# -----------------------------------------------------------------------------
# restricted unpickling of the CIFAR python-format batches


def _numpy_core(sub):
    try:  # numpy >= 2
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:  # numpy 1.x
        return importlib.import_module(f"numpy.core.{sub}")


@functools.lru_cache(maxsize=None)
def _allowed_globals():
    import codecs
    reconstruct = _numpy_core("multiarray")._reconstruct
    frombuffer = _numpy_core("numeric")._frombuffer
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes objects pickled by Python 3 at protocol < 3
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy/builtin globals CIFAR batch files need."""

    def find_class(self, module, name):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR batch files only need numpy arrays")
        return allowed[(module, name)]


def load_cifar_batch(path):
    """Read one CIFAR python-format batch file; keys are returned as str (files written by
    Python 2 have byte-string keys)."""
    with open(path, "rb") as f:
        obj = _RestrictedUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar_files(folder, files, label_key):
    xs, ys = [], []
    for fname in files:
        batch = load_cifar_batch(folder / fname)
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _ensure_cifar(name, data_dir, download):
    sub, train_files, test_files, _, _ = CIFAR_LAYOUT[name]
    folder = data_dir / sub

    def missing():
        return [f for f in train_files + test_files if not (folder / f).is_file()]

    reason = "download=False"
    if missing() and download:
        try:
            import torchvision
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            cls(root=str(data_dir), train=True, download=True)
            reason = "download did not produce the files"
        except Exception as e:  # no network, no torchvision, corrupt archive ...
            reason = f"download failed: {type(e).__name__}: {e}"
    if missing():
        raise DatasetUnavailable(
            f"{name} not found: searched data_dir {data_dir} for the extracted sub-folder '{sub}' with "
            f"files {train_files + test_files} (missing: {missing()}; {reason}). To fill it, run once "
            f"with network access and download=True, or copy the extracted python-version archive "
            f"so that {folder} exists (data_dir can be set via $THERMOSWEEP_DATA).")
    return folder


# -----------------------------------------------------------------------------
# the datasets


def _normalise_(x, mean, std):
    """In place: (x − mean) / std per channel of an NCHW tensor (saves memory on CIFAR)."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def _train_stats(x):
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


def _load_digits(data_seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # N×1×8×8 in [0, 1]
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target,
                                      random_state=data_seed)
    idx_tr, idx_te = torch.from_numpy(np.sort(idx_tr)), torch.from_numpy(np.sort(idx_te))
    mean, std = _train_stats(x[idx_tr])
    x = _normalise_(x, mean, std)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te], 10, 1


def _load_cifar(name, data_dir, download):
    folder = _ensure_cifar(name, data_dir, download)
    _, train_files, test_files, label_key, num_classes = CIFAR_LAYOUT[name]
    mean, std = CIFAR_STATS[name]
    out = []
    for files in (train_files, test_files):
        x, y = _read_cifar_files(folder, files, label_key)
        out += [_normalise_(x.float().div_(255.0), mean, std), y]
    return (*out, num_classes, 3)


def _load_synthetic(size, data_seed, num_classes=10):
    """Random CIFAR-shaped data: Gaussian noise plus a per-class pattern, normalised like digits."""
    n_train, n_test = size
    g = torch.Generator().manual_seed(data_seed)
    protos = 0.5 * torch.randn(num_classes, 3, 32, 32, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=g) + protos[y]
    mean, std = _train_stats(x[:n_train])
    x = _normalise_(x, mean, std)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, 3


def _subset_per_label(y, k, num_classes, seed):
    """Indices of k training examples per class, without replacement (docs/theory.md §1)."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if k > len(idx):
            raise ValueError(f"samples_per_label={k} but class {c} has only {len(idx)} training "
                             f"examples; use samples_per_label <= {len(idx)} or null for all")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.sort(torch.cat(picked)).values


def load_dataset(name, data_dir=None, samples_per_label=None, data_seed=1, device="cpu",
                 download=True, synthetic_size=(5000, 1000)):
    """Load a dataset onto `device` (docs/theory.md §1: per-channel normalisation, no augmentation).

    'digits': sklearn's bundled 8×8 digits (1 channel, pixel/16, stratified 80/20 split seeded by
    `data_seed`, normalised with train-set mean/std). 'cifar10' / 'cifar100': python-format batches
    under `data_dir` (downloaded with torchvision if absent and `download`), normalised with the
    docs/theory.md constants. 'synthetic': seeded random 3×32×32 data with 10 classes.
    `samples_per_label`: that many training images per class (without replacement, seed `data_seed`).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {list(DATASETS)}")
    if samples_per_label is not None and (not isinstance(samples_per_label, int)
                                          or isinstance(samples_per_label, bool)
                                          or samples_per_label < 1):
        raise ValueError(f"samples_per_label must be a positive integer or None, "
                         f"got {samples_per_label!r}")
    if name == "digits":
        parts = _load_digits(data_seed)
    elif name == "synthetic":
        if len(synthetic_size) != 2 or min(synthetic_size) < 1:
            raise ValueError(f"synthetic_size must be (n_train, n_test) with both >= 1, "
                             f"got {synthetic_size!r}")
        parts = _load_synthetic(synthetic_size, data_seed)
    else:
        data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        parts = _load_cifar(name, data_dir, download)
    x_tr, y_tr, x_te, y_te, num_classes, in_channels = parts
    if samples_per_label is not None:
        keep = _subset_per_label(y_tr, samples_per_label, num_classes, data_seed)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    to = lambda t: t.contiguous().to(device)
    return Dataset(to(x_tr), to(y_tr), to(x_te), to(y_te), num_classes, in_channels, name)


def sample_batch_indices(n, batch_size, generator):
    """`batch_size` indices drawn iid uniformly from range(n), with replacement (docs/theory.md §1),
    on the generator's device (no host synchronisation)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return torch.randint(0, n, (batch_size,), generator=generator, device=generator.device)
