"""`lora_init_type`: each initialisation gives the starting weights its definition implies (peft's, as SimpleTuner
passes it); PiSSA and OLoRA adapters are saved relative to the unchanged base; loftq is refused naming quantisation."""

from __future__ import annotations

import json

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, NotSupportedError
from pipeline.families import get_family, load_components
from pipeline.train import adapters
from pipeline.train.options import AdapterOptions

RANK, ALPHA = 4, 8.0
MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def options(init: str, **extra) -> AdapterOptions:
    config = Config(model_type="lora", lora_type="standard", lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                    lora_init_type=init, **extra)  # fmt: skip
    return AdapterOptions.from_config(config)


@pytest.fixture(scope="module")
def unet(tiny_model):
    """A loader of fresh copies of the tiny SD 1.x UNet."""
    family = get_family("sd1x")
    model = tiny_model("sd1x")
    return lambda: load_components(family, str(model), which=("denoiser",))["denoiser"].float()


def adapted(unet, init: str, **extra):
    """(original weight of MODULE, the adapted UNet, MODULE's lora layer)."""
    import torch

    torch.manual_seed(0)
    denoiser = unet()
    original = denoiser.get_submodule(MODULE).weight.detach().clone()
    adapters.attach(denoiser, options(init, **extra), get_family("sd1x"))
    return original, denoiser, denoiser.get_submodule(MODULE)


def parts(layer):
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def all_a(denoiser):
    import torch

    return torch.cat([p.detach().flatten() for n, p in denoiser.named_parameters() if "lora_A" in n])


def test_default_is_kaiming_a_and_zero_b(unet):
    original, _, layer = adapted(unet, "default")
    a, b = parts(layer)
    assert b.abs().max() == 0 and layer.base_layer.weight.equal(original)
    bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in inputs
    assert 0 < a.abs().max() <= bound
    assert a.std() == pytest.approx(bound / 3**0.5, rel=0.25)  # uniform(-bound, bound)


def test_gaussian_is_normal_a_with_std_one_over_rank_and_zero_b(unet):
    original, denoiser, layer = adapted(unet, "gaussian")
    _, b = parts(layer)
    assert b.abs().max() == 0 and layer.base_layer.weight.equal(original)
    pooled = all_a(denoiser)
    assert pooled.numel() > 2000
    assert float(pooled.mean()) == pytest.approx(0, abs=0.02)
    assert float(pooled.std()) == pytest.approx(1 / RANK, rel=0.05)


def test_pissa_takes_the_principal_singular_components_out_of_the_base(unet):
    import torch

    original, _, layer = adapted(unet, "pissa")
    a, b = parts(layer)
    residual = layer.base_layer.weight.detach()
    scale = ALPHA / RANK
    product = scale * b @ a
    assert float((residual + product - original).abs().max()) < 1e-5  # base minus the adapter's product = residual
    u, s, vh = torch.linalg.svd(original, full_matrices=False)
    principal = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK]
    assert float((product - principal).abs().max()) < 1e-5
    # A and B share the singular values: A = sqrt(S/scale) Vh, B = U sqrt(S/scale)
    assert torch.allclose(torch.linalg.norm(a, dim=1), torch.sqrt(s[:RANK] / scale), atol=1e-5)
    assert torch.allclose(torch.linalg.norm(b, dim=0), torch.sqrt(s[:RANK] / scale), atol=1e-5)
    assert float(torch.linalg.svdvals(residual)[0]) == pytest.approx(float(s[RANK]), rel=1e-4)


def test_olora_starts_from_the_qr_decomposition(unet):
    import torch

    original, _, layer = adapted(unet, "olora")
    a, b = parts(layer)
    residual = layer.base_layer.weight.detach()
    scale = ALPHA / RANK
    assert float((residual + scale * b @ a - original).abs().max()) < 1e-5
    q, r = torch.linalg.qr(original)
    assert torch.allclose(b, q[:, :RANK], atol=1e-5) and torch.allclose(a, r[:RANK], atol=1e-5)
    assert torch.allclose(b.T @ b, torch.eye(RANK), atol=1e-5)  # orthonormal columns
    assert torch.allclose(a, torch.triu(a), atol=1e-6)  # the leading rows of R are upper triangular


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_adapter_applies_to_the_original_base(unet, tmp_path, init):
    """After training moved A and B, the saved file on the unchanged base gives the trained weight."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    _, denoiser, layer = adapted(unet, init)
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.01)
    trained = layer.base_layer.weight.detach() + (ALPHA / RANK) * layer.lora_B["default"].weight.detach() @ \
        layer.lora_A["default"].weight.detach()  # fmt: skip
    family = get_family("sd1x")
    adapters.save_final(denoiser, options(init), family, tmp_path)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as handle:
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert header["unet.r"] == 2 * RANK and header["unet.lora_alpha"] == 2 * ALPHA
    assert header["unet.init_lora_weights"] is True  # loaders must not re-run the SVD on the base
    fresh = unet()
    config = LoraConfig(**{k.removeprefix("unet."): v for k, v in header.items() if k.startswith("unet.")})
    inject_adapter_in_model(config, fresh)
    state = {k.removeprefix("unet."): v for k, v in load_file(str(file)).items()}
    set_peft_model_state_dict(fresh, state)
    loaded = fresh.get_submodule(MODULE)
    merged = loaded.base_layer.weight.detach() + loaded.scaling["default"] * loaded.lora_B["default"].weight.detach() \
        @ loaded.lora_A["default"].weight.detach()  # fmt: skip
    assert float((merged - trained).abs().max()) < 1e-5


def test_pissa_with_dora_is_refused(unet):
    with pytest.raises(ConfigError, match="use_dora"):
        adapted(unet, "pissa", use_dora=True)


def test_loftq_is_refused_naming_quantisation(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--model_family": "sd1x", "--lora_init_type": "loftq"}))
    with pytest.raises(NotSupportedError, match=r"lora_init_type 'loftq'.*quantised base model"):
        load_config(path)
