"""A user's own data: .npz, .csv and image folders, and their error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metacorrect.data import load_dataset, make_problem
from metacorrect.data.user import load_user_data


def npz_arrays(rng=None, n_noisy=20, n_trusted=6, n_test=4, d=5, C=3):
    rng = rng or np.random.default_rng(0)
    return {"x_noisy": rng.normal(size=(n_noisy, d)), "y_noisy": np.arange(n_noisy) % C,
            "x_trusted": rng.normal(size=(n_trusted, d)), "y_trusted": np.arange(n_trusted) % C,
            "x_test": rng.normal(size=(n_test, d)), "y_test": np.arange(n_test) % C}


def test_npz(tmp_path):
    arrays = npz_arrays()
    T = np.full((3, 3), 0.1) + 0.7 * np.eye(3)
    np.savez(tmp_path / "mine.npz", T_true=T, class_names=np.array(["a", "b", "c"]), **arrays)
    ds = load_dataset(tmp_path / "mine.npz")
    assert ds.name == "mine" and ds.num_classes == 3 and ds.class_names == ["a", "b", "c"]
    assert ds.x_train.shape == (26, 5) and ds.x_train.dtype == torch.float32 and ds.x_test.shape == (4, 5)
    assert ds.trusted_mask.tolist() == [False] * 20 + [True] * 6 and not ds.clean_labels_known
    np.testing.assert_allclose(ds.x_train[20:].numpy(), arrays["x_trusted"], rtol=1e-6)
    np.testing.assert_allclose(ds.T_true, T)
    problem = make_problem(ds, seed=0)
    assert problem.trusted_idx.tolist() == list(range(20, 26))
    np.testing.assert_array_equal(problem.y_noisy, arrays["y_noisy"])
    np.testing.assert_allclose(problem.T_true, T)


def test_npz_without_test_set(tmp_path):
    arrays = npz_arrays()
    del arrays["x_test"], arrays["y_test"]
    np.savez(tmp_path / "d.npz", **arrays)
    ds = load_user_data(tmp_path / "d.npz")
    assert ds.x_test is None and ds.y_test is None and ds.num_classes == 3


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_trusted"), r"missing required array\(s\) y_trusted"),
    (lambda a: a.update(y_noisy=a["y_noisy"][:-1]), r"noisy part has 20 inputs but 19 labels"),
    (lambda a: a["x_noisy"].__setitem__((3, 1), np.nan), r"x_noisy contains NaN or Inf .*first in row 3"),
    (lambda a: a["x_test"].__setitem__((0, 0), np.inf), r"x_test contains NaN or Inf"),
    (lambda a: a.update(y_noisy=a["y_noisy"].astype(float)), r"y_noisy must have an integer dtype, got float64"),
    (lambda a: a.update(y_noisy=a["y_noisy"] + 0.5), r"y_noisy must hold integer class labels"),
    (lambda a: a.update(y_trusted=a["y_trusted"] - 1), r"y_trusted contains -1, out of range"),
    (lambda a: a.update(x_trusted=np.zeros((0, 5)), y_trusted=np.zeros(0, int)), r"no trusted examples"),
    (lambda a: a.update(x_trusted=a["x_trusted"][:, :4]), r"inputs differ in shape between parts"),
    (lambda a: a.pop("y_test"), r"x_test and y_test must be given together"),
    (lambda a: a.update(T_true=np.eye(2)), r"T_true is 2×2 but there are 3 classes|out of range"),
])
def test_npz_bad_input(tmp_path, change, message):
    arrays = npz_arrays()
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_user_data(tmp_path / "bad.npz")


def test_npz_labels_out_of_range_for_num_classes(tmp_path):
    np.savez(tmp_path / "d.npz", **npz_arrays())
    with pytest.raises(ValueError, match=r"noisy labels contain 2, out of range: expected class indices in \[0, 1\]"):
        load_user_data(tmp_path / "d.npz", num_classes=2)


def test_trusted_set_missing_a_class_warns(tmp_path):
    arrays = npz_arrays()
    arrays["y_trusted"] = np.zeros(6, int)
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.warns(UserWarning, match="trusted set has no example of class"):
        ds = load_user_data(tmp_path / "d.npz")
    assert ds.num_classes == 3


def write_csv(path, rows, header="f1,f2,label,trusted,split"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_csv_integer_labels(tmp_path):
    rows = [f"{i},{i * 0.5},{i % 3},{int(i >= 7)},train" for i in range(10)] + ["1,2,0,,test", "3,4,2,0,test"]
    ds = load_dataset(write_csv(tmp_path / "d.csv", rows))
    assert ds.x_train.shape == (10, 2) and ds.x_test.shape == (2, 2) and ds.num_classes == 3
    assert ds.trusted_mask.sum() == 3 and ds.y_test.tolist() == [0, 2]
    assert ds.x_train[-1].tolist() == [9.0, 4.5]  # trusted rows come last
    assert ds.class_names == ["0", "1", "2"]


def test_csv_string_labels(tmp_path):
    rows = ["1,2,dog,0", "2,3,cat,1", "3,4,bird,0", "4,5,dog,1", "5,6,cat,0", "6,7,bird,yes"]
    ds = load_user_data(write_csv(tmp_path / "d.csv", rows, header="a,b,label,trusted"))
    assert ds.class_names == ["bird", "cat", "dog"] and ds.x_test is None
    assert ds.y_train.tolist() == [2, 0, 1, 1, 2, 0]  # noisy rows (dog, bird, cat), then trusted (cat, dog, bird)


@pytest.mark.parametrize("rows, message", [
    (["1,nan,0,1", "2,3,1,0"], r"line 2: column 'b' is 'nan'; features must be finite numbers"),
    (["1,inf,0,1", "2,3,1,0"], r"line 2: column 'b' is 'inf'"),
    (["1,x,0,1", "2,3,1,0"], r"line 2: column 'b' holds 'x', not a number"),
    (["1,2,0.5,1", "2,3,1,0"], r"non-integer label '0.5'"),
    (["1,2,-1,1", "2,3,1,0"], r"label -1 out of range"),
    (["1,2,0,0", "2,3,1,0"], r"no trusted examples"),
    (["1,2,0,maybe", "2,3,1,0"], r"line 2: trusted = 'maybe'; expected 1"),
    (["1,2,0", "2,3,1,0"], r"line 2: 3 fields, the header has 4"),
    (["1,2,,1", "2,3,1,0"], r"line 2: empty 'label'"),
])
def test_csv_bad_input(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_user_data(write_csv(tmp_path / "bad.csv", rows, header="a,b,label,trusted"))


def test_csv_without_label_column(tmp_path):
    with pytest.raises(ValueError, match=r"no 'label' column in the header \['a', 'b', 'y'\]"):
        load_user_data(write_csv(tmp_path / "d.csv", ["1,2,0"], header="a,b,y"))


def test_csv_labels_out_of_range_for_num_classes(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["1,2,0,1", "2,3,4,0"], header="a,b,label,trusted")
    with pytest.raises(ValueError, match=r"labels contain 4, out of range"):
        load_user_data(path, num_classes=3)


def write_images(root, layout):
    from PIL import Image
    for split, classes in layout.items():
        for cls, sizes in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i, size in enumerate(sizes):
                Image.new("RGB" if i % 2 == 0 else "L", size, 200).save(root / split / cls / f"{i}.png")


def test_image_folders(tmp_path):
    write_images(tmp_path, {"train": {"cat": [(12, 10), (20, 20)], "dog": [(12, 10)]},
                            "trusted": {"cat": [(12, 10)], "dog": [(12, 10), (5, 5)]},
                            "test": {"dog": [(12, 10)]}})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert ds.x_train.shape == (6, 3, 10, 12) and ds.x_train.dtype == torch.uint8  # first image: 12 wide, 10 high
    assert ds.y_train.tolist() == [0, 0, 1, 0, 1, 1] and ds.trusted_mask.tolist() == [False] * 3 + [True] * 3
    assert ds.x_test.shape == (1, 3, 10, 12) and ds.y_test.tolist() == [1]
    out = ds.test_transform(ds.x_train[:2])
    assert out.dtype == torch.float32 and abs(float(out.max()) - 200 / 255) < 1e-5
    sized = load_user_data(tmp_path, image_size=8)
    assert sized.x_train.shape == (6, 3, 8, 8) and sized.input_shape == (3, 8, 8)


def test_image_folders_errors(tmp_path):
    write_images(tmp_path, {"train": {"cat": [(8, 8)], "dog": [(8, 8)]}})
    with pytest.raises(ValueError, match=r"no trusted/ folder"):
        load_user_data(tmp_path)
    write_images(tmp_path, {"trusted": {"cat": [(8, 8)]}})
    with pytest.warns(UserWarning, match="trusted set has no example of class.*dog"):
        load_user_data(tmp_path)
    (tmp_path / "trusted" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"bad.jpg: cannot read image"):
        load_user_data(tmp_path)


def test_unsupported_file(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'"):
        load_user_data(tmp_path / "d.txt")
