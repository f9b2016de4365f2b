"""S-Net, SOL-Net, DenseASPP, heatmap targets/decoding and the heatmap loss: behaviour, on tiny tensors."""

import math

import pytest
import torch
from torch import nn

from organseg.losses.heatmap import HeatmapMSELoss
from organseg.networks.blocks import DenseASPP3d, ResidualSEBlock3d, SEBlock3d
from organseg.networks.snet import SNet
from organseg.networks.sol import SOLNet
from organseg.spatial.heatmaps import decode_centres, gaussian_heatmaps


def conv_output_sizes(model: nn.Module, x: torch.Tensor) -> set[tuple[int, ...]]:
    """Spatial sizes of every Conv3d output during one forward (SE's global 1x1x1 gates excluded)."""
    sizes: set[tuple[int, ...]] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: sizes.add(tuple(out.shape[2:])))
        for m in model.modules()
        if isinstance(m, nn.Conv3d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    sizes.discard((1, 1, 1))
    return sizes


@pytest.mark.parametrize("anisotropic, bottleneck", [(True, (8, 8, 4)), (False, (8, 8, 2))])
def test_snet_downsamples_exactly_twice(anisotropic, bottleneck):
    torch.manual_seed(0)
    net = SNet(num_classes=3, base_channels=4, anisotropic=anisotropic)
    strided = [
        m
        for m in net.modules()
        if isinstance(m, (nn.MaxPool3d, nn.AvgPool3d)) or (isinstance(m, nn.Conv3d) and max(m.stride) > 1)
    ]
    assert len(strided) == 2
    x = torch.randn(1, 1, 32, 32, 8)
    # the network only ever computes at three resolutions: full, after pool 1, after pool 2
    first = (16, 16, 8) if anisotropic else (16, 16, 4)
    assert conv_output_sizes(net, x) == {(32, 32, 8), first, bottleneck}
    maps = net.feature_maps(x)
    assert tuple(maps["bottleneck"].shape[2:]) == bottleneck
    assert maps["logits"].shape == (1, 3, 32, 32, 8)


def test_snet_shapes_features_and_gradient_reach_first_layer():
    torch.manual_seed(0)
    net = SNet(in_channels=2, num_classes=5, base_channels=4)
    x = torch.randn(2, 2, 16, 20, 6)
    logits, feats = net.forward_features(x)
    assert logits.shape == (2, 5, 16, 20, 6)
    assert feats.shape == (2, net.feature_channels, 16, 20, 6)
    assert torch.equal(net(x), logits)
    (logits.square().mean() + feats.mean()).backward()
    first = net.stem[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_snet_rejects_indivisible_sizes():
    net = SNet(num_classes=2, base_channels=4)
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.randn(1, 1, 30, 32, 8))
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.randn(1, 1, 32, 32, 7))


def test_blocks_residual_and_se():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8, 4)
    se = SEBlock3d(6)
    gate = se.gate(x)
    assert gate.shape == (2, 6, 1, 1, 1) and (gate > 0).all() and (gate < 1).all()
    block = ResidualSEBlock3d(6, 10, kernel_size=(3, 3, 1), dilation=(2, 2, 1))
    assert block(x).shape == (2, 10, 8, 8, 4)
    same = ResidualSEBlock3d(6, 6)
    assert same.project is None
    nn.init.zeros_(same.conv2.weight)  # residual branch off -> identity
    assert torch.allclose(same(x), x)


