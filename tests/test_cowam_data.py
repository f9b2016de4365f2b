"""Few-organ data for co-training WAM: pseudo-label files (tool, staleness, batches), the multi-model
ensemble, and real MSD-layout single-organ datasets served in one label space by a card alone."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import lightning
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from torch import nn

from organseg.cache.build import build_cache
from organseg.cache.reader import CacheReader
from organseg.cli.main import main
from organseg.data import CTDataModule
from organseg.data.pseudo_labels import (
    PseudoLabelError,
    PseudoLabelReader,
    pseudo_label_problem,
    write_pseudo_file,
)
from organseg.io.card import DatasetCard
from organseg.methods.cowam_baselines import MarginalUNet, MultiModel, SelfTrainingUNet
from organseg.methods.unet_baseline import UNetBaseline

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "liver", "spleen", "kidney_l", "kidney_r", "pancreas", "stomach"]
SHAPE, SPACING = (80, 64, 24), (3.0, 3.0, 6.0)  # the phantom's field of view on a coarse grid
GROUPS = {"ls": ["liver", "spleen"], "kid": ["kidney_l", "kidney_r"]}


def _card(root: Path, name: str, raw: Path, labeled, **extra) -> Path:
    spec = yaml.safe_load((REPO / "data_modules/cards/abdomen_few_kidneys.yaml").read_text())
    spec.update(
        name=name,
        path=str(raw),
        cache=str(root / f"{name}.h5"),
        labeled=labeled,
        target_spacing=list(SPACING),
        split={"val": 1, "test": 0, "seed": 0},
        **extra,
    )
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def fewlabel(tmp_path_factory) -> dict:
    """Two few-organ phantom datasets (3 cases each, disjoint), cached, + their cards."""
    root = tmp_path_factory.mktemp("fewlabel")
    cards = {}
    for tag, keep in GROUPS.items():
        raw = root / f"raw_{tag}"
        assert (
            main(
                [
                    "phantom",
                    "abdomen",
                    "--out",
                    str(raw),
                    "--cases",
                    "3",
                    "--quiet",
                    "--workers",
                    "1",
                    "--shape",
                    *map(str, SHAPE),
                    "--spacing",
                    *map(str, SPACING),
                    "--keep",
                    *keep,
                ]
            )
            == 0
        )
        cards[tag] = _card(root, f"few_{tag}", raw, keep)
        build_cache(DatasetCard.load(cards[tag]), workers=1, progress=False)
    return {"root": root, "cards": cards}


def _save_expert(path: Path, card: Path, favour: str, seed: int = 0) -> Path:
    """A tiny UNetBaseline checkpoint (as `organseg fit` writes it) whose output bias favours one organ."""
    torch.manual_seed(seed)
    m = UNetBaseline(
        num_classes=len(CLASSES),
        classes=CLASSES,
        patch_size=(32, 32, 16),
        filters=(4, 8, 8),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 1)),
        class_weights=[1.0] * len(CLASSES),
    )
    with torch.no_grad():
        m.net.output_block.conv.conv.bias[CLASSES.index(favour)] += 20.0
    m.cards = [DatasetCard.load(card).to_dict()]
    ckpt = {
        "state_dict": m.state_dict(),
        "hyper_parameters": dict(m.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.slow
def test_pseudolabel_tool_writes_unannotated_organs_only_and_detects_staleness(fewlabel, capsys):
    root, cards = fewlabel["root"], fewlabel["cards"]
    ck_ls = _save_expert(root / "ls.ckpt", cards["ls"], favour="spleen")
    ck_kid = _save_expert(root / "kid.ckpt", cards["kid"], favour="kidney_r")
    out = root / "pseudo_ls.h5"
    args = [
        "pseudolabel",
        "--ckpt",
        str(ck_ls),
        str(ck_kid),
        "--card",
        str(cards["ls"]),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    cache = CacheReader(DatasetCard.load(cards["ls"]).cache)
    reader = PseudoLabelReader(out, cache_fingerprint=cache.fingerprint, case_ids=cache.case_ids)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # like any output file, not mkstemp's private 0600
    # the liver/spleen expert contributes nothing to its own dataset: only the kidney expert ran
    assert [c["organs"] for c in reader.checkpoints] == [["kidney_l", "kidney_r"]]
    for cid in cache.case_ids:
        p = reader.read_case(cid)
        assert p.shape == cache.shape(cid) and p.dtype == np.uint8
        assert set(np.unique(p)) <= {0, 3, 4}  # never liver/spleen (annotated here)
        assert (p == 4).mean() > 0.9  # the kidney expert's (biased) kidney_r
        # a patch that sticks out of the volume is zero-padded, like the cache's label
        patch = reader.read_patch(cid, (-4, 0, 0), (8, 8, 8))
        assert (patch[:4] == 0).all() and np.array_equal(patch[4:], p[:4, :8, :8])
    # unchanged inputs: nothing rewritten
    mtime = out.stat().st_mtime_ns
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == mtime
    assert pseudo_label_problem(out, cards["ls"]) is None
    # a retrained expert makes the file stale, for the reader, the bench's resume check and the DataModule
    _save_expert(ck_kid, cards["kid"], favour="kidney_l", seed=1)
    with pytest.raises(PseudoLabelError, match="stale"):
        PseudoLabelReader(out, cache_fingerprint=cache.fingerprint)
    assert (
        pseudo_label_problem(out, cards["ls"])
        == f"{out}: stale pseudo-labels (checkpoint {ck_kid} changed since)"
    )
    assert pseudo_label_problem(root / "gone.h5", cards["ls"]).startswith(
        f"{root / 'gone.h5'}: pseudo-label file not found"
    )
    dm = CTDataModule(
        [str(cards["ls"])], patch_size=(32, 32, 16), num_workers=0, preprocess=False, pseudo_labels=[str(out)]
    )
    with pytest.raises(PseudoLabelError, match="stale"):
        dm.sources("train")
    assert main(args) == 0 and out.stat().st_mtime_ns != mtime  # regenerated
    assert (PseudoLabelReader(out).read_case(cache.case_ids[0]) == 3).mean() > 0.9
    # another cache build is detected too
    with pytest.raises(PseudoLabelError, match="another build"):
        PseudoLabelReader(out, cache_fingerprint="0" * 16)
    # user errors: one line, exit 2, nothing written
    bad = root / "nothing.h5"
    assert (
        main(
            [
                "pseudolabel",
                "--ckpt",
                str(ck_ls),
                "--card",
                str(cards["ls"]),
                "--out",
                str(bad),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "nothing to pseudo-label" in capsys.readouterr().err and not bad.exists()
    assert (
        main(
            [
                "pseudolabel",
                "--ckpt",
                str(root / "missing.ckpt"),
                "--card",
                str(cards["ls"]),
                "--out",
                str(bad),
            ]
        )
        == 2
    )
    assert "missing.ckpt" in capsys.readouterr().err and not bad.exists()


def test_batches_carry_pseudo_labels_moved_with_the_label(fewlabel):
    """A pseudo-label file equal to the cached label must stay equal to the label after the random
    affine augmentation (same box, same nearest-neighbour transform); a card without a file gets zeros."""
    cards = fewlabel["cards"]
    cache = CacheReader(DatasetCard.load(cards["ls"]).cache)
    copy = fewlabel["root"] / "copy_ls.h5"
    write_pseudo_file(
        copy,
        ((cid, cache.read_case(cid)[1]) for cid in cache.case_ids),
        fingerprint="test",
        cache=cache.path,
        cache_fingerprint=cache.fingerprint,
        classes=CLASSES,
        checkpoints=[],
        card_name="few_ls",
    )
    dm = CTDataModule(
        [str(cards["ls"]), str(cards["kid"])],
        patch_size=(32, 32, 16),
        batch_size=4,
        patches_per_epoch=12,
        num_workers=0,
        preprocess=False,
        pseudo_labels=[str(copy), None],
        foreground_probability=1.0,
        augmentation={"affine_p": 1.0, "degrees": [0, 0, 30], "noise_p": 0.0, "blur_p": 0.0},
    )
    dm.setup("fit")
    seen = set()
    for batch in dm.train_dataloader():
        assert batch["pseudo"].dtype == torch.uint8  # compact between processes
        batch = dm.on_after_batch_transfer(batch, 0)
        assert batch["pseudo"].dtype == torch.int64 and batch["pseudo"].shape == batch["label"].shape
        for i, d in enumerate(batch["dataset"].tolist()):
            seen.add(d)
            if d == 0:
                assert torch.equal(batch["pseudo"][i], batch["label"][i])
                assert batch["labeled"][i].tolist() == [True, True, True, False, False, False, False]
            else:
                assert not batch["pseudo"][i].any()
                assert batch["labeled"][i].tolist() == [True, False, False, True, True, False, False]
    assert seen == {0, 1}
    # validation serves whole cases without pseudo-labels; the length of pseudo_labels is checked
    case = next(iter(dm.val_dataloader()))
    assert "pseudo" not in case
    with pytest.raises(ValueError, match="pseudo_labels has 1 entries for 2 cards"):
        CTDataModule([str(cards["ls"]), str(cards["kid"])], pseudo_labels=[str(copy)])


class _Oracle(nn.Module):
    """Expert whose logits are a fixed function of the image value: value v -> logit `strength` for
    ``claims[v]`` (elsewhere background)."""

    def __init__(self, claims: dict[int, tuple[int, float]]):
        super().__init__()
        self.claims, self.patch_size, self.sw_overlap, self.sw_batch_size = claims, [8, 8, 4], 0.0, 4

    def forward(self, x):
        logits = torch.zeros(x.shape[0], len(CLASSES), *x.shape[2:])
        logits[:, 0] = 1.0
        for v, (c, strength) in self.claims.items():
            logits[:, c] += strength * (x[:, 0] == v)
        return logits


def test_multimodel_takes_each_experts_own_organs_and_resolves_conflicts_by_confidence(fewlabel):
    root, cards = fewlabel["root"], fewlabel["cards"]
    mm = MultiModel.from_checkpoints(
        [
            _save_expert(root / "a.ckpt", cards["ls"], "liver"),
            _save_expert(root / "b.ckpt", cards["kid"], "kidney_l"),
        ],
        CLASSES,
    )
    assert mm.expert_organ_names == [["liver", "spleen"], ["kidney_l", "kidney_r"]]
    liver, spleen, kid_l = (CLASSES.index(o) for o in ("liver", "spleen", "kidney_l"))
    # expert A (liver, spleen): value 1 -> liver (very sure), 3 -> kidney_l (not its organ: ignored)
    # expert B (kidneys):       value 1 -> kidney_l (less sure), 2 -> kidney_l, 4 -> spleen (ignored)
    mm.experts = nn.ModuleList(
        [
            _Oracle({1: (liver, 9.0), 3: (kid_l, 9.0)}),
            _Oracle({1: (kid_l, 4.0), 2: (kid_l, 9.0), 4: (spleen, 9.0)}),
        ]
    )
    image = torch.zeros(1, 1, 16, 16, 8)
    for v in range(5):
        image[0, 0, :, :, v] = v
    pred = mm.predict_case(image)
    assert pred.dtype == torch.uint8 and pred.shape == (1, 16, 16, 8)
    assert pred[0, :, :, 0].eq(0).all()
    assert pred[0, :, :, 1].eq(liver).all()  # both claim it: the more confident expert wins
    assert pred[0, :, :, 2].eq(kid_l).all()
    assert pred[0, :, :, 3].eq(0).all() and pred[0, :, :, 4].eq(0).all()  # organs outside an expert's own
    # restricted to organs a dataset lacks (how `organseg pseudolabel` uses it)
    only_kid = MultiModel.from_checkpoints(
        [root / "a.ckpt", root / "b.ckpt"], CLASSES, exclude_organs=["liver", "spleen"]
    )
    assert only_kid.expert_organ_names == [["kidney_l", "kidney_r"]]
    with pytest.raises(ValueError, match="cannot be trained"):
        mm.training_step({}, 0)


@pytest.mark.slow
def test_multimodel_is_tested_by_lightning_on_every_case_of_a_test_only_dataset(fewlabel, tmp_path):
    """`organseg test -c experiments/cowam/multi_model.yaml -c data_modules/abdomen_test.yaml`: the
    Trainer's test loop over ``test_split: all`` (every cached case) with the N-pass ensemble."""
    root, cards = fewlabel["root"], fewlabel["cards"]
    mm = MultiModel(
        len(CLASSES),
        CLASSES,
        checkpoints=[
            str(_save_expert(root / "t1.ckpt", cards["ls"], "liver")),
            str(_save_expert(root / "t2.ckpt", cards["kid"], "kidney_l")),
        ],
        hd95_every_n_epochs=0,
    )
    dm = CTDataModule(
        [str(cards["kid"])],
        patch_size=(32, 32, 16),
        num_workers=0,
        preprocess=False,
        test_split="all",
        augmentation=None,
    )
    trainer = lightning.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path)
    )
    trainer.test(mm, datamodule=dm)
    m = trainer.callback_metrics
    assert float(m["test/cases"]) == 3  # all cases, not a split
    assert {"test/dice/kidney_l", "test/dice/kidney_r"} <= set(m)
    assert "test/dice/liver" not in m  # this test card does not annotate the liver
    assert (tmp_path / "test_report").is_dir()


