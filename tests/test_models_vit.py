"""ViT / SpecViT: parameter counts vs the official models, shapes, and the numerics of every piece
against NumPy written from the formulas (GELU via math.erf, LayerNorm, attention, sin-cos)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fmjax.models import MODEL_NAMES, build_model, layers as L, transformer

# REFERENCE.md: parameters at patch 4 without head (adapter included).
OFFICIAL_VIT_PARAMS = {"t": 5.99e6, "s": 22.53e6, "b": 87.47e6, "l": 305.5e6, "h": 633.7e6, "g": 1.138e9}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init(model, x):
  return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)


def _abstract_params(model):
  x = jax.ShapeDtypeStruct(model.input_shape(1), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]


@pytest.mark.parametrize("size", list(OFFICIAL_VIT_PARAMS))
def test_vit_param_counts_match_official(size):
  n = _count(_abstract_params(build_model(f"spec_vit_{size}", patch_size=4)))
  assert abs(n - OFFICIAL_VIT_PARAMS[size]) / OFFICIAL_VIT_PARAMS[size] < 0.005, n


def test_vit_s_exact_layout():
  params = nn.unbox(_abstract_params(build_model("spec_vit_s")))
  core = params["vit_core"]
  assert core["cls_token"].shape == (1, 1, 384)
  assert core["pos_embed"].shape == (1, 1025, 384)
  assert core["patch_embed"]["kernel"].shape == (4, 4, 128, 384)
  blk = core["encoder"]["blocks_0"]
  assert blk["attn"]["qkv"]["kernel"].shape == (384, 1152)
  assert blk["mlp"]["fc1"]["kernel"].shape == (384, 1536)
  assert len([k for k in core["encoder"] if k.startswith("blocks_")]) == 12


def test_build_model_errors_name_the_choices():
  with pytest.raises(ValueError, match="valid names"):
    build_model("vit_xl")
  with pytest.raises(ValueError, match="valid options"):
    build_model("spec_vit_s", patchsize=4)
  with pytest.raises(ValueError, match="needs"):
    build_model("spec_vit", width=64)
  with pytest.raises(ValueError, match="valid choices"):
    _abstract_params(build_model("spec_vit_s", remat="sometimes"))
  assert "spec_vit_g" in MODEL_NAMES and "spec_resnet50_dilated" in MODEL_NAMES


def _tiny(**kw):
  args = dict(width=32, depth=2, heads=2, image_size=16, patch_size=4, num_bands=80)
  args.update(kw)
  return build_model("spec_vit", **args)


@pytest.mark.parametrize("patch,bands,adapter", [(4, 202, True), (8, 235, True), (16, 198, True), (4, 13, False)])
def test_forward_shapes(patch, bands, adapter):
  model = _tiny(patch_size=patch, num_bands=bands, use_adapter=adapter)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, bands))
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  n = (16 // patch) ** 2
  assert model.num_patches == n and model.embed_dim == 32 and model.patch_size == patch
  assert out["embedding"].shape == (2, 32) and out["tokens"].shape == (2, n, 32)


def test_gelu_is_exact_erf():
  x = np.linspace(-6, 6, 101).astype(np.float32)
  ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  np.testing.assert_allclose(np.asarray(L.gelu(jnp.asarray(x))), ref, rtol=1e-6, atol=1e-6)
  tanh_approx = np.asarray(nn.gelu(jnp.asarray(x)))
  assert np.abs(tanh_approx - ref).max() > 1e-4  # the default Flax GELU would have failed


def _np_layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _np_attention(h, p, heads):
  """timm Attention (fused qkv, softmax, proj) written from the formulas."""
  b, n, d = h.shape
  hd = d // heads
  qkv = h @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  qkv = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)     # timm: (3, B, heads, N, hd)
  q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
  a = q @ k.transpose(0, 1, 3, 2)
  a = np.exp(a - a.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  o = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  return o @ p["proj"]["kernel"] + p["proj"]["bias"]


def _np_block(x, p, heads):
  """timm Block written from the formulas, float64."""
  x = x + _np_attention(_np_layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"]), p["attn"], heads)
  h = _np_layer_norm(x, p["norm2"]["scale"], p["norm2"]["bias"])
  h = _np_gelu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
  return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def _randomise(params, seed=0):
  """Random values everywhere (init has zero biases and unit norms, which would hide mistakes)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.normal(0, 0.3, l.shape).astype(np.float32) + (1.0 if l.ndim == 1 else 0)
                                   for l in leaves])


