"""Backbones: user trunks as a constructor parameter, ResNet-50 / ResNeXt-50 with RIDE's
expert split, and ``backbone_weights``."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from torch import nn
from torch.testing import assert_close

from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
from ltroute.nn import ExpertNet, count_macs

FAST = {"max_epochs": 1, "batch_size": 16, "random_state": 0}


class TinyResNet(nn.Module):
    """Shaped like a torchvision ResNet (conv1, bn1, relu, maxpool, layer1, avgpool, fc)."""

    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def user_trunk(width=8, seed=0):
    """What a user does with a torchvision model: their weights, classifier removed."""
    torch.manual_seed(seed)
    model = TinyResNet(width)
    with torch.no_grad():  # "pretrained": BN statistics that differ from a fresh init
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    model.fc = nn.Identity()
    return model


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_equal(module, state):
    current = module.state_dict()
    assert current.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(current[key], value), key


@pytest.fixture(scope="module")
def images():
    """60 tiny RGB images (3 x 8 x 8) of 3 string classes, long-tailed 30/20/10."""
    rng = np.random.RandomState(0)
    y = np.repeat(np.array(["cat", "dog", "emu"]), [30, 20, 10])
    X = rng.rand(len(y), 3, 8, 8).astype(np.float32)
    X[:, 0] += (y == "cat")[:, None, None] * 0.5  # a learnable signal per class
    X[:, 1] += (y == "dog")[:, None, None] * 0.5
    return X, y


# ----------------------------------------------------------------------- user trunks
def test_a_module_is_a_constructor_parameter():
    """The issue's reproduction: this raised SkorchAttributeError in the constructor."""
    trunk = nn.Linear(6, 16)
    clf = LongTailClassifier(backbone=trunk)
    assert clf.get_params()["backbone"] is trunk
    other = nn.Linear(6, 4)
    assert clf.set_params(backbone=other).backbone is other
    assert clf.set_params(backbone="mlp").backbone == "mlp"
    # Not registered as a skorch component: nothing to train or move besides module_.
    assert "backbone" not in clf.prefixes_ and "backbone_" not in clf.cuda_dependent_attributes_


@pytest.mark.parametrize("estimator", [LongTailClassifier, RIDEClassifier, DQRouteClassifier])
def test_user_trunk_with_every_estimator_leaves_the_parameter_untouched(estimator):
    rng = np.random.RandomState(0)
    X = rng.randn(90, 6).astype(np.float32)
    y = np.repeat([0, 1, 2], [50, 30, 10])
    trunk = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU())
    before = snapshot(trunk)
    clf = estimator(backbone=trunk, **FAST).fit(X, y)
    assert clf.backbone is trunk and trunk.training  # same object, same mode
    assert_state_equal(trunk, before)  # BN running statistics included
    assert clf.module_.trunk.trunk is not trunk
    assert clf.predict(X).shape == (90,)
    # After a fit the parameter can still be replaced (then used by the next fit).
    clf.set_params(backbone=nn.Linear(6, 4)).fit(X, y)
    assert clf.module_.trunk.trunk.out_features == 4


def test_torchvision_shaped_trunk_starts_from_the_users_weights(images):
    X, y = images
    trunk = user_trunk(width=8)
    before = snapshot(trunk)
    clf = LongTailClassifier(backbone=trunk, expert_hidden_sizes=(), max_epochs=0,
                             random_state=0).fit(X, y)
    # The network's trunk is a copy holding the user's weights; heads sit on its features.
    assert_state_equal(clf.module_.trunk.trunk, before)
    assert_state_equal(trunk, before)
    assert clf.module_.feature_dim == 8
    assert clf.module_.heads[0].in_features == 8
    # Training moves the copy, never the parameter.
    clf.set_params(max_epochs=2).fit(X, y)
    assert_state_equal(trunk, before)
    assert not torch.equal(clf.module_.trunk.trunk.conv1.weight, before["conv1.weight"])
    assert list(clf.predict(X[:4])) == list(clf.classes_[clf.predict_proba(X[:4]).argmax(1)])


