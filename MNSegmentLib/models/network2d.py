"""The 2D network: any timm encoder (``features_only``) + a light U-Net-style decoder, adapted by LoRA."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from MNSegmentLib.errors import InputError

_NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _conv_block(cin: int, cout: int, norm: str) -> nn.Sequential:
    normalise = nn.GroupNorm(math.gcd(8, cout), cout) if norm == "group" else nn.BatchNorm2d(cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), normalise, nn.ReLU(inplace=True))


class SliceSegmenter(nn.Module):
    """Grey slices (B, 1, H, W) -> class logits (B, K, H, W).

    The grey channel is repeated to the three channels that natural-image weights expect. Like the reference's
    head, the finest decoder features are concatenated with the input resampled to their resolution before the
    classifier; the logits are then upsampled to the input size (cheaper than a full-resolution decoder stage,
    which dominated the step time on the CPU).

    Normalisation never depends on the other slices of a batch, so chunking the slices, micro-batching the
    patches and recomputing activations (:func:`slicing.apply_2d`) give exactly what one pass would:

    - The encoder's BatchNorm layers keep their pretrained running statistics (they stay in eval mode in
      training too); their affine weights train with ``adaptation`` lora or full. This is the usual choice when
      fine-tuning a pretrained CNN on small batches: statistics estimated from one chunk of slices of a few
      patches are noisy, were updated again by every recomputation, and moved even with ``adaptation=frozen``.
      (An encoder from scratch, ``weights=none``, keeps its initial statistics 0 and 1: its BatchNorm layers
      are plain trainable per-channel affine maps.)
    - The decoder, trained from scratch, uses GroupNorm (``decoder_norm=group``): per-slice statistics, no
      running buffers. ``batch`` (BatchNorm) is only for run folders made before this choice; it is not
      batch-independent.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, decoder_channels: int = 64,
                 decoder_norm: str = "group"):
        super().__init__()
        self.encoder = encoder
        channels = encoder.feature_info.channels()
        self.blocks = nn.ModuleList()
        deeper = channels[-1]
        for skip in reversed(channels[:-1]):
            self.blocks.append(_conv_block(deeper + skip, decoder_channels, decoder_norm))
            deeper = decoder_channels
        self.head = nn.Sequential(_conv_block(deeper + 1, max(decoder_channels // 2, 8), decoder_norm),
                                  nn.Conv2d(max(decoder_channels // 2, 8), num_classes, 1))
        self.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and tensor cores
        self.train()

    def train(self, mode: bool = True) -> SliceSegmenter:
        """``mode`` everywhere except the encoder's BatchNorm layers, which always use their running statistics."""
        super().train(mode)
        for module in self.encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last))
        y = features[-1]
        for skip, block in zip(reversed(features[:-1]), self.blocks):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], 1))
        image = F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False)
        y = self.head(torch.cat([y, image.to(y.dtype)], 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _lora_targets(encoder: nn.Module) -> list[str]:
    """Linear layers (attention/MLP projections of transformers) and plain convolutions.

    Depthwise convolutions and timm's dynamic-"same"-padding convolutions are left out: LoRA's low-rank
    convolution copies the base layer's static padding and would produce a differently sized output.
    """
    names = []
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear):
            names.append(name)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            pointwise = module.kernel_size == (1, 1) and module.stride == (1, 1)
            if pointwise or type(module) is nn.Conv2d:
                names.append(name)
    return names


def _adapt(encoder: nn.Module, model2d: dict) -> nn.Module:
    mode = model2d["adaptation"]
    if mode == "full":
        return encoder
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = _lora_targets(encoder)
        if not targets:
            raise InputError(f"model2d.adaptation=lora: {model2d['name']} has no linear or plain convolution "
                             "layer to adapt; use model2d.adaptation=full or frozen")
        lora = LoraConfig(r=model2d["lora_rank"], lora_alpha=model2d["lora_alpha"],
                          lora_dropout=model2d["lora_dropout"], target_modules=targets)
        encoder = inject_adapter_in_model(lora, encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad = mode == "lora" and "lora_" in name
    if mode == "lora":  # normalisation layers are trained too (re-calibrates them to medical intensities)
        for module in encoder.modules():
            if isinstance(module, _NORMS):
                for param in module.parameters(recurse=False):
                    param.requires_grad = True
    return encoder


def build_model2d(model2d: dict, num_classes: int, load_weights: bool = True) -> tuple[SliceSegmenter, str]:
    """Builds the 2D network; returns it with a description of the weights it starts from.

    ``load_weights=False`` skips pretrained weights (prediction loads the trained state dict instead).
    """
    import timm

    name = model2d["name"]
    try:
        encoder = timm.create_model(name, pretrained=False, features_only=True, in_chans=3)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"model2d.name={name}: not a timm model with features_only support ({err}); "
                         "see timm.list_models()") from None
    description = "randomly initialised"
    if load_weights:
        from MNSegmentLib.models.pretrained import load_encoder_weights

        description = load_encoder_weights(encoder, name, str(model2d["weights"]))
    encoder = _adapt(encoder, model2d)
    return SliceSegmenter(encoder, num_classes, model2d["decoder_channels"], model2d["decoder_norm"]), description
