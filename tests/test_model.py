"""The networks: registered by name, parameter counts pinned, the seed's rules checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import model
from model.analysis import feature_receptive_field, output_coverage, uses

# Every registered net with its exact trainable parameter count (a change to a net must change this table).
PARAMS = {"seed": 190_880, "dwres": 187_882}


def test_every_registered_net_has_a_pinned_count():
    assert set(model.model_names()) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name):
    net = model.build(name)
    assert model.count_params(net) == PARAMS[name]
    assert model.count_params(net) < 200_000


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_logits_shape_in_channels_last(name):
    net = model.build(name).to(memory_format=torch.channels_last).eval()
    x = torch.randn(5, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (5, 10) and out.dtype == torch.float32
    assert not torch.allclose(out.exp().sum(1), torch.ones(5))  # logits, not (log-)probabilities


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_rules_depthwise_dilated_no_maxpool(name):
    net = model.build(name)
    found = uses(net)
    assert found == {"depthwise": True, "dilated": True, "maxpool": False}
    assert not any(isinstance(m, nn.MaxPool2d | nn.AdaptiveMaxPool2d) for m in net.modules())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_receptive_field_covers_the_input(name):
    assert output_coverage(model.build(name)) == 1.0  # every input pixel reaches the logits


def test_seed_receptive_field_is_computed_not_assumed():
    # 3x3, 3x3 -> 5; 3x3/2 -> 7; 3x3 at stride 2 -> 11; 3x3 dilation 2 -> 19; 3x3 -> 23; depthwise 3x3 -> 27;
    # then the 9x9 average pool at stride 2 makes the logits see 27 + 8 * 2 = 43 >= 32 pixels.
    assert feature_receptive_field(model.build("seed")) == 27


def test_dwres_sees_the_whole_image_before_pooling():
    assert feature_receptive_field(model.build("dwres")) == 77


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        model.build("resnet50")


def test_registering_a_taken_name_is_refused():
    from model._registry import register_model

    with pytest.raises(ValueError, match="'seed' is registered twice"):
        register_model("seed")(nn.Identity)
    assert model.build("seed").__class__.__name__ == "SeedNet"  # the first registration still stands


def test_late_registrations_are_listed():
    from model._registry import _REGISTRY, register_model

    register_model("probe-net")(nn.Identity)
    try:
        assert "probe-net" in model.model_names()
    finally:
        del _REGISTRY["probe-net"]