def test_block_matches_numpy_formula():
  block = transformer.Block(num_heads=4, mlp_dim=48)
  x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
  params = _randomise(jax.tree.map(np.asarray, nn.unbox(jax.jit(block.init)(jax.random.key(0), x)["params"])))
  ours = jax.jit(lambda p, x: block.apply({"params": p}, x))(params, x)
  ref = _np_block(x.astype(np.float64), jax.tree.map(lambda a: a.astype(np.float64), params), 4)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-4, atol=2e-4)


def test_layer_norm_matches_numpy():
  ln = L.layer_norm("ln")
  x = np.random.default_rng(2).normal(3, 5, size=(4, 7, 24)).astype(np.float32)
  p = _randomise(jax.tree.map(np.asarray, nn.unbox(jax.jit(ln.init)(jax.random.key(0), x)["params"])), seed=3)
  np.testing.assert_allclose(np.asarray(jax.jit(ln.apply)({"params": p}, x)),
                             _np_layer_norm(x.astype(np.float64), p["scale"], p["bias"]), rtol=1e-5, atol=1e-5)


def test_sincos_matches_formula():
  d, g = 16, 3
  table = L.sincos_2d(d, g, cls_token=True)
  assert table.shape == (1 + g * g, d) and table.dtype == np.float64
  assert np.all(table[0] == 0)
  quarter = d // 4
  for i in range(g):          # row
    for j in range(g):        # column
      row = table[1 + i * g + j]
      for k in range(quarter):
        omega = 1.0 / 10000 ** (k / quarter)
        assert row[k] == pytest.approx(math.sin(j * omega), abs=1e-12)               # column, sin
        assert row[quarter + k] == pytest.approx(math.cos(j * omega), abs=1e-12)     # column, cos
        assert row[2 * quarter + k] == pytest.approx(math.sin(i * omega), abs=1e-12)  # row, sin
        assert row[3 * quarter + k] == pytest.approx(math.cos(i * omega), abs=1e-12)  # row, cos


def test_sincos_pos_embed_is_fixed_not_a_parameter():
  model = _tiny(sincos_pos_embed=True, use_adapter=False, num_bands=8)
  params = nn.unbox(_abstract_params(model))
  assert "pos_embed" not in params["vit_core"]
  x = np.zeros((1, 16, 16, 8), np.float32)
  v = _init(model, x)
  table = model.apply(v, method=model.position_table)
  np.testing.assert_allclose(np.asarray(table[0]), L.sincos_2d(32, 4), atol=1e-6)