def _write_msd(root: Path, task: str, prefix: str, labels: dict[str, str], organ_values, n: int = 3) -> Path:
    """An MSD task folder: imagesTr/<case>.nii.gz (no _0000), labelsTr/<case>.nii.gz, dataset.json."""
    folder = root / task
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(len(task))
    for i in range(n):
        zyx = (12, 40, 48)
        hu = rng.normal(-800, 20, zyx).astype(np.int16)
        lab = np.zeros(zyx, np.uint8)
        hu[2:10, 8:32, 8:40] = 40  # body
        for k, v in enumerate(organ_values):
            sl = (slice(4, 8), slice(12 + 6 * k, 16 + 6 * k + i), slice(14, 30))
            lab[sl] = v
            hu[sl] = 60 + 40 * k
        for arr, sub in ((hu, "imagesTr"), (lab, "labelsTr")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((3.0, 3.0, 6.0))
            sitk.WriteImage(img, str(folder / sub / f"{prefix}_{i}.nii.gz"))
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "name": task,
                "modality": {"0": "CT"},
                "labels": labels,
                "numTraining": n,
                "training": [
                    {"image": f"./imagesTr/{prefix}_{i}.nii.gz", "label": f"./labelsTr/{prefix}_{i}.nii.gz"}
                    for i in range(n)
                ],
            }
        )
    )
    return folder