def test_user_trunk_through_clone_and_pickle(images):
    X, y = images
    trunk = user_trunk()
    clf = LongTailClassifier(backbone=trunk, expert_hidden_sizes=(), **FAST)
    cloned = clone(clf)
    # scikit-learn's clone deep-copies non-estimator parameters: same weights, new object.
    assert cloned.backbone is not trunk
    assert_state_equal(cloned.backbone, snapshot(trunk))
    restored = pickle.loads(pickle.dumps(clf))
    assert_state_equal(restored.backbone, snapshot(trunk))

    clf.fit(X, y)
    restored = pickle.loads(pickle.dumps(clf))
    assert_close(restored.predict_proba(X), clf.predict_proba(X))
    assert_state_equal(restored.backbone, snapshot(trunk))
    # A clone of the fitted estimator is unfitted and fits to the same result.
    refit = clone(clf).fit(X, y)
    assert_close(refit.predict_proba(X), clf.predict_proba(X))


def test_grid_search_over_two_user_trunks(images):
    X, y = images
    narrow, wide = user_trunk(width=4, seed=1), user_trunk(width=12, seed=2)
    states = snapshot(narrow), snapshot(wide)
    search = GridSearchCV(LongTailClassifier(expert_hidden_sizes=(), **FAST),
                          {"backbone": [narrow, wide]}, cv=2, error_score="raise")
    search.fit(X, y)
    assert len(search.cv_results_["params"]) == 2
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    chosen = search.best_params_["backbone"]
    width = chosen.conv1.out_channels
    assert width in (4, 12)
    assert search.best_estimator_.module_.feature_dim == width
    assert_state_equal(narrow, states[0])
    assert_state_equal(wide, states[1])


