"""Dataset loaders on small files written in the standard formats, plus the real offline
files in shared/data when present (skipped otherwise)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metacorrect.data import MissingDataError, load_dataset, make_problem
from metacorrect.data import cifar, clothing1m, text
from metacorrect.data.catalog import describe_datasets, format_catalog
from metacorrect.data.mnist import read_idx


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METACORRECT_CACHE", str(tmp_path / "cache"))


def need(root: Path, *files: str) -> None:
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        pytest.skip(f"real data file(s) {missing} not in {root}")


# ----------------------------------------------------------------------------- MNIST
def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    arr = np.asarray(arr, dtype=np.uint8)
    raw = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)
    return path


def write_mnist(root: Path, folder="mnist", gz=True, n_train=5, n_test=3):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10}
    for name, arr in arrays.items():
        write_idx(root / folder / name, arr, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_synthetic(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4] and ds.y_test.dtype == np.int64
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0


def test_fashion_mnist_synthetic(tmp_path):
    write_mnist(tmp_path, folder="fashion-mnist")
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.class_names[0] == "T-shirt/top" and ds.num_classes == 10 and ds.licence == "MIT"


def test_mnist_missing_file_names_file_and_place(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MissingDataError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and str(tmp_path / "mnist") in msg and "never downloads" in msg


def test_idx_bad_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">HBBI", 0, 8, 3, 5) + bytes(5))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: bad idx magic number 0x00000803"):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_payload(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28)), gz=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"x-idx3-ubyte: idx file truncated"):
        read_idx(path, 3)


def test_idx_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((40, 28, 28)))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"x-idx3-ubyte\.gz: cannot read idx file .*corrupt or truncated"):
        read_idx(path, 3)


def test_mnist_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(ValueError, match="holds 5 images but .* holds 4 labels"):
        load_dataset("mnist", tmp_path)


def test_mnist_real(shared_data):
    need(shared_data, "mnist/train-images-idx3-ubyte.gz")
    ds = load_dataset("mnist", shared_data)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert np.bincount(ds.y_test).tolist()[:3] == [980, 1135, 1032]


def test_fashion_mnist_real_test_split(shared_data):
    need(shared_data, "fashion-mnist/t10k-images-idx3-ubyte.gz")
    images = read_idx(shared_data / "fashion-mnist/t10k-images-idx3-ubyte.gz", 3)
    labels = read_idx(shared_data / "fashion-mnist/t10k-labels-idx1-ubyte.gz", 1)
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- CIFAR
def write_cifar10_pickles(root: Path, per_batch=4, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, fh, protocol=2)
        xs.append(data)
        ys += labels
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": test, b"labels": list(range(n_test))}, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in cifar.CIFAR10_CLASSES]}, fh, protocol=2)
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.array(ys)


def test_cifar10_pickles(tmp_path):
    x, y = write_cifar10_pickles(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (20, 3, 32, 32)
    assert torch.equal(ds.x_train, torch.from_numpy(x)) and ds.y_train.tolist() == y.tolist()
    assert ds.x_test.shape == (3, 3, 32, 32) and ds.input_shape == (3, 32, 32) and ds.input_dtype == torch.float32
    assert "pickles" in ds.description


def test_cifar_pickle_refuses_code(tmp_path):
    write_cifar10_pickles(tmp_path)
    with open(tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "evil": print}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3: not a readable CIFAR pickle .*refusing to load"):
        load_dataset("cifar10", tmp_path)


def test_image_transforms():
    train_t, test_t = cifar.image_transforms(cifar.CIFAR10_MEAN, cifar.CIFAR10_STD)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = test_t(x)
    mean = torch.tensor(cifar.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    torch.manual_seed(3)
    a = train_t(x)
    torch.manual_seed(3)
    b = train_t(x)
    assert torch.equal(a, b) and a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    # every augmented image is a (possibly flipped) 32×32 window of the zero-padded image
    raw = (a * std + mean) * 255
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4))
    for i in range(16):
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.allclose(raw[i], w, atol=1e-3) or torch.allclose(raw[i], w.flip(2), atol=1e-3)
                   for w in windows)
    torch.manual_seed(4)
    assert not torch.equal(train_t(x), a)  # a different seed, different crops


def colour(i: int) -> tuple[int, int, int]:
    return (37 * i) % 200 + 20, (91 * i) % 200 + 20, (53 * i) % 200 + 20


def write_cifar10_jpeg(root: Path, clean_label: np.ndarray, n_test_per_class=1, skip=None):
    """The JPEG layout: image i of the original order is train/<class>/<rank>.jpg, a flat colour(i)."""
    from PIL import Image
    folder = root / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "cifar10-jpg.tar.gz", "w:gz") as tf:
        def add(name, rgb):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), rgb).save(buf, format="JPEG", quality=95)
            info = tarfile.TarInfo(name)
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
        seen = np.zeros(10, int)
        for i, c in enumerate(clean_label):
            name = f"cifar10-jpg/train/{cifar.CIFAR10_CLASSES[c]}/{seen[c]:04d}.jpg"
            seen[c] += 1
            if name != skip:
                add(name, colour(i))
        for c in range(10):
            for r in range(n_test_per_class):
                add(f"cifar10-jpg/test/{cifar.CIFAR10_CLASSES[c]}/{r:04d}.jpg", (c * 20, 0, 0))


def write_cifar10n(root: Path, clean_label: np.ndarray, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"clean_label": clean_label}
    for key in cifar.NOISY_SETS.values():
        arrays[key] = np.where(rng.random(len(clean_label)) < 0.3, rng.integers(0, 10, len(clean_label)),
                               clean_label)
    np.savez(root / "cifar10" / "cifar10n_labels.npz", **arrays)
    return arrays


def test_cifar10_jpeg_rebuilds_original_order(tmp_path):
    clean = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 3))
    write_cifar10_jpeg(tmp_path, clean)
    arrays = write_cifar10n(tmp_path, clean)
    seen = []
    ds = load_dataset("cifar10n", tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.y_train.tolist() == clean.tolist()
    means = ds.x_train.float().mean(dim=(2, 3)).numpy()
    expected = np.array([colour(i) for i in range(30)], dtype=float)
    assert np.abs(means - expected).max() < 4  # JPEG is lossy, but each image is where it belongs
    assert ds.x_test.shape == (10, 3, 32, 32) and ds.y_test.tolist() == list(range(10))
    assert sorted(ds.noisy_label_sets) == ["aggre", "random1", "random2", "random3", "worse"]
    np.testing.assert_array_equal(ds.noisy_label_sets["worse"], arrays["worse_label"])
    assert seen[-1] == (40, 40)
    assert "CC BY-NC" in ds.licence
    problem = make_problem(ds, label_set="aggre", trusted=10, seed=0)
    np.testing.assert_array_equal(problem.y_noisy, arrays["aggre_label"][problem.noisy_idx])


def test_cifar10_jpeg_cache_is_reused(tmp_path, monkeypatch):
    clean = np.repeat(np.arange(10), 2)
    write_cifar10_jpeg(tmp_path, clean)
    write_cifar10n(tmp_path, clean)
    first = load_dataset("cifar10", tmp_path)
    cached = list((tmp_path / "cache").glob("cifar10-jpg-*/*.npy"))
    assert sorted(p.name for p in cached) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    assert not list((tmp_path / "cache").glob("**/*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("decoded again")
    monkeypatch.setattr(cifar, "decode_jpeg_archive", boom)
    second = load_dataset("cifar10", tmp_path)
    assert torch.equal(first.x_train, second.x_train)


def test_cifar10_jpeg_without_order_labels_warns(tmp_path):
    write_cifar10_jpeg(tmp_path, np.repeat(np.arange(10), 2))
    with pytest.warns(UserWarning, match="class-major order"):
        ds = load_dataset("cifar10", tmp_path)
    assert ds.y_train.tolist() == sorted(ds.y_train.tolist())


def test_cifar10_jpeg_gap_in_numbers(tmp_path):
    clean = np.repeat(np.arange(10), 3)
    write_cifar10_jpeg(tmp_path, clean, skip="cifar10-jpg/train/cat/0001.jpg")
    with pytest.raises(ValueError, match=r"train/cat numbers are not 0\.\.1 without gaps"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_order_labels_disagree_with_archive(tmp_path):
    write_cifar10_jpeg(tmp_path, np.repeat(np.arange(10), 2))
    write_cifar10n(tmp_path, np.repeat(np.arange(10), 2)[::-1][:19].copy())
    with pytest.raises(ValueError, match="per-class counts"):
        load_dataset("cifar10", tmp_path)


def test_cifar10n_clean_label_must_match(tmp_path):
    x, y = write_cifar10_pickles(tmp_path)
    wrong = y.copy()
    wrong[0] = (wrong[0] + 1) % 10
    write_cifar10n(tmp_path, wrong)
    with pytest.raises(ValueError, match="clean_label does not equal the CIFAR-10 training labels"):
        load_dataset("cifar10n", tmp_path)


def test_cifar10_missing_archive(tmp_path):
    with pytest.raises(MissingDataError) as err:
        load_dataset("cifar10", tmp_path)
    assert "cifar10-jpg.tar.gz" in str(err.value) and str(tmp_path / "cifar10") in str(err.value)


def test_cifar10_jpeg_needs_pillow(tmp_path, monkeypatch):
    write_cifar10_jpeg(tmp_path, np.repeat(np.arange(10), 1))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install 'metacorrect\[images\]'"):
        cifar.decode_jpeg_archive(tmp_path / "cifar10" / "cifar10-jpg.tar.gz", cifar.CIFAR10_CLASSES)


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine = np.arange(200) % 100
    coarse_of = np.arange(100) // 5
    with open(folder / "train", "wb") as fh:
        pickle.dump({b"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8), b"fine_labels": fine.tolist(),
                     b"coarse_labels": coarse_of[fine].tolist()}, fh, protocol=2)
    with open(folder / "test", "wb") as fh:
        pickle.dump({b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"fine_labels": list(range(10)),
                     b"coarse_labels": coarse_of[:10].tolist()}, fh, protocol=2)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, fh, protocol=2)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.x_train.shape == (200, 3, 32, 32) and ds.num_classes == 100 and ds.class_names[7] == "f7"
    np.testing.assert_array_equal(ds.coarse_of_fine, coarse_of)
    problem = make_problem(ds, "hierarchical", 0.5, trusted=100, seed=0)
    assert problem.T_true.shape == (100, 100)


def test_cifar10_real_archive_first_images(shared_data):
    need(shared_data, "cifar10/cifar10-jpg.tar.gz", "cifar10/cifar10n_labels.npz")
    out = cifar.decode_jpeg_archive(shared_data / "cifar10/cifar10-jpg.tar.gz", cifar.CIFAR10_CLASSES, limit=12)
    x, y = out["train"]
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == [0] * 12
    assert 20 < x.mean() < 235
    clean = np.load(shared_data / "cifar10/cifar10n_labels.npz")["clean_label"]
    order = cifar.original_train_order(clean, np.full(10, 5000))
    assert sorted(order.tolist()) == list(range(50000))
    np.testing.assert_array_equal(np.repeat(np.arange(10), 5000)[order], clean)
    assert clean[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # frog, truck, truck, deer, car, ...


@pytest.mark.slow
def test_cifar10n_real_full_decode(shared_data, tmp_path_factory, monkeypatch):
    """Decodes all 60,000 JPEGs (about 20 s) and checks the cached arrays."""
    need(shared_data, "cifar10/cifar10-jpg.tar.gz", "cifar10/cifar10n_labels.npz")
    monkeypatch.setenv("METACORRECT_CACHE", str(tmp_path_factory.getbasetemp() / "cifar-cache"))
    ds = load_dataset("cifar10n", shared_data)
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert abs(np.mean(ds.noisy_label_sets["aggre"] != ds.y_train) - 0.090) < 0.002
    assert abs(np.mean(ds.noisy_label_sets["worse"] != ds.y_train) - 0.402) < 0.002
    cached = {p.name: np.load(p, mmap_mode="r").shape
              for p in (tmp_path_factory.getbasetemp() / "cifar-cache").glob("cifar10-jpg-*/*.npy")}
    assert cached == {"x_train.npy": (50000, 3, 32, 32), "y_train.npy": (50000,),
                      "x_test.npy": (10000, 3, 32, 32), "y_test.npy": (10000,)}


# ----------------------------------------------------------------------------- Clothing1M
def write_clothing1m(root: Path):
    from PIL import Image
    folder = root / "clothing1m"
    ann = folder / "annotations"
    ann.mkdir(parents=True)
    keys = [f"images/{i % 3}/{i:02d}/{1000 + i}.jpg" for i in range(12)]
    for i, key in enumerate(keys):
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 30), (i * 20, 100, 50)).save(folder / key, format="JPEG")
    noisy_train, clean_train, test = keys[:6], keys[6:9], keys[9:]
    noisy_kv = {k: i % 14 for i, k in enumerate(keys[:7])}  # key 6 (clean train) has a noisy label too
    clean_kv = {k: (i * 3) % 14 for i, k in enumerate(keys) if i >= 6}
    (ann / "noisy_label_kv.txt").write_text("".join(f"{k} {v}\n" for k, v in noisy_kv.items()))
    (ann / "clean_label_kv.txt").write_text("".join(f"{k} {v}\n" for k, v in clean_kv.items()))
    (ann / "noisy_train_key_list.txt").write_text("\n".join(noisy_train + [keys[6]]) + "\n")
    (ann / "clean_train_key_list.txt").write_text("\n".join(clean_train) + "\n")
    (ann / "clean_test_key_list.txt").write_text("\n".join(test) + "\n")
    return keys, noisy_kv, clean_kv


def test_clothing1m_synthetic(tmp_path, monkeypatch):
    keys, noisy_kv, clean_kv = write_clothing1m(tmp_path)
    ds = load_dataset("clothing1m", tmp_path, image_size=8)
    assert ds.x_train.shape == (9, 3, 8, 8) and ds.x_train.dtype == torch.uint8 and ds.x_test.shape == (3, 3, 8, 8)
    assert ds.num_classes == 14 and not ds.clean_labels_known
    assert ds.trusted_mask.tolist() == [False] * 6 + [True] * 3  # key 6 is kept once, as trusted
    assert ds.y_train.tolist() == [noisy_kv[k] for k in keys[:6]] + [clean_kv[k] for k in keys[6:9]]
    assert ds.noisy_label_sets["noisy"].tolist() == [noisy_kv[k] for k in keys[:7]] + [clean_kv[k] for k in keys[7:9]]
    assert ds.y_test.tolist() == [clean_kv[k] for k in keys[9:]]
    assert abs(int(ds.x_train[1, 0].float().mean()) - 20) <= 3  # red channel of image 1
    assert ds.input_shape == (3, 8, 8)
    with pytest.warns(UserWarning, match="trusted set has no example"):
        problem = make_problem(ds, trusted=0.5, seed=0)
    assert problem.trusted_idx.tolist() == [6, 7, 8] and problem.y_noisy.tolist() == ds.y_train[:6].tolist()
    small = load_dataset("clothing1m", tmp_path, image_size=8, max_noisy=2)
    assert small.x_train.shape[0] == 5 and small.trusted_mask.sum() == 3

    def no_decoding():
        raise AssertionError("decoded again")
    monkeypatch.setattr(clothing1m, "require_pillow", no_decoding)
    again = load_dataset("clothing1m", tmp_path, image_size=8)  # from the cache
    assert torch.equal(again.x_train, ds.x_train)


def test_clothing1m_missing_image_and_annotation(tmp_path):
    keys, _, _ = write_clothing1m(tmp_path)
    (tmp_path / "clothing1m" / keys[2]).unlink()
    with pytest.raises(MissingDataError, match=keys[2]):
        load_dataset("clothing1m", tmp_path, image_size=8)
    (tmp_path / "clothing1m" / "annotations" / "clean_test_key_list.txt").unlink()
    with pytest.raises(MissingDataError, match="clean_test_key_list.txt"):
        load_dataset("clothing1m", tmp_path, image_size=8)


def test_clothing1m_bad_label(tmp_path):
    write_clothing1m(tmp_path)
    with open(tmp_path / "clothing1m" / "annotations" / "noisy_label_kv.txt", "a") as fh:
        fh.write("images/x.jpg 14\n")
    with pytest.raises(ValueError, match=r"noisy_label_kv.txt, line 8: label 14 out of range 0\.\.13"):
        load_dataset("clothing1m", tmp_path, image_size=8)


# ----------------------------------------------------------------------------- Twitter POS
TWEETS = {
    "tweets-train.txt": "i\tO\nlove\tV\n<@MENTION>\t@\n\nlol\t!\n!!\t,\n\n",
    "tweets-dev.txt": "the\tD\ngame\tN\n",  # no trailing blank line
    "tweets-devtest.txt": "i\tO\nwon't\tV\n2\t$\n\n",
}
CLUSTERS = "0010\ti\t100\n0010\tI\t10\n1011011\tlove\t50\n1010\tthe\t99\n00011100\tlol\t80\n01001101\t!!\t5\n"


def write_twitter(root: Path):
    folder = root / "twitter-pos"
    folder.mkdir(parents=True)
    for name, content in TWEETS.items():
        (folder / name).write_text(content)
    (folder / "6mpaths").write_text(CLUSTERS)


def test_twitter_pos_synthetic(tmp_path):
    write_twitter(tmp_path)
    ds = load_dataset("twitter_pos", tmp_path)
    K = 3 * len(text.SLOTS)
    assert ds.x_train.shape == (7, K) and ds.x_train.dtype == torch.int64 and ds.x_test.shape == (3, K)
    assert [ds.class_names[t] for t in ds.y_train] == ["O", "V", "@", "!", ",", "D", "N"]
    assert ds.num_classes == 25 and ds.class_names == text.TAGS
    V = ds.extra["vocab_size"]
    assert int(ds.x_train.min()) >= 1 and int(ds.x_train.max()) < V
    assert len(ds.extra["feature_names"]) == K
    # the same word in the same position has the same ids
    S = len(text.SLOTS)
    x = ds.x_train.numpy()
    np.testing.assert_array_equal(x[0, S:2 * S], ds.x_test.numpy()[0, S:2 * S])  # "i" at the centre
    np.testing.assert_array_equal(x[0, :S], x[3, :S])  # both tweets start with </s> on the left
    np.testing.assert_array_equal(x[2, 2 * S:], x[4, 2 * S:])  # </s> on the right of the last token
    # 'i' has cluster 0010 like 'I'; "won't" has no cluster: slot 'cluster' = its range's "none" id
    feat = text.TwitterFeaturizer(text.read_clusters(tmp_path / "twitter-pos" / "6mpaths"))
    assert feat.vocab_size == V
    ids = feat.local_ids("won't")
    assert ids[1] == 0 and ids[-1] == text.SHAPES.index("other")
    assert feat.local_ids("I")[1:8] == feat.local_ids("i")[1:8]
    assert text.word_shape("<URL-bit.ly>") == "url" and text.word_shape("3:30") == "number"


def test_twitter_pos_column_ranges_disjoint(tmp_path):
    write_twitter(tmp_path)
    feat = text.TwitterFeaturizer(text.read_clusters(tmp_path / "twitter-pos" / "6mpaths"),
                                  word_buckets=64, affix_buckets=16)
    x, _ = feat.featurize(text.read_tagged(tmp_path / "twitter-pos" / "tweets-train.txt"))
    upper = np.r_[feat.offsets[1:], feat.vocab_size]
    assert np.all(x >= feat.offsets) and np.all(x < upper)


def test_twitter_pos_bad_tag(tmp_path):
    write_twitter(tmp_path)
    (tmp_path / "twitter-pos" / "tweets-dev.txt").write_text("the\tD\ngame\tNOUN\n")
    with pytest.raises(ValueError, match=r"tweets-dev.txt, line 2: unknown tag 'NOUN'"):
        load_dataset("twitter_pos", tmp_path)


def test_twitter_pos_missing_clusters(tmp_path):
    write_twitter(tmp_path)
    (tmp_path / "twitter-pos" / "6mpaths").unlink()
    with pytest.raises(MissingDataError, match=r"'6mpaths'.*twitter-pos"):
        load_dataset("twitter_pos", tmp_path)


def test_twitter_pos_real(shared_data):
    need(shared_data, "twitter-pos/tweets-train.txt", "twitter-pos/6mpaths")
    ds = load_dataset("twitter_pos", shared_data)
    assert ds.x_train.shape == (14619 + 4823, 45) and ds.x_test.shape == (7152, 45)
    assert np.bincount(ds.y_train, minlength=25).min() >= 1 and ds.extra["vocab_size"] > int(ds.x_train.max())


# ----------------------------------------------------------------------------- SST
def write_sst(root: Path):
    folder = root / "sst"
    folder.mkdir(parents=True)
    (folder / "senti.binary.train").write_text(
        "a great , great movie\t1\nthe worst film of the year\t0\ngreat film !\t1\nIt is not good\t0\n")
    (folder / "senti.binary.dev").write_text("a surprising film\t1\n")
    (folder / "senti.binary.test").write_text("great film\t1\nthe\t0\n")


def test_sst_synthetic(tmp_path):
    write_sst(tmp_path)
    ds = load_dataset("sst", tmp_path)
    itos = ds.extra["itos"]
    assert itos[:4] == ["<pad>", "<unk>", "great", "film"]  # by count, ties: first seen
    assert "the" not in itos and "not" not in itos  # GLC removes NLTK stop words
    assert ds.y_train.tolist() == [1, 0, 1, 0, 1] and ds.y_test.tolist() == [1, 0]
    assert ds.x_train.shape == (5, 3) and ds.x_train.dtype == torch.int64  # longest: "worst film year"
    assert ds.x_train[0].tolist() == [2, 2, 4] and ds.x_train[1].tolist() == [5, 3, 6]  # worst film year
    assert ds.x_train[4].tolist() == [1, 3, 0]  # "surprising" is only in dev: unknown
    assert ds.x_test[1].tolist() == [1, 0, 0]  # empty after stop words: one unknown token
    assert ds.extra["vocab_size"] == len(itos) == 8
    short = load_dataset("sst", tmp_path, max_len=2)
    assert short.x_train[1].tolist() == [3, 6]  # keeps the last tokens, as GLC


def test_sst_bad_label(tmp_path):
    write_sst(tmp_path)
    (tmp_path / "sst" / "senti.binary.test").write_text("great film\t1\nmeh\tneutral\n")
    with pytest.raises(ValueError, match=r"senti.binary.test, line 2: expected a phrase ending in a 0/1 label"):
        load_dataset("sst", tmp_path)


def test_sst_real(shared_data):
    need(shared_data, "sst/senti.binary.train")
    ds = load_dataset("sst", shared_data)
    assert ds.x_train.shape == (67349 + 872, 30) and ds.x_test.shape == (1821, 30)
    assert ds.extra["vocab_size"] == 10002 and int(ds.x_train.max()) == 10001
    assert 0.5 < ds.y_train.mean() < 0.6


# ----------------------------------------------------------------------------- catalog
def test_catalog_synthetic(tmp_path):
    write_mnist(tmp_path)
    write_sst(tmp_path)
    (tmp_path / "SHA256SUMS").write_text(
        f"{cifar.file_sha256(tmp_path / 'sst/senti.binary.dev')}  sst/senti.binary.dev\n")
    rows = {r["name"]: r for r in describe_datasets(tmp_path)}
    assert rows["mnist"]["present"] and rows["mnist"]["checksum"] == "MISMATCH"  # not the standard files
    assert rows["sst"]["present"] and rows["sst"]["checksum"] == "MISMATCH"
    assert {f["checksum"] for f in rows["sst"]["files"]} == {"MISMATCH"}  # embedded sums win
    assert rows["cifar100"]["status"] == "missing" and not rows["cifar100"]["present"]
    assert rows["digits"]["status"] == "embedded"
    assert rows["cifar10n"]["non_commercial"] and rows["cifar10h"]["non_commercial"]
    assert not rows["mnist"]["non_commercial"] and not rows["cifar10h"]["loadable"]
    out = format_catalog(list(rows.values()))
    assert str(tmp_path / "cifar100" / "cifar-100-python" / "train") in out
    assert "cifar10n" in out and "NON-COMMERCIAL" in out and "never downloads" in out


def test_catalog_alternatives(tmp_path):
    write_cifar10_pickles(tmp_path)
    write_mnist(tmp_path, gz=False)
    rows = {r["name"]: r for r in describe_datasets(tmp_path, verify=False)}
    assert rows["cifar10"]["status"] == "present"  # pickles stand in for the JPEG archive
    assert rows["cifar10n"]["status"] == "incomplete"  # cifar10n_labels.npz is required there
    assert rows["mnist"]["status"] == "present" and rows["mnist"]["checksum"] == "unverified"


def test_catalog_real(shared_data):
    need(shared_data, "mnist", "sst", "twitter-pos", "cifar10")
    rows = {r["name"]: r for r in describe_datasets(shared_data)}
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar10n", "sst", "twitter_pos", "cifar10h"):
        assert rows[name]["status"] == "present" and rows[name]["checksum"] == "ok", name
