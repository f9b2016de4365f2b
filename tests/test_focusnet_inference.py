"""FocusNetV2 locate-zoom-paste inference (organseg.inference.locate_zoom_paste): z-streamed blending equals
MONAI's full-volume sliding window, SOL centres and SOS pastes land where they must, memory is bounded."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from organseg.inference.locate_zoom_paste import blend_slabs, predict_focusnet
from organseg.networks.focusnetv2 import FocusNetV2
from organseg.spatial.heatmaps import decode_centres
from organseg.spatial.roi import roi_box

PATCH = (32, 32, 8)
SHAPE = (64, 64, 16)
C = 5
SMALL = [2, 3, 4]
ROIS = [(8, 8, 4), (12, 12, 4), (8, 8, 4)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0) -> FocusNetV2:
    torch.manual_seed(seed)
    return FocusNetV2(
        C,
        SMALL,
        ROIS,
        base_channels=4,
        sol_hidden=8,
        sos_base=4,
        ae_code_channels=4,
        ae_base=4,
        sos_branch="unet",  # a 12-voxel ROI: the upstream branch needs multiples of 4
        shape_ae="spatial",  # ROIs of two sizes: upstream's AE takes one
    ).eval()


def monai_reference(model, image):
    """Full-volume MONAI sliding window over S-Net logits ++ SOL heatmaps, same windows/blending."""

    def predictor(w):
        logits, _, heat = model.snet_sol(w)
        return torch.cat([logits, heat], 1)

    with torch.no_grad():
        return sliding_window_inference(
            image,
            list(PATCH),
            1,
            predictor,
            overlap=0.5,
            mode="gaussian",
            padding_mode="constant",
            cval=float(image.min()),
        )[0]


# ------------------------------------------------------------------ real (random) model vs MONAI
@pytest.mark.parametrize("shape", [SHAPE, (50, 45, 11), (20, 40, 6)])  # divisible, odd, smaller than a patch
def test_streamed_equals_monai_full_volume(shape):
    model = tiny_model()
    image = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    out = predict_focusnet(
        model,
        image,
        patch_size=PATCH,
        threshold=2.0,  # > any sigmoid: no SOS
        return_snet_labels=True,
    )
    labels = out["snet_labels"]
    assert labels.shape == shape and labels.dtype == torch.uint8
    assert int(labels.min()) >= 0 and int(labels.max()) < C
    assert not out["found"].any() and torch.isnan(out["centres"]).all()
    ref = monai_reference(model, image)
    # identical windows and weights; only the order in which a voxel's (<= 8) window contributions
    # are summed differs, so an argmax could flip only at a float32 tie: none expected here
    assert torch.equal(labels, ref[:C].argmax(0).to(torch.uint8))
    # default merge="upstream" with nothing found: S-Net's own argmax, small organs included
    assert torch.equal(out["labels"], labels)
    torch.testing.assert_close(out["peaks"], ref[C:].amax(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    if shape == SHAPE:  # the streamed blend itself, slab by slab

        def predictor(w):
            logits, _, heat = model.snet_sol(w)
            return torch.cat([logits, heat], 1)

        depths, parts = [], []
        for z0, z1, slab in blend_slabs(predictor, image, PATCH):
            assert slab.shape == (C + len(SMALL), *shape[:2], z1 - z0)
            depths.append(z1 - z0)
            parts.append(slab.clone())
        assert sum(depths) == shape[2] and max(depths) <= PATCH[2]  # never more than one patch deep
        torch.testing.assert_close(torch.cat(parts, -1), ref, rtol=1e-5, atol=1e-5)
        # centres decoded from the running maxima == decode_centres on the full blended heatmap
        low = predict_focusnet(model, image, patch_size=PATCH, threshold=0.0)
        want, found = decode_centres(ref[None, C:], threshold=0.0)
        assert low["found"].all() and found.all()
        torch.testing.assert_close(low["centres"], want[0], rtol=0, atol=1e-4)


def test_model_is_left_in_its_mode_and_bad_patch_rejected():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="divisible"):
        predict_focusnet(model, torch.randn(1, 1, *SHAPE), patch_size=(30, 32, 8))
    predict_focusnet(model, torch.randn(1, 1, 32, 32, 8), patch_size=PATCH, threshold=2.0)
    assert model.training


# ------------------------------------------------------------------ forced SOL / SOS
def _coords(win: torch.Tensor, shape=SHAPE):
    """The test image stores each voxel's flat index, so a window knows where it is."""
    idx = win[:, 0].round().long()
    return idx // (shape[1] * shape[2]), (idx // shape[2]) % shape[1], idx % shape[2]


