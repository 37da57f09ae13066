import numpy as np
import pytest

from tasks.digits import digits_splits, load_digits_uint8, split_of
from tasks.images import grid, save_grid_png


def test_digits_are_the_embedded_1797_images_as_uint8():
    images, labels, keys = load_digits_uint8()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert sorted(set(labels.tolist())) == list(range(10))
    assert len(set(keys)) == 1797


def test_split_is_deterministic_disjoint_and_close_to_the_fraction():
    a, b = digits_splits(0.1, 0.0), digits_splits(0.1, 0.0)  # two splits: no test share
    assert np.array_equal(a["val"][0], b["val"][0])
    n_val, n_train = len(a["val"][0]), len(a["train"][0])
    assert n_val + n_train == 1797
    # binomial(1797, 0.1): sd ≈ 12.7
    assert abs(n_val - 179.7) < 4 * 12.7
    # a key's side is a function of the key alone: the split holds exactly the images whose own
    # key says val, and the rule (SHA-256 of the key) is pinned, so no sample changes side
    images, _, keys = load_digits_uint8()
    is_val = np.array([split_of(k, 0.1) == "val" for k in keys])
    assert np.array_equal(a["val"][0], images[is_val])
    assert np.array_equal(a["train"][0], images[~is_val])
    assert n_val == 165 and [k for k in keys if split_of(k, 0.1) == "val"][:4] == [
        "digits/0034", "digits/0059", "digits/0064", "digits/0075"]
    # a larger share holds out a superset (benchmarks/recipes.py judges models trained on either
    # split on the smaller one), and the default share is the pipeline's, 0.2
    val_of = {f: {k for k in keys if split_of(k, f) == "val"} for f in (0.1, 0.2)}
    assert val_of[0.1] < val_of[0.2] and len(digits_splits()["val"][0]) == len(val_of[0.2]) == 324
    with pytest.raises(ValueError, match="val_fraction"):
        split_of("k", 1.0)


def test_grid_places_every_image_with_padding():
    imgs = np.stack([np.full((1, 2, 2), i, np.uint8) for i in range(5)])
    g = grid(imgs, nrow=3, pad=1, pad_value=200)
    assert g.shape == (2 * 3 + 1, 3 * 3 + 1, 1)
    assert g[1, 1, 0] == 0 and g[1, 4, 0] == 1 and g[4, 1, 0] == 3 and g[4, 4, 0] == 4
    assert g[0, 0, 0] == 200 and g[4, 7, 0] == 200  # padding and the empty sixth cell
    with pytest.raises(ValueError, match="uint8"):
        grid(imgs.astype(np.float32), nrow=3)


def test_save_grid_png_round_trips(tmp_path):
    from PIL import Image

    imgs = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    path = save_grid_png(imgs, tmp_path / "g.png", nrow=3, scale=2)
    with Image.open(path) as im:
        assert im.mode == "RGB"
        arr = np.asarray(im)
    np.testing.assert_array_equal(
        arr[2:10, 2:10], imgs[0].transpose(1, 2, 0).repeat(2, 0).repeat(2, 1)
    )
    assert not list(tmp_path.glob("*.tmp"))


def test_test_split_is_locked_disjoint_and_stable():
    """Three splits by the key's hash: val takes the bottom ``val_fraction`` of the hash range
    and test the top ``test_fraction``, so a key's side depends on the key and the fractions
    alone, val is the same images whatever test_fraction is, and test the same whatever
    val_fraction is (a selection split grown for a benchmark never takes test images)."""
    images, _, keys = load_digits_uint8()
    side = {f: [split_of(k, *f) for k in keys] for f in ((0.2, 0.0), (0.2, 0.15), (0.3, 0.15))}
    for sides in side.values():
        assert set(sides) <= {"train", "val", "test"}
    # the listing's order changes nothing: each key's side is a function of the key
    assert [split_of(k, 0.2, 0.15) for k in reversed(keys)] == side[(0.2, 0.15)][::-1]
    of = {f: {s: {k for k, x in zip(keys, sides, strict=True) if x == s}
              for s in ("train", "val", "test")} for f, sides in side.items()}
    new = of[(0.2, 0.15)]
    assert not (new["val"] & new["test"] or new["val"] & new["train"] or new["test"] & new["train"])
    assert len(new["val"]) + len(new["test"]) + len(new["train"]) == 1797
    # val is unchanged by test_fraction (324 at 0.2); test only takes rows that were train
    assert new["val"] == of[(0.2, 0.0)]["val"] and len(new["val"]) == 324
    assert not of[(0.2, 0.0)]["test"] and new["test"] < of[(0.2, 0.0)]["train"]
    assert of[(0.3, 0.15)]["test"] == new["test"]
    # binomial(1797, 0.15): sd ≈ 15.1; the default split is the pipeline's, with its test rows
    assert abs(len(new["test"]) - 269.6) < 4 * 15.1
    default = digits_splits()
    assert len(default["test"][0]) == len(new["test"]) and len(default["val"][0]) == 324
    assert sum(len(default[s][0]) for s in ("train", "val", "test")) == 1797
    is_test = np.array([k in new["test"] for k in keys])
    assert np.array_equal(default["test"][0], images[is_test])
    with pytest.raises(ValueError, match="test_fraction"):
        split_of("k", 0.5, 0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        split_of("k", 0.2, -0.1)
