"""Issue 15, INT8 that pays on ONNX Runtime: the decoders' resize + conv upsampling
(``upsample="resize"``) against the papers' transposed convolutions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from edgead.models import registry  # noqa: E402
from edgead.models.blocks import DCGANDecoder, UNetGenerator, grow_from_code, upsample_conv  # noqa: E402
from edgead.models.ssim_ae import SSIMAutoencoder  # noqa: E402


def test_resize_stem_is_the_transposed_convs_linear_map() -> None:
    """From a 1x1 code, a size x size transposed conv and a 1x1 conv + pixel shuffle are the same map."""
    torch.manual_seed(0)
    transpose, resize = grow_from_code(6, 5, 4, "transpose", bias=True), grow_from_code(6, 5, 4, "resize", bias=True)
    conv = resize[0]
    with torch.no_grad():  # pixel shuffle reads channel o·16 + 4i + j as output (o, i, j)
        conv.weight.copy_(transpose.weight.permute(1, 2, 3, 0).reshape(5 * 16, 6, 1, 1))
        conv.bias.copy_(transpose.bias.repeat_interleave(16))
    z = torch.randn(3, 6, 1, 1)
    torch.testing.assert_close(resize(z), transpose(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda up: DCGANDecoder(32, 3, 16, width=8, upsample=up),
    lambda up: UNetGenerator(32, 3, width=8, upsample=up),
    lambda up: SSIMAutoencoder(64, 3, 16, 8, upsample=up),
], ids=["dcgan", "unet", "ssim_ae"])
def test_both_upsamplings_give_the_same_shapes_and_resize_has_no_transposed_conv(make) -> None:
    transpose, resize = make("transpose").eval(), make("resize").eval()
    x = torch.randn(2, 16, 1, 1) if isinstance(transpose, DCGANDecoder) else torch.rand(2, 3, *(
        (32, 32) if isinstance(transpose, UNetGenerator) else (64, 64)))
    assert resize(x).shape == transpose(x).shape
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in resize.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in transpose.modules())


def test_unknown_upsampling_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"upsample must be one of \('transpose', 'resize'\), got 'bilinear'"):
        registry.create("ganomaly", upsample="bilinear", width=8, latent_dim=8, image_size=32)
    with pytest.raises(ValueError, match="upsample must be one of"):
        upsample_conv(4, 4, "deconv")


def test_transposed_default_keeps_the_state_dict_layout_of_earlier_runs() -> None:
    """Runs saved before the option load unchanged: the transposed layers sit where they always did."""
    state = registry.create("ganomaly", width=8, latent_dim=8, image_size=32).state_dict()
    assert tuple(state["generator.net.main.0.weight"].shape) == (8, 32, 4, 4)  # ConvTranspose2d(in, out, 4, 4)
    assert not any(".main.0.0." in k for k in state)


def _onnx_decoder(tmp_path: Path, upsample: str) -> tuple[Path, list[dict[str, np.ndarray]]]:
    torch.manual_seed(0)
    net = DCGANDecoder(32, 3, 16, width=8, upsample=upsample).eval()
    path = tmp_path / f"decoder_{upsample}.onnx"
    torch.onnx.export(net, (torch.randn(1, 16, 1, 1),), str(path), input_names=["z"], output_names=["reconstruction"],
                      opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    return path, [{"z": rng.standard_normal((1, 16, 1, 1)).astype(np.float32)} for _ in range(8)]


def _optimised_ops(path: Path, tmp_path: Path) -> list[str]:
    """The op types of ONNX Runtime's own optimised CPU graph (what its kernels run)."""
    import onnx

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_only_the_resize_decoder_runs_its_upsampling_as_int8_convolutions_in_onnx_runtime(upsample: str,
                                                                                          tmp_path: Path) -> None:
    from edgead.export.int8 import quantize_int8

    fp32, feeds = _onnx_decoder(tmp_path, upsample)
    int8 = tmp_path / f"decoder_{upsample}.int8.onnx"
    quantize_int8(fp32, int8, feeds, layout="cpu")
    ops = _optimised_ops(int8, tmp_path)
    if upsample == "transpose":  # no INT8 ConvTranspose kernel: float, between Q/DQ pairs
        assert ops.count("ConvTranspose") == 4 and "QLinearConv" not in ops
    else:  # the 1x1 stem and the resize + 3x3 convs, but the last (the graph's output stays float)
        assert "ConvTranspose" not in ops and ops.count("QLinearConv") == 3
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    got = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    assert np.isfinite(got).all() and np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95