def _pattern(x, y, z):
    return (x // 8 + y // 8 + z // 4) % C


def _runner_up(x, y, z):
    """S-Net's second choice everywhere: a large (non-small) class, 0 or 1."""
    return (x // 8) % 2


class _SphereSOS(nn.Module):
    """Fake SOS bank: organ k's mask is a ball of radius 2.5 around its true centre (read off the CT
    channel of the ROI, which holds flat voxel indices)."""

    def __init__(self, centres):
        super().__init__()
        self.centres = centres
        self.calls = []

    def forward(self, rois, k):
        self.calls.append(k)
        x, y, z = _coords(rois[:, -1:])
        cx, cy, cz = self.centres[k]
        ball = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= 2.5**2
        return torch.where(ball, 10.0, -10.0)[:, None]


def forced_model(centres, amplitudes, sigma=(2.0, 2.0, 1.0)):
    """Tiny FocusNetV2 whose S-Net is a fixed label pattern and whose SOL heatmaps are Gaussians at
    ``centres`` (volume coordinates) with peak ``amplitudes``; SOS-Net is ``_SphereSOS``."""
    model = tiny_model()
    f = model.snet.feature_channels

    def snet_sol(win):
        x, y, z = _coords(win)
        logits = (
            (
                10.0 * nn.functional.one_hot(_pattern(x, y, z), C)
                + 5.0 * nn.functional.one_hot(_runner_up(x, y, z), C)
            )
            .permute(0, 4, 1, 2, 3)
            .float()
        )
        heat = torch.stack(
            [
                a
                * torch.exp(
                    -0.5
                    * (((x - cx) / sigma[0]) ** 2 + ((y - cy) / sigma[1]) ** 2 + ((z - cz) / sigma[2]) ** 2)
                )
                for (cx, cy, cz), a in zip(centres, amplitudes)
            ],
            1,
        )
        return logits, torch.zeros(win.shape[0], f, *win.shape[2:]), heat

    model.snet_sol = snet_sol
    model.sos = _SphereSOS(centres)
    return model


def coordinate_image(shape=SHAPE):
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(1, 1, *shape)


def grid(shape=SHAPE):
    return torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")


FORCED_CENTRES = [
    (40.3, 22.6, 9.2),  # interior
    (5.4, 60.2, 1.3),  # ROI (12, 12, 4) sticks out in x, y and z
    (30.0, 30.0, 8.0),
]  # peak 0.25 < threshold: not found, nothing pasted
FORCED_PEAKS = [0.9, 0.8, 0.25]


def roi_and_ball(k: int, centres=FORCED_CENTRES):
    """Organ k's ROI box (as ``roi_box`` places it) and ``_SphereSOS``'s ball, as bool volumes."""
    x, y, z = grid()
    start, stop = roi_box(centres[k], ROIS[k])
    box = (x >= start[0]) & (x < stop[0]) & (y >= start[1]) & (y < stop[1]) & (z >= start[2]) & (z < stop[2])
    cx, cy, cz = centres[k]
    return box, (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= 2.5**2


def test_forced_sol_centres_and_exact_sos_paste():
    centres = FORCED_CENTRES
    model = forced_model(centres, FORCED_PEAKS)
    out = predict_focusnet(
        model,
        coordinate_image(),
        patch_size=PATCH,
        threshold=0.3,
        return_snet_labels=True,
        merge="replace_in_roi",
    )
    x, y, z = grid()
    snet = _pattern(x, y, z).to(torch.uint8)
    assert torch.equal(out["snet_labels"], snet)
    assert out["found"].tolist() == [True, True, False]
    assert model.sos.calls == [0, 1]
    torch.testing.assert_close(
        out["peaks"],
        torch.tensor([0.9, 0.8, 0.25])
        * torch.tensor(
            [
                math.exp(-0.5 * (0.09 / 4 + 0.16 / 4 + 0.04)),
                math.exp(-0.5 * (0.16 / 4 + 0.04 / 4 + 0.09)),
                1.0,
            ]
        ),
        rtol=1e-4,
        atol=1e-5,
    )
    for k in (0, 1):
        assert (out["centres"][k] - torch.tensor(centres[k])).abs().max() < 0.01  # well within a voxel
    assert torch.isnan(out["centres"][2]).all() and out["roi_starts"][2].tolist() == [-1, -1, -1]

    expected, boxes = snet.clone(), torch.zeros(SHAPE, dtype=torch.bool)
    for k in (0, 1):
        assert out["roi_starts"][k].tolist() == list(roi_box(centres[k], ROIS[k])[0])
        box, ball = roi_and_ball(k)
        cls = SMALL[k]
        expected[box & (expected == cls) & ~ball] = 0
        expected[box & ball] = cls
        boxes |= box
    assert torch.equal(out["labels"][~boxes], snet[~boxes])  # outside every ROI: S-Net's labels
    assert torch.equal(out["labels"], expected)  # inside: the SOS ball, clipped to the ROI
    assert (out["labels"] != snet).any()


def test_upstream_merge_keeps_snet_labels_and_lays_only_sos_masks_over_them():
    """Default merge (upstream's separate SOS map laid over S-Net's): every voxel outside the SOS masks keeps
    S-Net's label -- outside the ROIs, inside them, S-Net's small-organ voxels included (none becomes a
    runner-up class); only the SOS balls change, to their organ."""
    model = forced_model(FORCED_CENTRES, FORCED_PEAKS)
    out = predict_focusnet(
        model, coordinate_image(), patch_size=PATCH, threshold=0.3, return_snet_labels=True
    )
    x, y, z = grid()
    snet = _pattern(x, y, z).to(torch.uint8)
    assert torch.equal(out["snet_labels"], snet)
    expected, balls, boxes = (
        snet.clone(),
        torch.zeros(SHAPE, dtype=torch.bool),
        torch.zeros(SHAPE, dtype=torch.bool),
    )
    for k in (0, 1):
        box, ball = roi_and_ball(k)
        expected[box & ball] = SMALL[k]
        balls |= box & ball
        boxes |= box
        # S-Net's organ-k voxels inside the ROI but off the SOS mask (replace_in_roi would clear them)
        assert bool((box & ~ball & (snet == SMALL[k])).any())
    assert torch.equal(out["labels"][~boxes], snet[~boxes])  # outside the pasted ROIs: untouched
    assert torch.equal(out["labels"][~balls], snet[~balls])  # and inside them, off the SOS masks
    assert torch.equal(out["labels"], expected)
    # S-Net's small-organ voxels off the masks are still small organs (runner_up would have moved them)
    assert bool(torch.isin(out["labels"][~balls], torch.tensor(SMALL, dtype=torch.uint8)).any())


def test_runner_up_merge_takes_small_organs_only_from_sos():
    """merge="runner_up" (ours, the default before issue 13): S-Net's small-organ votes are ignored everywhere
    (its best other class is used), found organs are the SOS masks, an organ not found is absent."""
    model = forced_model(FORCED_CENTRES, FORCED_PEAKS)
    out = predict_focusnet(
        model, coordinate_image(), patch_size=PATCH, threshold=0.3, return_snet_labels=True, merge="runner_up"
    )
    x, y, z = grid()
    pattern = _pattern(x, y, z)
    assert torch.equal(out["snet_labels"], pattern.to(torch.uint8))  # still S-Net's full argmax
    small = torch.isin(pattern, torch.tensor(SMALL))
    expected = torch.where(small, _runner_up(x, y, z), pattern).to(torch.uint8)
    for k in (0, 1):  # each found organ: exactly its SOS ball
        box, ball = roi_and_ball(k)
        expected[box & ball] = SMALL[k]
    assert torch.equal(out["labels"], expected)
    assert all((out["labels"] == SMALL[k]).any() for k in (0, 1))
    assert not (out["labels"] == SMALL[2]).any()  # not found by SOL: absent
    with pytest.raises(ValueError, match="merge"):
        predict_focusnet(model, coordinate_image(), patch_size=PATCH, merge="snet")


# slabs are [0,4) [4,8) [8,16): peaks on a slab's last / first slice, and on the volume border
@pytest.mark.parametrize("cz", [3.4, 4.3, 7.45, 0.0, 15.0])
def test_subvoxel_centre_across_slab_boundaries(cz):
    centre = (20.6, 33.3, cz)
    model = forced_model([centre, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)], [0.9, 0.1, 0.1])
    out = predict_focusnet(model, coordinate_image(), patch_size=PATCH)
    assert out["found"].tolist() == [True, False, False]
    got = out["centres"][0]
    # on the volume border decode_centres keeps the integer position (no neighbour on one side)
    want = torch.tensor([20.6, 33.3, cz if 0 < round(cz) < SHAPE[2] - 1 else round(cz)])
    assert (got - want).abs().max() < 0.01, (got, want)


# ------------------------------------------------------------------ memory
_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from organseg.inference.locate_zoom_paste import predict_focusnet
    from organseg.networks.focusnetv2 import FocusNetV2
    torch.set_num_threads(1)
    C, shape, patch = {C}, {shape}, {patch}
    model = FocusNetV2(C, [1, 2], [(8, 8, 4), (8, 8, 4)], base_channels=4, sol_hidden=4, sos_base=4,
                       ae_code_channels=4, ae_base=4)
    scale = torch.linspace(0.5, 1.5, C).view(1, C, 1, 1, 1)
    def snet_sol(w):  # cheap stand-in network: memory then is the pipeline's, not the convolutions'
        return w * scale, w[:, :0], torch.sigmoid(w).expand(-1, 2, -1, -1, -1)
    model.snet_sol = snet_sol
    image = torch.randn(1, 1, *shape)
    predict_focusnet(model, torch.randn(1, 1, *patch), patch_size=patch, threshold=2.0)  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = predict_focusnet(model, image, patch_size=patch, threshold=2.0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"before_kb": before, "after_kb": after, "labels": list(out["labels"].shape)}}))