def gradient_extent(module: nn.Module, shape=(1, 4, 33, 33, 13)) -> tuple[int, int, int]:
    """Per-axis extent of the input voxels that influence the centre output voxel."""
    x = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    out = module(x)
    c = [s // 2 for s in shape[2:]]
    out[0, :, c[0], c[1], c[2]].sum().backward()
    nz = torch.nonzero(x.grad[0].abs().sum(0))
    return tuple(int(v) for v in (nz.max(0).values - nz.min(0).values + 1))


def test_dense_aspp_receptive_field_grows_with_rates():
    def aspp(rates, z_rates=None):
        m = DenseASPP3d(4, 6, rates=rates, z_rates=z_rates, growth=2, bottleneck=4, norm=None).double()
        for p in m.parameters():  # positive weights: no accidental cancellation inside the footprint
            nn.init.constant_(p, 0.05)
        return m

    plain = gradient_extent(aspp((1, 1, 1, 1)))
    dilated = gradient_extent(aspp((1, 2, 3, 5)))
    # dense connections: the last unit sees the sum of all branches' extents, 1 + 2 * sum(rates)
    assert plain == (9, 9, 9)
    assert dilated == (23, 23, 9)  # z rate stays 1 by default (coarse axis)
    assert gradient_extent(aspp((1, 2, 3, 5), z_rates=(1, 1, 2, 2))) == (23, 23, 13)
    assert aspp((1, 2, 3, 5))(torch.rand(1, 4, 8, 8, 4, dtype=torch.float64)).shape == (1, 6, 8, 8, 4)


def test_gaussian_heatmaps_peak_symmetry_absence_and_anisotropy():
    centres = torch.tensor([[10.0, 12.0, 5.0], [float("nan")] * 3])
    heat = gaussian_heatmaps(centres, (24, 24, 12), spacing=(1.0, 1.0, 3.0), sigma_mm=3.0)
    assert heat.shape == (2, 24, 24, 12) and heat.dtype == torch.float32
    h = heat[0]
    assert tuple(int(i) for i in torch.unravel_index(h.argmax(), h.shape)) == (10, 12, 5)
    assert h[10, 12, 5] == 1.0
    for d in (1, 2, 3):
        assert torch.isclose(h[10 + d, 12, 5], h[10 - d, 12, 5])
        assert torch.isclose(h[10, 12 + d, 5], h[10, 12 - d, 5])
        assert h[10 + d, 12, 5] < h[10 + d - 1, 12, 5]
    assert torch.isclose(h[10, 12, 6], h[10, 12, 4])
    assert torch.count_nonzero(heat[1]) == 0
    # sigma in mm: at spacing (1, 1, 3) the voxel sigma along z is a third of x's
    wide = gaussian_heatmaps(torch.tensor([[20.0, 20.0, 7.0]]), (41, 41, 15), (1.0, 1.0, 3.0), 6.0, cutoff=0)[
        0
    ]
    d = torch.arange(41.0) - 20
    dz = torch.arange(15.0) - 7
    sx = math.sqrt(float((wide[:, 20, 7] * d**2).sum() / wide[:, 20, 7].sum()))
    sz = math.sqrt(float((wide[20, 20, :] * dz**2).sum() / wide[20, 20, :].sum()))
    assert sx == pytest.approx(6.0, rel=0.02) and sz == pytest.approx(2.0, rel=0.02)


def test_decode_centres_subvoxel_and_missing():
    true = torch.tensor([10.3, 12.6, 5.2])
    heat = gaussian_heatmaps(true[None], (24, 24, 12), (1.0, 1.0, 3.0), sigma_mm=4.0)
    batch = torch.zeros(2, 2, 24, 24, 12)
    batch[0, 0] = heat[0]
    batch[1, 1] = heat[0] * 0.9
    coarse, found = decode_centres(batch, subvoxel=False)
    assert found.tolist() == [[True, False], [False, True]]
    assert torch.linalg.norm(coarse[0, 0] - true) < 1.0
    assert torch.equal(coarse[0, 0], torch.tensor([10.0, 13.0, 5.0]))
    assert torch.isnan(coarse[0, 1]).all() and torch.isnan(coarse[1, 0]).all()
    fine, _ = decode_centres(batch, subvoxel=True)
    # the log-parabola vertex is exact for a Gaussian (and a scaled one)
    assert torch.allclose(fine[0, 0], true, atol=1e-3) and torch.allclose(fine[1, 1], true, atol=1e-3)
    # a noisy, smoothed prediction: still within half a voxel
    torch.manual_seed(0)
    noisy = (heat[0] + 0.02 * torch.rand_like(heat[0]))[None, None]
    noisy = nn.functional.avg_pool3d(noisy, 3, stride=1, padding=1, count_include_pad=False) / noisy.max()
    est, ok = decode_centres(noisy)
    assert ok.all() and torch.linalg.norm(est[0, 0] - true) < 0.5
    # threshold is on the peak value
    assert not decode_centres(batch * 0.25, threshold=0.3)[1].any()


def test_sol_net_shape_and_range():
    torch.manual_seed(0)
    sol = SOLNet(feature_channels=4, num_small_organs=3, hidden=8)
    out = sol(torch.randn(2, 4, 8, 8, 4))
    assert out.shape == (2, 3, 8, 8, 4) and (out >= 0).all() and (out <= 1).all()
    assert SOLNet(4, 3, hidden=8, output="linear")(torch.randn(1, 4, 4, 4, 2)).shape == (1, 3, 4, 4, 2)


def test_heatmap_mse_loss_zero_positive_and_weighting():
    target = gaussian_heatmaps(torch.tensor([[8.0, 8.0, 4.0]]), (16, 16, 8), (1.0, 1.0, 3.0), 3.0)[None]
    pred = target.clone().requires_grad_(True)
    plain, weighted = HeatmapMSELoss(), HeatmapMSELoss(alpha=20.0)
    assert plain(pred, target).item() == 0 and weighted(pred, target).item() == 0
    assert plain(pred + 0.1, target) > 0
    assert torch.isclose(plain(pred, target.roll(4, 2)), nn.functional.mse_loss(pred, target.roll(4, 2)))
    missed = torch.zeros_like(target)  # the peak is not predicted at all
    spurious = target + target.roll(8, 2)  # the peak is right, plus a same-sized false peak elsewhere
    assert torch.isclose(plain(missed, target), plain(spurious, target))  # plain MSE cannot tell them apart
    assert weighted(missed, target) > 3 * weighted(spurious, target)
    assert weighted(missed, target) > plain(missed, target)
    loss = weighted(pred * 0.5, target)
    loss.backward()
    assert loss.dim() == 0 and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        plain(pred, target[:, :, :8])
