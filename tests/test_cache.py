"""organseg.cache: building the HDF5 cache (fingerprints, atomicity, bad cases, CLI) and CacheReader."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers.synthetic_cases import (
    CLASSES,
    CountingOpener,
    make_card,
    make_nnunet_dataset,
    make_pddca_dataset,
    phantom,
    read_patch_in_child,
    truncate,
    write,
)
from organseg.cache import build as build_mod
from organseg.cache.build import CHUNKS, FORMAT_VERSION, body_bbox, build_cache, inspect_cache, label_stats
from organseg.cache.reader import PAD_VALUE, CacheError, CacheReader
from organseg.io.geometry import image_to_xyz, restore_original_geometry
from organseg.io.layouts import CaseError, list_cases, read_case

IDS = ("hn_000", "hn_001", "hn_002")


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "hn"
    make_nnunet_dataset(root, IDS)
    return root


@pytest.fixture
def dataset(tmp_path, raw_dataset):
    """A private copy of the raw dataset (tests modify it) and its card."""
    root = tmp_path / "hn"
    shutil.copytree(raw_dataset, root)
    return root, make_card(tmp_path, root)


@pytest.fixture(scope="module")
def built(tmp_path_factory, raw_dataset):
    tmp = tmp_path_factory.mktemp("built")
    card = make_card(tmp, raw_dataset)
    build_cache(card, workers=1, progress=False)
    return card


def _stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def _tmp_files(cache: Path):
    return sorted(cache.parent.glob(cache.name + ".tmp-*"))


# ---------------------------------------------------------------------------------- layout and attrs
def test_cache_layout_and_root_attrs(built):
    with h5py.File(built.cache, "r", locking=False) as f:
        a = f.attrs
        assert a["format_version"] == FORMAT_VERSION and bool(a["complete"]) is True
        assert len(a["fingerprint"]) == 64
        assert json.loads(a["classes"]) == CLASSES
        assert json.loads(a["case_ids"]) == list(IDS)
        assert json.loads(a["card"])["name"] == built.name
        assert list(a["hu_window"]) == [-160.0, 240.0]
        assert json.loads(a["norm"])["range"] == [-1.0, 1.0]
        assert a["axis_order"] == "xyz" and "T" in a["created"]
        assert json.loads(a["skipped"]) == []
        for cid in IDS:
            g = f[f"cases/{cid}"]
            img, lab = g["image"], g["label"]
            assert img.dtype == np.int16 and lab.dtype == np.uint8 and img.shape == lab.shape
            assert img.chunks == tuple(min(c, s) for c, s in zip(CHUNKS, img.shape))
            assert img.compression == "lzf" and img.shuffle and lab.compression == "lzf"
            assert tuple(g.attrs["shape"]) == img.shape
            assert list(g.attrs["spacing"]) == [1.0, 1.0, 3.0]
            arr = img[()]
            assert arr.min() >= -160 and arr.max() <= 240
            assert g.attrs["source_image"].endswith(f"{cid}_0000.nii.gz")


def test_stored_statistics_are_consistent_with_the_label(built):
    r = CacheReader(built.cache)
    for cid in IDS:
        _, label = r.read_case(cid)
        counts, boxes, centres = r.class_counts(cid), r.bboxes(cid), r.centres(cid)
        assert counts.shape == (4,) and boxes.shape == (4, 2, 3) and centres.shape == (4, 3)
        assert counts.sum() == np.prod(r.shape(cid))
        np.testing.assert_array_equal(counts, np.bincount(label.ravel(), minlength=4))
        for c in range(4):
            coords = np.argwhere(label == c)
            if len(coords) == 0:
                assert (boxes[c] == -1).all() and np.isnan(centres[c]).all()
                continue
            np.testing.assert_array_equal(boxes[c, 0], coords.min(0))
            np.testing.assert_array_equal(boxes[c, 1], coords.max(0) + 1)
            np.testing.assert_allclose(centres[c], coords.mean(0), rtol=1e-5, atol=1e-4)
            if c:
                fg = r.fg_coords(cid, c)
                assert fg.dtype == np.int32 and fg.shape == (len(coords), 3)  # fewer than fg_samples: all
                assert (label[tuple(fg.T)] == c).all()
        assert r.fg_coords(cid, 1) is r.fg_coords(cid, 1)  # cached after the first read


def test_label_stats_subsamples_deterministically():
    label = np.zeros((30, 30, 10), np.uint8)
    label[5:25, 5:25, 2:8] = 2
    a = label_stats(label, 3, fg_samples=100, seed_key="case")
    b = label_stats(label, 3, fg_samples=100, seed_key="case")
    assert a["fg"][2].shape == (100, 3) and len(np.unique(a["fg"][2], axis=0)) == 100
    np.testing.assert_array_equal(a["fg"][2], b["fg"][2])
    assert (label[tuple(a["fg"][2].T)] == 2).all()
    assert 1 not in a["fg"] and a["class_counts"][1] == 0 and (a["bboxes"][1] == -1).all()
    np.testing.assert_allclose(a["centres"][0], np.argwhere(label == 0).mean(0), rtol=1e-6)


def test_body_crop_drops_the_couch_and_keeps_labels():
    image, label = phantom((40, 36, 12))
    start, stop = body_bbox(image, label)
    assert stop[1] < 36 - 1, "the separate couch slab (last rows in y) is cropped away"
    inside = label[tuple(slice(a, b) for a, b in zip(start, stop))]
    assert inside.sum() == label.sum()
    # nothing found: the full volume
    assert body_bbox(np.full((8, 8, 4), -1000.0), None) == ((0, 0, 0), (8, 8, 4))


def test_restore_from_cache_recovers_the_original_label(built):
    r = CacheReader(built.cache)
    cid = "hn_001"
    case = [c for c in list_cases(built) if c.case_id == cid][0]
    _, orig_label, geom = read_case(built, case)
    _, cached = r.read_case(cid)
    back = restore_original_geometry(cached, r.geometry(cid))
    assert back.GetSize() == geom.shape
    np.testing.assert_allclose(back.GetSpacing(), geom.spacing)
    np.testing.assert_allclose(back.GetOrigin(), geom.origin)
    np.testing.assert_allclose(back.GetDirection(), geom.direction)
    restored = image_to_xyz(back)
    for c in (1, 2, 3):
        a, b = restored == c, orig_label == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.75  # small blobs (~100 voxels), anisotropic


def test_parallel_build_matches_serial(dataset, tmp_path):
    root, card = dataset
    serial = build_cache(card, workers=1, progress=False)
    card2 = make_card(tmp_path, root, name="par")
    parallel = build_cache(card2, workers=2, progress=True)
    with h5py.File(serial, "r", locking=False) as a, h5py.File(parallel, "r", locking=False) as b:
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
        for cid in IDS:
            for name in ("image", "label", "fg/1", "fg/2", "fg/3"):
                np.testing.assert_array_equal(a[f"cases/{cid}/{name}"][()], b[f"cases/{cid}/{name}"][()])
            ga, gb = a[f"cases/{cid}"], b[f"cases/{cid}"]
            np.testing.assert_array_equal(ga.attrs["bboxes"], gb.attrs["bboxes"])


def test_pddca_cache(tmp_path):
    make_pddca_dataset(tmp_path / "pddca", ("c1", "c2"))
    card = make_card(tmp_path, tmp_path / "pddca", layout="pddca")
    build_cache(card, workers=1, progress=False, interpolation="bspline", compression="gzip")
    r = CacheReader(card.cache)
    assert r.case_ids == ["c1", "c2"]
    assert r.sources("c1")["structures"]["BrainStem"].endswith("BrainStem.nrrd")
    with h5py.File(card.cache, "r", locking=False) as f:
        assert f["cases/c1/image"].compression == "gzip" and f.attrs["interpolation"] == "bspline"
    assert (r.class_counts("c1")[1:] > 0).all()


# ---------------------------------------------------------------------------------- fingerprint
def test_rerun_is_a_noop_and_changes_rebuild(dataset, tmp_path, capsys):
    root, card = dataset
    cache = build_cache(card, workers=1, progress=False)
    before = _stat(cache)
    assert build_cache(card, workers=1, progress=False) == cache
    assert "cache up to date" in capsys.readouterr().out
    assert _stat(cache) == before, "nothing rewritten (same inode, mtime, size)"

    # touching an input (new mtime) rebuilds
    img = root / "imagesTr" / "hn_001_0000.nii.gz"
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    build_cache(card, workers=1, progress=False)
    out = capsys.readouterr().out
    assert "rebuilding" in out and "modified case(s) (hn_001)" in out
    after = _stat(cache)
    assert after != before
    # a changed card parameter rebuilds
    card2 = make_card(tmp_path, root, hu_window=[-200, 300])
    build_cache(card2, workers=1, progress=False)
    out = capsys.readouterr().out
    assert "rebuilding" in out and "hu_window" in out
    assert CacheReader(cache).hu_window == (-200.0, 300.0)
    # a changed build option rebuilds; --force rebuilds
    build_cache(card2, workers=1, progress=False, fg_samples=50)
    assert "fg_samples" in capsys.readouterr().out
    st1 = _stat(cache)
    build_cache(card2, workers=1, progress=False, fg_samples=50, force=True)
    assert _stat(cache) != st1
    # a new case rebuilds
    shutil.copy(root / "imagesTr" / "hn_002_0000.nii.gz", root / "imagesTr" / "hn_003_0000.nii.gz")
    shutil.copy(root / "labelsTr" / "hn_002.nii.gz", root / "labelsTr" / "hn_003.nii.gz")
    build_cache(card2, workers=1, progress=False, fg_samples=50)
    assert "new case(s) (hn_003)" in capsys.readouterr().out
    assert CacheReader(cache).case_ids == ["hn_000", "hn_001", "hn_002", "hn_003"]


@pytest.mark.parametrize("damage", ["truncate", "incomplete", "missing_group", "garbage"])
def test_corrupt_cache_is_detected_reported_and_rebuilt(dataset, capsys, damage):
    _, card = dataset
    cache = build_cache(card, workers=1, progress=False)
    if damage == "truncate":
        truncate(cache)
    elif damage == "garbage":
        cache.write_bytes(b"\0" * 4096)
    else:
        with h5py.File(cache, "a", locking=False) as f:
            if damage == "incomplete":
                f.attrs["complete"] = False
            else:
                del f["cases/hn_002"]
    assert inspect_cache(cache)[0] not in (None, "missing")
    if damage != "missing_group":
        with pytest.raises(CacheError, match=r"corrupt|incomplete") as info:
            CacheReader(cache)
        assert str(info.value).startswith(str(cache)) and "organseg preprocess" in str(info.value)
    capsys.readouterr()
    build_cache(card, workers=1, progress=False)
    out = capsys.readouterr().out
    assert f"{cache}: cache is corrupt/incomplete (" in out and "rebuilding" in out
    r = CacheReader(cache)
    assert r.case_ids == list(IDS)
    r.read_patch("hn_002", (0, 0, 0), (8, 8, 4))


def test_stale_temp_file_is_removed_and_never_read(dataset, capsys):
    _, card = dataset
    cache = build_cache(card, workers=1, progress=False)
    before = _stat(cache)
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    stale = cache.with_name(f"{cache.name}.tmp-{dead.pid}")
    stale.write_bytes(b"half-written junk that is not HDF5")
    build_cache(card, workers=1, progress=False)
    out = capsys.readouterr().out
    assert "removed stale temporary file" in out and "cache up to date" in out
    assert not stale.exists() and _stat(cache) == before
    assert CacheReader(cache).case_ids == list(IDS)


def test_build_killed_halfway_leaves_no_cache(dataset, monkeypatch):
    _, card = dataset
    real_write = build_mod._write_case
    calls = []

    def dying_writer(h5, result, compression):
        calls.append(result.case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_write(h5, result, compression)

    monkeypatch.setattr(build_mod, "_write_case", dying_writer)
    cache = Path(card.cache)
    with pytest.raises(KeyboardInterrupt):
        build_cache(card, workers=1, progress=False)
    assert calls == ["hn_000", "hn_001"]
    assert not cache.exists() and _tmp_files(cache) == []
    # an existing good cache survives a killed rebuild untouched
    monkeypatch.setattr(build_mod, "_write_case", real_write)
    build_cache(card, workers=1, progress=False)
    before = _stat(cache)
    calls.clear()
    monkeypatch.setattr(build_mod, "_write_case", dying_writer)
    with pytest.raises(KeyboardInterrupt):
        build_cache(card, workers=1, progress=False, force=True)
    assert _stat(cache) == before and _tmp_files(cache) == []
    assert CacheReader(cache).case_ids == list(IDS)


# ---------------------------------------------------------------------------------- bad cases
def _add_bad_cases(root: Path):
    _, label = phantom((40, 36, 12), seed=3)
    image, _ = phantom((40, 36, 12), seed=3)
    label[1, 1, 1] = 9
    write(image, root / "imagesTr" / "hn_003_0000.nii.gz")
    write(label, root / "labelsTr" / "hn_003.nii.gz")  # unknown label value
    write(image, root / "imagesTr" / "hn_004_0000.nii.gz")
    write(label[:, :, :8], root / "labelsTr" / "hn_004.nii.gz")  # shape mismatch
    truncate(root / "imagesTr" / "hn_004_0000.nii.gz")


def test_bad_case_fails_without_writing_and_keeps_the_old_cache(dataset):
    root, card = dataset
    cache = Path(card.cache)
    _add_bad_cases(root)
    with pytest.raises(CaseError, match=r"^hn_003: label values \{9\} not in the card's classes") as info:
        build_cache(card, workers=1, progress=False)
    assert "\n" not in str(info.value) and "--skip-bad" in str(info.value)
    assert not cache.exists() and _tmp_files(cache) == []
    # with a good cache in place: a failing rebuild leaves it untouched
    for p in [*root.glob("*/hn_003*"), *root.glob("*/hn_004*")]:
        p.unlink()
    build_cache(card, workers=1, progress=False)
    before = _stat(cache)
    _add_bad_cases(root)
    with pytest.raises(CaseError, match=r"^hn_003: "):
        build_cache(card, workers=2, progress=False)
    assert _stat(cache) == before and _tmp_files(cache) == []


def test_skip_bad_caches_good_cases_and_lists_the_bad(dataset, capsys):
    root, card = dataset
    _add_bad_cases(root)
    cache = build_cache(card, workers=1, progress=False, skip_bad=True)
    err = capsys.readouterr().err
    assert "skipping bad case hn_003: label values {9}" in err
    assert "skipping bad case hn_004: unreadable image: truncated" in err
    r = CacheReader(cache)
    assert r.case_ids == list(IDS) and r.skipped == ["hn_003", "hn_004"]
    with h5py.File(cache, "r", locking=False) as f:
        assert json.loads(f.attrs["skipped"]) == ["hn_003", "hn_004"]
        assert "hn_003" in json.loads(f.attrs["skipped_errors"])
        assert "hn_003" not in f["cases"]
    build_cache(card, workers=1, progress=False, skip_bad=True)
    assert "cache up to date" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_main(monkeypatch):
    from organseg.cli import main as cli

    # other subcommands are written in parallel: register only the importable ones
    available = {k: v for k, v in cli.TOOL_SUBCOMMANDS.items() if _importable(v)}
    monkeypatch.setattr(cli, "TOOL_SUBCOMMANDS", available)
    return cli.main


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def test_cli_preprocess(dataset, cli_main, capsys):
    root, card = dataset
    assert cli_main(["preprocess", card.source, "--workers", "1", "--no-progress"]) == 0
    assert Path(card.cache).exists()
    assert cli_main(["preprocess", card.source, "--no-progress"]) == 0
    assert "cache up to date" in capsys.readouterr().out
    _add_bad_cases(root)
    assert cli_main(["preprocess", card.source, "--workers", "1", "--no-progress", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("organseg preprocess: error: hn_003: label values {9}")
    assert cli_main(["preprocess", card.source, "--no-progress", "--skip-bad", "--workers", "1"]) == 0
    assert cli_main(["preprocess", str(root / "missing.yaml")]) == 2
    assert "dataset card not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- reader
def test_reader_missing_file_and_unknown_case(tmp_path, built):
    with pytest.raises(CacheError, match="no cache file; run `organseg preprocess"):
        CacheReader(tmp_path / "nope.h5")
    with pytest.raises(CacheError, match="no case 'zz'"):
        CacheReader(built.cache).read_patch("zz", (0, 0, 0), (2, 2, 2))


def test_read_patch_matches_slicing_including_borders(built):
    r = CacheReader(built.cache)
    cid = "hn_002"
    image, label = r.read_case(cid)
    np.testing.assert_array_equal(image, r.normalise(r.read_hu(cid)))
    assert image.dtype == np.float32 and image.min() >= -1.0 and image.max() <= 1.0
    shape = np.array(r.shape(cid))
    pad = 40
    big_img = np.pad(image, pad, constant_values=PAD_VALUE)
    big_lab = np.pad(label, pad, constant_values=0)
    size = (16, 12, 6)
    starts = [
        (0, 0, 0),
        (3, 5, 1),
        tuple(shape - size),
        (-5, -3, -2),
        tuple(shape - 4),
        (-20, 2, 3),
        (-30, -30, -30),
        tuple(shape + 2),
    ]
    rng = np.random.default_rng(0)
    starts += [tuple(rng.integers(-10, shape + 2)) for _ in range(20)]
    for start in starts:
        img, lab = r.read_patch(cid, start, size)
        assert img.shape == size and img.dtype == np.float32 and lab.dtype == np.uint8
        sl = tuple(slice(s + pad, s + pad + n) for s, n in zip(start, size))
        np.testing.assert_array_equal(img, big_img[sl], err_msg=str(start))
        np.testing.assert_array_equal(lab, big_lab[sl], err_msg=str(start))
    whole_img, whole_lab = r.read_patch(cid, (-2, -2, -2), tuple(shape + 4))  # larger than the volume
    np.testing.assert_array_equal(whole_img[2:-2, 2:-2, 2:-2], image)
    assert (whole_img[:2] == -1.0).all() and (whole_lab[:2] == 0).all()
    np.testing.assert_allclose(r.normalise(np.array([-1000, -160, 40, 240, 3000])), [-1, -1, 0, 1, 1])
    with pytest.raises(ValueError):
        r.read_patch(cid, (0, 0, 0), (0, 4, 4))


def test_reader_pickles_and_works_in_a_spawned_process(built):
    r = CacheReader(built.cache)
    here = r.read_patch("hn_001", (-3, 4, 2), (20, 16, 8))  # opens the file in this process
    clone = pickle.loads(pickle.dumps(r))
    assert clone._h5 is None and clone._attrs == {} and clone.case_ids == r.case_ids
    assert len(pickle.dumps(r)) < 4000
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        img, lab, pid = pool.apply(read_patch_in_child, (r, "hn_001", (-3, 4, 2), (20, 16, 8)))
    assert pid != os.getpid()
    np.testing.assert_array_equal(img, here[0])
    np.testing.assert_array_equal(lab, here[1])


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_reader_reopens_after_fork(built):
    r = CacheReader(built.cache)
    expected = r.read_patch("hn_000", (2, 2, 1), (10, 10, 5))
    parent_handle = r._h5
    with mp.get_context("fork").Pool(1) as pool:
        img, lab, pid = pool.apply(read_patch_in_child, (r, "hn_000", (2, 2, 1), (10, 10, 5)))
    assert pid != os.getpid()
    np.testing.assert_array_equal(img, expected[0])
    np.testing.assert_array_equal(lab, expected[1])
    assert r._h5 is parent_handle and r._h5.id.valid  # the parent's handle is untouched


# ---------------------------------------------------------------------------------- lazy patch IO
@pytest.fixture(scope="module")
def big_cache(tmp_path_factory):
    """One 256x256x100 case at the target spacing (no resampling), body filling the field of view."""
    tmp = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    shape = (256, 256, 100)
    x, y = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    body = ((x - 127.5) / 126) ** 2 + ((y - 127.5) / 126) ** 2 <= 1
    image = np.full(shape, -1000, np.int16)
    image[body] = 40
    image += rng.normal(0, 30, size=shape).astype(np.int16)  # CT-like noise: not trivially compressible
    label = np.zeros(shape, np.uint8)
    label[100:140, 90:150, 30:70] = 1
    grid = {"spacing": (1, 1, 3), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}
    write(image, tmp / "raw" / "imagesTr" / "big_0000.nii", **grid)
    write(label, tmp / "raw" / "labelsTr" / "big.nii", **grid)
    card = make_card(tmp, tmp / "raw", classes=["background", "brainstem"])
    build_cache(card, workers=1, progress=False)
    return card


def _overlapped_chunk_bytes(ds: h5py.Dataset, start, stop) -> int:
    """Stored (compressed) bytes of the chunks of ``ds`` that the box [start, stop) overlaps."""
    ranges = [range((a // c) * c, b, c) for a, b, c in zip(start, stop, ds.chunks)]
    return sum(
        ds.id.get_chunk_info_by_coord((x, y, z)).size for x in ranges[0] for y in ranges[1] for z in ranges[2]
    )


def test_patch_read_touches_only_a_small_fraction_of_the_volume(big_cache):
    opener = CountingOpener()
    r = CacheReader(big_cache.cache, opener=opener)
    shape = r.shape("big")
    assert shape[2] == 100 and min(shape[:2]) >= 240
    start, size = (80, 70, 20), (96, 96, 48)
    stop = tuple(a + n for a, n in zip(start, size))
    with h5py.File(big_cache.cache, "r", locking=False) as f:
        image_ds, label_ds = f["cases/big/image"], f["cases/big/label"]
        stored = image_ds.id.get_storage_size() + label_ds.id.get_storage_size()
        needed = _overlapped_chunk_bytes(image_ds, start, stop) + _overlapped_chunk_bytes(
            label_ds, start, stop
        )
        n_chunks = np.prod([len(range((a // c) * c, b, c)) for a, b, c in zip(start, stop, image_ds.chunks)])
    assert n_chunks == 4 * 4 * 4  # 96x96x48 at this offset overlaps 4x4x4 chunks of 32x32x16
    r.fg_coords("big", 1)  # file open + metadata read: not part of a patch read
    base = opener.bytes_read
    img, lab = r.read_patch("big", start, size)
    patch_bytes = opener.bytes_read - base
    assert img.shape == size and lab.sum() > 0
    # exactly the overlapped chunks are read (plus a little chunk-index metadata), nothing else
    assert needed <= patch_bytes <= needed + 64 * 1024, (patch_bytes, needed)
    assert patch_bytes < 0.3 * stored, (patch_bytes, stored)
    # reading the same patch again is served from the chunk cache
    base = opener.bytes_read
    r.read_patch("big", start, size)
    assert opener.bytes_read - base < 0.05 * patch_bytes
    # a whole-volume read, for contrast, reads everything
    opener2 = CountingOpener()
    r2 = CacheReader(big_cache.cache, opener=opener2)
    r2.fg_coords("big", 1)
    base = opener2.bytes_read
    full_img, full_lab = r2.read_case("big")
    assert opener2.bytes_read - base >= stored
    # and the bytes that came through the counting file are the right voxels
    np.testing.assert_array_equal(img, full_img[80:176, 70:166, 20:68])
    np.testing.assert_array_equal(lab, full_lab[80:176, 70:166, 20:68])