""")


@pytest.mark.slow
def test_peak_rss_growth_is_slab_sized_not_volume_sized():
    """RSS growth of one run in a fresh process (ru_maxrss is a high-water mark, so a fresh process
    is needed) on 256x256x96 with 48 classes. A full-volume float32 buffer per class (what MONAI's
    sliding_window_inference allocates, before its softmax copy) is 48 x 6.3 M x 4 B = 1.21 GB; the
    streamed pipeline holds (48 + 2 + 1) x 256 x 256 x 16 x 4 B = 0.21 GB of slab buffer + the uint8
    labels and one argmax slab."""
    c, shape, patch = 48, (256, 256, 96), (64, 64, 16)
    res = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT.format(C=c, shape=shape, patch=patch)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    assert rss["labels"] == list(shape)
    growth = (rss["after_kb"] - rss["before_kb"]) * 1024
    naive = c * math.prod(shape) * 4
    slab = (c + 2 + 1) * shape[0] * shape[1] * patch[2] * 4
    print(
        f"RSS growth {growth / 2**20:.0f} MiB; slab buffer {slab / 2**20:.0f} MiB; "
        f"one full-volume float per class {naive / 2**20:.0f} MiB"
    )
    assert growth < 0.4 * naive


# ------------------------------------------------------------------ speed settings (issue 11)
def _recording(model):
    """Wrap ``model.snet_sol`` to record, per call, the autocast dtype (None when off), the window's
    batch size and whether the window and the network's weights are channels_last_3d."""
    calls = []
    inner = model.snet_sol
    # a weight whose two layouts differ (more than one input channel, a 3-wide kernel)
    weight = next(p for p in model.snet.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2] > 1)

    def snet_sol(win):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        cl = win.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
        calls.append((dtype, win.shape[0], cl))
        return inner(win)

    model.snet_sol = snet_sol
    return calls