@pytest.mark.slow
def test_msd_single_organ_datasets_train_in_one_label_space_by_cards_alone(tmp_path):
    """LiTS-like liver (1 = liver, 2 = tumour) and MSD-spleen-like (1 = spleen) folders in the MSD
    layout become two few-organ datasets of one label space through their cards (`label_values`)."""
    liver = _write_msd(
        tmp_path, "Task03_Liver", "liver", {"0": "background", "1": "liver", "2": "cancer"}, [1, 2]
    )
    spleen = _write_msd(tmp_path, "Task09_Spleen", "spleen", {"0": "background", "1": "spleen"}, [1])
    cards = [
        _card(
            tmp_path, "lits", liver, ["liver"], layout="msd", label_values={1: "liver", 2: "liver"}
        ),  # tumour -> liver
        _card(tmp_path, "msd_spleen", spleen, ["spleen"], layout="msd", label_values={1: "spleen"}),
    ]
    dm = CTDataModule(
        [str(c) for c in cards],
        patch_size=(16, 16, 8),
        batch_size=4,
        patches_per_epoch=8,
        num_workers=0,
        augmentation=None,
    )
    dm.prepare_data()
    dm.setup("fit")
    liver_i, spleen_i = CLASSES.index("liver"), CLASSES.index("spleen")
    for card in cards:  # cached labels are in the unified space (spleen's raw 1 became class 2)
        r = CacheReader(DatasetCard.load(card).cache)
        values = set(np.unique(np.concatenate([r.read_case(c)[1].ravel() for c in r.case_ids])).tolist())
        assert values == ({0, liver_i} if "lits" in card.name else {0, spleen_i})
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    want = {
        0: [True, True, False, False, False, False, False],
        1: [True, False, True, False, False, False, False],
    }
    for i, d in enumerate(batch["dataset"].tolist()):
        assert batch["labeled"][i].tolist() == want[d]
        assert set(batch["label"][i].unique().tolist()) <= {0, liver_i if d == 0 else spleen_i}
    # and a partial-label model trains on it (marginal loss, a few steps, validation on both datasets)
    model = MarginalUNet(
        num_classes=dm.num_classes,
        classes=dm.classes,
        patch_size=(16, 16, 8),
        filters=(4, 8, 8),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 1)),
        class_weights="uniform",
        hd95_every_n_epochs=0,
    )
    trainer = lightning.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert {"val/dice/liver", "val/dice/spleen"} <= set(trainer.callback_metrics)