def test_keep_idx_selects_patches_after_position_embedding():
  """Attention is permutation-equivariant, so encoding a permutation of all patches must give the
  full encoding's patch tokens in that order (and the same cls token): checks gather order,
  that position embeddings are added before the gather and that cls is prepended after."""
  model = _tiny(use_adapter=False, num_bands=6)
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 6))
  v = _init(model, x)
  perm = np.stack([np.random.default_rng(s).permutation(16) for s in range(2)]).astype(np.int32)
  enc = jax.jit(lambda v, x, k: model.apply(v, x, train=False, keep_idx=k, method=model.encode))
  full = enc(v, x, None)
  perm_out = enc(v, x, perm)
  assert perm_out.shape == (2, 17, 32)
  np.testing.assert_allclose(np.asarray(perm_out[:, 0]), np.asarray(full[:, 0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(perm_out[:, 1:]), np.take_along_axis(np.asarray(full[:, 1:]), perm[..., None], 1),
                             rtol=1e-5, atol=1e-5)


def _stack_blocks(core_params, depth):
  """Unrolled blocks_i -> one scanned `blocks` tree with a leading layer axis."""
  enc = core_params["encoder"]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *[enc[f"blocks_{i}"] for i in range(depth)])
  return {**core_params, "encoder": {"blocks": stacked}}


def test_scan_and_remat_match_unrolled():
  loop = _tiny(use_adapter=False, num_bands=6, depth=2)
  scan = _tiny(use_adapter=False, num_bands=6, depth=2, scan=True, remat="full")
  x = jax.random.normal(jax.random.key(4), (2, 16, 16, 6))
  v = jax.tree.map(np.asarray, nn.unbox(_init(loop, x)))
  sv = {"params": {"vit_core": _stack_blocks(v["params"]["vit_core"], 2)}}
  abstract = nn.unbox(jax.eval_shape(lambda: scan.init(jax.random.key(0), x, train=False)))
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, sv)

  def loss(model, p):
    t, inter = model.apply(p, x, train=False, intermediates=[1], method=model.encode)
    return jnp.sum(t ** 2) + jnp.sum(inter[1] ** 2), (t, inter[1])

  (l1, (t1, i1)), g1 = jax.jit(jax.value_and_grad(lambda p: loss(loop, p), has_aux=True))(v)
  (l2, (t2, i2)), g2 = jax.jit(jax.value_and_grad(lambda p: loss(scan, p), has_aux=True))(sv)
  np.testing.assert_allclose(np.asarray(t1), np.asarray(t2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(i1), np.asarray(i2), rtol=1e-5, atol=1e-5)
  g1s = _stack_blocks(g1["params"]["vit_core"], 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
               g1s, g2["params"]["vit_core"])


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype="bfloat16", num_bands=6, use_adapter=False)
  ref = _tiny(num_bands=6, use_adapter=False)
  x = jax.random.normal(jax.random.key(5), (2, 16, 16, 6))
  v = _init(ref, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(v["params"])))
  run = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))(v, x)
  low, high = run(model), run(ref)
  assert low["tokens"].dtype == jnp.bfloat16
  err = np.abs(np.asarray(low["tokens"], np.float32) - np.asarray(high["tokens"]))
  assert err.mean() < 0.05, err.mean()


def test_drop_path_drops_whole_branches_per_sample_only_when_training():
  block = transformer.Block(num_heads=2, mlp_dim=16, drop_rate=0.5, train=True)
  x = np.random.default_rng(3).normal(size=(64, 3, 8)).astype(np.float32)
  v = jax.jit(block.init)(jax.random.key(0), x)
  eval_block = transformer.Block(num_heads=2, mlp_dim=16, drop_rate=0.5, train=False)
  nodrop_block = transformer.Block(num_heads=2, mlp_dim=16, drop_rate=0.0, train=True)
  both = jax.jit(lambda v, x, r: (block.apply(v, x, rngs={"dropout": r}), eval_block.apply(v, x),
                                  nodrop_block.apply(v, x)))
  train_out, eval_out, nodrop = map(np.asarray, both(v, x, jax.random.key(1)))
  np.testing.assert_allclose(eval_out, nodrop, rtol=1e-6)       # eval: no dropping, no rng needed
  untouched = np.all(np.isclose(train_out, x, atol=1e-6), axis=(1, 2))
  assert 0 < untouched.sum() < 64        # some samples lost both branches (p = 1/4), not all


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_patch_embedding_of_kept_patches_equals_embedding_all_then_gathering(backend, monkeypatch):
  """MAE's encoder projects only the kept patches: same tokens as the full stride-p convolution
  (lax.conv_general_dilated) gathered at keep_idx, and the same parameter gradient. All patches are
  projected as patches @ kernel on CPU and by the convolution elsewhere ('gpu': both branches)."""
  from fmjax.models.vit import PatchEmbed
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 6)), jnp.float32)
  keep = jnp.asarray(np.stack([rng.permutation(16)[:5] for _ in range(2)]), jnp.int32)
  module = PatchEmbed(width=8, patch_size=4)
  params = module.init(jax.random.key(0), x)
  kernel, bias = params["params"]["kernel"].value, params["params"]["bias"].value

  def reference(kernel, bias):
    full = jax.lax.conv_general_dilated(x, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST).reshape(2, 16, 8) + bias
    return jnp.take_along_axis(full, keep[..., None], axis=1)

  def ours(kernel, bias):
    return module.apply({"params": {"kernel": kernel, "bias": bias}}, x, keep)
  np.testing.assert_allclose(ours(kernel, bias), reference(kernel, bias), rtol=1e-5, atol=1e-5)
  every_patch = module.apply({"params": {"kernel": kernel, "bias": bias}}, x)    # [2, 16, 8], row-major
  np.testing.assert_allclose(jnp.take_along_axis(every_patch, keep[..., None], axis=1), reference(kernel, bias),
                             rtol=1e-5, atol=1e-5)
  full_target = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  every_patch_grads = jax.grad(
      lambda k, x: jnp.sum(module.apply({"params": {"kernel": k, "bias": bias}}, x) * full_target), (0, 1))
  convolution_grads = jax.grad(lambda k, x: jnp.sum(jax.lax.conv_general_dilated(
      x, k, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST).reshape(2, 16, 8) * full_target), (0, 1))
  for ours_grad, ref_grad in zip(every_patch_grads(kernel, x), convolution_grads(kernel, x)):
    np.testing.assert_allclose(ours_grad, ref_grad, rtol=1e-4, atol=1e-5)
  target = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  g_ours = jax.grad(lambda k: jnp.sum(ours(k, bias) * target))(kernel)
  g_ref = jax.grad(lambda k: jnp.sum(reference(k, bias) * target))(kernel)
  np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol,logit_scale", [(jnp.float32, 2e-5, 12.0), (jnp.bfloat16, 3e-2, 2.0)])
