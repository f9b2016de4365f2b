"""FocusNetV2 zoom-in parts: ROI crop/paste, SOS-Net bank, shape autoencoder and shape/GAN losses."""

from __future__ import annotations

import math

import pytest
import torch

from organseg.losses.shape import adversarial_losses, discriminator_logits, reconstruction_loss, shape_loss
from organseg.networks.shape_autoencoder import ShapeAutoencoder, ShapeDiscriminator
from organseg.networks.sos import SOSNet, SOSNetBank, sos_inputs
from organseg.spatial.roi import crop_roi, crop_rois, paste_probabilities, paste_roi, roi_box, roi_size_voxels

SHAPE = (20, 18, 10)


@pytest.fixture
def labels() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 4, SHAPE, generator=g)


def _box_mask(start, size, shape=SHAPE) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[tuple(slice(max(a, 0), max(a + s, 0)) for a, s in zip(start, size))] = True
    return m


# ----------------------------------------------------------------------------------------- ROI
def test_roi_box_and_size():
    assert roi_box((10, 10, 5), (8, 8, 4)) == ((6, 6, 3), (14, 14, 7))  # even: [c - s/2, c + s/2)
    assert roi_box((10.5, 9.4, 5), (3, 3, 3)) == ((10, 8, 4), (13, 11, 7))  # half-up rounding, odd: centred
    assert roi_box((0, 0, 0), (8, 8, 4))[0] == (-4, -4, -2)  # may leave the volume
    assert roi_box((0, 19, 5), (8, 8, 4), fit_within=(20, 20, 10)) == ((0, 12, 3), (8, 20, 7))
    assert roi_box((3, 3, 3), (30, 8, 4), fit_within=(20, 20, 10))[0] == (-10, 0, 1)  # bigger: covers it
    assert roi_size_voxels((64, 64, 20), (1.0, 1.0, 2.5)) == (64, 64, 8)
    assert roi_size_voxels((20, 21, 2), (1.5, 1.5, 3.0)) == (14, 14, 1)


def test_crop_paste_round_trip_interior(labels):
    start, _ = roi_box((10, 9, 5), (8, 6, 4))
    crop = crop_roi(labels[None], start, (8, 6, 4))[0]
    assert torch.equal(crop, labels[6:14, 6:12, 3:7])
    assert torch.equal(paste_roi(labels.clone(), crop == 2, start, 2), labels)


@pytest.mark.parametrize(
    "centre,size",
    [((0, 0, 0), (8, 6, 4)), ((19, 17, 9), (8, 6, 4)), ((10, 9, 5), (30, 26, 16)), ((-20, 5, 5), (8, 6, 4))],
)
def test_crop_pads_and_paste_clips_at_borders(labels, centre, size):
    start, _ = roi_box(centre, size)
    crop = crop_roi(labels[None].float(), start, size, pad_value=-1)[0]
    assert crop.shape == size
    inside = _box_mask(start, size).sum().item()
    assert (crop == -1).sum().item() == math.prod(size) - inside  # padded exactly where outside
    assert sorted(crop[crop >= 0].long().tolist()) == sorted(labels[_box_mask(start, size)].tolist())
    for k in range(4):
        assert torch.equal(paste_roi(labels, crop == k, start, k), labels)


def test_paste_replaces_class_inside_roi_only(labels):
    start, size = (4, 5, 2), (8, 6, 4)
    box = _box_mask(start, size)
    g = torch.Generator().manual_seed(1)
    new = torch.rand(size, generator=g) > 0.7
    out = paste_roi(labels, new, start, 3)
    assert torch.equal(out[~box], labels[~box])  # outside the ROI: untouched
    region, old = out[box].reshape(size), labels[box].reshape(size)
    assert torch.equal(region == 3, new)  # class 3 inside = exactly the new mask
    keep = ~new & (old != 3)
    assert torch.equal(region[keep], old[keep])  # other organs kept where not in the mask
    assert (region[~new & (old == 3)] == 0).all()  # old class-3 voxels reset to background
    assert not torch.equal(out, labels) and torch.equal(labels, labels.clone())  # input not modified


