"""Video-MME with LLaVA-OneVision / LLaVA-Video: multiple choice over video frames, scored by option log-likelihood.

Each video is decoded with PyAV (the ``video`` extra: ``pip install -e ".[video]"``) and
:attr:`VideoMmeEvaluator.frames` frames (8 by default) are taken uniformly, at ``linspace(0, total - 1, frames)``
rounded down (lmms-eval's and LLaVA-NeXT's sampling); each frame is resized to the model's input size and normalised
with the settings of the video processor saved beside the model (the work ``LlavaOnevisionVideoProcessor`` does,
done here with PIL so that no torchvision is needed). Frames and prompts are made once, identically for the unpruned
model and every trial.

The prompt is the model's chat format for one user turn with the video, the question, its lettered options and
``Answer with the option's letter from the given choices directly.``; one forward gives the next-token distribution,
and the option letter with the highest log-likelihood is the answer (no generation). Schedules are applied with
:func:`tuner.mllm.prepare_onevision_video` (frames merged one by one; the prompt's video run follows the count).

Data: lmms-eval's ``lmms-eval/Video-MME`` (test): ``videoID``, ``question``, ``options`` (``"A. ..."``), ``answer``
(a letter), ``duration`` (short/medium/long), ``domain``, ... The videos are not in the table: download and unzip
them (``hf download lmms-eval/Video-MME --repo-type dataset --include 'videos_chunked_*.zip'``) and the evaluator
finds ``<videoID>.mp4`` (or ``.MP4``, ``.mkv``, ``.webm``, ``.avi``, ``.mov``) in, in order: the folder named by the
``TUNER_VIDEO_DIR`` environment variable; a local dataset's folder, its ``data/`` subfolder and the ``data/`` folder
beside it (a hub snapshot: ``--dataset SNAPSHOT/videomme`` with the videos unzipped to ``SNAPSHOT/data``); lmms-eval's
cache ``$HF_HOME/videomme/data``. A local dataset may instead carry a ``video`` column: a file path (relative to the
dataset's folder) or a list of frames (images or arrays), with ``question``, ``options`` (or ``choices``) and
``answer``.

Sampling is by video: all questions of a video (Video-MME has three) go to the same slice, ``calib`` and ``holdout``
count videos, and the videos are stratified by ``duration`` where the data has it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from evaluators.base import EvaluatorError, EvaluatorOptions, register_evaluator
from evaluators.calibration import resolve_sizes, stratified_split
from evaluators.loading import find_column, load_model
from evaluators.mllm import LETTERS, MllmEvaluator, TaskSpec, _answer_index
from tuner.evoprune import Schedule

__all__ = [
    "VIDEO_DIR_VARIABLE",
    "FrameTransform",
    "VideoItem",
    "VideoMmeEvaluator",
    "read_video_frames",
    "sample_indices",
    "video_items",
    "video_prompt",
]

VIDEO_DIR_VARIABLE = "TUNER_VIDEO_DIR"
"""The environment variable naming the folder that holds Video-MME's video files."""

VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."
_OPTION_PREFIX = re.compile(r"^\s*([A-E])[.)]\s*")


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread uniformly over ``total`` frames, first and last included (repeats when the
    video is shorter than ``count``).

    Example:
        >>> sample_indices(100, 8), sample_indices(3, 5)
        ([0, 14, 28, 42, 56, 70, 84, 99], [0, 0, 1, 1, 2])
    """
    return [int(i) for i in np.linspace(0, max(total, 1) - 1, count, dtype=int)]


def read_video_frames(path: str | Path, count: int) -> list[np.ndarray]:
    """``count`` RGB frames (``H x W x 3`` uint8) of a video file, at :func:`sample_indices`, decoded with PyAV.

    Each wanted frame is reached by seeking to the key frame before it and decoding forward, so a long video costs a
    few seeks, not a full decode.

    Raises:
        EvaluatorError: PyAV is missing, or the file holds no decodable video stream.
    """
    try:
        import av
    except ImportError:
        raise EvaluatorError(
            'decoding videos needs PyAV; install the video extra (pip install -e ".[video]") or pip install av'
        ) from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EvaluatorError(f"{str(path)!r} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if rate <= 0:
                raise EvaluatorError(f"{str(path)!r}: the video stream has no frame rate")
            time_base = float(stream.time_base or 0)
            start = float(stream.start_time) * time_base if stream.start_time is not None else 0.0
            total = _frame_count(container, stream, rate)
            frames: dict[int, np.ndarray] = {}
            for index in sorted(set(sample_indices(total, count))):
                frames[index] = _frame_at(container, stream, start + index / rate, 0.5 / rate)
    except EvaluatorError:
        raise
    except Exception as error:  # noqa: BLE001 - PyAV raises its own error types for unreadable files
        raise EvaluatorError(f"cannot decode video {str(path)!r}: {type(error).__name__}: {error}") from None
    return [frames[index] for index in sample_indices(total, count)]


def _frame_count(container: Any, stream: Any, rate: float) -> int:
    if stream.frames:
        return int(stream.frames)
    if stream.duration is not None:
        return max(1, round(float(stream.duration) * float(stream.time_base or 0) * rate))
    if container.duration is not None:
        return max(1, round(container.duration / 1_000_000 * rate))
    # No count in the container's headers: count the packets (no decoding).
    total = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return max(1, total)


def _frame_at(container: Any, stream: Any, time_s: float, tolerance_s: float) -> np.ndarray:
    """The first frame at or after ``time_s`` (less half a frame), or the last frame of the video."""
    container.seek(max(0, int(round(time_s / float(stream.time_base)))), stream=stream, backward=True)
    last = None
    for frame in container.decode(stream):
        last = frame
        if frame.time is None or frame.time >= time_s - tolerance_s:
            break
    if last is None:
        raise EvaluatorError(f"no frame could be decoded at {time_s:.2f} s")
    return np.asarray(last.to_ndarray(format="rgb24"))


@dataclass(frozen=True)
class FrameTransform:
    """What the model's video processor does to a frame: resize to ``height x width``, rescale, normalise.

    Attributes:
        height: output height in pixels; ``width`` the width.
        resample: the PIL resampling filter (3: bicubic).
        rescale_factor: multiplies the 0-255 values (1/255), when ``do_rescale``.
        image_mean: subtracted per channel, when ``do_normalize``; ``image_std`` divides.
    """

    height: int
    width: int
    resample: int = 3
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def of_model(cls, name: str, image_size: int) -> FrameTransform:
        """The settings saved beside a model (its video processor's, else its image processor's), for frames of the
        tower's ``image_size``; transformers' ``LlavaOnevisionVideoProcessor`` defaults fill what is not saved.

        Raises:
            EvaluatorError: no processor settings beside the model, or a frame size the tower does not take.
        """
        # BaseVideoProcessor has the class method in every transformers 5.x (VideoProcessorMixin only from 5.2x).
        from transformers.video_processing_utils import BaseVideoProcessor

        local = Path(name).expanduser()
        try:
            saved, _ = BaseVideoProcessor.get_video_processor_dict(str(local) if local.exists() else name)
        except Exception as error:  # noqa: BLE001 - OSError for a missing file, others for a bad one
            raise EvaluatorError(
                f"cannot read the video processor settings of {name!r} ({type(error).__name__}); save the model's "
                "processor beside it (processor.save_pretrained)"
            ) from None
        size = saved.get("size") or {"height": image_size, "width": image_size}
        height = size.get("height", size.get("shortest_edge"))
        width = size.get("width", size.get("shortest_edge"))
        if height is None or width is None or (int(height), int(width)) != (image_size, image_size):
            raise EvaluatorError(
                f"the video processor of {name!r} makes {height}x{width} frames but the model's tower takes "
                f"{image_size}x{image_size}; save the model's own processor beside it"
            )
        defaults = cls(image_size, image_size)
        return cls(
            height=int(height),
            width=int(width),
            resample=int(saved.get("resample", defaults.resample)),
            do_rescale=bool(saved.get("do_rescale", True)),
            rescale_factor=float(saved.get("rescale_factor", defaults.rescale_factor)),
            do_normalize=bool(saved.get("do_normalize", True)),
            image_mean=tuple(float(v) for v in saved.get("image_mean", defaults.image_mean)),
            image_std=tuple(float(v) for v in saved.get("image_std", defaults.image_std)),
        )

    def __call__(self, frames: Sequence[Any]) -> torch.Tensor:
        """``[F, 3, height, width]`` float32 from RGB frames (PIL images or ``H x W x 3`` arrays)."""
        from PIL import Image

        out = []
        for frame in frames:
            image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
            image = image.convert("RGB").resize((self.width, self.height), resample=Image.Resampling(self.resample))
            values = np.asarray(image, dtype=np.float32)
            if self.do_rescale:
                values = values * np.float32(self.rescale_factor)
            if self.do_normalize:
                mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
                values = (values - mean) / std
            out.append(torch.from_numpy(values.transpose(2, 0, 1).copy()))
        return torch.stack(out)


def video_prompt(question: str, options: Sequence[str], video_token: str = "<video>") -> str:
    """LLaVA-OneVision's chat format (its processor's chat template) for one user turn: the video, the question, the
    lettered options and the instruction; the answer letter is the next token.

    Example:
        >>> print(video_prompt("What falls?", ["a leaf", "a cup"]))
        <|im_start|>user <video>
        What falls?
        A. a leaf
        B. a cup
        Answer with the option's letter from the given choices directly.<|im_end|><|im_start|>assistant
        <BLANKLINE>
    """
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    body = "\n".join([question.strip(), *lines, MC_POST_PROMPT])
    return f"<|im_start|>user {video_token}\n{body}<|im_end|><|im_start|>assistant\n"


@dataclass(frozen=True)
class VideoItem:
    """One Video-MME question.

    Attributes:
        row: its dataset row.
        question: the question text.
        options: the options, without their letters.
        answer: the index of the right option.
        video: the video's key (``videoID``, else the video's path, else the row): questions sharing it are sampled
            together.
        stratum: the video's ``duration`` (short/medium/long), or ``""``.
    """

    row: int
    question: str
    options: tuple[str, ...]
    answer: int
    video: str
    stratum: str


def _strip_letter(option: str, index: int) -> str:
    match = _OPTION_PREFIX.match(option)
    return option[match.end() :].strip() if match and match.group(1) == LETTERS[index] else option.strip()


def video_items(dataset: Any, name: str) -> list[VideoItem]:
    """The dataset's rows as items, checked for the columns Video-MME needs.

    Raises:
        EvaluatorError: a missing column, no way to find the videos, or an answer that is not an option.
    """
    columns = set(dataset.column_names)
    find_column(dataset, ("question",), "question", name)
    find_column(dataset, ("answer",), "answer", name)
    options_column = find_column(dataset, ("options", "choices"), "options", name)
    if "video" not in columns and "videoID" not in columns:
        raise EvaluatorError(
            f"dataset {name!r} has no video column (a file path or a list of frames) and no videoID to find the "
            f"video files by; its columns: {', '.join(sorted(columns))}"
        )
    table = dataset.select_columns(
        [c for c in ("question", "answer", options_column, "videoID", "duration") if c in columns]
    )
    by_path = "video" in columns and "videoID" not in columns and _holds_paths(dataset)
    paths = list(dataset["video"]) if by_path else None
    items = []
    for row, record in enumerate(table):
        options = tuple(_strip_letter(str(option), i) for i, option in enumerate(record[options_column]))
        answer = _answer_index(record["answer"], options, row, name)
        if "videoID" in record:
            video = str(record["videoID"])
        else:
            video = str(paths[row]) if paths is not None else f"row {row}"
        items.append(VideoItem(row, str(record["question"]), options, answer, video, str(record.get("duration") or "")))
    return items


def _holds_paths(dataset: Any) -> bool:
    from datasets import Value

    feature = dataset.features.get("video")
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


@register_evaluator("videomme")
class VideoMmeEvaluator(MllmEvaluator):
    """Accuracy of a LLaVA-OneVision / LLaVA-Video model on Video-MME, by option log-likelihood over uniformly
    sampled frames (see the module's notes).

    Args:
        options: the shared :class:`~evaluators.base.EvaluatorOptions`. ``model`` (required): a
            ``LlavaOnevisionForConditionalGeneration`` with its tokenizer and processor settings saved beside it;
            ``dataset``: ``lmms-eval/Video-MME`` by default, or a local dataset in its schema; ``calib``/``holdout``
            count videos (all of a video's questions go to one slice), stratified by duration; ``batch_size``
            questions per forward; ``frames``: frames sampled per video (``--frames``; None: :attr:`default_frames`),
            every video gets exactly this many.
        **settings: fields of :class:`~evaluators.base.EvaluatorOptions` that override ``options`` (``frames=16``
            included).

    Attributes:
        calib_items: the calibration questions (:class:`VideoItem`); ``holdout_items`` the held-out ones.
        frames: frames per video.

    Raises:
        EvaluatorError: a missing or non-OneVision model, a tokenizer without the model's video token, a dataset
            without the needed columns, videos that cannot be found or decoded, or bad sizes.
    """

    spec: ClassVar[TaskSpec] = TaskSpec("videomme", "lmms-eval/Video-MME", None, "test", "choice",
                                        group_column="videoID")  # fmt: skip
    default_calib: ClassVar[int] = 50
    default_holdout: ClassVar[int] = 50
    default_batch_size: ClassVar[int] = 4
    default_frames: ClassVar[int] = 8
    requires: ClassVar[dict[str, str]] = {"model": "a LLaVA-OneVision or LLaVA-Video model folder or hub id"}

    def __init__(self, options: EvaluatorOptions | None = None, /, **settings: Any) -> None:
        options = EvaluatorOptions.of(options, settings)
        self.task = self.spec
        if options.model is None:
            raise EvaluatorError("the videomme evaluator needs a LLaVA-OneVision model; give model", param="model")
        self.frames = self.frames_per_item = int(self.check_frames(options.frames) or self.default_frames)
        dataset_name = options.dataset or str(self.spec.dataset)
        self._set_runtime(options, self.default_batch_size)
        self.model_name, self.dataset_name = options.model, dataset_name
        # The data and the videos first: a missing column or video file fails before a large model is loaded.
        dataset, self.dataset_split = self._load_dataset(dataset_name, options.dataset_split)
        items = video_items(dataset, dataset_name)
        self.calib, self.holdout, calib_rows, holdout_rows = self._split_by_video(items, options)
        self.calib_items: list[VideoItem] = [items[i] for i in calib_rows]  # type: ignore[assignment]
        self.holdout_items: list[VideoItem] = [items[i] for i in holdout_rows]  # type: ignore[assignment]
        sources = self._video_sources(dataset, self.calib_items + self.holdout_items, dataset_name)
        self.model = load_model(
            options.model, device=self.device, dtype=self.dtype, allowed=("LlavaOnevisionForConditionalGeneration",),
            purpose="a LLaVA-OneVision or LLaVA-Video model (LlavaOnevisionForConditionalGeneration)",
        )  # fmt: skip
        self.tokenizer = _load_tokenizer(options.model)
        config: Any = self.model.config
        self.transform = FrameTransform.of_model(options.model, int(config.vision_config.image_size))
        self._letter_ids = _letter_ids(self.tokenizer, options.model)
        pixels: dict[str, torch.Tensor] = {}
        for item in self.calib_items + self.holdout_items:
            if item.video not in pixels:
                pixels[item.video] = self.transform(self._frames_of(sources[item.row]))
        self._batches = {
            "calib": self._prepare_videos(self.calib_items, pixels),
            "holdout": self._prepare_videos(self.holdout_items, pixels),
        }

    # ------------------------------------------------------------------------------------------------ interface

    def applied(self, schedule: Schedule) -> Any:
        """The schedule on every frame, the prompts' video runs rewritten (:func:`prepare_onevision_video`)."""
        from tuner.mllm import prepare_onevision_video

        return prepare_onevision_video(self.model, schedule)  # type: ignore[arg-type]

    def _encoder_call(self, inputs: dict[str, Any]) -> Callable[[], Any]:
        """The ``encoder`` scope: every frame through the vision tower (the layers that run), the projector and the
        pooling (skipped while a schedule is applied, as in the prefill), on the batch's videos."""
        model: Any = self.model
        videos = inputs["pixel_values_videos"]

        def encode() -> None:
            model.model.get_video_features(videos)  # positional: named pixel_values before transformers 5.2x

        return encode

    def describe_latency(self) -> str:
        """The scope's words, with the frames each video of the batch has (the study, export and apply say it)."""
        return f"{super().describe_latency()} videos of {self.frames} frames"

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "frames": self.frames}

    # ------------------------------------------------------------------------------------------------- building

    def _split_by_video(
        self, items: list[VideoItem], options: EvaluatorOptions
    ) -> tuple[int, int, list[int], list[int]]:
        """Videos drawn whole, stratified by duration; sizes count videos."""
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.video, []).append(index)
        keys = list(groups)
        calib, holdout = resolve_sizes(options.calib, options.holdout, len(keys), self.default_calib,
                                       self.default_holdout)  # fmt: skip
        calib_groups, holdout_groups = stratified_split([items[groups[k][0]].stratum for k in keys], calib, holdout,
                                                        self.seed)  # fmt: skip
        calib_rows = sorted(i for g in calib_groups for i in groups[keys[g]])
        holdout_rows = sorted(i for g in holdout_groups for i in groups[keys[g]])
        return calib, holdout, calib_rows, holdout_rows

    def _video_sources(self, dataset: Any, items: list[VideoItem], name: str) -> dict[int, Any]:
        """Per item row, its video: a file path, or a list of frames (a ``video`` column of frames).

        Raises:
            EvaluatorError: a video file that cannot be found (the message says where it looked and the fix).
        """
        rows = sorted({item.row for item in items})
        local = Path(name).expanduser()
        base = local if local.is_dir() else local.parent
        if "video" in dataset.column_names:
            values = dataset.select(rows)["video"]
            sources: dict[int, Any] = {}
            for row, value in zip(rows, values, strict=True):
                if isinstance(value, (str, os.PathLike)):
                    path = Path(value).expanduser()
                    path = path if path.is_absolute() or not local.exists() else base / path
                    if not path.is_file():
                        raise EvaluatorError(f"dataset {name!r} row {row}: video file {str(path)!r} not found")
                    sources[row] = path
                elif isinstance(value, (list, tuple)) and value:
                    sources[row] = value
                else:
                    raise EvaluatorError(
                        f"dataset {name!r} row {row}: the video column holds {type(value).__name__}, not a file path "
                        "or a list of frames"
                    )
            return sources
        folders = _video_folders(local if local.exists() else None)
        found: dict[str, Path] = {}
        for item in items:
            if item.video not in found:
                located = _find_video(item.video, folders)
                if located is None:
                    raise EvaluatorError(
                        f"dataset {name!r}: no video file for videoID {item.video!r} (looked for {item.video}.mp4, "
                        f".mkv, ... in {', '.join(str(f) for f in folders) or 'no folder'}); download and unzip the "
                        f"videos (hf download lmms-eval/Video-MME --repo-type dataset --include "
                        f"'videos_chunked_*.zip') and set {VIDEO_DIR_VARIABLE} to their folder"
                    )
                found[item.video] = located
        return {item.row: found[item.video] for item in items}

    def _frames_of(self, source: Any) -> list[Any]:
        if isinstance(source, Path):
            return read_video_frames(source, self.frames)
        decoded = [_decoded_frame(frame) for frame in source]
        return [decoded[i] for i in sample_indices(len(decoded), self.frames)]

    def _prepare_videos(
        self, items: list[VideoItem], pixels: dict[str, torch.Tensor]
    ) -> list[tuple[dict[str, Any], Any, Any]]:
        """Prompts per batch (on the device), left-padded, each with its video's run of video tokens (frames x pooled
        tokens per frame + the newline, as the model's processor expands it), and each item's letter ids."""
        from tuner.mllm import pooled_tokens_per_frame

        config: Any = self.model.config
        video_token_id = int(config.video_token_id)
        run = self.frames * pooled_tokens_per_frame(self.model) + 1
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batches = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            rows = []
            for item in chunk:
                ids = list(self.tokenizer(video_prompt(item.question, item.options, "<video>"))["input_ids"])
                if ids.count(video_token_id) != 1:
                    raise EvaluatorError(
                        f"the tokenizer of {self.model_name!r} does not make one video token (id {video_token_id}) of "
                        "'<video>'; save the model's own tokenizer beside it"
                    )
                at = ids.index(video_token_id)
                rows.append(ids[:at] + [video_token_id] * run + ids[at + 1 :])
            width = max(len(ids) for ids in rows)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows])
            inputs = {
                "input_ids": input_ids.to(self.device),
                "attention_mask": mask.to(self.device),
                "pixel_values_videos": torch.stack([pixels[item.video] for item in chunk]).to(self.device, self.dtype),
                # Positions counted from the mask, so a left-padded prompt scores as it would alone.
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
            }
            option_ids = [self._letter_ids[: len(item.options)] for item in chunk]
            batches.append((inputs, option_ids, [item.answer for item in chunk]))
        return batches


