"""Kernel shapes follow the data's voxel spacing: the U-Net by nnU-Net v2's rule (kernel 1 along an axis
while its spacing at that level is at least twice the finest), S-Net as upstream by default and in-plane
at full resolution as a named option. Shapes only; speed is measured by benchmarks/step_speed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule
from torch import nn

from organseg.errors import ConfigError
from organseg.methods import UNetBaseline
from organseg.methods.cowam import CoTrainingWAM
from organseg.networks.focusnetv2 import FocusNetArchitecture
from organseg.networks.snet import SNet
from organseg.networks.unet import build_unet, kernel_sizes_for_spacing, nnunet_strides

REPO = Path(__file__).resolve().parents[1]
STRIDES = [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]  # experiments/baseline/unet.yaml
CLASSES = ["background", "a", "b"]


def level_kernels(net: nn.Module) -> dict[str, list[tuple[int, ...]]]:
    """The DynUNet's kernel per encoder level (first conv of each block) and per decoder block, the
    decoder listed from the full-resolution block up (so index i works at level i's resolution)."""
    enc = [net.input_block, *net.downsamples, net.bottleneck]
    dec = [up.conv_block for up in net.upsamples][::-1]
    return {
        "encoder": [tuple(b.conv1.conv.kernel_size) for b in enc],
        "decoder": [tuple(b.conv1.conv.kernel_size) for b in dec],
    }


# nnU-Net v2 plans by hand (get_pool_and_conv_props, network_topology.py) for the default strides:
# level i sees spacing * prod(strides[:i+1]); 3 once spacing / finest < 2 (then kept), bottleneck 3x3x3
@pytest.mark.parametrize(
    "spacing, kernels",
    [
        # (0.5, 0.5, 1.5): 3x at full res -> z kernel 1; (1, 1, 1.5) after the in-plane pool -> 3x3x3
        ((0.5, 0.5, 1.5), [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        # (2, 2, 3): 1.5x, under nnU-Net's factor 2, so 3x3x3 from the start
        ((2.0, 2.0, 3.0), [[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        ((1.0, 1.0, 1.0), [[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        # the cards' default 1 x 1 x 3: 3x, then (2, 2, 3) = 1.5x
        ((1.0, 1.0, 3.0), [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        # exactly 2x is still anisotropic (nnU-Net: "< 2" gives 3)
        ((1.0, 1.0, 2.0), [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        # (0.5, 0.5, 2.5): 5x, 2.5x, 2.5x, then the bottleneck is 3x3x3 anyway
        ((0.5, 0.5, 2.5), [[3, 3, 1], [3, 3, 1], [3, 3, 1], [3, 3, 3]]),
        # the coarse axis need not be z: (3, 1, 1) -> kernel 1 along x
        ((3.0, 1.0, 1.0), [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
    ],
)
def test_unet_kernels_follow_nnunet_rule_for_the_spacing(spacing, kernels):
    if spacing[0] > spacing[2]:
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    else:
        strides = STRIDES
    assert kernel_sizes_for_spacing(spacing, strides) == kernels
    net = build_unet(1, 3, strides=strides, spacing=spacing)
    got = level_kernels(net)
    assert got["encoder"] == [tuple(k) for k in kernels]
    # nnU-Net's decoder: the block at level i's resolution has level i's kernel
    assert got["decoder"] == [tuple(k) for k in kernels[:-1]]
    assert net(torch.zeros(1, 1, 16, 16, 8)).shape == (1, 3, 16, 16, 8)


def test_nnunet_pooling_rule_matches_the_default_strides_for_anisotropic_data():
    # 1 x 1 x 3 mm (and 0.5 x 0.5 x 1.5): z is not pooled first, as experiments/baseline/unet.yaml
    assert nnunet_strides((1.0, 1.0, 3.0), 4) == STRIDES
    assert nnunet_strides((0.5, 0.5, 1.5), 4) == STRIDES
    # 2 x 2 x 3 (the demo's cards) and isotropic data: nnU-Net pools z at once
    assert nnunet_strides((2.0, 2.0, 3.0), 4) == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert nnunet_strides((1.0, 1.0, 1.0), 3) == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]


def test_explicit_kernel_sizes_override_the_spacing_rule():
    explicit = [[3, 3, 3], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    net = build_unet(1, 3, strides=STRIDES, kernel_sizes=explicit, spacing=(1.0, 1.0, 3.0))
    assert level_kernels(net)["encoder"] == [tuple(k) for k in explicit]
    module = UNetBaseline(3, CLASSES, (32, 32, 8), spacing=[1.0, 1.0, 3.0], kernel_sizes=explicit)
    assert level_kernels(module.net)["encoder"] == [tuple(k) for k in explicit]
    with pytest.raises(ConfigError, match=r"kernel_sizes \(2\) and strides \(4\)"):
        build_unet(1, 3, strides=STRIDES, kernel_sizes=explicit[:2])


def test_without_spacing_the_unet_keeps_its_old_3x3x3_shapes():
    """Checkpoints written before the spacing argument (no ``spacing`` in their hparams) still load."""
    old = UNetBaseline(3, CLASSES, (32, 32, 8))
    assert set(level_kernels(old.net)["encoder"]) == {(3, 3, 3)}
    new = UNetBaseline(3, CLASSES, (32, 32, 8), spacing=[1.0, 1.0, 3.0])
    assert level_kernels(new.net)["encoder"][0] == (3, 3, 1)
    assert new.hparams.spacing == [1.0, 1.0, 3.0]  # stored: a checkpoint rebuilds the same kernels
    restored = UNetBaseline(**{k: v for k, v in new.hparams.items()})
    restored.load_state_dict(new.state_dict())


def test_cotraining_networks_take_the_spacing_and_the_override():
    m = CoTrainingWAM(3, CLASSES, (32, 32, 8), spacing=[1.0, 1.0, 3.0])
    for net in (m.net_a, m.net_b, m.wam_a.module, m.wam_b.module):
        assert level_kernels(net)["encoder"][0] == (3, 3, 1)
    m = CoTrainingWAM(3, CLASSES, (32, 32, 8), spacing=[1.0, 1.0, 3.0], kernel_sizes=[[3, 3, 3]] * 4)
    assert level_kernels(m.net_a)["encoder"][0] == (3, 3, 3)


def test_the_cli_links_the_card_spacing_to_the_unet(monkeypatch):
    from organseg.cli.lightning import OrgansegCLI
    from organseg.methods.base import SegmentationModuleBase

    monkeypatch.chdir(REPO)
    cli = OrgansegCLI(
        SegmentationModuleBase,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[
            "-c",
            "experiments/baseline/unet.yaml",
            "-c",
            "data_modules/hn_phantom.yaml",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
        ],
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
    )
    card_spacing = cli.datamodule.target_spacing
    assert cli.model.hparams.spacing == card_spacing
    expected = kernel_sizes_for_spacing(card_spacing, STRIDES)
    assert level_kernels(cli.model.net)["encoder"] == [tuple(k) for k in expected]


# ---------------------------------------------------------------------------------------------- S-Net
def conv_kernels(net: SNet) -> dict[str, tuple[int, ...]]:
    """Kernel of every spatial conv of S-Net (1x1x1 projections, SE gates and the head left out)."""
    return {
        name: tuple(m.kernel_size)
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv3d) and tuple(m.kernel_size) != (1, 1, 1)
    }


def test_snet_default_kernels_are_upstreams():
    """Upstream (yhygao/focusnet-v2 model/net.py, model/model.py): only ``inconv`` (stem conv and its SE
    block) is (1,3,3) = our (3,3,1); every conv_block, literal conv and up_block is 3x3x3."""
    net = SNet(num_classes=3, base_channels=4)
    kernels = conv_kernels(net)
    stem = {n for n in kernels if n.startswith("stem.")}
    assert stem == {"stem.0", "stem.2.conv1", "stem.2.conv2"}
    assert {kernels[n] for n in stem} == {(3, 3, 1)}
    assert {k for n, k in kernels.items() if n not in stem} == {(3, 3, 3)}
    assert kernels["skip1"] == kernels["skip2"] == kernels["dec2.conv1"] == (3, 3, 3)


def test_snet_inplane_option_changes_only_the_full_resolution_decoder_convs():
    upstream = SNet(num_classes=3, base_channels=4)
    inplane = SNet(num_classes=3, base_channels=4, full_res_kernels="inplane")
    a, b = upstream.state_dict(), inplane.state_dict()
    changed = sorted(k for k in a if a[k].shape != b[k].shape)
    assert changed == ["dec2.conv1.weight", "dec2.conv2.weight", "skip1.weight"]
    assert all(b[k].shape[2:] == (3, 3, 1) for k in changed)
    assert all(a[k].shape[2:] == (3, 3, 3) for k in changed)
    x = torch.randn(1, 1, 16, 16, 4)
    assert inplane(x).shape == upstream(x).shape == (1, 3, 16, 16, 4)
    with pytest.raises(ConfigError, match="full_res_kernels"):
        SNet(num_classes=3, full_res_kernels="3x3x1")
    with pytest.raises(ConfigError, match="needs anisotropic=True"):
        SNet(num_classes=3, anisotropic=False, full_res_kernels="inplane")


def test_architecture_names_the_snet_kernels_and_stores_them():
    default = FocusNetArchitecture()
    assert default.snet_full_res_kernels == "upstream"
    assert default.as_dict()["snet_full_res_kernels"] == "upstream"
    arch = FocusNetArchitecture.of({**default.as_dict(), "snet_full_res_kernels": "inplane"})
    record = arch.record(["b"], [1.0, 1.0, 3.0])
    assert record["snet_full_res_kernels"] == "inplane"
    assert (
        FocusNetArchitecture.of({k: v for k, v in record.items() if k not in ("small_organs", "spacing")})
        == arch
    )
    net = arch.build(CLASSES, ["b"], [1.0, 1.0, 3.0])
    assert tuple(net.snet.dec2.conv1.weight.shape[2:]) == (3, 3, 1)
    assert tuple(default.build(CLASSES, ["b"], [1.0, 1.0, 3.0]).snet.dec2.conv1.weight.shape[2:]) == (3, 3, 3)
    with pytest.raises(ConfigError, match="snet_full_res_kernels must be one of"):
        FocusNetArchitecture(snet_full_res_kernels="fast")
    # the architecture file every stage composes names the default
    import yaml

    given = yaml.safe_load((REPO / "experiments/focusnetv2/architecture.yaml").read_text())
    assert FocusNetArchitecture.of(given) == default
