"""The networks: shapes, torchvision-compatible names, weight loading, FLOP count."""

import pytest
import torch

from training.networks import ResNet, ResUNet, count_gflops, count_parameters, load_matching_weights

# torchvision.models.resnet18().state_dict().keys(), in order (torchvision cannot be installed here).
TORCHVISION_RESNET18_KEYS = [
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "bn1.num_batches_tracked",
    "layer1.0.conv1.weight",
    "layer1.0.bn1.weight",
    "layer1.0.bn1.bias",
    "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var",
    "layer1.0.bn1.num_batches_tracked",
    "layer1.0.conv2.weight",
    "layer1.0.bn2.weight",
    "layer1.0.bn2.bias",
    "layer1.0.bn2.running_mean",
    "layer1.0.bn2.running_var",
    "layer1.0.bn2.num_batches_tracked",
    "layer1.1.conv1.weight",
    "layer1.1.bn1.weight",
    "layer1.1.bn1.bias",
    "layer1.1.bn1.running_mean",
    "layer1.1.bn1.running_var",
    "layer1.1.bn1.num_batches_tracked",
    "layer1.1.conv2.weight",
    "layer1.1.bn2.weight",
    "layer1.1.bn2.bias",
    "layer1.1.bn2.running_mean",
    "layer1.1.bn2.running_var",
    "layer1.1.bn2.num_batches_tracked",
    "layer2.0.conv1.weight",
    "layer2.0.bn1.weight",
    "layer2.0.bn1.bias",
    "layer2.0.bn1.running_mean",
    "layer2.0.bn1.running_var",
    "layer2.0.bn1.num_batches_tracked",
    "layer2.0.conv2.weight",
    "layer2.0.bn2.weight",
    "layer2.0.bn2.bias",
    "layer2.0.bn2.running_mean",
    "layer2.0.bn2.running_var",
    "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight",
    "layer2.0.downsample.1.weight",
    "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean",
    "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked",
    "layer2.1.conv1.weight",
    "layer2.1.bn1.weight",
    "layer2.1.bn1.bias",
    "layer2.1.bn1.running_mean",
    "layer2.1.bn1.running_var",
    "layer2.1.bn1.num_batches_tracked",
    "layer2.1.conv2.weight",
    "layer2.1.bn2.weight",
    "layer2.1.bn2.bias",
    "layer2.1.bn2.running_mean",
    "layer2.1.bn2.running_var",
    "layer2.1.bn2.num_batches_tracked",
    "layer3.0.conv1.weight",
    "layer3.0.bn1.weight",
    "layer3.0.bn1.bias",
    "layer3.0.bn1.running_mean",
    "layer3.0.bn1.running_var",
    "layer3.0.bn1.num_batches_tracked",
    "layer3.0.conv2.weight",
    "layer3.0.bn2.weight",
    "layer3.0.bn2.bias",
    "layer3.0.bn2.running_mean",
    "layer3.0.bn2.running_var",
    "layer3.0.bn2.num_batches_tracked",
    "layer3.0.downsample.0.weight",
    "layer3.0.downsample.1.weight",
    "layer3.0.downsample.1.bias",
    "layer3.0.downsample.1.running_mean",
    "layer3.0.downsample.1.running_var",
    "layer3.0.downsample.1.num_batches_tracked",
    "layer3.1.conv1.weight",
    "layer3.1.bn1.weight",
    "layer3.1.bn1.bias",
    "layer3.1.bn1.running_mean",
    "layer3.1.bn1.running_var",
    "layer3.1.bn1.num_batches_tracked",
    "layer3.1.conv2.weight",
    "layer3.1.bn2.weight",
    "layer3.1.bn2.bias",
    "layer3.1.bn2.running_mean",
    "layer3.1.bn2.running_var",
    "layer3.1.bn2.num_batches_tracked",
    "layer4.0.conv1.weight",
    "layer4.0.bn1.weight",
    "layer4.0.bn1.bias",
    "layer4.0.bn1.running_mean",
    "layer4.0.bn1.running_var",
    "layer4.0.bn1.num_batches_tracked",
    "layer4.0.conv2.weight",
    "layer4.0.bn2.weight",
    "layer4.0.bn2.bias",
    "layer4.0.bn2.running_mean",
    "layer4.0.bn2.running_var",
    "layer4.0.bn2.num_batches_tracked",
    "layer4.0.downsample.0.weight",
    "layer4.0.downsample.1.weight",
    "layer4.0.downsample.1.bias",
    "layer4.0.downsample.1.running_mean",
    "layer4.0.downsample.1.running_var",
    "layer4.0.downsample.1.num_batches_tracked",
    "layer4.1.conv1.weight",
    "layer4.1.bn1.weight",
    "layer4.1.bn1.bias",
    "layer4.1.bn1.running_mean",
    "layer4.1.bn1.running_var",
    "layer4.1.bn1.num_batches_tracked",
    "layer4.1.conv2.weight",
    "layer4.1.bn2.weight",
    "layer4.1.bn2.bias",
    "layer4.1.bn2.running_mean",
    "layer4.1.bn2.running_var",
    "layer4.1.bn2.num_batches_tracked",
    "fc.weight",
    "fc.bias",
]
# A few shapes torchvision's resnet18 has (1000 ImageNet classes).
TORCHVISION_RESNET18_SHAPES = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer4.1.conv2.weight": (512, 512, 3, 3),
    "layer4.1.bn2.running_var": (512,),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}
