"""The fused CPU kernels of a merge step against the tensor code they replace on a CPU (tuner.evoprune.cpu_kernels)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from tuner.evoprune import Schedule, Scoring, TokenState, apply, cpu_kernels
from tuner.evoprune.merge import _match, _merge, merge_step

SETTINGS = [
    Scoring(),
    Scoring(w_attn=0.3),
    Scoring(w_div=0.0, w_attn=0.0, ctr=0.0),
    Scoring(w_div=1.0, ctr=0.4, tau=0.7),
    Scoring(w_sim=0.5, w_div=1.0, w_attn=1.0, ctr=0.0, knn_k=3),
    Scoring(w_sim=0.0, w_div=1.0, w_attn=0.5, ctr=0.3),
    Scoring(w_sim=2.0, w_div=0.0, ctr=0.4, knn_k=1),
]


def _both(monkeypatch: pytest.MonkeyPatch, run):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    fused = run()
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    return fused, run()


@pytest.mark.parametrize("scoring", SETTINGS, ids=str)
def test_match_chooses_the_same_tokens_as_the_tensor_code(
    scoring: Scoring, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(7)
    for trial in range(40):
        batch = 1 + trial % 3
        num_tokens = int(torch.randint(2, 260, (), generator=generator))
        remove = int(torch.randint(1, num_tokens // 2 + 1, (), generator=generator))
        features = torch.randn(batch, num_tokens, 16, generator=generator)
        importance = torch.rand(batch, num_tokens, generator=generator) * 2 + 0.1
        importance = importance / importance.mean(dim=1, keepdim=True)
        (src, dst, reduced), (ref_src, ref_dst, ref_reduced) = _both(
            monkeypatch, lambda: _match(features, remove, scoring, importance)  # noqa: B023
        )
        assert torch.equal(src, ref_src) and torch.equal(dst, ref_dst), (num_tokens, remove, batch)
        assert (reduced is None) == (ref_reduced is None)
        if reduced is not None:
            assert torch.equal(reduced, ref_reduced)


def test_knn_uses_exactly_k_neighbours_where_blocks_are_uneven(monkeypatch: pytest.MonkeyPatch) -> None:
    # 11 tokens, K 8: the kernel's lower bound comes from 11 one-token blocks; with fewer blocks than K it would
    # drop neighbours. Only the kNN term differs between the candidates here.
    generator = torch.Generator().manual_seed(3)
    for num_tokens in (9, 10, 11, 17, 23):
        features = torch.randn(2, num_tokens, 4, generator=generator)
        scoring = Scoring(w_div=5.0, ctr=0.0)
        fused, reference = _both(monkeypatch, lambda: _match(features, 2, scoring, None))  # noqa: B023
        assert torch.equal(fused[0], reference[0]) and torch.equal(fused[1], reference[1])


@pytest.mark.parametrize("prefix", [0, 1])
def test_merge_equals_the_tensor_code_and_copies_the_prefix(prefix: int, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(11)
    batch, num_tokens, channels = 3, 40, 24
    hidden = torch.randn(batch, prefix + num_tokens, channels, generator=generator)
    state = TokenState.start(batch, num_tokens, "cpu")
    for remove in (9, 7, 5):
        features = torch.randn(batch, prefix + state.num_tokens, 8, generator=generator)
        src, dst, _ = _match(features[:, prefix:], remove, Scoring(), torch.ones(batch, state.num_tokens))
        (tokens, new_state), (ref_tokens, ref_state) = _both(
            monkeypatch, lambda: _merge(hidden, state, src, dst, prefix)  # noqa: B023
        )
        # Same arithmetic in the same order: the same bits, merged tokens included.
        assert torch.equal(tokens, ref_tokens)
        assert torch.equal(new_state.sizes, ref_state.sizes)
        assert torch.equal(new_state.first_patch, ref_state.first_patch)
        assert torch.equal(new_state.source, ref_state.source)
        if prefix:
            assert torch.equal(tokens[:, :prefix], hidden[:, :prefix])
        hidden, state = tokens, new_state


def test_kernels_serve_float32_cpu_tensors_without_gradient_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    assert cpu_kernels.enabled(torch.zeros(2, 3))
    assert not cpu_kernels.enabled(torch.zeros(2, 3, dtype=torch.float64))
    assert not cpu_kernels.enabled(torch.zeros(2, 3, dtype=torch.float16))
    assert not cpu_kernels.enabled(torch.zeros(2, 3, requires_grad=True))
    assert not cpu_kernels.enabled(torch.zeros(2, 3, device="meta"))
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    assert not cpu_kernels.enabled(torch.zeros(2, 3))


def test_a_step_that_needs_gradients_runs_the_tensor_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    hidden = torch.randn(1, 9, 4, requires_grad=True)
    out, _ = merge_step(hidden, hidden, TokenState.start(1, 8, "cpu"), 3, Scoring(w_div=0.0, ctr=0.0), None, 1)
    out.sum().backward()
    assert hidden.grad is not None and out.shape == (1, 6, 4)


def test_encoder_forward_is_the_same_with_and_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8
    )
    model = CLIPVisionModel(config).eval()
    schedule = Schedule.preset("decreasing", num_layers=4, tokens_in=64, tokens_out=12, family="clip", has_cls=True)
    pixels = torch.randn(2, 3, 64, 64)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), apply(model, schedule) as handle:
            output = model(pixel_values=pixels).last_hidden_state
            assert handle.sizes is not None and handle.source is not None
            return output, handle.sizes, handle.source

    (output, sizes, source), (ref_output, ref_sizes, ref_source) = _both(monkeypatch, run)
    assert torch.equal(sizes, ref_sizes) and torch.equal(source, ref_source)
    torch.testing.assert_close(output, ref_output, rtol=1e-5, atol=1e-5)
