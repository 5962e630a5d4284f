"""Streamed image datasets: a miniature Clothing1M folder of generated JPEGs trains end to
end through DataLoader workers; bad annotation files, undecodable images and weights for
another architecture are clear errors; the ResNet-50 has torchvision's names and size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from metacorrect.data import load_dataset  # noqa: E402
from metacorrect.data.base import MissingDataError  # noqa: E402
from metacorrect.data.clothing1m import CLASSES  # noqa: E402
from metacorrect.data.streaming import ImageDecodeError, ImageNetTransform, StreamLoader  # noqa: E402
from metacorrect.distributed import World  # noqa: E402
from metacorrect.experiments.run import RunConfig, run_experiment  # noqa: E402
from metacorrect.models import create_model, load_init_weights  # noqa: E402


def make_clothing1m(root, n_noisy=40, n_clean=16, n_test=12, seed=0):
    """The distributed layout (annotations/*.txt, images/<a>/<b>/<n>.jpg) with small JPEGs
    whose colour follows the clean label."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder = root / "clothing1m"
    (folder / "annotations").mkdir(parents=True)
    keys, labels = [], []
    for i in range(n_noisy + n_clean + n_test):
        label = int(rng.integers(0, 4))  # 4 of the 14 classes occur
        key = f"images/{i % 3}/{i % 7:02d}/{i}.jpg"
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        colour = np.array([60 * label, 255 - 60 * label, 128], dtype=np.uint8)
        pixels = np.clip(colour + rng.normal(0, 20, (40 + i % 5, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / key, quality=90)
        keys.append(key)
        labels.append(label)
    noisy, clean, test = keys[:n_noisy], keys[n_noisy:n_noisy + n_clean], keys[n_noisy + n_clean:]
    flip = lambda y: (y + 1) % 4 if rng.random() < 0.3 else y  # noqa: E731
    ann = folder / "annotations"
    (ann / "noisy_label_kv.txt").write_text("".join(f"{k} {flip(y)}\n" for k, y in zip(keys[:n_noisy], labels)))
    (ann / "clean_label_kv.txt").write_text("".join(f"{k} {y}\n" for k, y in zip(keys[n_noisy:], labels[n_noisy:])))
    (ann / "noisy_train_key_list.txt").write_text("\n".join(noisy) + "\n")
    (ann / "clean_train_key_list.txt").write_text("\n".join(clean) + "\n")
    (ann / "clean_test_key_list.txt").write_text("\n".join(test) + "\n")
    return folder


def _small(dataset):
    """The miniature at 32×32 crops (resize 36): the recipe's code path, a CPU-sized image."""
    train_t, eval_t = ImageNetTransform(True, size=32, resize=36), ImageNetTransform(False, size=32, resize=36)
    from metacorrect.data.streaming import FilesBatchTransform
    dataset.extra["streamed"] = (train_t, eval_t)
    dataset.train_transform, dataset.test_transform = FilesBatchTransform(train_t), FilesBatchTransform(eval_t)
    return dataset


@pytest.mark.filterwarnings("ignore:the trusted set has no example")  # 4 of the 14 classes occur
def test_a_miniature_clothing1m_trains_streamed_with_two_loader_workers(tmp_path):
    make_clothing1m(tmp_path)
    ds = _small(load_dataset("clothing1m-stream", tmp_path))
    assert len(ds.x_train) == 56 and len(ds.x_test) == 12 and ds.class_names == CLASSES
    assert ds.input_shape == (3, 32, 32)
    config = RunConfig(dataset="clothing1m-stream", data_dir=str(tmp_path), label_set="noisy", trusted=16,
                       method="mlc", method_options={"t_init": "identity", "update_every": 2}, model="resnet8",
                       batch_size=8, epochs=2, loader_workers=2, device="cpu", seed=0)
    summary = run_experiment(config, tmp_path / "run", dataset=ds)
    assert summary["world_size"] == 1 and 0 <= summary["final_test_acc"] <= 1
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    labels = np.load(tmp_path / "run" / "labels.npz")
    assert len(labels["trusted_idx"]) == 16 and len(labels["noisy_idx"]) == 40


def test_stream_loader_shards_are_the_global_batch_and_reshuffle_each_epoch(tmp_path):
    make_clothing1m(tmp_path, n_noisy=10, n_clean=4, n_test=2)
    ds = _small(load_dataset("clothing1m-stream", tmp_path))
    labels = torch.arange(len(ds.x_train))  # the labels name the examples
    train_t = ds.extra["streamed"][0]

    def epochs(world, n=2):
        loader = StreamLoader(ds.x_train, labels, 4, transform=train_t, seed=3, world=world)
        return [[(y.tolist(), loader.last_count) for _, y in loader] for _ in range(n)]

    one = epochs(World())
    ranks = [epochs(World(r, 3)) for r in range(3)]
    for e in range(2):
        for b, (ys, (local, total)) in enumerate(one[e]):
            assert local == total == len(ys)
            union = sum((ranks[r][e][b][0] for r in range(3)), [])
            assert union == ys and sum(ranks[r][e][b][1][0] for r in range(3)) == total
    assert one[0] != one[1]  # a new order each epoch
    assert sorted(sum((ys for ys, _ in one[0]), [])) == list(range(len(labels)))


def test_missing_annotation_file_names_it(tmp_path):
    folder = make_clothing1m(tmp_path, n_noisy=4, n_clean=2, n_test=2)
    (folder / "annotations" / "clean_test_key_list.txt").unlink()
    with pytest.raises(MissingDataError, match="clean_test_key_list.txt"):
        load_dataset("clothing1m-stream", tmp_path)


def test_an_image_that_does_not_decode_is_an_error_naming_the_file(tmp_path):
    folder = make_clothing1m(tmp_path, n_noisy=4, n_clean=2, n_test=2)
    bad = sorted((folder / "images").rglob("*.jpg"))[0]
    bad.write_bytes(b"not a jpeg at all")
    ds = _small(load_dataset("clothing1m-stream", tmp_path))
    loader = StreamLoader(ds.x_train, torch.zeros(len(ds.x_train), dtype=torch.long), 8,
                          transform=ds.extra["streamed"][0], workers=0)
    with pytest.raises(ImageDecodeError, match=bad.name):
        list(loader)


def test_resnet50_has_torchvisions_names_and_size():
    model = create_model("resnet50", (3, 224, 224), 1000)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50
    assert len(state) == 320
    for name, shape in [("conv1.weight", (64, 3, 7, 7)), ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
                        ("layer2.0.conv2.weight", (128, 128, 3, 3)), ("layer4.2.bn3.running_var", (2048,)),
                        ("fc.weight", (1000, 2048))]:
        assert tuple(state[name].shape) == shape, name


def test_init_weights_load_replace_the_head_and_refuse_another_architecture(tmp_path):
    small = dict(blocks=(1, 1), base=8)
    source = create_model("resnet50", (3, 32, 32), 1000, **small)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = create_model("resnet50", (3, 32, 32), 14, **small)
    assert load_init_weights(target, tmp_path / "w.pt") == ["fc.bias", "fc.weight"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    torch.save(create_model("resnet8", (3, 32, 32), 14).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another architecture"):
        load_init_weights(target, tmp_path / "other.pt")
    wrong = source.state_dict()
    wrong["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="layer1.0.conv1.weight has shape"):
        load_init_weights(target, tmp_path / "wrong.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable"):
        load_init_weights(target, tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_init_weights(target, tmp_path / "absent.pt")