def _video_folders(local: Path | None) -> list[Path]:
    """Where video files are looked for, in order (see the module's notes)."""
    folders = []
    if os.environ.get(VIDEO_DIR_VARIABLE):
        folders.append(Path(os.environ[VIDEO_DIR_VARIABLE]).expanduser())
    if local is not None:
        base = local if local.is_dir() else local.parent
        # A hub snapshot keeps the table in videomme/ and the unzipped videos in data/ beside it.
        folders += [base, base / "data", base.parent / "data"]
    folders.append(Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "videomme" / "data")
    return folders


def _find_video(video_id: str, folders: Sequence[Path]) -> Path | None:
    for folder in folders:
        for suffix in VIDEO_SUFFIXES:
            path = folder / f"{video_id}{suffix}"
            if path.is_file():
                return path
    return None


def _decoded_frame(frame: Any) -> Any:
    if isinstance(frame, dict) and ("bytes" in frame or "path" in frame):
        from datasets import Image as ImageFeature

        return ImageFeature().decode_example(frame)
    return frame


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    local = Path(name).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else name)
    except Exception as error:  # noqa: BLE001
        raise EvaluatorError(
            f"cannot load the tokenizer of {name!r} ({type(error).__name__}); save the processor beside the model "
            "(processor.save_pretrained)",
            param="model",
        ) from None
    tokenizer.padding_side = "left"
    return tokenizer


def _letter_ids(tokenizer: Any, name: str) -> list[int]:
    """The first token of each option letter: what follows the prompt's ``assistant\\n``."""
    ids = [tokenizer.encode(letter, add_special_tokens=False)[:1] for letter in LETTERS]
    flat = [found[0] if found else -1 for found in ids]
    if -1 in flat or len(set(flat)) != len(flat):
        raise EvaluatorError(
            f"the tokenizer of {name!r} does not give the letters {', '.join(LETTERS)} distinct first tokens, so the "
            "options cannot be scored by likelihood"
        )
    return flat
