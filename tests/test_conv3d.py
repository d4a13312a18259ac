"""3-D CNNs (video classifiers): Conv3d, BatchNorm3d and the 3-D pools, checked against 2-D
twins where a 3-D layer is a 2-D one (a kernel of depth 1 on one frame; a kernel of height 1
on frames one pixel high, time as the height), and torchvision's video ResNets end to end."""
import pytest
import torch
import torchvision
from torch import nn

import rsp_fast
from conftest import rel_err

D = torch.float64
BACKENDS = [b for b, status in rsp_fast.backends("cpu").items() if status == "available"]


def _twins(axis: int):
    """A network over clips and its 2-D twin, the clip net's kernels, strides, dilations and
    paddings those of the twin with a 1 (a 0 for padding) inserted at ``axis`` of (T, H, W):
    axis 0 makes it the twin on a single frame, axis 1 the twin over (T, W) on frames one
    pixel high. A grouped strided dilated conv, BatchNorm, a max pool, a "same" even kernel."""
    def net(dims):
        conv, bn, pool, gap = ((nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d) if dims == 3 else
                               (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d))

        def size(n, fill=1):
            return (n, n) if dims == 2 else (n, n)[:axis] + (fill,) + (n, n)[axis:]
        return nn.Sequential(
            conv(3, 6, size(3), padding=size(1, 0)), bn(6), nn.ReLU(),
            conv(6, 8, size(3), stride=size(2), dilation=size(2), padding=size(2, 0), groups=2), nn.ReLU(),
            pool(size(2)), conv(8, 8, size(2), padding="same"), nn.ReLU(), conv(8, 8, size(1)), nn.ReLU(),
            gap(1), nn.Flatten(), nn.Linear(8, 5))
    torch.manual_seed(0)
    clip_net, image_net = net(3).double().eval(), net(2).double().eval()
    with torch.no_grad():
        clip_net[1].running_mean.normal_(), clip_net[1].running_var.uniform_(0.5, 2)
        for p3, p2 in zip(clip_net.state_dict().values(), image_net.state_dict().values()):
            p2.copy_(p3.reshape(p2.shape))
    return clip_net, image_net


@pytest.mark.parametrize("init", ["comparative", "gradcam"])
@pytest.mark.parametrize("axis,clip_shape", [(0, (2, 3, 1, 11, 13)), (1, (2, 3, 12, 1, 10))])
def test_conv3d_explains_as_its_2d_twin(axis, clip_shape, init):
    clip_net, image_net = _twins(axis)
    clip = torch.randn(*clip_shape, dtype=D)
    image = clip.squeeze(2 + axis)
    assert torch.allclose(clip_net(clip), image_net(image))
    expected = rsp_fast.RSP(image_net, init=init).attribute(image)
    for backend in BACKENDS:
        got = rsp_fast.RSP(clip_net, init=init, backend=backend).attribute(clip)
        assert got.shape == clip.shape
        assert rel_err(got.squeeze(2 + axis), expected) < 1e-12, backend


@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18"])
def test_torchvision_video_resnets_conserve_and_explain_each_clip_alone(name):
    model = getattr(torchvision.models.video, name)(num_classes=5).double().eval()
    clips = torch.randn(2, 3, 4, 32, 32, dtype=D)
    ex = rsp_fast.RSP(model).explain(clips, record=True)
    assert ex.layer == "layer4" and ex.attribution.shape == clips.shape
    assert torch.equal(rsp_fast.heatmap(ex.attribution), ex.attribution.sum(1))  # N×T×H×W
    total = ex.initial.flatten(1).sum(1)
    assert torch.allclose(ex.attribution.flatten(1).sum(1) + ex.dropped, total, rtol=1e-9)
    alone = rsp_fast.RSP(model).attribute(clips[1:], target=int(ex.target[1]))
    assert rel_err(alone, ex.attribution[1:]) < 1e-12
    with pytest.raises(rsp_fast.RSPError, match=r"5-D \(N, C, T, H, W\)"):
        rsp_fast.RSP(model).attribute(clips[:, :, 0])


