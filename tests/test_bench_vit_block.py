"""benchmarks/vit_block.py times fmjax's ViT block parts against the torch modules with the same weights:
on a tiny shape, each part's outputs must agree (a wrong weight copy or layout would show here)."""
import pytest

pytest.importorskip("torch")

from benchmarks import vit_block  # noqa: E402


def test_each_part_matches_torch_with_copied_weights():
  results = vit_block.main(["--batch", "2", "--tokens", "5", "--width", "16", "--heads", "2", "--rounds", "1"])
  assert set(results) == set(vit_block.PARTS)
  for part, r in results.items():
    assert r["max_abs_diff"] < 1e-5, part
    assert min(r["fmjax_fwd"], r["fmjax_both"], r["torch_fwd"], r["torch_both"]) > 0, part


def test_unknown_part_is_refused():
  with pytest.raises(ValueError, match="not one of"):
    vit_block.build("decoder", 16, 2)
