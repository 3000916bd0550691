"""Loading what an evaluator needs: a device and dtype, a model, its processors, an image dataset, ready batches.

Every failure becomes one :class:`~evaluators.base.EvaluatorError` line that names the problem and the fix. Model and
dataset names are hub ids or local paths; nothing is downloaded unless the name is not a local path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from evaluators.base import EvaluatorError
from tuner.evoprune.adapters import supported_models

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "check_source",
    "class_names",
    "dtype_name",
    "find_column",
    "latency_batch",
    "load_image_dataset",
    "load_image_processor",
    "load_model",
    "load_processor",
    "load_rgb_images",
    "preprocess_images",
    "resolve_batch_size",
    "resolve_device",
    "resolve_dtype",
    "supported_class_names",
    "to_batches",
]

IMAGE_COLUMNS: tuple[str, ...] = ("image", "img")
"""Column names taken as the image column, in order of preference."""

LABEL_COLUMNS: tuple[str, ...] = ("label", "labels")
"""Column names taken as the label column, in order of preference."""

_DEFAULT_SPLITS = ("test", "validation", "train")
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Model classes by config.model_type, for checkpoints whose config names no architecture.
_CLASS_BY_MODEL_TYPE = {
    "clip": "CLIPModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipModel",
    "siglip_vision_model": "SiglipVisionModel",
    "llava": "LlavaForConditionalGeneration",
}
_DATA_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
}


# ---------------------------------------------------------------------------------------------- device and dtype


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device, checked to exist here.

    Raises:
        EvaluatorError: an unknown device, or CUDA asked for where there is none.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvaluatorError(f"unknown device {device!r}; use cpu or cuda (cuda:N)", param="device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvaluatorError(f"{str(resolved)!r} is not available here (no CUDA); use device cpu", param="device")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The model dtype: ``"auto"`` is fp16 on CUDA and fp32 elsewhere; else fp32/fp16/bf16 (or a torch dtype).

    Example:
        >>> resolve_dtype("auto", torch.device("cpu")), resolve_dtype("BF16", torch.device("cpu"))
        (torch.float32, torch.bfloat16)
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise EvaluatorError(f"unsupported dtype {dtype}; use auto, fp32, fp16 or bf16", param="dtype")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise EvaluatorError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16", param="dtype")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``"fp32"``, ``"fp16"`` or ``"bf16"``."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# ----------------------------------------------------------------------------------------------------------- model


def supported_class_names() -> list[str]:
    """The transformers class names the EvoPrune adapters support (without their notes)."""
    return [entry.split(" ")[0] for entry in supported_models()]


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with path syntax is meant as a local path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or os.path.isabs(name)


HUB_PROBE_S = 3.0
"""How long :func:`check_source` waits for the hub to accept a connection before calling it unreachable."""

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _hub_offline() -> str | None:
    """The environment variable that puts the hub libraries offline, if one is set."""
    for variable in _OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return variable
    return None


def _hub_unreachable(timeout_s: float = HUB_PROBE_S) -> str | None:
    """Why the hub cannot be reached from here (None when it accepts a connection within ``timeout_s``).

    One connection attempt in a background thread, so neither a slow name lookup nor the hub clients' retries (half
    a minute) hold up a run that cannot load anything from the hub anyway.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    offline = _hub_offline()
    if offline is not None:
        return f"{offline} is set"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except OSError as error:
            outcome.append(f"{host}: {error.strerror or type(error).__name__}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"{host}: no answer in {timeout_s:g} s"


def _in_hub_cache(name: str, kind: str) -> bool:
    """Whether the hub client's cache holds the model's config (or the dataset's card): usable without the hub."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    filename, repo_type = ("config.json", "model") if kind == "model" else ("README.md", "dataset")
    try:
        found = try_to_load_from_cache(name, filename, repo_type=repo_type)
    except Exception:  # noqa: BLE001 - an id the cache cannot even parse is not in it
        return False
    return isinstance(found, str)


def check_source(name: str, kind: str) -> None:
    """Check, in seconds and without loading anything, that a model or dataset named on the command line can be had.

    A local path must exist; a hub id needs the hub to answer (or a copy in the hub cache). Loading itself comes
    later and can still fail (a hub id that does not exist, a folder without a checkpoint).

    Args:
        name: a local folder or file, or a hub id.
        kind: ``"model"`` or ``"dataset"`` (the option the message names).

    Raises:
        EvaluatorError: no such local path, or a hub id while the hub is unreachable; the message names ``kind``.
    """
    local = Path(name).expanduser()
    if local.exists():
        return
    fix = "give a local folder (save_pretrained output)" if kind == "model" else "give a local folder or file"
    if _looks_like_path(name):
        raise EvaluatorError(f"cannot load {kind} {name!r}: no such folder or file; {fix}", param=kind)
    if _in_hub_cache(name, kind):
        return
    reason = _hub_unreachable()
    if reason is not None:
        raise EvaluatorError(
            f"cannot load {kind} {name!r}: not a local path, and the hub is unreachable from here ({reason}) with no "
            f"cached copy; {fix}, or run where the hub answers",
            param=kind,
        )


def _hub_failure(error: BaseException) -> str:
    text = str(error).lower()
    words = ("connect", "reach", "offline", "resolve", "network", "timed out", "timeout")
    if isinstance(error, ConnectionError) or any(word in text for word in words):
        return "the hub is unreachable"
    return "not found on the hub"


def load_model(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    allowed: Sequence[str] | None = None,
    purpose: str = "",
) -> nn.Module:
    """Load a model the EvoPrune adapters support, from a local folder or a hub id, in eval mode, with sdpa attention.

    The class comes from the checkpoint's config (``architectures``, else ``model_type``).

    Args:
        name: a local folder (``save_pretrained`` output) or a hub id.
        device: where to put it.
        dtype: its dtype.
        allowed: class names this evaluator accepts (default: every class the adapters support).
        purpose: what the evaluator needs, for the error when the class is not allowed (e.g. "a CLIP or SigLIP
            dual encoder").

    Returns:
        The model.

    Raises:
        EvaluatorError: missing folder, unreachable hub, a folder without a checkpoint, or an unsupported class.
    """
    import transformers
    from transformers import AutoConfig

    fix = "give a local folder with a CLIP or SigLIP checkpoint"
    local = Path(name).expanduser()
    if not local.exists() and _looks_like_path(name):
        raise EvaluatorError(f"cannot load model {name!r}: no such folder; {fix}")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else name)
    except Exception as error:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... for this
        if local.exists():
            raise EvaluatorError(
                f"cannot load model {name!r}: the folder holds no transformers checkpoint ({_first_line(error)}); {fix}"
            ) from None
        raise EvaluatorError(
            f"cannot load model {name!r}: not a local folder and {_hub_failure(error)}; {fix}"
        ) from None
    supported = supported_class_names()
    class_name = _model_class_name(config, supported)
    accepted = list(allowed) if allowed is not None else supported
    if class_name not in accepted:
        found = class_name or f"model_type {getattr(config, 'model_type', None)!r}"
        if class_name not in supported:
            raise EvaluatorError(
                f"model {name!r} is a {found}, which EvoPrune does not support; supported: {', '.join(supported)}"
            )
        raise EvaluatorError(
            f"model {name!r} is a {found}; this evaluator needs {purpose or 'one of'} ({', '.join(accepted)})"
        )
    model_class = getattr(transformers, class_name)
    try:
        model = model_class.from_pretrained(
            str(local) if local.exists() else name, dtype=dtype, attn_implementation="sdpa"
        )
    except Exception as error:  # noqa: BLE001
        raise EvaluatorError(f"cannot load the weights of model {name!r}: {_first_line(error)}; {fix}") from None
    return model.to(device).eval()


def _model_class_name(config: Any, supported: Sequence[str]) -> str | None:
    for architecture in getattr(config, "architectures", None) or []:
        if architecture in supported:
            return str(architecture)
    architectures = getattr(config, "architectures", None) or []
    by_type = _CLASS_BY_MODEL_TYPE.get(getattr(config, "model_type", ""))
    if by_type is not None and not architectures:
        return by_type
    return str(architectures[0]) if architectures else by_type


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load_image_processor(name: str) -> Any:
    """The image processor saved beside a model (``AutoImageProcessor``).

    Raises:
        EvaluatorError: none can be loaded.
    """
    from transformers import AutoImageProcessor

    try:
        try:
            return AutoImageProcessor.from_pretrained(_existing_or_id(name))
        except ImportError as error:
            if "torchvision" not in str(error).lower():
                raise
            return _pil_image_processor(_existing_or_id(name))
    except Exception as error:  # noqa: BLE001
        raise EvaluatorError(
            f"cannot load the image processor of {name!r} ({_first_line(error)}); save one beside the model "
            "(image_processor.save_pretrained)"
        ) from None


def _pil_image_processor(name: str) -> Any:
    """The saved image processor's PIL-backed class (``<Name>Pil``), loaded directly.

    Some transformers 5 releases refuse ``AutoImageProcessor`` without torchvision even where the model's processor
    has a PIL backend; the class named in the saved settings, or its ``Pil`` variant, loads without it.
    """
    import transformers
    from transformers.image_processing_utils import ImageProcessingMixin

    settings, _ = ImageProcessingMixin.get_image_processor_dict(name)
    class_name = str(settings.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
    processor_class = getattr(transformers, f"{class_name}Pil", None) or getattr(transformers, class_name, None)
    if processor_class is None:
        raise ImportError(f"no PIL image processor {class_name!r} in this transformers; install torchvision")
    return processor_class.from_pretrained(name)


def load_processor(name: str) -> tuple[Any, Any]:
    """The tokenizer and image processor of a dual encoder: ``AutoProcessor``, else ``AutoTokenizer`` + image processor.

    Returns:
        ``(tokenizer, image_processor)``.

    Raises:
        EvaluatorError: no tokenizer or no image processor can be loaded.
    """
    from transformers import AutoProcessor, AutoTokenizer

    path = _existing_or_id(name)
    try:
        processor = AutoProcessor.from_pretrained(path)
        tokenizer = getattr(processor, "tokenizer", None)
        image_processor = getattr(processor, "image_processor", None)
        if tokenizer is not None and image_processor is not None:
            return tokenizer, image_processor
    except Exception:  # noqa: BLE001 - fall back to the two parts below, which give the error
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001
        raise EvaluatorError(
            f"cannot load the tokenizer of {name!r} ({_first_line(error)}); save the processor beside the model "
            "(processor.save_pretrained)"
        ) from None
    return tokenizer, load_image_processor(name)


def _existing_or_id(name: str) -> str:
    local = Path(name).expanduser()
    return str(local) if local.exists() else name


# --------------------------------------------------------------------------------------------------------- dataset


def load_image_dataset(name: str, split: str | None = None) -> tuple[Dataset, str | None]:
    """Load a dataset: a ``save_to_disk`` folder, a local data folder or file, or a hub id.

    Args:
        name: the dataset.
        split: the split to use; None for the first of test, validation, train (or the only one).

    Returns:
        ``(dataset, split)``: one split, and its name (None for a dataset saved without split names).

    Raises:
        EvaluatorError: not found, unreachable, or no such split.
    """
    import datasets

    fix = "give a local folder (save_to_disk output, an image folder or data files) or file"
    local = Path(name).expanduser()
    loaded: Any
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
        elif local.is_dir():
            loaded = datasets.load_dataset(str(local))
        elif local.is_file():
            builder = _DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise EvaluatorError(
                    f"cannot load dataset {name!r}: unknown file type {local.suffix!r}; use "
                    f"{', '.join(sorted(_DATA_FILE_BUILDERS))}, an image folder or a save_to_disk folder"
                )
            loaded = datasets.load_dataset(builder, data_files=str(local))
        elif _looks_like_path(name):
            raise EvaluatorError(f"dataset {name!r} not found: no such folder or file; {fix}")
        else:
            try:
                loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
            except Exception as error:  # noqa: BLE001 - offline, missing, gated, ... all end the same way
                raise EvaluatorError(
                    f"cannot load dataset {name!r}: not a local folder or file and {_hub_failure(error)}; {fix}"
                ) from None
    except EvaluatorError:
        raise
    except Exception as error:  # noqa: BLE001
        raise EvaluatorError(f"cannot load dataset {name!r}: {_first_line(error)}; {fix}") from None
    return _one_split(loaded, name, split)


def _one_split(loaded: Any, name: str, split: str | None) -> tuple[Dataset, str | None]:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        # One split only (a save_to_disk Dataset has no split name; a hub load with split= has the one asked for).
        own = None if loaded.split is None else str(loaded.split)
        if split is not None and own != split:
            raise EvaluatorError(
                f"dataset {name!r} has one split ({own or 'unnamed'}), not {split!r}; drop dataset_split",
                param="dataset_split",
            )
        return loaded, own
    if not isinstance(loaded, datasets.DatasetDict):
        raise EvaluatorError(f"dataset {name!r} is a {type(loaded).__name__}; give a map-style dataset")
    splits = list(loaded)
    if split is not None:
        if split not in loaded:
            raise EvaluatorError(f"dataset {name!r} has no split {split!r}; its splits: {', '.join(splits)}")
        return loaded[split], split
    for candidate in _DEFAULT_SPLITS:
        if candidate in loaded:
            return loaded[candidate], candidate
    if len(splits) == 1:
        return loaded[splits[0]], splits[0]
    raise EvaluatorError(
        f"dataset {name!r} has splits {', '.join(splits)}; pick one with dataset_split", param="dataset_split"
    )


def find_column(dataset: Dataset, candidates: Sequence[str], what: str, name: str) -> str:
    """The first of ``candidates`` among the dataset's columns.

    Raises:
        EvaluatorError: none of them; the message lists the dataset's columns.
    """
    for candidate in candidates:
        if candidate in dataset.column_names:
            return candidate
    raise EvaluatorError(
        f"dataset {name!r} has no {what} column (looked for {', '.join(candidates)}); its columns: "
        f"{', '.join(dataset.column_names)}"
    )


def class_names(dataset: Dataset, label_column: str, name: str) -> list[str]:
    """Class names from the label column's ``ClassLabel`` feature.

    Raises:
        EvaluatorError: the column is not a ``ClassLabel``.
    """
    from datasets import ClassLabel

    feature = dataset.features[label_column]
    if not isinstance(feature, ClassLabel):
        raise EvaluatorError(
            f"dataset {name!r}: column {label_column!r} is a {type(feature).__name__}, not a ClassLabel, so it has no "
            "class names; cast it (dataset.cast_column(column, ClassLabel(names=[...])))"
        )
    return list(feature.names)


def load_rgb_images(dataset: Dataset, column: str, positions: Sequence[int], name: str) -> list[Any]:
    """The images at ``positions`` as RGB PIL images (decoded from the column's ``Image`` feature, paths or arrays).

    Raises:
        EvaluatorError: the column holds something that is not an image.
    """
    import numpy as np
    from PIL import Image

    images = []
    for value in dataset.select(list(positions))[column]:
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            from datasets import Image as ImageFeature

            value = ImageFeature().decode_example(value)
        if isinstance(value, (str, os.PathLike)):
            value = Image.open(value)
        elif isinstance(value, np.ndarray):
            value = Image.fromarray(value)
        if not isinstance(value, Image.Image):
            raise EvaluatorError(f"dataset {name!r}: column {column!r} holds {type(value).__name__} values, not images")
        images.append(value.convert("RGB"))
    return images


def preprocess_images(
    dataset: Dataset,
    column: str,
    positions: Sequence[int],
    image_processor: Any,
    name: str,
    *,
    image_size: int | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """Decode and preprocess the images at ``positions`` into one ``[n, 3, H, W]`` float32 CPU tensor.

    Args:
        dataset: the dataset.
        column: its image column.
        positions: rows to take, in order.
        image_processor: the model's image processor.
        name: the dataset's name, for errors.
        image_size: the side length the model expects; the processor's output is checked against it.
        chunk: images decoded at a time (bounds the memory held by PIL images).

    Raises:
        EvaluatorError: not images, or the processor makes another size than the model expects.
    """
    parts = []
    for start in range(0, len(positions), chunk):
        images = load_rgb_images(dataset, column, positions[start : start + chunk], name)
        parts.append(image_processor(images=images, return_tensors="pt")["pixel_values"].float())
    pixel_values = torch.cat(parts) if parts else torch.empty(0)
    if image_size is not None and pixel_values.numel() and tuple(pixel_values.shape[-2:]) != (image_size, image_size):
        raise EvaluatorError(
            f"the image processor makes {pixel_values.shape[-2]}x{pixel_values.shape[-1]} images but the model "
            f"expects {image_size}x{image_size}; save the model's own image processor beside it"
        )
    return pixel_values


# --------------------------------------------------------------------------------------------------------- batches


def to_batches(
    tensor: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """``tensor`` cut into batches of ``batch_size`` along dim 0, each moved to ``device`` (and floats to ``dtype``).

    Prepared once, so a trial spends its time in forward passes, not in copies.
    """
    batches = []
    for start in range(0, len(tensor), batch_size):
        batch = tensor[start : start + batch_size]
        if dtype is not None and batch.is_floating_point():
            batch = batch.to(dtype=dtype)
        batches.append(batch.to(device).contiguous())
    return batches


def latency_batch(
    pixel_values: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Exactly ``batch_size`` inputs (cycling through ``pixel_values`` if it has fewer), on ``device``, for timing."""
    if len(pixel_values) == 0:
        raise EvaluatorError("no inputs to time: the calibration subset is empty")
    picks = torch.arange(batch_size) % len(pixel_values)
    return pixel_values[picks].to(device=device, dtype=dtype).contiguous()


def resolve_batch_size(batch_size: int | None, default: int) -> int:
    """``batch_size``, or ``default`` when None.

    Raises:
        EvaluatorError: not an integer >= 1.
    """
    if batch_size is None:
        return default
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluatorError(f"batch_size must be an integer >= 1, got {batch_size!r}", param="batch_size")
    return batch_size