def test_paste_probabilities():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(4, *SHAPE, generator=g), 0)
    roi = torch.rand(8, 6, 4, generator=g)
    start = (-2, 14, 7)  # partly outside
    out = paste_probabilities(probs, roi, start, 2)
    box = _box_mask(start, (8, 6, 4))
    assert torch.allclose(out.sum(0), torch.ones(SHAPE), atol=1e-5)
    assert torch.equal(out[:, ~box], probs[:, ~box])
    assert torch.allclose(out[2][box], roi[2:, :4, :3].reshape(-1))


def test_crop_is_differentiable():
    vol = torch.randn(1, 2, *SHAPE, requires_grad=True)
    start, size = (15, -3, 4), (8, 6, 4)
    crop_roi(vol, start, size, pad_value=-1).sum().backward()
    expected = _box_mask(start, size).float().expand(1, 2, *SHAPE)
    assert torch.equal(vol.grad, expected)


def test_crop_rois_batched(labels):
    vol = torch.stack([labels, labels.flip(0)])[:, None].float()
    centres = torch.tensor([[0.0, 0.0, 0.0], [12.2, 9.7, 5.0]])
    crops, starts = crop_rois(vol, centres, (8, 6, 4), pad_value=-1, return_starts=True)
    assert crops.shape == (2, 1, 8, 6, 4)
    for b in range(2):
        assert tuple(starts[b].tolist()) == roi_box(centres[b], (8, 6, 4))[0]
        assert torch.equal(crops[b], crop_roi(vol[b], starts[b], (8, 6, 4), pad_value=-1))
    inside = crop_rois(vol, centres, (8, 6, 4), pad_value=-1, fit_within=True)
    assert (inside >= 0).all()


# ------------------------------------------------------------------------------------- SOS-Net
def test_sos_bank_shapes_and_independence():
    torch.manual_seed(0)
    feats, heat, ct = torch.randn(2, 3, 16, 16, 4), torch.rand(2, 1, 16, 16, 4), torch.randn(2, 1, 16, 16, 4)
    x = sos_inputs(feats, heat, ct)
    assert x.shape[1] == 5 and torch.equal(x[:, -1:], ct)  # CT is the last channel
    bank = SOSNetBank(3, in_channels=5, base_channels=4)
    assert bank(x, 0).shape == (2, 1, 16, 16, 4)
    before = [p.detach().clone() for p in bank[1].parameters()]
    opt = torch.optim.SGD(bank.parameters(), lr=0.1)
    bank(x, 0).square().mean().backward()
    opt.step()
    assert all(p.grad is None for p in bank[1].parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, bank[1].parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bank[0].parameters())
    for d in (0, 2):
        assert SOSNet(5, 4, downsamplings=d)(x).shape == (2, 1, 16, 16, 4)
    with pytest.raises(ValueError):
        SOSNet(5, 4)(x[..., :15, :, :])


# ------------------------------------------------------------------------------ shape prior
S = (16, 16, 8)
CENTRE, RADIUS = (7.5, 7.5, 3.5), 5.0


