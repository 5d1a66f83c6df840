"""The 2D network's normalisation (models2d.py): frozen encoder statistics, a batch-independent decoder, and
chunking/recomputation (slicing.apply_2d) giving exactly what one pass gives."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from MNSegmentLib import config as configuration
from MNSegmentLib.models.network2d import build_model2d
from MNSegmentLib.models.slicing import apply_2d


def _model(adaptation: str = "lora", decoder_norm: str = "group"):
    settings = {**configuration.preset("quick")["model2d"], "weights": "none", "adaptation": adaptation,
                "decoder_norm": decoder_norm}
    torch.manual_seed(0)
    model, _ = build_model2d(settings, num_classes=2, load_weights=False)
    return model


def _batch(n: int = 2, depth: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 32, 32, depth, generator=generator)
    y = torch.randint(0, 2, (n, 32, 32, depth), generator=generator)
    return x, y


def _encoder_batchnorms(model) -> list[nn.Module]:
    return [m for m in model.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _train_step(model, chunk: int = 1000, recompute: bool = False) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = _batch()
    logits = apply_2d(model, x, 2, chunk, recompute=recompute)
    nn.functional.cross_entropy(logits, y).backward()
    optimizer.step()


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("adaptation", ["lora", "full"])
def test_training_step_keeps_encoder_statistics_and_trains_their_affine(adaptation):
    model = _model(adaptation)
    assert _encoder_batchnorms(model)  # the default encoder is a BatchNorm network
    stats = _buffers(model.encoder)
    affine = {k: v.clone() for k, v in model.encoder.named_parameters() if k.endswith((".weight", ".bias"))
              and "bn" in k}
    assert affine
    model.train()
    _train_step(model)
    assert all(torch.equal(stats[k], v) for k, v in model.encoder.named_buffers())
    changed = [k for k, v in model.encoder.named_parameters() if k in affine and not torch.equal(affine[k], v)]
    assert changed  # the affine weights of the encoder's norms do learn


def test_frozen_adaptation_changes_nothing_in_the_encoder():
    model = _model("frozen")
    encoder = copy.deepcopy(model.encoder.state_dict())
    decoder = copy.deepcopy(model.head.state_dict())
    model.train()
    _train_step(model)
    after = model.encoder.state_dict()
    assert all(torch.equal(encoder[k], after[k]) for k in encoder)  # weights and buffers
    assert any(not torch.equal(decoder[k], v) for k, v in model.head.state_dict().items())  # the decoder learns


def test_decoder_normalises_each_slice_on_its_own():
    model = _model()
    assert not [k for k, _ in model.blocks.named_buffers()] + [k for k, _ in model.head.named_buffers()]
    model.train()
    slices = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(slices)[:2], model(slices[:2]), rtol=1e-4, atol=1e-5)


def test_chunked_and_recomputed_training_equals_one_pass():
    results = []
    for chunk, recompute in ((1000, False), (4, True), (5, False)):
        model = _model()
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0)  # only to reach the grads the same way
        optimizer.zero_grad()
        x, y = _batch()
        logits = apply_2d(model, x, 2, chunk, recompute=recompute)
        nn.functional.cross_entropy(logits, y).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads, _buffers(model)))
    (logits0, grads0, buffers0), *others = results
    assert grads0
    for logits, grads, buffers in others:
        torch.testing.assert_close(logits, logits0, rtol=1e-4, atol=1e-5)
        assert grads.keys() == grads0.keys()
        for k in grads0:
            torch.testing.assert_close(grads[k], grads0[k], rtol=1e-3, atol=1e-6)
        assert buffers.keys() == buffers0.keys()
        assert all(torch.equal(buffers[k], buffers0[k]) for k in buffers0)  # statistics exactly as one pass


def test_run_folders_from_before_decoder_norm_keep_their_batchnorm_decoder(tmp_path):
    old = configuration.preset("quick")
    del old["model2d"]["decoder_norm"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = configuration.load_run_config(tmp_path / "config.json")
    assert loaded["model2d"]["decoder_norm"] == "batch"
    assert configuration.preset("quick")["model2d"]["decoder_norm"] == "group"
    legacy = _model(decoder_norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in legacy.head.modules())
