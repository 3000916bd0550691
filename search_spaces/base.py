"""What a search space is: declared parameters, and a deterministic map from one trial's parameters to one Schedule.

A space declares its parameters as data (:class:`FloatParam`, :class:`IntParam`, :class:`ChoiceParam`), possibly
conditional on another parameter's value (``when``) or repeated once per encoder layer (``per_layer``). The generic
:meth:`SearchSpace.suggest` asks an Optuna trial for them in declaration order; :meth:`SearchSpace.to_schedule` turns a
parameter dict into exactly one valid :class:`~tuner.evoprune.Schedule`, the same one every time, clamping values
(deterministically) where a plan would break a layer's halving limit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, ClassVar

import optuna

from tuner.errors import SearchSpaceError
from tuner.evoprune import Schedule, Scoring
from tuner.registry import SEARCH_SPACE_GROUP, Registry

__all__ = [
    "DEFAULT_SCORING_PARAMS",
    "SCORING_PARAMS",
    "SEED_KEEP_SHARES",
    "SPACES",
    "TEMPORAL_PARAM",
    "ChoiceParam",
    "EncoderShape",
    "FloatParam",
    "IntParam",
    "Param",
    "SearchSpace",
    "SearchSpaceError",
    "SeedPoint",
    "available_spaces",
    "default_scoring_params",
    "get_space",
    "on_grid",
    "register_space",
    "round_half_up",
    "scoring_from_params",
    "space_instance",
    "tokens_for_share",
]


@dataclass(frozen=True)
class EncoderShape:
    """The encoder facts a space needs: depth, patch tokens in, family and CLS, and the frames of a video workload.

    Attributes:
        num_layers: encoder layers.
        tokens_in: patch tokens entering layer 0 (CLS not counted).
        family: encoder family (``"clip"``, ``"siglip"``), recorded in the schedules; None when unknown.
        has_cls: whether the encoder has a CLS token; None when unknown.
        frames_per_item: frames per video the encoder gets (consecutive batch items); 1 (default) for images.
            Above 1, spaces also search the temporal merging weight (:data:`TEMPORAL_PARAM`); at 1 they propose
            exactly the parameters they always did.
    """

    num_layers: int
    tokens_in: int
    family: str | None = None
    has_cls: bool | None = None
    frames_per_item: int = 1

    def __post_init__(self) -> None:
        frames = self.frames_per_item
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise SearchSpaceError(f"frames_per_item must be an integer >= 1 (1 for images), got {frames!r}")

    @property
    def is_video(self) -> bool:
        """Whether the workload is video (more than one frame per item): temporal merging is then searched."""
        return self.frames_per_item > 1

    @classmethod
    def of_model(cls, model: Any, frames_per_item: int = 1) -> EncoderShape:
        """The shape of a model's vision encoder (through the EvoPrune adapters).

        For LLaVA-family models, only the vision layers up to ``vision_feature_layer`` count: those are the ones that
        run once the model is prepared (:func:`tuner.mllm.vision_layers_that_run`).

        Args:
            model: the model.
            frames_per_item: frames per video of the workload (the model cannot tell); 1 for images.

        Raises:
            UnsupportedModelError: no adapter knows the model.
        """
        from tuner.evoprune.adapters import resolve_encoder
        from tuner.mllm import vision_layers_that_run

        encoder = resolve_encoder(model)
        return cls(vision_layers_that_run(model), encoder.num_patches, encoder.family, encoder.has_cls, frames_per_item)


Bound = Callable[[EncoderShape], int]


@dataclass(frozen=True)
class Param:
    """One declared parameter.

    Attributes:
        name: the Optuna parameter name (with ``per_layer``, the prefix of ``name_0``, ``name_1``, ...).
        help: one line: what it controls.
        when: ``(other, values)``: only suggested when the already-suggested ``other`` has one of ``values``.
        per_layer: one parameter per encoder layer.
        video_only: only on a video workload (``shape.frames_per_item > 1``); absent on images.
    """

    name: str
    help: str
    when: tuple[str, tuple[Any, ...]] | None = None
    per_layer: bool = False
    video_only: bool = False

    def names(self, shape: EncoderShape) -> list[str]:
        """The Optuna parameter names this declaration stands for on ``shape`` (none for a video-only one on images)."""
        if self.video_only and not shape.is_video:
            return []
        if self.per_layer:
            return [f"{self.name}_{layer}" for layer in range(shape.num_layers)]
        return [self.name]

    def applies(self, params: Mapping[str, Any]) -> bool:
        """Whether the declaration is active given the parameters suggested before it."""
        return self.when is None or params.get(self.when[0]) in self.when[1]

    def suggest(self, trial: optuna.trial.BaseTrial, name: str, shape: EncoderShape) -> Any:
        """Ask ``trial`` for the value of ``name``."""
        raise NotImplementedError

    def range_text(self) -> str:
        """The range, for listings."""
        raise NotImplementedError

    def describe(self) -> str:
        """``name  range  help`` on one line, with the condition."""
        name = f"{self.name}_<layer>" if self.per_layer else self.name
        condition = f" (when {self.when[0]} in {', '.join(map(str, self.when[1]))})" if self.when else ""
        if self.video_only:
            condition += " (video only)"
        return f"{name}: {self.range_text()}: {self.help}{condition}"


@dataclass(frozen=True)
class FloatParam(Param):
    """A float in ``[low, high]``, on a ``step`` grid when given."""

    low: float = 0.0
    high: float = 1.0
    step: float | None = None

    def suggest(self, trial: optuna.trial.BaseTrial, name: str, shape: EncoderShape) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step)

    def range_text(self) -> str:
        step = f" step {self.step:g}" if self.step else ""
        return f"float [{self.low:g}, {self.high:g}]{step}"


@dataclass(frozen=True)
class IntParam(Param):
    """An integer in ``[low, high]``; ``high`` may depend on the encoder (then ``high_text`` names it)."""

    low: int = 0
    high: int | Bound = 1
    high_text: str = ""

    def upper(self, shape: EncoderShape) -> int:
        """``high`` on ``shape`` (never below ``low``)."""
        high = self.high(shape) if callable(self.high) else self.high
        return max(self.low, high)

    def suggest(self, trial: optuna.trial.BaseTrial, name: str, shape: EncoderShape) -> int:
        return trial.suggest_int(name, self.low, self.upper(shape))

    def range_text(self) -> str:
        high = self.high_text or str(self.high)
        return f"int [{self.low}, {high}]"


@dataclass(frozen=True)
class ChoiceParam(Param):
    """One of ``choices``."""

    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.trial.BaseTrial, name: str, shape: EncoderShape) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def range_text(self) -> str:
        shown = (str(choice).lower() if isinstance(choice, bool) else str(choice) for choice in self.choices)
        return "{" + ", ".join(shown) + "}"


TEMPORAL_PARAM = FloatParam(
    "temporal_weight",
    "factor on the score of folding a token into its near-copy in the previous frame, in place of the "
    "diversity/attention factors of a spatial merge (0 = off)",
    low=0.0,
    high=1.0,
    step=0.05,
    video_only=True,
)
"""Temporal merging's weight (docs/method.md, "Temporal merging"), searched on video workloads only."""

