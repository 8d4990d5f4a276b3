"""UniCT network: shapes for both configurations, every ablation switch, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import FULL, SMALL, PreprocessConfig, UniCTConfig, get_config
from model.network import UniCT

VOCAB = 50


def tiny(cfg: UniCTConfig) -> UniCTConfig:
    """Same architecture and widths as ``cfg``, on a smaller grid (shape checks of FULL on CPU)."""
    pre = dataclasses.replace(cfg.preprocess, size=(12, 64, 64))
    return dataclasses.replace(cfg, preprocess=pre)


def test_small_forward_shapes() -> None:
    torch.manual_seed(0)
    model = UniCT(SMALL, VOCAB).eval()
    d, h, w = SMALL.preprocess.size
    with torch.no_grad():
        out = model(torch.randn(1, d, h, w))
    assert out.cls_logits.shape == (1, 10)
    assert out.seg_logits.shape == (1, 10, d, h, w)
    assert out.fusion_attention.shape == (1, 3, 3)
    assert out.memory.shape == (1, 3 + d // 3, SMALL.d_model)
    assert torch.allclose(out.fusion_attention.sum(-1), torch.ones(1, 3), atol=1e-5)


def test_full_configuration_shapes() -> None:
    """FULL's widths (64..512, d=512, 8 heads) on a reduced grid; the real input is 240x480x480."""
    assert FULL.preprocess.size == (240, 480, 480)
    assert FULL.preprocess.spacing_mm == (1.5, 0.75, 0.75)
    cfg = tiny(FULL)
    model = UniCT(cfg, VOCAB).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 12, 64, 64))
    assert out.cls_logits.shape == (2, 10)
    assert out.seg_logits.shape == (2, 10, 12, 64, 64)
    assert out.memory.shape == (2, 3 + 4, 512)


def test_half_resolution_segmentation_for_training() -> None:
    model = UniCT(tiny(SMALL), VOCAB).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 12, 64, 64), full_resolution_seg=False)
    assert out.seg_logits.shape == (1, 10, 12, 32, 32)


@pytest.mark.parametrize(
    "switch",
    [
        "fusion",
        "modulation",
        "classification_supervision",
        "segmentation_supervision",
        "report_supervision",
    ],
)
def test_every_ablation_switch_builds_and_runs(switch: str) -> None:
    cfg = tiny(SMALL).with_ablation(**{switch: False})
    assert getattr(cfg.ablation, switch) is False
    model = UniCT(cfg, VOCAB).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 12, 64, 64))
    assert out.seg_logits.shape == (1, 10, 12, 64, 64)
    if switch == "fusion":
        assert torch.equal(out.fusion_attention[0], torch.eye(3))
    else:
        assert not torch.equal(out.fusion_attention[0], torch.eye(3))


def test_modulation_off_has_no_effect_of_seg_token() -> None:
    """Without modulation, the dense path does not depend on the FiLM parameters."""
    cfg = tiny(SMALL).with_ablation(modulation=False)
    model = UniCT(cfg, VOCAB).eval()
    x = torch.randn(1, 12, 64, 64)
    with torch.no_grad():
        before = model(x).seg_logits
        for module in model.segmenter.modules():
            if hasattr(module, "to_params"):
                torch.nn.init.normal_(module.to_params.weight)
        after = model(x).seg_logits
    assert torch.equal(before, after)


def test_determinism_with_fixed_seed() -> None:
    def run() -> torch.Tensor:
        torch.manual_seed(123)
        model = UniCT(tiny(SMALL), VOCAB).eval()
        torch.manual_seed(7)
        x = torch.randn(1, 12, 64, 64)
        with torch.no_grad():
            return model(x).cls_logits

    assert torch.equal(run(), run())


def test_report_decoder_teacher_forcing_and_greedy() -> None:
    torch.manual_seed(0)
    model = UniCT(tiny(SMALL), VOCAB).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 12, 64, 64))
        tokens = torch.randint(4, VOCAB, (2, 9))
        logits = model.report_logits(tokens, out.memory)
        generated = model.generate_report(out.memory, bos=1, eos=2, max_len=8)
    assert logits.shape == (2, 9, VOCAB)
    assert generated.shape[0] == 2 and generated.shape[1] <= 7


def test_causal_mask_prefix_invariance() -> None:
    """Logits at position i depend only on tokens 0..i."""
    torch.manual_seed(0)
    model = UniCT(tiny(SMALL), VOCAB).eval()
    with torch.no_grad():
        memory = model(torch.randn(1, 12, 64, 64)).memory
        a = torch.tensor([[1, 5, 6, 7, 8]])
        b = torch.tensor([[1, 5, 6, 30, 31]])
        la, lb = model.report_logits(a, memory), model.report_logits(b, memory)
    assert torch.allclose(la[:, :3], lb[:, :3], atol=1e-5)


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="multiple of 3"):
        dataclasses.replace(
            SMALL, preprocess=PreprocessConfig(spacing_mm=(1, 1, 1), size=(10, 64, 64))
        )
    with pytest.raises(ValueError, match="unknown UniCT configuration"):
        get_config("medium")
    cfg = SMALL.with_ablation(fusion=False)
    assert UniCTConfig.from_dict(cfg.to_dict()) == cfg