def test_speed_settings_reach_the_network_and_keep_the_labels():
    """precision autocasts every network call (windows and SOS windows) and fp32 does not; windows go
    sw_batch_size at a time (default 2); channels_last hands the network channels_last_3d windows and
    leaves the parameters contiguous. Same weights, same volume: batching and memory format give the
    fp32 labels; bf16 keeps them on all but near-tied voxels."""
    image = torch.randn(1, 1, *SHAPE, generator=torch.Generator().manual_seed(3))
    kwargs = {"patch_size": PATCH, "threshold": 0.0, "return_snet_labels": True}
    ref_model = tiny_model()
    ref_calls = _recording(ref_model)
    ref = predict_focusnet(ref_model, image, sw_batch_size=1, **kwargs)
    assert {c[0] for c in ref_calls} == {None} and {c[1] for c in ref_calls[: -len(SMALL)]} == {1}
    assert ref["found"].all()  # threshold 0: the SOS windows ran too (the last len(SMALL) calls)

    model = tiny_model()
    calls = _recording(model)
    batched = predict_focusnet(model, image, **kwargs)  # default sw_batch_size
    sizes = [c[1] for c in calls[: -len(SMALL)]]  # batches are filled within one z-start's windows
    assert sum(sizes) == len(ref_calls) - len(SMALL) and max(sizes) == 2 and sizes.count(2) > len(sizes) / 2
    assert torch.equal(batched["labels"], ref["labels"])
    n_calls = len(calls)

    model = tiny_model()
    calls = _recording(model)
    cl = predict_focusnet(model, image, channels_last=True, **kwargs)
    assert all(c[2] for c in calls)
    assert all(p.is_contiguous() for p in model.parameters())
    assert (cl["snet_labels"] == ref["snet_labels"]).float().mean() > 0.999

    model = tiny_model()
    calls = _recording(model)
    low = predict_focusnet(model, image, precision="bf16", **kwargs)
    assert {c[0] for c in calls} == {torch.bfloat16} and len(calls) == n_calls
    assert not torch.is_autocast_enabled("cpu")  # and switched off again
    assert low["labels"].dtype == torch.uint8 and low["peaks"].dtype == torch.float32
    agree = (low["snet_labels"] == ref["snet_labels"]).float().mean()
    assert agree > 0.9  # random weights: near-tied logits flip under bf16's 8-bit mantissa
    with pytest.raises(ValueError, match="precision must be one of"):
        predict_focusnet(tiny_model(), image, precision="fp8", **kwargs)