SCORING_PARAMS: tuple[Param, ...] = (
    FloatParam(
        "w_div",
        "weight of the diversity penalty, relative to w_sim = 1 (the paper's lambda_d; 0 switches it off)",
        low=0.0,
        high=2.0,
        step=0.05,
    ),
    FloatParam(
        "w_attn",
        "weight of the soft attention-importance penalty, relative to w_sim = 1 (0 switches it off)",
        low=0.0,
        high=2.0,
        step=0.05,
    ),
    FloatParam(
        "ctr",
        "share of tokens protected from merging by attention received (paper: 0.25)",
        low=0.0,
        high=0.5,
        step=0.05,
    ),
    ChoiceParam(
        "proportional_attention",
        "later attention counts a merged token as many (ToMe's log(size) key bias)",
        choices=(False, True),
    ),
    ChoiceParam(
        "features", "features compared: attention keys (head mean) or hidden states", choices=("keys", "hidden")
    ),
    TEMPORAL_PARAM,
)
"""The score settings every space searches (``temporal_weight`` on video only). ``w_sim`` stays 1: scaling all three
weights changes no ranking."""

DEFAULT_SCORING_PARAMS: dict[str, Any] = {
    "w_div": 0.5,
    "w_attn": 0.0,
    "ctr": 0.25,
    "proportional_attention": False,
    "features": "keys",
}
"""The paper's scoring (``Scoring()``), in the parameters of :data:`SCORING_PARAMS` (images; see
:func:`default_scoring_params`)."""