def test_segmenting_a_sample_of_triplets_matches_the_full_decode() -> None:
    """``seg_triplets`` decodes exactly the chosen triplets' slices of the full output."""
    torch.manual_seed(0)
    model = UniCT(tiny(SMALL), VOCAB).eval()
    volume = torch.randn(2, 12, 64, 64)
    chosen = torch.tensor([[0, 2], [1, 3]])
    with torch.no_grad():
        full = model(volume, full_resolution_seg=False).seg_logits
        part = model(volume, full_resolution_seg=False, seg_triplets=chosen).seg_logits
    assert part.shape == (2, 10, 6, 32, 32)
    for b in range(2):
        slices = torch.cat([torch.arange(3 * t, 3 * t + 3) for t in chosen[b].tolist()])
        assert torch.allclose(part[b], full[b][:, slices], atol=1e-5)


def test_segmentation_starts_at_the_foreground_prior() -> None:
    from model.network.heads import FOREGROUND_PRIOR_LOGIT

    model = UniCT(tiny(SMALL), VOCAB)
    assert model.segmenter.out.bias is not None
    assert torch.all(model.segmenter.out.bias == FOREGROUND_PRIOR_LOGIT)


def test_report_memory_follows_the_given_findings() -> None:
    """The findings token carries what ``findings`` says; classification is untouched."""
    torch.manual_seed(0)
    model = UniCT(tiny(SMALL), VOCAB).eval()
    volume = torch.randn(1, 12, 64, 64)
    with torch.no_grad():
        none = model(volume, findings=torch.zeros(1, 10))
        every = model(volume, findings=torch.ones(1, 10))
    assert torch.equal(none.cls_logits, every.cls_logits)
    assert not torch.allclose(none.memory[:, 2], every.memory[:, 2])
    assert torch.equal(none.memory[:, 3:], every.memory[:, 3:])


def test_classification_reads_segmentation_only_when_it_is_supervised() -> None:
    torch.manual_seed(0)
    volume = torch.randn(1, 12, 64, 64)
    for supervised in (True, False):
        cfg = tiny(SMALL).with_ablation(segmentation_supervision=supervised)
        model = UniCT(cfg, VOCAB).eval()
        with torch.no_grad():
            before = model(volume).cls_logits
            assert model.segmenter.out.bias is not None
            model.segmenter.out.bias += 3.0
            after = model(volume).cls_logits
        assert torch.allclose(before, after) is not supervised


def test_triplet_context_starts_as_identity_and_reaches_the_neighbours() -> None:
    """A new context leaves a trained decoder's input unchanged; once trained, what is in
    the triplet above changes a triplet's features (the 3D context nodules need)."""
    from model.network.heads import TripletContext

    torch.manual_seed(0)
    context = TripletContext(4, (3, 3, 3))
    maps = torch.randn(2 * 5, 4, 8, 8)  # 2 volumes of 5 triplets
    assert torch.equal(context(maps, 5), maps)
    torch.nn.init.normal_(context.project.weight)
    changed = maps.clone()
    changed[2] += 1.0  # volume 0, triplet 2
    delta = (context(changed, 5) - context(maps, 5)).abs().amax(dim=(1, 2, 3))
    assert delta[1] > 0 and delta[3] > 0  # its neighbours see it
    assert delta[0] == 0 and delta[4] == 0  # two triplets away: out of reach
    assert torch.all(delta[5:] == 0)  # the other volume does not


def test_sampled_triplets_keep_the_context_of_unsampled_neighbours() -> None:
    """With the triplet context trained (non-zero), decoding a sample of triplets still
    gives the full decode's values: the context is computed over every triplet first."""
    torch.manual_seed(1)
    model = UniCT(tiny(SMALL), VOCAB).eval()
    for context in (model.segmenter.stem_context, model.segmenter.l1_context):
        torch.nn.init.normal_(context.project.weight, std=0.1)
    volume = torch.randn(1, 12, 64, 64)
    chosen = torch.tensor([[1, 3]])
    with torch.no_grad():
        full = model(volume, full_resolution_seg=False).seg_logits
        part = model(volume, full_resolution_seg=False, seg_triplets=chosen).seg_logits
    slices = torch.tensor([3, 4, 5, 9, 10, 11])
    assert torch.allclose(part[0], full[0][:, slices], atol=1e-4)