def ellipsoid(centre=CENTRE, radius=RADIUS) -> torch.Tensor:
    """Binary [1,1,*S] ellipsoid, half as deep in z (coarse slices)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in S], indexing="ij"))
    d = (grid - torch.tensor(centre).view(3, 1, 1, 1)) * torch.tensor([1.0, 1.0, 2.0]).view(3, 1, 1, 1)
    return ((d**2).sum(0) <= radius**2).float()[None, None]


def _increasing(values) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


@pytest.fixture(scope="module")
def pretrained_ae() -> ShapeAutoencoder:
    """A few reconstruction steps on random ellipsoids (enough to make the code shape-aware)."""
    torch.manual_seed(0)
    ae = ShapeAutoencoder(1, code_channels=32, base=8)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u = torch.rand(4, 4, generator=g)
        batch = torch.cat(
            [ellipsoid((4 + 8 * a, 4 + 8 * b, 2 + 4 * c), 2 + 4 * r) for a, b, c, r in u.tolist()]
        )
        loss = reconstruction_loss(ae, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae


def test_autoencoder_shapes_and_soft_input_gradient():
    torch.manual_seed(0)
    ae = ShapeAutoencoder(2, code_channels=6, base=4)
    masks = torch.rand(3, 2, 16, 12, 6, requires_grad=True)
    recon, code = ae(masks)
    assert recon.shape == masks.shape and code.shape == (3, 6, 2, 2, 1)
    recon.sum().backward()
    assert masks.grad is not None and masks.grad.abs().sum() > 0
    assert ShapeDiscriminator(6)(code).shape == (3,)


def test_shape_loss_zero_for_identical_masks(pretrained_ae):
    soft = torch.rand(2, 3, *S)
    for kind in ("code_l2", "features", "recon"):
        assert shape_loss(pretrained_ae, soft, soft.clone(), kind=kind).item() < 1e-10
        assert shape_loss(pretrained_ae, ellipsoid(), ellipsoid(), kind=kind).item() < 1e-10


def test_shape_loss_grows_with_deformation(pretrained_ae):
    true = ellipsoid()
    torch.manual_seed(3)
    random_ae = ShapeAutoencoder(1, code_channels=32, base=8)  # fixed random weights
    for ae in (random_ae, pretrained_ae):
        shifts = [shape_loss(ae, ellipsoid((CENTRE[0] + s, *CENTRE[1:])), true).item() for s in (0, 1, 2, 4)]
        dilated = [shape_loss(ae, ellipsoid(radius=RADIUS + d), true).item() for d in (0, 1, 2, 3)]
        assert shifts[0] < 1e-10 and _increasing(shifts), shifts
        assert _increasing(dilated), dilated
    eroded = [shape_loss(pretrained_ae, ellipsoid(radius=RADIUS - d), true).item() for d in (0, 1, 2, 3)]
    assert _increasing(eroded), eroded


def test_shape_loss_gradients(pretrained_ae):
    true = ellipsoid().repeat(1, 3, 1, 1, 1)  # 3 organs folded into the batch of a 1-channel AE
    for kind in ("code_l2", "features", "recon"):
        pretrained_ae.zero_grad(set_to_none=True)
        pred = (0.3 + 0.4 * torch.rand(1, 3, *S)).requires_grad_()
        shape_loss(pretrained_ae, pred, true, kind=kind, detach_ae=True).backward()
        assert pred.grad is not None and pred.grad.abs().sum() > 0
        assert all(p.grad is None for p in pretrained_ae.parameters())
    shape_loss(pretrained_ae, pred.detach(), true, detach_ae=False).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pretrained_ae.parameters())
    pretrained_ae.zero_grad(set_to_none=True)


def test_discriminator_logits_frozen():
    torch.manual_seed(0)
    ae, disc = ShapeAutoencoder(1, 8, 4), ShapeDiscriminator(8)
    pred = torch.rand(2, 3, *S, requires_grad=True)
    logits = discriminator_logits(ae, disc, pred, frozen=True)
    assert logits.shape == (6,)
    adversarial_losses(None, logits)["loss_adv"].backward()
    assert pred.grad.abs().sum() > 0
    assert all(p.grad is None for m in (ae, disc) for p in m.parameters())
    discriminator_logits(ae, disc, pred.detach()).sum().backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_adversarial_losses():
    at_chance = adversarial_losses(torch.zeros(4), torch.zeros(4))
    assert set(at_chance) == {"loss_adv", "loss_disc"}
    assert math.isclose(at_chance["loss_disc"].item(), math.log(2), rel_tol=1e-6)
    disc = [
        adversarial_losses(torch.full((4,), m), torch.full((4,), -m))["loss_disc"].item()
        for m in (0, 1, 2, 4)
    ]
    assert _increasing(disc[::-1])  # better separation -> lower D loss
    gen = [adversarial_losses(None, torch.full((4,), f))["loss_adv"].item() for f in (-4, -1, 0, 2)]
    assert _increasing(gen[::-1])  # fakes that look real -> lower G loss
    assert set(adversarial_losses(None, torch.zeros(2))) == {"loss_adv"}
