"""benchmarks/backbone_step.py times the backbone alone, fmjax against the torch model that the exporter
fills with fmjax's weights: on a tiny shape, both sides' embeddings must agree (a wrong export, input
layout or train/eval mode would show here) and every part is timed on both sides."""
import pytest

pytest.importorskip("torch")

from benchmarks import backbone_step  # noqa: E402

TINY = ["--calls", "1", "--warmup", "1", "--rounds", "1"]


def _check(summary, tolerance):
  assert summary["max_abs_diff"] < tolerance
  for part in backbone_step.PARTS:
    r = summary[part]
    assert r["fmjax_ms"] > 0 and r["torch_ms"] > 0, part
    assert r["ratio"] == pytest.approx(r["torch_ms"] / r["fmjax_ms"]), part


def test_vit_backbone_sides_compute_the_same_embedding():
  summary = backbone_step.main(["--model", "spec_vit_t", "--image-size", "16", "--batch", "2", "--bands", "80", *TINY])
  _check(summary, 1e-4)


@pytest.mark.slow
def test_resnet_backbone_sides_compute_the_same_embedding():
  # 32 px: at 16 px the last stage is 1 x 1, and train-mode BatchNorm over a handful of values
  # amplifies rounding differences into sign flips.
  summary = backbone_step.main(["--model", "spec_resnet50", "--image-size", "32", "--batch", "4", "--bands", "80",
                                *TINY])
  _check(summary, 1e-3)


def test_unknown_model_is_refused():
  with pytest.raises(SystemExit):
    backbone_step.main(["--model", "spec_vit_q"])