# ----------------------------------------------------------- ResNet-50 / ResNeXt-50
def conv_macs(size, c_in, c_out, kernel, stride, groups=1):
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return out * out * c_out * (c_in // groups) * kernel * kernel, out


def stage_macs(size, c_in, planes, blocks, stride, groups, width_per_group):
    """Hand count of a bottleneck stage: 1x1, 3x3 (stride, groups), 1x1, projection."""
    width, total = planes * width_per_group // 64 * groups, 0
    for block in range(blocks):
        s = stride if block == 0 else 1
        total += conv_macs(size, c_in, width, 1, 1)[0]
        macs, out = conv_macs(size, width, width, 3, s, groups)
        total += macs + conv_macs(out, width, planes * 4, 1, 1)[0]
        if block == 0:
            total += conv_macs(size, c_in, planes * 4, 1, s)[0]
        size, c_in = out, planes * 4
    return total, size


def hand_count(size, groups, width_per_group, planes):
    """MACs of the shared trunk and of one expert (convolutions only)."""
    stem, size = conv_macs(size, 3, 64, 7, 2)
    size = (size - 1) // 2 + 1  # 3x3 max-pool, stride 2, padding 1
    layer1, size = stage_macs(size, 64, 64, 3, 1, groups, width_per_group)
    layer2, size = stage_macs(size, 256, 128, 4, 2, groups, width_per_group)
    layer3, size = stage_macs(size, 512, planes[0], 6, 2, groups, width_per_group)
    layer4, _ = stage_macs(size, planes[0] * 4, planes[1], 3, 2, groups, width_per_group)
    return stem + layer1 + layer2, layer3 + layer4


@pytest.mark.parametrize("backbone, groups, width_per_group",
                         [("resnet50", 1, 64), ("resnext50", 32, 4)])
@pytest.mark.parametrize("reduce_dimension", [False, True])
def test_imagenet_backbone_macs_match_a_hand_count(backbone, groups, width_per_group,
                                                   reduce_dimension):
    """On 224 x 224 inputs (meta tensors: nothing is computed) the trunk and every
    expert cost exactly the hand count."""
    planes = (192, 384) if reduce_dimension else (256, 512)
    with torch.device("meta"):
        net = ExpertNet(input_shape=(3, 224, 224), n_classes=1000, n_experts=2,
                        backbone=backbone, reduce_dimension=reduce_dimension)
    trunk_hand, expert_hand = hand_count(224, groups, width_per_group, planes)
    trunk_macs, shared = count_macs(net.trunk, torch.zeros(1, 3, 224, 224, device="meta"))
    assert trunk_macs == trunk_hand
    expert_macs, features = count_macs(net.branches[0], shared)
    assert expert_macs == expert_hand
    assert count_macs(net.heads[0], features)[0] == planes[1] * 4 * 1000
    assert net.feature_dim == planes[1] * 4
    # Every expert is the same network (with its own parameters).
    shapes = [[p.shape for p in branch.parameters()] for branch in net.branches]
    assert shapes[0] == shapes[1]
    if not reduce_dimension:
        # One full expert is the ImageNet network: torchvision lists 4.09 GFLOPS (MACs)
        # for ResNet-50 and 4.23 for ResNeXt-50 32x4d.
        total = (trunk_hand + expert_hand + 2048 * 1000) / 1e9
        assert round(total, 2) == {"resnet50": 4.09, "resnext50": 4.23}[backbone]


@pytest.mark.parametrize("backbone, n_params", [("resnet50", 25_557_032),
                                                ("resnext50", 25_028_904)])
def test_one_full_expert_has_torchvisions_parameter_count(backbone, n_params):
    """torchvision's resnet50 / resnext50_32x4d (1000 classes) have these many parameters."""
    with torch.device("meta"):
        net = ExpertNet(input_shape=(3, 224, 224), n_classes=1000, backbone=backbone)
    assert sum(p.numel() for p in net.parameters()) == n_params


@pytest.mark.parametrize("backbone", ["resnet50", "resnext50"])
def test_imagenet_backbone_expert_split_on_tiny_images(backbone):
    net = ExpertNet(input_shape=(3, 32, 32), n_classes=5, n_experts=3, backbone=backbone,
                    reduce_dimension=True, cosine_head=True)
    out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3, 5) and torch.isfinite(out).all()
    # Shared: stem, layer1, layer2 with torchvision's names. Per expert: layer3, layer4.
    trunk_keys = net.trunk_state_dict().keys()
    assert {k.split(".")[0] for k in trunk_keys} == {"conv1", "bn1", "layer1", "layer2"}
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer2.3.bn3.running_var"} <= \
        set(trunk_keys)
    branch_keys = net.branches[0].state_dict().keys()
    assert {k.split(".")[0] for k in branch_keys} == {"layer3", "layer4"}
    assert len(net.branches[0].layer3) == 6 and len(net.branches[0].layer4) == 3
    assert net.branches[0].layer3[0].conv3.out_channels == 192 * 4
    assert net.feature_dim == 1536
    ids = [{id(p) for p in branch.parameters()} for branch in net.branches]
    assert not ids[0] & ids[1] and not ids[1] & ids[2]
    groups = 32 if backbone == "resnext50" else 1
    assert net.trunk.layer1[0].conv2.groups == groups
    # The expert methods compose to forward (what RIDE's router reads).
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    shared = net.shared(x)
    assert shared.shape == (2, 512, 4, 4)
    parts = [net.expert_logits(net.expert_features(shared, k), k) for k in range(3)]
    assert_close(torch.stack(parts, dim=1), net(x))


def test_resnet50_by_name_in_an_estimator():
    """RIDE's reduced experts by default; fitted on a few tiny images (0 epochs: the test
    checks the wiring, not learning)."""
    X = np.random.RandomState(0).rand(6, 3, 32, 32).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 2])
    clf = RIDEClassifier(backbone="resnet50", n_experts=2, max_epochs=0, router=False,
                         batch_size=2, random_state=0).fit(X, y)
    assert clf.module_.feature_dim == 1536 and len(clf.module_.branches) == 2
    proba = clf.predict_proba(X[:2])
    assert proba.shape == (2, 3)
    assert_close(proba.sum(1), np.ones(2, dtype=np.float32))


# ------------------------------------------------------------------ backbone_weights
def test_trunk_weights_round_trip(tmp_path):
    source = ExpertNet(input_shape=(3, 32, 32), n_classes=4, backbone="resnet50",
                       reduce_dimension=True)
    path = tmp_path / "trunk.pt"
    torch.save(source.trunk_state_dict(), path)
    torch.manual_seed(1)
    loaded = ExpertNet(input_shape=(3, 32, 32), n_classes=4, backbone="resnet50",
                       reduce_dimension=True, backbone_weights=path)
    assert_state_equal(loaded.trunk, source.trunk_state_dict())
    # Only the trunk: the experts keep their own initialisation.
    assert not torch.equal(loaded.branches[0].layer3[0].conv1.weight,
                           source.branches[0].layer3[0].conv1.weight)
    source.eval(), loaded.eval()
    x = torch.rand(2, 3, 32, 32)
    assert_close(loaded.shared(x), source.shared(x))