def test_cost_model_counts_conv3d_layers():
    """rsp_fast.cost counts a video ResNet's 3-D convolutions (those PyTorch's FLOP counter
    sees in the forward pass, up to the saliency layer) and their RSP products."""
    from torch.utils.flop_counter import FlopCounterMode
    model = torchvision.models.video.r3d_18(num_classes=5).eval()
    report = rsp_fast.cost(model, (3, 4, 32, 32))
    convs = [r for r in report["layers"] if r["kind"] == "conv3d"]
    assert len(convs) == sum(isinstance(m, nn.Conv3d) for m in model.modules())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 4, 32, 32))
    conv_flops = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert sum(r["forward_macs"] for r in convs) == conv_flops // 2
    assert convs[0]["path"] == "z^B" and all(r["rsp_macs"] == 6 * r["forward_macs"] for r in convs[1:])


class _Clips(nn.Module):
    """conv → (BatchNorm, ReLU) → conv → ReLU → pooled head over clips; ``conv(i, c_in, c_out)``
    makes the i-th conv, ``functional`` writes the second one as F.conv3d on its parameter."""

    def __init__(self, conv, functional: bool = False):
        super().__init__()
        self.first, self.bn, self.second = conv(0, 3, 6), nn.BatchNorm3d(6), conv(1, 6, 8)
        self.functional = functional
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        h = torch.relu(self.bn(self.first(x)))
        if self.functional:
            s = self.second
            h = torch.nn.functional.conv3d(h, s.weight, s.bias, s.stride, s.padding, s.dilation, s.groups)
        else:
            h = self.second(h)
        return self.head(torch.relu(h))


@pytest.mark.parametrize("mode,pad", [("reflect", nn.ReflectionPad3d), ("replicate", nn.ReplicationPad3d),
                                      ("circular", nn.CircularPad3d)])
def test_conv3d_padding_modes_explain_like_an_explicit_pad(mode, pad):
    """Conv3d(padding_mode=...) is F.pad with that mode, then the conv without padding (as in
    2-D): the same attribution as the model written that way, first and inner layer."""
    def written(i, c_in, c_out):
        return nn.Conv3d(c_in, c_out, 3, padding=1, padding_mode=mode, groups=2 if i else 1)

    def padded(i, c_in, c_out):
        return nn.Sequential(pad(1), nn.Conv3d(c_in, c_out, 3, groups=2 if i else 1))
    torch.manual_seed(0)
    model, twin = _Clips(written).double().eval(), _Clips(padded).double().eval()
    with torch.no_grad():
        for p_twin, p in zip(twin.parameters(), model.parameters()):
            p_twin.copy_(p)
    clips = torch.randn(2, 3, 5, 9, 8, dtype=D)
    assert torch.allclose(model(clips), twin(clips))
    assert rel_err(rsp_fast.RSP(model).attribute(clips), rsp_fast.RSP(twin).attribute(clips)) < 1e-12


def test_conv3d_written_as_a_function_explains_like_the_module():
    def conv(i, c_in, c_out):
        return nn.Conv3d(c_in, c_out, (3, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1))
    torch.manual_seed(0)
    model = _Clips(conv).double().eval()
    functional = _Clips(conv, functional=True).double().eval()
    functional.load_state_dict(model.state_dict())
    clips = torch.randn(2, 3, 6, 7, 9, dtype=D)
    assert torch.allclose(model(clips), functional(clips))
    assert rel_err(rsp_fast.RSP(functional).attribute(clips), rsp_fast.RSP(model).attribute(clips)) < 1e-12
    def rows(m):  # the cost model's rows, without the layer names (a call's node is named "conv3d")
        return [{k: v for k, v in r.items() if k != "layer"} for r in rsp_fast.cost(m, (3, 6, 7, 9))["layers"]]
    assert rows(functional) == rows(model) and len(rows(model)) == 2