def default_scoring_params(shape: EncoderShape) -> dict[str, Any]:
    """:data:`DEFAULT_SCORING_PARAMS` on ``shape``: on video also ``temporal_weight`` 0 (the paper: frame by frame)."""
    if shape.is_video:
        return {**DEFAULT_SCORING_PARAMS, TEMPORAL_PARAM.name: 0.0}
    return dict(DEFAULT_SCORING_PARAMS)


def on_grid(value: float, step: float | None) -> float:
    """``value`` rounded to the decimals of ``step`` (removes float noise such as 0.30000000000000004)."""
    if not step:
        return float(value)
    exponent = Decimal(repr(step)).normalize().as_tuple().exponent
    decimals = max(0, -exponent) if isinstance(exponent, int) else 0
    return round(float(value), decimals)


def scoring_from_params(params: Mapping[str, Any]) -> Scoring:
    """The :class:`Scoring` of :data:`SCORING_PARAMS` values (``w_sim`` = 1, other settings at their defaults;
    ``temporal_weight`` 0 when absent, as on images)."""
    steps = {param.name: param.step for param in SCORING_PARAMS if isinstance(param, FloatParam)}
    return Scoring(
        w_sim=1.0,
        w_div=on_grid(params["w_div"], steps["w_div"]),
        w_attn=on_grid(params["w_attn"], steps["w_attn"]),
        ctr=on_grid(params["ctr"], steps["ctr"]),
        features=params["features"],
        proportional_attention=bool(params["proportional_attention"]),
        temporal_weight=on_grid(params.get(TEMPORAL_PARAM.name, 0.0), TEMPORAL_PARAM.step),
    )