TORCHVISION_RESNET18_PARAMETERS = 11_689_512


def torchvision_like_resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with resnet18's keys and shapes (1000-class fc) and random values, as an ImageNet file has."""
    shapes = {k: v.shape for k, v in ResNet(width=64, num_outputs=1000).state_dict().items()}
    assert list(shapes) == TORCHVISION_RESNET18_KEYS
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(1000) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=generator)
        for k, shape in shapes.items()
    }


def test_classifier_outputs_one_logit_per_slice() -> None:
    model = ResNet(width=8).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1)
    maps = model.features(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]  # stem 1/2, then 1/4 .. 1/32


@pytest.mark.parametrize("size", [64, 96])
def test_segmenter_outputs_one_logit_per_pixel(size: int) -> None:
    model = ResUNet(width=8).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 1, size, size)


def test_resnet_width_64_has_torchvision_resnet18_names_shapes_and_size() -> None:
    model = ResNet(width=64, num_outputs=1000)
    state = model.state_dict()
    assert list(state) == TORCHVISION_RESNET18_KEYS
    for key, shape in TORCHVISION_RESNET18_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert count_parameters(model) == TORCHVISION_RESNET18_PARAMETERS


def test_load_matching_weights_takes_a_torchvision_checkpoint_but_its_fc() -> None:
    state = torchvision_like_resnet18_state()
    model = ResNet(width=64)  # one tumor logit, not 1000 classes
    fc_before = model.fc.weight.detach().clone()
    loaded = load_matching_weights(model, state)
    assert sorted(loaded) == sorted(k for k in TORCHVISION_RESNET18_KEYS if not k.startswith("fc."))
    own = model.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in loaded)
    assert torch.equal(model.fc.weight, fc_before)


def test_segmenter_encoder_takes_the_same_checkpoint() -> None:
    state = torchvision_like_resnet18_state()
    model = ResUNet(width=64)
    loaded = load_matching_weights(model.encoder, state)
    assert len(loaded) == len(TORCHVISION_RESNET18_KEYS) - 2
    assert torch.equal(model.encoder.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])


def test_load_matching_weights_refuses_a_checkpoint_that_matches_nothing() -> None:
    """A width-64 checkpoint for a width-8 net: no weight fits. Only the shape-() BatchNorm counters
    (num_batches_tracked) match by name and shape, and they must not count as a successful load."""
    with pytest.raises(ValueError, match="no parameter of the checkpoint matches"):
        load_matching_weights(ResNet(width=8), torchvision_like_resnet18_state())


def test_gflops_of_resnet18_match_the_published_figures() -> None:
    model = ResNet(width=64).train()
    # torchvision lists resnet18 at 1.81 G multiply-adds for 224x224, i.e. 3.63 GFLOPs; at 256: x (256/224)^2.
    assert count_gflops(model, 224) == pytest.approx(3.63, abs=0.02)
    assert count_gflops(model, 256) == pytest.approx(4.74, abs=0.02)
    assert model.training  # counting does not leave the model in eval mode
