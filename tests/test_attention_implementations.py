"""The attention implementations behind `model.attention`: the cuDNN path's glue (layout, scale,
odd-length padding) checked through jax's XLA implementation against torch, and the option's
plumbing from the config to every Attention layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import build_model, transformer
from fmjax.models.heads import MAEDecoder


@pytest.mark.parametrize("length", [16, 17, 103])
def test_fused_attention_matches_torch_sdpa_for_odd_and_even_lengths(length):
  """fused_attention pads an odd token count by one masked key; output and qkv gradient must still
  be exactly softmax(q k^T / sqrt(d)) v over the real tokens (torch SDPA in float64)."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(length)
  qkv = rng.normal(size=(2, length, 3, 4, 16)).astype(np.float32) * 2
  cotangent = rng.normal(size=(2, length, 4, 16)).astype(np.float32)
  loss = lambda x: jnp.sum(transformer.fused_attention(x, "xla") * cotangent)
  out = transformer.fused_attention(jnp.asarray(qkv), "xla")
  grad = jax.grad(loss)(jnp.asarray(qkv))
  assert out.shape == (2, length, 4, 16)

  t = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
  q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))    # SDPA takes [B, heads, L, d]
  ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
  (ref * torch.tensor(cotangent, dtype=torch.float64)).sum().backward()
  np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=2e-5)
  np.testing.assert_allclose(np.asarray(grad), t.grad.numpy(), atol=5e-5)


def test_resolve_attention_on_a_cpu():
  assert jax.default_backend() == "cpu"
  assert transformer.resolve_attention("xla", 64, jnp.bfloat16) == "xla"
  assert transformer.resolve_attention("auto", 64, jnp.bfloat16) == "xla"   # cuDNN only on a GPU
  assert not transformer.cudnn_attention_supported(64, jnp.bfloat16)
  with pytest.raises(ValueError, match="needs a GPU backend"):
    transformer.resolve_attention("cudnn", 64, jnp.bfloat16)
  with pytest.raises(ValueError, match="valid choices"):
    transformer.resolve_attention("flash", 64, jnp.bfloat16)


@pytest.mark.parametrize("scan", [False, True])
def test_attention_option_reaches_every_layer(scan):
  """'cudnn' on a CPU is refused inside Attention: an encoder (unrolled or scanned) and the MAE
  decoder built with it fail at init, so the option travels through every layer in between."""
  x = jnp.zeros((1, 16, 16, 8))
  vit = build_model("spec_vit", width=32, depth=2, num_heads=4, patch_size=4, image_size=16, num_bands=8,
                    use_adapter=False, scan=scan, attention="cudnn")
  with pytest.raises(ValueError, match="attention='cudnn' needs a GPU backend"):
    vit.init(jax.random.key(0), x, train=False)
  auto = build_model("spec_vit", width=32, depth=2, num_heads=4, patch_size=4, image_size=16, num_bands=8,
                     use_adapter=False, scan=scan, attention="auto")
  variables = auto.init(jax.random.key(0), x, train=False)
  plain = build_model("spec_vit", width=32, depth=2, num_heads=4, patch_size=4, image_size=16, num_bands=8,
                      use_adapter=False, scan=scan)
  np.testing.assert_array_equal(auto.apply(variables, x + 1, train=False)["embedding"],
                                plain.apply(variables, x + 1, train=False)["embedding"])
  decoder = MAEDecoder(patch_size=4, out_channels=8, width=32, num_heads=4, attention="cudnn")
  with pytest.raises(ValueError, match="attention='cudnn' needs a GPU backend"):
    decoder.init(jax.random.key(0), jnp.zeros((1, 3, 32)), jnp.tile(jnp.arange(16), (1, 1)), train=False)


def test_config_attention_is_passed_to_mae_and_dropped_for_resnets():
  from configs import common, dino_rn50
  from fmjax.objectives import build_objective
  from fmjax.objectives.dino import build_backbone
  config = common.mae_config("t")
  config.model.attention = "auto"
  objective = build_objective(config)
  assert objective.model.encoder.attention == "auto" and objective.model.decoder.attention == "auto"
  resnet_config = dino_rn50.get_config()
  resnet_config.model.attention = "cudnn"   # a ViT-only option: ResNets never see it
  assert type(build_backbone(resnet_config)).__name__ == "SpecResNet"


def test_evaluation_of_a_cudnn_pretraining_run_falls_back_off_the_gpu():
  """A backbone pretrained with attention='cudnn' is evaluated on whatever machine evaluates it."""
  from configs import common
  from fmjax.evaluate import protocols, run
  pre_config = common.mae_config("t")
  pre_config.model.attention = "cudnn"
  model_cfg = run.backbone_config(pre_config)
  assert model_cfg["attention"] == "auto"
  backbone = protocols.build_backbone({**model_cfg, "image_size": 16, "patch_size": 4, "num_bands": 80})
  variables = backbone.init(jax.random.key(0), jnp.zeros((1, 16, 16, 80)), train=False)
  assert backbone.apply(variables, jnp.ones((1, 16, 16, 80)), train=False)["embedding"].shape == (1, 192)