def test_backbone_weights_in_an_estimator_for_a_user_trunk(tmp_path, images):
    """The names are the user module's own; every fit starts from the file."""
    X, y = images
    pretrained = user_trunk(seed=3)
    path = tmp_path / "user_trunk.pt"
    torch.save(pretrained.state_dict(), path)
    clf = LongTailClassifier(backbone=user_trunk(seed=4), backbone_weights=str(path),
                             expert_hidden_sizes=(), max_epochs=0, random_state=0)
    clf.fit(X, y)
    assert_state_equal(clf.module_.trunk.trunk, snapshot(pretrained))
    assert clone(clf).backbone_weights == str(path)


def test_torchvision_layout_conversion(tmp_path):
    """A whole torchvision-style state_dict is refused with the fix; the documented
    filter makes it load."""
    full = ExpertNet(input_shape=(3, 32, 32), n_classes=1000, backbone="resnet50")
    # torchvision's names: trunk entries, then layer3, layer4 and fc at the top level.
    state = dict(full.trunk_state_dict())
    state |= full.branches[0].state_dict()
    state |= {"fc." + k: v for k, v in full.heads[0].state_dict().items()}
    target = ExpertNet(input_shape=(3, 32, 32), n_classes=10, backbone="resnet50")
    with pytest.raises(ValueError, match=r"not in the trunk \(layer3.*keep those"):
        target.load_trunk_weights(state)
    trunk = {k: v for k, v in state.items()
             if k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"}}
    path = tmp_path / "resnet50_trunk.pt"
    torch.save(trunk, path)
    target.load_trunk_weights(path)
    assert_state_equal(target.trunk, trunk)


def test_torchvision_resnet50_weights_load_when_torchvision_works():
    models = pytest.importorskip("torchvision.models")  # fails to import with CPU torch
    reference = models.resnet50(weights=None).eval()
    trunk = {k: v for k, v in reference.state_dict().items()
             if k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"}}
    net = ExpertNet(input_shape=(3, 64, 64), n_classes=3, backbone="resnet50",
                    backbone_weights=trunk).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.layer2(reference.layer1(reference.maxpool(
            reference.relu(reference.bn1(reference.conv1(x))))))
        assert_close(net.shared(x), expected)


def test_backbone_weights_errors(tmp_path):
    def build(weights, backbone="resnet32"):
        return ExpertNet(input_shape=(3, 32, 32), n_classes=3, backbone=backbone,
                         backbone_weights=weights)

    good = build(None).trunk_state_dict()
    with pytest.raises(FileNotFoundError, match="does not exist.*never downloads"):
        build(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not be read as a state_dict"):
        build(garbage)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": good, "epoch": torch.tensor(3)}, checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint\? Save the state_dict"):
        build(checkpoint)
    with pytest.raises(ValueError, match="strip it"):
        build({"module." + k: v for k, v in good.items()})
    with pytest.raises(ValueError, match="1 trunk entries are missing"):
        build({k: v for k, v in good.items() if k != "conv1.weight"})
    grey = ExpertNet(input_shape=(1, 32, 32), n_classes=3, backbone="resnet32")
    with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(16, 1, 3, 3\), but "
                                         r"the trunk's has shape \(16, 3, 3, 3\)"):
        build(grey.trunk_state_dict())
    resnext = ExpertNet(input_shape=(3, 32, 32), n_classes=3, backbone="resnext50")
    with pytest.raises(ValueError, match="has shape"):
        build(resnext.trunk_state_dict(), "resnet50")


def test_backbone_weights_parameter_validation(images):
    X, y = images
    with pytest.raises(ValueError, match="'backbone_weights' parameter"):
        LongTailClassifier(backbone_weights=3, max_epochs=0).fit(X, y)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        LongTailClassifier(backbone="convnet", backbone_weights="nowhere.pt",
                           max_epochs=0).fit(X, y)
