"""Export: onnxruntime and torch.export logits equal PyTorch's (float32, within 1e-4) on other shapes than the
example the export traced."""

import warnings

import pytest
import torch

from companion import GPT, GPTConfig, Llama, LlamaConfig
from companion.inference.export import OnnxLM, export_onnx, export_program

TOL = dict(atol=1e-4, rtol=1e-4)  # float32 kernels of two runtimes: different summation orders only


@pytest.fixture(scope="module", params=["gpt", "llama"])
def model(request):
    torch.manual_seed(0)
    return (GPT(GPTConfig.tiny()) if request.param == "gpt" else Llama(LlamaConfig.tiny())).eval()


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the known exporter warning is silenced by export_onnx
        return export_onnx(model, tmp_path_factory.mktemp("onnx") / "lm.onnx")


def test_onnx_logits_match(model, onnx_path):
    lm = OnnxLM(onnx_path, threads=1)
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 1), (1, 5), (3, model.config.n_ctx)]:  # dynamic batch and sequence length
        idx = torch.randint(0, model.config.vocab_size, shape, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(lm(idx), model(idx), **TOL)


def test_torch_export_matches(model):
    program = export_program(model)
    idx = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(idx), model(idx), **TOL)


def test_bad_arguments_raise(model, onnx_path, tmp_path):
    with pytest.raises(ValueError, match="path must end in .onnx, got"):
        export_onnx(model, tmp_path / "lm.bin")
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\), got \(4,\)"):
        OnnxLM(onnx_path)(torch.zeros(4, dtype=torch.long))