def test_attention_matches_torch_sdpa_values_and_gradients(dtype, tol, logit_scale):
  """`softmax_attention` (normalisation deferred to the output, max without gradient) against
  torch's scaled_dot_product_attention: output and the gradients of q, k and v; in float32 with
  logits (|x| ~ 1e3) that an unshifted exp would overflow."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  q, k, v = (rng.normal(size=(2, 3, 17, 8)).astype(np.float32) * s for s in (logit_scale, logit_scale, 1.0))
  cotangent = rng.normal(size=(2, 3, 17, 8)).astype(np.float32)

  def loss(q, k, v):
    out = transformer.softmax_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), dtype)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
  # softmax_attention takes q already scaled by 1/sqrt(head_dim): undo SDPA's own scaling.
  ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=1.0)
  (ref * torch.tensor(cotangent, dtype=torch.float64)).sum().backward()
  assert np.isfinite(np.asarray(out, np.float32)).all()
  scale = lambda t: float(np.abs(t).max())
  np.testing.assert_allclose(np.asarray(out, np.float32), ref.detach().numpy(), atol=tol * scale(ref.detach().numpy()))
  for got, want in zip(grads, (tq.grad, tk.grad, tv.grad)):
    want = want.numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=tol * scale(want))


def test_attention_module_is_timm_attention():
  """The Attention module (fused qkv, head-major softmax_attention, proj) against the float64
  NumPy formulas, including its input gradient (finite differences along a random direction)."""
  module = transformer.Attention(num_heads=4)
  x = np.random.default_rng(4).normal(size=(2, 9, 32)).astype(np.float32)
  params = _randomise(nn.meta.unbox(module.init(jax.random.key(0), x)["params"]), seed=5)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  np_attention = lambda x: _np_attention(x, p, heads=4)
  apply = lambda x: module.apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(apply(x)), np_attention(x.astype(np.float64)), atol=2e-5)
  direction = np.random.default_rng(6).normal(size=x.shape)
  weights = np.random.default_rng(7).normal(size=(2, 9, 32))
  _, tangent = jax.jvp(lambda x: jnp.sum(apply(x) * weights), (x,), (direction.astype(np.float32),))
  eps = 1e-5
  f = lambda x: float(np.sum(np_attention(x) * weights))
  fd = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(float(tangent), fd, rtol=1e-4)


def test_remat_of_scanned_blocks_cuts_compiled_temporaries():
  """remat='full' under scan keeps only the blocks' inputs for the backward pass: XLA's temporaries
  of a fwd+bwd drop several-fold (benchmarks/RESULTS.md sections 1 and 6 rely on it)."""
  def temporaries(remat):
    model = build_model("spec_vit", width=64, depth=6, num_heads=4, patch_size=2, image_size=16, num_bands=8,
                        use_adapter=False, scan=True, remat=remat)
    x = jnp.zeros((8, 16, 16, 8))
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), x[:1], train=False)))
    loss = lambda p, x: jnp.sum(model.apply(p, x, train=True)["tokens"])
    return jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis().temp_size_in_bytes
  assert temporaries("full") < temporaries("none") / 2


@pytest.mark.parametrize("scan,remat", [(False, "none"), (False, "full"), (True, "none")])
def test_cls_embedding_path_matches_full_forward_and_skips_the_last_blocks_other_tokens(scan, remat):
  """`embed` (what the SSL objectives call) gives `__call__`'s cls embedding, parameter and input
  gradients, and unrolled it leaves out the last block's projection and MLP for the non-cls tokens
  (XLA would not drop them: the compiled forward of `__call__(x)['embedding']` counts them)."""
  from fmjax.models.vit import VisionTransformer
  width, mlp, batch, tokens = 32, 64, 2, 1 + 16
  model = VisionTransformer(width=width, depth=2, num_heads=4, mlp_dim=mlp, patch_size=4, image_size=16,
                            scan=scan, remat=remat)
  x = jax.random.normal(jax.random.key(0), (batch, 16, 16, 5))
  variables = model.init(jax.random.key(1), x, train=False)

  def full(v, x):
    return model.apply(v, x, train=True)["embedding"]

  def cls_only(v, x):
    return model.apply(v, x, train=True, method=model.embed)

  np.testing.assert_allclose(cls_only(variables, x), full(variables, x), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda v, x: jnp.sum(jnp.sin(3 * f(v, x))), (0, 1))(variables, x) for f in (full, cls_only)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    # Summation order differs between the two paths: float32 rounding relative to the leaf's scale
    # (the qkv kernel's gradient reaches ~30, where an absolute 1e-5 is under three float32 ulps).
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))
  flops = [jax.jit(f).lower(variables, x).compile().cost_analysis()["flops"] for f in (full, cls_only)]
  skipped = 2 * batch * (tokens - 1) * (width * width + 2 * width * mlp)   # proj, fc1, fc2 of 16 tokens
  if scan:
    assert flops[1] == pytest.approx(flops[0], rel=0.01)
  else:
    assert flops[0] - flops[1] >= skipped


def test_ssl_network_reads_a_vits_embedding_through_the_cls_only_path():
  """The DINO / MoCo network takes the backbone's `embed`: the same embedding as `__call__`, and its
  compiled forward (backbone + a small head) costs less than the backbone's full forward alone."""
  from fmjax.models.ssl_heads import DINOHead, SSLNetwork
  from fmjax.models.vit import VisionTransformer
  backbone = VisionTransformer(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4, image_size=16)
  network = SSLNetwork(backbone, DINOHead(out_dim=8, hidden_dim=8, bottleneck_dim=4))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 5))
  variables = network.init(jax.random.key(1), x, train=False)
  backbone_variables = {"params": variables["params"]["backbone"]}
  out = network.apply(variables, x, train=False)
  full = backbone.apply(backbone_variables, x, train=False)
  np.testing.assert_allclose(out["embedding"], full["embedding"], rtol=1e-5, atol=1e-5)
  network_flops = jax.jit(lambda v: network.apply(v, x, train=False)).lower(variables).compile().cost_analysis()
  backbone_flops = jax.jit(lambda v: backbone.apply(v, x, train=False)["embedding"]).lower(
      backbone_variables).compile().cost_analysis()
  assert network_flops["flops"] < backbone_flops["flops"]


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_dense_runs_a_2d_product_on_cpu_only_with_nn_dense_values_and_gradients(backend, monkeypatch):
  """L.Dense on [B, L, D]: on CPU one [B*L, D] product (XLA CPU transposes the output gradient of an
  N-D one), elsewhere the N-D product; either way flax nn.Dense's values and gradients."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 7, 3)), jnp.float32)
  ours, reference = L.dense(3, "embed", "mlp", name="d"), nn.Dense(3)
  params = nn.meta.unbox(ours.init(jax.random.key(0), x)["params"])
  params["bias"] = jnp.asarray(rng.normal(size=3), jnp.float32)
  loss = lambda m: lambda p, x: jnp.sum(m.apply({"params": p}, x) * target)
  got, want = jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(reference), (0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours.apply({"params": params}, x), reference.apply({"params": params}, x), rtol=1e-6)
  jaxpr = jax.make_jaxpr(lambda p, x: ours.apply({"params": p}, x))(params, x)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert [e.invars[0].aval.ndim for e in dots] == [2 if backend == "cpu" else 3]