def test_self_training_module_needs_pseudo_labels_and_uses_them():
    m = SelfTrainingUNet(
        num_classes=3,
        classes=["background", "a", "b"],
        patch_size=(8, 8, 4),
        filters=(4, 8, 8),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 1)),
        class_weights=[1.0, 1.0, 1.0],
    )
    m.log = lambda *a, **k: None
    batch = {
        "image": torch.zeros(1, 1, 8, 8, 4),
        "label": torch.zeros(1, 8, 8, 4, dtype=torch.long),
        "labeled": torch.tensor([[True, True, False]]),
    }
    with pytest.raises(ValueError, match="pseudo_labels"):
        m.training_step(batch, 0)
    targets, real = [], m.loss_fn.forward

    def spy(logits, target):
        targets.append(target)
        return real(logits, target)

    m.loss_fn.forward = spy
    batch["pseudo"] = torch.full((1, 8, 8, 4), 2, dtype=torch.long)
    assert torch.isfinite(m.training_step(batch, 0))
    assert targets[0].eq(2).all()  # class b is unannotated here: the pseudo-label fills the GT background


def test_evaluate_with_several_checkpoints_scores_them_as_one_multimodel(fewlabel, tmp_path):
    """`organseg evaluate --ckpt A B`: the experts together (each its own organs), as the co-training
    benchmark's multi-model arm; the summary names every checkpoint."""
    root, cards = fewlabel["root"], fewlabel["cards"]
    a = _save_expert(root / "eval_a.ckpt", cards["ls"], "liver")
    b = _save_expert(root / "eval_b.ckpt", cards["kid"], "kidney_l")
    out = tmp_path / "eval"
    args = ["evaluate", "--ckpt", str(a), str(b), "--split", "all", "--overlays", "0", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"] == [str(a.resolve()), str(b.resolve())]
    with open(out / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # the liver expert's bias paints every voxel liver, the kidney expert's kidney_l: both organs predicted,
    # each everywhere its expert is more confident; other organs never (no expert claims them)
    predicted = {r["organ"] for r in rows if r["dice"] not in ("", "nan") and float(r["dice"]) > 0}
    assert predicted and predicted <= {"liver", "kidney_l"}
    assert len({r["case_id"] for r in rows}) == 3


# ---------------------------------------------------------------- patch centres over GT + pseudo-labels
class _Volume:
    """Duck-typed cache / pseudo-label reader of one case: counts and organ coordinates per class."""

    def __init__(self, blocks: dict[int, tuple[slice, slice, slice]], shape=(40, 40, 12)):
        lab = np.zeros(shape, dtype=np.uint8)
        for c, box in blocks.items():
            lab[box] = c
        self.map = lab
        self._shape = shape

    def shape(self, case_id):
        return self._shape

    def class_counts(self, case_id):
        return np.bincount(self.map.ravel(), minlength=len(CLASSES))

    def fg_coords(self, case_id, c):
        return np.argwhere(self.map == c).astype(np.int32)


def test_patch_centres_come_from_ground_truth_and_pseudo_labels_at_the_configured_rate(tmp_path):
    """A liver+spleen dataset whose pseudo-labels add the pancreas: organ centres are shared equally by
    the union's organs (liver, spleen from ground truth, pancreas from pseudo-labels), counted over 10k
    draws; ``gt`` (ours) never centres on the pseudo-labelled pancreas."""
    from organseg.data.datasets import CacheSource, PatchStream

    liver, spleen, pancreas = (CLASSES.index(o) for o in ("liver", "spleen", "pancreas"))
    gt = _Volume({liver: np.s_[2:12, 2:12, 2:8], spleen: np.s_[20:24, 20:24, 2:5]})
    # the pseudo-labels also claim a liver block (annotated here, so the ground truth decides: ignored)
    pseudo = _Volume({pancreas: np.s_[30:33, 5:8, 4:6], liver: np.s_[30:35, 30:35, 1:3]})
    labeled = np.array([c in (0, liver, spleen) for c in range(len(CLASSES))])
    src = CacheSource("ls", gt, ["case"], labeled, pseudo)

    def rates(**kw):
        stream = PatchStream([src], (8, 8, 4), 1, 1, foreground_probability=0.6, **kw)
        rng = np.random.default_rng(0)
        draws = [stream.draw_patch_centre(rng, src, "case") for _ in range(10_000)]
        for centre, c in draws:
            if c == pancreas:
                assert pseudo.map[tuple(centre)] == pancreas
            elif c > 0:
                assert gt.map[tuple(centre)] == c
        return np.bincount([c for _, c in draws], minlength=len(CLASSES)) / len(draws)

    p = rates()  # default gt_and_pseudo: 0.6 / 3 organs each
    for organ in (liver, spleen, pancreas):
        assert abs(p[organ] - 0.2) < 0.015, (organ, p)
    assert abs(p[0] - 0.4) < 0.015
    weighted = rates(organ_weights=[1, 1, 1, 1, 1, 2, 1])  # pancreas twice: 0.6 * 2/4
    assert abs(weighted[pancreas] - 0.3) < 0.015 and abs(weighted[liver] - 0.15) < 0.015
    ours = rates(patch_centres="gt")
    assert ours[pancreas] == 0 and abs(ours[liver] - 0.3) < 0.015
    with pytest.raises(ValueError, match="patch_centres"):
        PatchStream([src], (8, 8, 4), 1, 1, patch_centres="both")
    # the reader of a real pseudo-label file serves the same counts and coordinates
    write_pseudo_file(
        tmp_path / "p.h5",
        [("case", pseudo.map)],
        fingerprint="t",
        cache=tmp_path,
        cache_fingerprint="c",
        classes=CLASSES,
        checkpoints=[],
        card_name="ls",
    )
    reader = PseudoLabelReader(tmp_path / "p.h5")
    assert np.array_equal(reader.class_counts("case"), pseudo.class_counts("case"))
    got = {tuple(v) for v in reader.fg_coords("case", pancreas)}
    assert got == {tuple(v) for v in pseudo.fg_coords("case", pancreas)} and len(got) == 18
    assert len(reader.fg_coords("case", spleen)) == 0


# ---------------------------------------------------------------- class weights: one count for every method
class _Counts:
    def __init__(self, counts, shape=(10, 10, 10)):
        self.counts, self._shape = np.asarray(counts), shape

    def class_counts(self, case_id):
        return self.counts

    def shape(self, case_id):
        return self._shape


def test_class_counts_are_per_annotating_dataset_or_gt_plus_pseudo_and_absent_classes_weigh_nothing():
    """Hand case, classes (bg, liver, pancreas, spleen): dataset A annotates the liver (2 cases of 1000
    voxels, 100 liver each; its pseudo-labels add 20 pancreas voxels per case), dataset B the pancreas
    (1 case, 10 pancreas voxels; pseudo-labels: 120 liver voxels); no dataset annotates the spleen."""
    from organseg.data.datamodule import count_class_voxels
    from organseg.data.datasets import CacheSource
    from organseg.losses import class_weights_from_counts

    a_lab, b_lab = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    a = CacheSource("A", _Counts([900, 100, 0, 0]), ["a1", "a2"], a_lab, _Counts([980, 0, 20, 0]))
    b = CacheSource("B", _Counts([990, 0, 10, 0]), ["b1"], b_lab, _Counts([880, 120, 0, 0]))
    # annotated (default): liver 200/2000 of A's voxels, pancreas 10/1000 of B's, scaled to V = 3000
    np.testing.assert_allclose(count_class_voxels([a, b], 4), [3000 - 330, 300, 30, 0])
    # the same without pseudo-labels: naive union / marginal count exactly as self-/co-training do
    bare = [CacheSource(s.name, s.reader, s.case_ids, s.labeled) for s in (a, b)]
    np.testing.assert_allclose(count_class_voxels(bare, 4), count_class_voxels([a, b], 4))
    # ground truth + pseudo-labels: liver 200 + 120, pancreas 10 + 40
    np.testing.assert_allclose(count_class_voxels([a, b], 4, "gt_and_pseudo"), [3000 - 370, 320, 50, 0])
    with pytest.raises(ValueError, match="gt_and_pseudo: card A"):
        count_class_voxels(bare, 4, "gt_and_pseudo")
    # ours, the earlier rule: ground truth only (the unannotated liver of B is background)
    np.testing.assert_allclose(count_class_voxels([a, b], 4, "gt"), [2790, 200, 10, 0])
    # the spleen (no voxels anywhere) gets weight 0 and does not lower the others' (mean 1 over present)
    w = class_weights_from_counts([2670, 300, 30, 0], "inverse_frequency")
    f = np.array([2670, 300, 30]) / 3000
    expect = (1 / f) / (1 / f).mean()
    np.testing.assert_allclose(w, [*expect, 0.0])
    old = class_weights_from_counts([2670, 300, 30, 0], "inverse_frequency", absent="max")
    assert old[3] == max(old) and old[2] == old[3]  # the earlier rule: the largest weight
    with pytest.raises(ValueError, match="class_counts"):
        count_class_voxels([a, b], 4, "pseudo")