def round_half_up(value: float) -> int:
    """``value`` rounded to the nearest integer, halves up (on its decimal value as written)."""
    return int(Decimal(repr(float(value))).to_integral_value(rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class SeedPoint:
    """A known schedule enqueued before the search starts.

    Attributes:
        label: what it is (``"no pruning"``, ``"paper skip default, 25% tokens"``).
        params: the space's own parameters for it.
    """

    label: str
    params: dict[str, Any]


SEED_KEEP_SHARES: tuple[float, ...] = (0.5, 0.25, 0.12)
"""Token shares of the paper's Skip default enqueued as seed trials (besides no pruning)."""


class SearchSpace(ABC):
    """A family of schedules an Optuna trial can pick from.

    Subclasses set ``name``, ``summary`` and ``params`` and implement :meth:`to_schedule` and :meth:`seed_points`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]

    def suggest(self, trial: optuna.trial.BaseTrial, shape: EncoderShape) -> dict[str, Any]:
        """Ask ``trial`` for every active parameter, in declaration order.

        Args:
            trial: an Optuna trial (a live one, or a ``FixedTrial``).
            shape: the encoder.

        Returns:
            The parameters, by Optuna name.
        """
        values: dict[str, Any] = {}
        for param in self.params:
            if not param.applies(values):
                continue
            for name in param.names(shape):
                values[name] = param.suggest(trial, name, shape)
        return values

    def sample(self, trial: optuna.trial.BaseTrial, shape: EncoderShape) -> Schedule:
        """The schedule ``trial`` proposes: :meth:`suggest`, then :meth:`to_schedule`."""
        return self.to_schedule(self.suggest(trial, shape), shape)

    @abstractmethod
    def build(self, params: Mapping[str, Any], shape: EncoderShape) -> Schedule:
        """The schedule of ``params`` (already checked to be complete); always valid, always the same."""

    def to_schedule(self, params: Mapping[str, Any], shape: EncoderShape) -> Schedule:
        """The one schedule ``params`` stand for on ``shape``.

        An empty plan gets the default scoring, so that "no pruning" has one fingerprint whatever the score settings.

        Raises:
            SearchSpaceError: a parameter the space needs is missing.
        """
        missing = [name for name in self.expected_names(params, shape) if name not in params]
        if missing:
            raise SearchSpaceError(
                f"search space {self.name!r} needs the parameters {', '.join(missing)}; "
                "was the study made with another space?"
            )
        schedule = self.build(params, shape)
        if schedule.is_empty and schedule.scoring != Scoring():
            schedule = replace(schedule, scoring=Scoring())
        return schedule

    def expected_names(self, params: Mapping[str, Any], shape: EncoderShape) -> list[str]:
        """The parameter names active for ``params`` (conditions read from ``params`` itself)."""
        names: list[str] = []
        for param in self.params:
            if param.applies(params):
                names += param.names(shape)
        return names

    @abstractmethod
    def seed_points(self, shape: EncoderShape) -> list[SeedPoint]:
        """No pruning, the paper's Skip default (``Scoring()``, stride 2) at :data:`SEED_KEEP_SHARES`, then front-loaded
        schedules without attention statistics (:data:`search_spaces.family.FAST_SEED_KEEP_SHARES`)."""

    def distinct_seed_points(self, shape: EncoderShape) -> list[SeedPoint]:
        """:meth:`seed_points` without those that give the same schedule as an earlier one on ``shape``.

        (On a shallow encoder the Skip default cannot reach 12% of the tokens; it then equals the 25% point.)
        """
        seen: set[str] = set()
        distinct = []
        for point in self.seed_points(shape):
            fingerprint = self.to_schedule(point.params, shape).fingerprint()
            if fingerprint not in seen:
                seen.add(fingerprint)
                distinct.append(point)
        return distinct

    def describe(self) -> list[str]:
        """One line per declared parameter, for ``tuner spaces``."""
        return [param.describe() for param in self.params]


def tokens_for_share(share: float, tokens_in: int) -> int:
    """Patch tokens kept for a share of ``tokens_in``: rounded half up, at least 1."""
    return min(tokens_in, max(1, round_half_up(share * tokens_in)))


_INSTANCES: dict[type[SearchSpace], SearchSpace] = {}


def _instance(cls: type[SearchSpace]) -> SearchSpace:
    """The one shared instance of a space class (spaces hold no state)."""
    if cls not in _INSTANCES:
        _INSTANCES[cls] = cls()
    return _INSTANCES[cls]


def space_instance(name: str, loaded: Any) -> SearchSpace:
    """What an entry point of ``tuner.search_spaces`` loads: a :class:`SearchSpace` subclass or instance, whose
    ``name`` is the entry point's."""
    if isinstance(loaded, type) and issubclass(loaded, SearchSpace):
        loaded = _instance(loaded)
    if not isinstance(loaded, SearchSpace):
        raise SearchSpaceError(f"entry point {name!r} of group {SEARCH_SPACE_GROUP} is not a SearchSpace: {loaded!r}")
    if loaded.name != name:
        raise SearchSpaceError(
            f"entry point {name!r} of group {SEARCH_SPACE_GROUP} is the space named {loaded.name!r}; name them alike"
        )
    return loaded


SPACES: Registry[SearchSpace] = Registry(
    "search space", SEARCH_SPACE_GROUP, error=SearchSpaceError, adapt=space_instance, hint="see `tuner spaces`"
)
"""The search spaces by name: the built-in ones and those of installed packages (entry points)."""


def register_space(cls: type[SearchSpace]) -> type[SearchSpace]:
    """Class decorator: make a space available under its ``name`` (a name taken by another space is an error)."""
    SPACES.register(cls.name, _instance(cls))
    return cls


def available_spaces() -> list[str]:
    """Names of the registered spaces, sorted."""
    return SPACES.names()


def get_space(name: str) -> SearchSpace:
    """The space registered as ``name``.

    Raises:
        SearchSpaceError: unknown name; the message lists the available ones.
    """
    return SPACES.get(name)
