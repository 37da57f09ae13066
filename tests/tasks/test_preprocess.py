"""The preprocessing stage end to end on a local Ray: sources, manifest, versions, faults; and
its pieces without Ray (dataset names, the local listing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.datasets import (
    MANIFEST,
    SPLITS,
    DataConfig,
    list_versions,
    open_dataset,
    part_files,
    split_of,
)
from tasks.decode import decode_image
from tasks.errors import DatasetNotFound, PreprocessError
from tasks.preprocess import preprocess
from tasks.runtime import RuntimeConfig
from tests.helpers import BAD_FILES, encode, make_folder, png_bytes, smooth_rgb

REPO = Path(__file__).resolve().parents[2]


def run(source, root, **data) -> tuple:
    cfg = DataConfig(name=data.pop("name", "ds"), source=str(source), **data)
    rt = RuntimeConfig(root=str(root))
    res = preprocess(cfg, rt, echo=lambda s: None)
    return res, cfg, rt


def read_split(root: Path, manifest: dict, split: str) -> pa.Table:
    rt = RuntimeConfig(root=str(root))
    paths = part_files(rt.root_location(), manifest, split)
    tables = [pq.read_table(p) for p in paths]
    return pa.concat_tables(tables) if tables else None


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    files = make_folder(src)
    return src, files


def test_image_folder_round_trip(ray_local, folder, tmp_path):
    src, files = folder
    root = tmp_path / "root"
    res, _, _ = run(src, root, resolution=8, channels=3, val_fraction=0.3)
    m = res.manifest
    assert not res.reused and res.ref.version == m["version"]
    assert (Path(res.ref.uri) / MANIFEST).is_file()

    # labels from the first folder level, root files unlabelled, classes sorted
    assert m["class_names"] == ["cat", "dog"] and m["num_classes"] == 2
    assert m["shape"] == [3, 8, 8] and m["layout"] == "CHW" and m["dtype"] == "uint8"
    good = {k: v for k, v in files.items()
            if not k.startswith(".") and k.split("/")[-1] not in BAD_FILES}
    assert m["rows"] == len(good) == 15
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {f"cat/{n}" for n in BAD_FILES}
    for name, reason in BAD_FILES.items():
        assert reason in skipped[f"cat/{name}"]

    rows = {}
    for split in SPLITS:
        t = read_split(root, m, split)
        info = m["splits"][split]
        if t is None:  # no rows of this split among the few inputs
            assert info["rows"] == 0 and not info["files"]
            continue
        assert t.num_rows == info["rows"] == sum(f["rows"] for f in info["files"])
        assert t.schema.field("pixels").type == pa.binary(3 * 8 * 8)
        for key, label, px in zip(*(t.column(c).to_pylist() for c in ("key", "label", "pixels")),
                                  strict=True):
            assert split_of(key, 0.3, 0.15) == split  # val_fraction 0.3, test_fraction default
            rows[key] = (label, px)
        arr = np.frombuffer(b"".join(t.column("pixels").to_pylist()), np.uint8)
        arr = arr.reshape(-1, 3, 64).astype(np.float64) / 255
        np.testing.assert_allclose(info["mean"], arr.mean(axis=(0, 2)), atol=1e-5)
        np.testing.assert_allclose(info["std"], arr.std(axis=(0, 2)), atol=1e-5)
    assert set(rows) == set(good)
    for key, data in good.items():
        label, px = rows[key]
        assert label == ({"cat": 0, "dog": 1}[key.split("/")[0]] if "/" in key else None)
        expect = decode_image(data, resolution=8, mode="RGB", max_pixels=10**8)
        assert px == expect.tobytes()
    counts = {c: sum(m["splits"][s]["class_counts"][c] for s in SPLITS) for c in ("cat", "dog")}
    assert counts == {"cat": 6, "dog": 6}
    assert sum(m["splits"][s]["unlabelled"] for s in SPLITS) == 3
    assert m["preprocessing"]["resolution"] == 8 and m["source"]["inputs"] == len(files) - 1

    # readers go through the manifest
    ref, m2 = open_dataset(RuntimeConfig(root=str(root)).root_location(), "ds")
    assert ref == res.ref and m2 == m


def test_rerun_on_unchanged_input_does_nothing(ray_local, folder, tmp_path):
    src, _ = folder
    root = tmp_path / "root"
    first, _, _ = run(src, root, channels=3)
    manifest_path = Path(first.ref.uri) / MANIFEST
    before = {p: (root / p).stat().st_mtime_ns for p in all_files(root)}
    again, _, _ = run(src, root, channels=3)
    assert again.reused and again.ref == first.ref and again.manifest == first.manifest
    assert {p: (root / p).stat().st_mtime_ns for p in all_files(root)} == before
    assert manifest_path.read_bytes() == json.dumps(first.manifest, indent=2).encode() + b"\n"

    # a changed setting or a touched file is a new version; the old one is untouched
    other, _, _ = run(src, root, channels=3, resolution=12)
    assert other.ref.version != first.ref.version and not other.reused
    os.utime(src / "dog" / "img000.png", (1, 1))
    touched, _, _ = run(src, root, channels=3)
    assert touched.ref.version not in (first.ref.version, other.ref.version)
    for p, mtime in before.items():
        assert (root / p).stat().st_mtime_ns == mtime
    versions = list_versions(RuntimeConfig(root=str(root)).root_location(), "ds")
    assert [v["version"] for v in versions][-1] == touched.ref.version and len(versions) == 3
    assert open_dataset(RuntimeConfig(root=str(root)).root_location(), "ds")[0] == touched.ref


def test_strict_mode_names_the_bad_files_and_commits_nothing(ray_local, folder, tmp_path):
    src, _ = folder
    root = tmp_path / "root"
    with pytest.raises(PreprocessError, match=r"notes.txt") as e:
        run(src, root, strict=True, channels=3)
    assert "data.strict" in str(e.value)
    (src / "cat" / "notes.txt").unlink()  # listing-time problem fixed; decode-time ones remain
    with pytest.raises(PreprocessError) as e:
        run(src, root, strict=True, channels=3)
    for name in set(BAD_FILES) - {"notes.txt"}:
        assert f"cat/{name}" in str(e.value)
    assert not list(root.rglob(MANIFEST)) and not list(root.rglob("*.parquet"))


def test_strict_run_refuses_a_committed_version_with_skips(ray_local, folder, tmp_path):
    src, _ = folder
    root = tmp_path / "root"
    run(src, root, channels=3)
    with pytest.raises(PreprocessError, match=r"truncated.png"):
        run(src, root, channels=3, strict=True)


def test_empty_and_all_bad_sources_fail_without_a_manifest(ray_local, tmp_path):
    root = tmp_path / "root"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PreprocessError, match=r"no usable input"):
        run(empty, root)
    with pytest.raises(PreprocessError, match=r"does not exist"):
        run(tmp_path / "nope", root)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_bytes(b"garbage")
    (bad / "c.txt").write_bytes(b"x")
    with pytest.raises(PreprocessError, match=r"every input .* is bad"):
        run(bad, root)
    only_txt = tmp_path / "txt"
    only_txt.mkdir()
    (only_txt / "c.txt").write_bytes(b"x")
    with pytest.raises(PreprocessError, match=r"no usable input.*not an image"):
        run(only_txt, root)
    assert not list(root.rglob(MANIFEST)) and not list(root.rglob("*.parquet"))
    with pytest.raises(DatasetNotFound, match=r"preprocess"):
        open_dataset(RuntimeConfig(root=str(root)).root_location(), "ds")


def test_digits_source(ray_local, tmp_path):
    res, _, _ = run("digits", tmp_path, name="digits")
    m = res.manifest
    assert m["rows"] == 1797 and m["shape"] == [1, 8, 8] and m["class_names"] == list("0123456789")
    assert m["splits"]["val"]["rows"] == 324 and not m["skipped"]
    assert m["splits"]["test"]["rows"] == 271 and m["preprocessing"]["test_fraction"] == 0.15
    from tasks.digits import digits_splits

    keys = {}
    for split in ("train", "val", "test"):  # the default split: val 0.2, test 0.15
        images, labels = digits_splits()[split]
        t = read_split(tmp_path, m, split).sort_by("key")
        got = np.frombuffer(b"".join(t.column("pixels").to_pylist()), np.uint8).reshape(
            -1, 1, 8, 8)
        np.testing.assert_array_equal(got, images)
        np.testing.assert_array_equal(t.column("label").to_numpy(), labels)
        keys[split] = set(t.column("key").to_pylist())
    assert sum(map(len, keys.values())) == len(set().union(*keys.values())) == 1797
    up, _, _ = run("digits", tmp_path, name="digits", resolution=16, channels=3)
    assert up.manifest["shape"] == [3, 16, 16] and up.ref.version != res.ref.version


def test_a_two_split_manifest_opens_and_asking_it_for_test_says_how_to_get_one(tmp_path):
    """A version committed before the test split existed lists only train and val: it opens
    and reads as before; its test split is refused naming the version and the fix."""
    root = RuntimeConfig(root=str(tmp_path)).root_location()
    vdir = tmp_path / "datasets" / "old" / "0123456789abcdef"
    (vdir / "train").mkdir(parents=True)
    split = {"rows": 0, "class_counts": {}, "unlabelled": 0, "mean": [0.0], "std": [0.0]}
    m = {"format": "diffusion-pipeline/dataset", "format_version": 1, "name": "old",
         "version": "0123456789abcdef", "created_at": "2026-01-01T00:00:00+00:00",
         "shape": [1, 8, 8], "preprocessing": {"val_fraction": 0.2}, "skipped": [],
         "splits": {"train": split | {"files": [{"path": "train/part-a-00000.parquet",
                                                  "rows": 0, "bytes": 0}]},
                    "val": split | {"files": []}}}
    (vdir / MANIFEST).write_text(json.dumps(m))
    ref, got = open_dataset(root, "old")
    assert ref.version == "0123456789abcdef" and set(got["splits"]) == {"train", "val"}
    assert part_files(root, got, "train")[0].endswith("train/part-a-00000.parquet")
    assert part_files(root, got, "val") == []
    with pytest.raises(DatasetNotFound, match=r"old@0123456789abcdef has no test split.*"
                       r"data\.test_fraction > 0"):
        part_files(root, got, "test")


def _hf_parquet(path: Path, n: int, names: list[str]) -> list[bytes]:
    images = [png_bytes(smooth_rgb(i)) for i in range(n)]
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array([i % len(names) for i in range(n)], pa.int64()),
    })
    hf = {"info": {"features": {
        "image": {"_type": "Image"},
        "label": {"names": names, "_type": "ClassLabel"},
    }}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(hf)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)
    return images


def test_parquet_source_hugging_face_layout(ray_local, tmp_path):
    src = tmp_path / "hf" / "data"
    images = _hf_parquet(src / "train-00000-of-00001.parquet", 10, ["airplane", "ship", "frog"])
    (src / "_SUCCESS").write_bytes(b"")
    res, _, _ = run(src, tmp_path / "root", channels=3, val_fraction=0.2)
    m = res.manifest
    assert m["source"]["kind"] == "parquet" and m["rows"] == 10
    assert m["class_names"] == ["airplane", "ship", "frog"]
    t = pa.concat_tables([read_split(tmp_path / "root", m, s) for s in SPLITS
                          if m["splits"][s]["rows"]])
    by_key = {k: (lab, px) for k, lab, px in zip(*(t.column(c).to_pylist()
                                                   for c in ("key", "label", "pixels")),
                                                 strict=True)}
    for i, data in enumerate(images):
        lab, px = by_key[f"train-00000-of-00001.parquet#{i}"]
        assert lab == i % 3
        assert px == decode_image(data, resolution=8, mode="RGB", max_pixels=10**8).tobytes()


def test_parquet_source_plain_binary_string_labels_custom_columns(ray_local, tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({
        "id": [f"id-{i}" for i in range(6)],
        "jpeg": [encode(Image.fromarray(smooth_rgb(i)), "JPEG") for i in range(6)],
        "species": ["owl", "cat", "owl", None, "cat", "owl"],
    }), path)
    res, _, _ = run(path, tmp_path / "root", image_column="jpeg", label_column="species",
                    key_column="id", val_fraction=0.0, test_fraction=0.0)  # all train
    m = res.manifest
    assert m["class_names"] == ["cat", "owl"] and m["splits"]["train"]["unlabelled"] == 1
    assert m["splits"]["train"]["class_counts"] == {"cat": 2, "owl": 3}
    keys = read_split(tmp_path / "root", m, "train").column("key").to_pylist()
    assert sorted(keys) == [f"id-{i}" for i in range(6)]
    with pytest.raises(PreprocessError, match=r"no image column 'image'.*data.image_column"):
        run(path, tmp_path / "root2")


def test_killed_run_leaves_no_version_and_rerun_completes(ray_local, folder, tmp_path):
    src, _ = folder
    root = tmp_path / "root"
    env = {**os.environ, "DIFFUSION_PIPELINE_FAULT": "preprocess-before-commit",
           "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("RAY_ADDRESS", None)
    code = (
        "from tasks.datasets import DataConfig; from tasks.runtime import RuntimeConfig;"
        "from tasks.preprocess import preprocess;"
        f"preprocess(DataConfig(name='ds', source={str(src)!r}, channels=3),"
        f" RuntimeConfig(root={str(root)!r}, ray_num_cpus=1))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(root.rglob("*.parquet")), "the killed run had written its part files"
    assert not list(root.rglob(MANIFEST))
    with pytest.raises(DatasetNotFound):
        open_dataset(RuntimeConfig(root=str(root)).root_location(), "ds")

    res, _, _ = run(src, root, channels=3)
    assert not res.reused and res.manifest["rows"] == 15
    listed = {f["path"] for s in SPLITS for f in res.manifest["splits"][s]["files"]}
    on_disk = {str(p.relative_to(res.ref.uri)) for p in Path(res.ref.uri).rglob("*.parquet")}
    assert listed < on_disk  # the dead run's parts are still there, but not in the manifest
    assert all(res.manifest["writer"]["run_id"] in p for p in listed)


def test_concurrent_runs_of_one_version(ray_local, folder, tmp_path):
    src, _ = folder
    root = tmp_path / "root"
    results, errors = [], []

    def go():
        try:
            results.append(run(src, root, channels=3)[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    a, b = results
    assert a.ref == b.ref and a.manifest == b.manifest
    listed = {f["path"] for s in SPLITS for f in a.manifest["splits"][s]["files"]}
    on_disk = {str(p.relative_to(a.ref.uri)) for p in Path(a.ref.uri).rglob("*.parquet")}
    assert listed == on_disk  # the loser removed its own parts
    assert read_split(root, a.manifest, "train").num_rows == a.manifest["splits"]["train"]["rows"]


def test_no_name_escapes_the_dataset_dir(ray_local, tmp_path):
    src = tmp_path / "src"
    for cls in ("we..ird", "a b", "ünï", "-rf", "..hidden"):
        (src / cls).mkdir(parents=True)
        (src / cls / "x.png").write_bytes(png_bytes(smooth_rgb(1)))
    (src / "we..ird" / "..png").write_bytes(png_bytes(smooth_rgb(2)))
    root = tmp_path / "root"
    res, _, _ = run(src, root, channels=3)
    # names are labels only; hidden entries ('.'-prefixed) are ignored like .DS_Store
    assert res.manifest["class_names"] == sorted(["we..ird", "a b", "ünï", "-rf"])
    assert res.manifest["rows"] == 4
    vdir = Path(res.ref.uri).relative_to(root)
    for p in all_files(root):
        assert p.startswith(str(vdir) + "/")


def test_a_dataset_name_cannot_name_a_path():
    for bad in ("../evil", "a/b", "..", ".hidden", "", "x" * 200):
        with pytest.raises(ValueError, match=r"data.name"):
            DataConfig(name=bad)


def test_local_listing_matches_fsspec_and_survives_link_loops(tmp_path):
    from tasks.preprocess.listing import _find, _find_local
    from tasks.storage import Location

    src = tmp_path / "src"
    make_folder(src, per_class=2, bad=False)
    loc = Location.of(str(src))
    assert _find_local(str(src)) == {
        p: {k: i[k] for k in ("name", "size", "type", "mtime")}
        for p, i in loc.fs.find(str(src), detail=True, withdirs=False).items()
    }
    (src / "cat" / "loop").symlink_to(src / "cat", target_is_directory=True)
    assert set(_find(loc)) >= set(_find_local(str(src))) - {""}


def test_links_that_lead_outside_the_source_are_not_followed(tmp_path):
    """An image folder with symbolic links: one to a file elsewhere and one to a folder
    elsewhere are skipped with the reason, nothing behind them is listed; a link that stays
    inside the source is followed as before. A Parquet source refuses such a part."""
    from tasks.preprocess.sources import list_source

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    make_folder(src, per_class=2, unlabelled=0, bad=False)
    make_folder(elsewhere, per_class=3, unlabelled=0, bad=False, classes=("secret",))
    (src / "cat" / "passwd.png").symlink_to(elsewhere / "secret" / "img000.png")
    (src / "bird").symlink_to(elsewhere / "secret", target_is_directory=True)
    (src / "dog" / "again.png").symlink_to(src / "cat" / "img000.png")  # inside: followed

    listing = list_source(DataConfig(source=str(src)), RuntimeConfig())
    keys = {u["key"] for u in listing.units}
    assert "dog/again.png" in keys
    assert not any(k.startswith(("bird", "cat/passwd")) for k in keys)
    assert {s["key"]: s["reason"] for s in listing.skipped} == {
        "cat/passwd.png": "a symbolic link to outside data.source (not followed)",
        "bird": "a symbolic link to outside data.source (not followed)"}
    assert listing.class_names == ["cat", "dog"]

    pq_src = tmp_path / "pq"
    pq_src.mkdir()
    pq.write_table(pa.table({"image": [b"x"]}), elsewhere / "part.parquet")
    (pq_src / "part-0.parquet").symlink_to(elsewhere / "part.parquet")
    with pytest.raises(PreprocessError, match=r"part-0.parquet is a symbolic link to outside"):
        list_source(DataConfig(source=str(pq_src), format="parquet"), RuntimeConfig())


def test_a_file_over_the_byte_cap_is_skipped_from_the_listing_unread(tmp_path):
    """A 300 MB file named .jpg (sparse: nothing is written) is refused by its listed size,
    before any task reads it; the cap is a setting, and part of the version."""
    from tasks.preprocess.listing import version_of
    from tasks.preprocess.sources import list_source

    src = tmp_path / "src"
    make_folder(src, per_class=2, unlabelled=0, bad=False)
    with open(src / "cat" / "huge.jpg", "wb") as f:
        f.truncate(300 * 10**6)
    cfg = DataConfig(source=str(src))
    listing = list_source(cfg, RuntimeConfig())
    assert "cat/huge.jpg" not in {u["key"] for u in listing.units}
    assert listing.skipped == [{"key": "cat/huge.jpg", "reason":
                                f"300000000 bytes, over data.max_file_bytes={64 * 2**20}"}]
    roomy = DataConfig(source=str(src), max_file_bytes=400 * 10**6)
    assert "cat/huge.jpg" in {u["key"] for u in list_source(roomy, RuntimeConfig()).units}
    assert version_of(listing, cfg) != version_of(listing, roomy)


def _labelled_parquet(path: Path, labels: pa.Array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array([b"x"] * len(labels), pa.binary()),
                             "label": labels}), path)


@pytest.mark.parametrize("top", [20_000, 4_294_967_295])
def test_a_label_beyond_max_classes_is_refused_naming_file_label_and_key(tmp_path, top):
    """One corrupt integer label (4294967295 in a uint32 column) made the listing build
    range(label + 1) class names: four billion strings. Labels are class indices below
    data.max_classes, refused in one line naming the file, the label and the key."""
    from tasks.preprocess.sources import list_source

    _labelled_parquet(tmp_path / "src" / "a.parquet", pa.array([0, 1, 2], pa.uint32()))
    _labelled_parquet(tmp_path / "src" / "b.parquet", pa.array([1, top, None], pa.uint32()))
    cfg = DataConfig(source=str(tmp_path / "src"), format="parquet")
    with pytest.raises(PreprocessError) as e:
        list_source(cfg, RuntimeConfig())
    msg = str(e.value)
    assert "b.parquet" in msg and str(top) in msg and "data.max_classes" in msg, msg
    assert "\n" not in msg
    # a dataset that really has that many classes says so
    if top < 10**6:
        listing = list_source(cfg.model_copy(update={"max_classes": top + 1}), RuntimeConfig())
        assert len(listing.class_names) == top + 1


def test_negative_labels_name_the_file(tmp_path):
    from tasks.preprocess.sources import list_source

    _labelled_parquet(tmp_path / "src" / "neg.parquet", pa.array([0, -3], pa.int64()))
    with pytest.raises(PreprocessError, match=r"neg\.parquet.*-3"):
        list_source(DataConfig(source=str(tmp_path / "src"), format="parquet"), RuntimeConfig())


def test_too_many_distinct_string_labels_are_refused(tmp_path):
    """A label column of unique strings (an id column by mistake) would make a class per row."""
    from tasks.preprocess.sources import list_source

    _labelled_parquet(tmp_path / "src" / "a.parquet", pa.array(["cat", "dog"]))
    _labelled_parquet(tmp_path / "src" / "b.parquet", pa.array(["owl", "eel"]))
    cfg = DataConfig(source=str(tmp_path / "src"), format="parquet", max_classes=3)
    with pytest.raises(PreprocessError, match=r"b\.parquet.*more than data\.max_classes=3"):
        list_source(cfg, RuntimeConfig())
    assert list_source(cfg.model_copy(update={"max_classes": 4}),
                       RuntimeConfig()).class_names == ["cat", "dog", "eel", "owl"]


def test_integer_and_string_labels_in_different_files_are_refused_naming_both(tmp_path):
    """Mixed label types raised a bare TypeError from max(); one line names a file of each."""
    from tasks.preprocess.sources import list_source

    _labelled_parquet(tmp_path / "src" / "a.parquet", pa.array([0, 1], pa.int64()))
    _labelled_parquet(tmp_path / "src" / "b.parquet", pa.array(["cat", None]))
    with pytest.raises(PreprocessError) as e:
        list_source(DataConfig(source=str(tmp_path / "src"), format="parquet"), RuntimeConfig())
    msg = str(e.value)
    assert "a.parquet" in msg and "b.parquet" in msg and "integer" in msg and "string" in msg
    assert "\n" not in msg