def test_bf16_blend_is_close_to_fp32():
    """The blended S-Net logits under bf16 autocast stay within bf16 rounding of fp32's (the blending
    sums themselves are float32)."""
    from organseg.inference.precision import inference_autocast

    model = tiny_model()
    image = torch.randn(1, 1, *SHAPE, generator=torch.Generator().manual_seed(4))

    def predictor(w):
        logits, _, heat = model.snet_sol(w)
        return torch.cat([logits, heat], 1)

    fp32 = torch.cat([s.clone() for _, _, s in blend_slabs(predictor, image, PATCH)], -1)
    with inference_autocast("cpu", "bf16"):
        bf16 = torch.cat([s.clone() for _, _, s in blend_slabs(predictor, image, PATCH)], -1)
    assert bf16.dtype == torch.float32
    err = (bf16 - fp32).abs().max() / fp32.abs().max()
    assert 0 < err < 0.05  # autocast did run in bf16 (not bit-equal), within a few bf16 ulps of the range


def test_retain_freed_memory_on_glibc():
    """``organseg predict``'s allocator setting: glibc accepts it (in a child, so this process keeps glibc's
    defaults); elsewhere it reports False and changes nothing."""
    import platform

    code = "from organseg.runtime.allocator import retain_freed_memory as r; print(r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(platform.libc_ver()[0] == "glibc")
