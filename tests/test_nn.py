"""Network modules: shapes, ResNet-32 structure and size, cosine heads, user trunks."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from ltroute.nn import ConvNetBranch, ExpertNet, NormedLinear, resolve_backbone


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "input_shape, backbone, trunk_name",
    [((16,), "auto", "MLP"), ((1, 28, 28), "auto", "ConvNetTrunk"),
     ((3, 32, 32), "auto", "ResNet32Trunk"), ((3, 16, 16), "auto", "ConvNetTrunk"),
     ((1, 12, 12), "resnet32", "ResNet32Trunk")],
)
def test_expert_net_shapes_for_every_backbone(input_shape, backbone, trunk_name):
    net = ExpertNet(input_shape=input_shape, n_classes=7, n_experts=3, backbone=backbone)
    assert type(net.trunk).__name__ == trunk_name
    out = net(torch.randn(4, *input_shape))
    assert out.shape == (4, 3, 7)
    assert len(net.branches) == len(net.heads) == 3


def test_resnet32_sizes_match_the_ride_spec():
    """Plain ResNet-32 has ~0.47 M parameters; 3 reduced RIDE experts ~0.78 M (ride.md)."""
    plain = ExpertNet(input_shape=(3, 32, 32), n_classes=100, backbone="resnet32")
    assert n_params(plain) == pytest.approx(0.47e6, rel=0.01)
    ride = ExpertNet(input_shape=(3, 32, 32), n_classes=100, n_experts=3, backbone="resnet32",
                     reduce_dimension=True, cosine_head=True)
    assert n_params(ride) == pytest.approx(0.78e6, rel=0.01)
    # 32 weighted layers: stem + 3 stages x 5 blocks x 2 convs + head.
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 32
    # Experts own layer2/layer3: no parameter is shared between branches.
    ids = [{id(p) for p in b.parameters()} for b in ride.branches]
    assert not ids[0] & ids[1]


def test_option_a_shortcut_is_parameter_free():
    net = ExpertNet(input_shape=(3, 32, 32), n_classes=10, backbone="resnet32")
    shortcut = net.branches[0].layer2[0].shortcut
    assert n_params(shortcut) == 0
    x = torch.randn(2, 16, 32, 32)
    y = shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.all(y[:, :8] == 0) and torch.all(y[:, 24:] == 0)


def test_normed_linear_is_a_bounded_cosine_with_unit_columns():
    head = NormedLinear(5, 4, scale=30.0)
    assert_close(head.weight.norm(dim=0), torch.ones(4))
    x = torch.randn(8, 5) * 100
    z = head(x)
    assert torch.all(z.abs() <= 30.0 + 1e-4)
    # Scale invariance in the input: only the direction of x matters.
    assert_close(head(3 * x), z)
    cos = torch.nn.functional.cosine_similarity(x[:1].T.expand(5, 4).T, head.weight.T, dim=1)
    assert_close(z[0], 30 * cos)


def test_cosine_and_linear_heads():
    cos = ExpertNet(input_shape=(6,), n_classes=3, cosine_head=True, head_scale=10.0)
    lin = ExpertNet(input_shape=(6,), n_classes=3)
    assert isinstance(cos.heads[0], NormedLinear) and isinstance(lin.heads[0], nn.Linear)
    assert cos(torch.randn(5, 6)).abs().max() <= 10.0 + 1e-4


def test_user_trunk_is_copied_and_sized_by_a_dry_run():
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    net = ExpertNet(input_shape=(1, 8, 8), n_classes=5, n_experts=2, backbone=trunk,
                    expert_hidden_sizes=(12,))
    assert net.feature_dim == 12
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 2, 5)
    assert all(p is not q for p, q in zip(trunk.parameters(), net.parameters(), strict=False))


def test_expert_methods_compose_to_forward():
    net = ExpertNet(input_shape=(6,), n_classes=3, n_experts=2).eval()
    x = torch.randn(4, 6)
    shared = net.shared(x)
    parts = [net.expert_logits(net.expert_features(shared, k), k) for k in range(2)]
    assert_close(torch.stack(parts, dim=1), net(x))


def test_resolve_backbone_and_errors():
    assert resolve_backbone("auto", (10,)) == "mlp"
    assert resolve_backbone("auto", (3, 32, 32)) == "resnet32"
    assert resolve_backbone("auto", (1, 28, 28)) == "convnet"
    with pytest.raises(ValueError, match="feature vectors"):
        ExpertNet(input_shape=(1, 8, 8), n_classes=2, backbone="mlp")
    with pytest.raises(ValueError, match="images"):
        ExpertNet(input_shape=(8,), n_classes=2, backbone="convnet")
    with pytest.raises(ValueError, match="not supported"):
        ExpertNet(input_shape=(8,), n_classes=2, backbone="vit")


@pytest.mark.parametrize("pool_size", [1, 3])
def test_convnet_branch_pools_to_a_pool_size_map_before_its_hidden_layer(pool_size):
    torch.manual_seed(0)
    branch = ConvNetBranch(in_channels=4, width=5, hidden=7, pool_size=pool_size).eval()
    x = torch.randn(2, 4, 7, 7)
    feature_map = branch.block(x)  # (2, 5, 7, 7)
    # Average pooling by hand: 7 = 3 bins of rows [0, 3), [2, 5), [4, 7) (adaptive bins).
    bins = [(0, 7)] if pool_size == 1 else [(0, 3), (2, 5), (4, 7)]
    pooled = torch.stack([torch.stack([feature_map[:, :, r0:r1, c0:c1].mean((2, 3))
                                       for c0, c1 in bins], -1) for r0, r1 in bins], -2)
    assert_close(branch(x), branch.fc(pooled.flatten(1)))
    assert branch.out_features == 7
    assert ConvNetBranch(in_channels=4, width=5, hidden=0, pool_size=pool_size)(x).shape == (
        2, 5 * pool_size ** 2)
