import pytest
import torch

from simserve.inference.config import ModelConfig
from simserve.model import SiameseNet, Tower, build_model, load_checkpoint, save_checkpoint
from simserve.model.heads import HEAD_REGISTRY, DynamicConv2d, set_temperature

CFG = ModelConfig(input_size=64, stages=((16, 2, 1), (32, 2, 2), (48, 1, 1)), stem_width=8, embed_dim=24, head_width=16)


def _model(head: str) -> SiameseNet:
    torch.manual_seed(0)
    return build_model(CFG.replace(head=head)).eval()


@pytest.mark.parametrize("head", sorted(HEAD_REGISTRY))
def test_shapes_and_exact_symmetry(head):
    m = _model(head)
    a, b = torch.randn(5, 3, 64, 64), torch.randn(5, 3, 64, 64)
    fmap, emb = m.embed(a)
    assert fmap.shape == (5, 48, CFG.feature_size, CFG.feature_size)
    assert emb.shape == (5, 24)
    assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
    with torch.no_grad():
        s_ab, s_ba = m.score(a, b), m.score(b, a)
    assert s_ab.shape == (5,)
    assert torch.equal(s_ab, s_ba)  # exactly, by construction
    assert ((s_ab >= 0) & (s_ab <= 1)).all()


def test_unknown_head_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown head 'nope'; registered: .*'concat'"):
        build_model(ModelConfig(head="nope"))


def test_one_tower_shared_by_both_inputs():
    m = _model("concat")
    assert sum(isinstance(x, Tower) for x in m.modules()) == 1
    a, b = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    w = m.tower.stem[0].weight

    def grad(detach_a: bool, detach_b: bool) -> torch.Tensor:
        m.zero_grad()
        fa, _ = m.embed(a)
        fb, _ = m.embed(b)
        m.fuse(fa.detach() if detach_a else fa, fb.detach() if detach_b else fb).sum().backward()
        return w.grad.clone()

    g_a, g_b, g_both = grad(False, True), grad(True, False), grad(False, False)
    assert g_a.abs().sum() > 0 and g_b.abs().sum() > 0  # both inputs reach the one weight
    assert torch.allclose(g_both, g_a + g_b, atol=1e-6)


def test_dynamic_head_is_per_sample_and_batch_independent():
    m = _model("dynamic")
    a, b = torch.randn(6, 3, 64, 64), torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        batched = m.score(a, b)
        single = torch.cat([m.score(a[i : i + 1], b[i : i + 1]) for i in range(6)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_dynamic_temperature_flattens_attention():
    conv = DynamicConv2d(8, 4, 3, kernels=4)
    x = torch.randn(2, 8, 5, 5) * 10
    set_temperature(conv, 1e6)
    assert torch.allclose(conv.attend(x), torch.full((2, 4), 0.25), atol=1e-4)
    set_temperature(conv, 1.0)
    assert not torch.allclose(conv.attend(x), torch.full((2, 4), 0.25), atol=1e-3)


def test_checkpoint_round_trip(tmp_path):
    m = _model("separable")
    save_checkpoint(tmp_path / "m.pt", m, epoch=3)
    loaded, payload = load_checkpoint(tmp_path / "m.pt")
    assert payload["epoch"] == 3 and loaded.cfg == m.cfg
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.score(x, x.flip(0)), m.score(x, x.flip(0)))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    torch.save({"format": "simserve-checkpoint/1", "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_checkpoint(tmp_path / "evil.pt")
