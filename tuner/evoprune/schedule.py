"""Per-layer token-merging schedules (docs/method.md, section 5) and the presets of the paper's schedule families.

A :class:`Schedule` says how many patch tokens (a CLS token is never counted) each encoder layer merges away. Layer
``l`` receives ``T_l`` patch tokens (``T_0 = tokens_in``) and removes ``r_l`` of them, ``0 <= r_l <= T_l // 2`` (one
bipartite merge step can at most halve its tokens); it merges iff ``r_l > 0``.

Example:
    >>> s = Schedule.preset("skip", num_layers=6, tokens_in=64, tokens_out=16)
    >>> s.remove_per_layer
    [16, 0, 16, 0, 16, 0]
    >>> s.tokens_after()
    [48, 48, 32, 32, 16, 16]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol, overload

from tuner.evoprune.errors import ScheduleError
from tuner.evoprune.flops import encoder_flops
from tuner.evoprune.scoring import Scoring

PRESET_NAMES: tuple[str, ...] = ("decreasing", "first", "increasing", "last", "mean", "skip")
"""Names accepted by :meth:`Schedule.preset`, the schedule families of the paper (appendix A)."""

KEEP_RATIOS_PRESET = "keep_ratios"
"""Preset name recorded by :meth:`Schedule.from_keep_ratios`."""

ALPHA_MAX = 100
"""Largest exponent of the increasing / decreasing presets (beyond it every preset is all on one layer anyway)."""

_REQUIRED = object()
_PRESET_PARAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "decreasing": {"alpha": 1.0},
    "first": {"n": _REQUIRED},
    "increasing": {"alpha": 1.0},
    "last": {"n": _REQUIRED},
    "mean": {},
    "skip": {"stride": 2, "offset": 0, "start_layer": 0},
}


def _require_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScheduleError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def layer_cap_violation(remove_per_layer: Sequence[int], tokens_in: int) -> tuple[int, str] | None:
    """The first layer that removes more patch tokens than one merge step can, with the error message, or None.

    A merge step folds tokens of one half of the bipartite split into the other, so it removes at most
    ``T_l // 2`` of the ``T_l`` patch tokens its layer receives.

    Args:
        remove_per_layer: patch tokens removed by each layer.
        tokens_in: patch tokens entering layer 0.

    Returns:
        ``(layer, message)`` of the first layer over its maximum, or None when every layer fits.

    Example:
        >>> layer_cap_violation([4, 3], 10) is None
        True
        >>> layer, message = layer_cap_violation([4, 4, 4], 12)
        >>> layer, message[:50]
        (2, 'layer 2 removes 4 patch tokens but can remove at m')
    """
    tokens = tokens_in
    for layer, remove in enumerate(remove_per_layer):
        if remove > tokens // 2:
            return layer, (
                f"layer {layer} removes {remove} patch tokens but can remove at most {tokens // 2} "
                f"(it receives {tokens}; one merge step can at most halve them)"
            )
        tokens -= remove
    return None


def _equal_split(total: int, merging_layers: Sequence[int], num_layers: int) -> list[int]:
    """``total`` split equally over ``merging_layers``, the remainder one each on the earliest of them."""
    plan = [0] * num_layers
    if total == 0:
        return plan
    share, remainder = divmod(total, len(merging_layers))
    for position, layer in enumerate(merging_layers):
        plan[layer] = share + (1 if position < remainder else 0)
    return plan


def _apportion(total: int, weights: Sequence[Fraction]) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainder (ties to the earlier layer), exactly."""
    weight_sum = sum(weights, Fraction(0))
    quotas = [total * weight / weight_sum for weight in weights]
    plan = [math.floor(quota) for quota in quotas]
    leftover = total - sum(plan)
    by_remainder = sorted(range(len(weights)), key=lambda layer: (-(quotas[layer] - plan[layer]), layer))
    for layer in by_remainder[:leftover]:
        plan[layer] += 1
    return plan


def _depth_weights(num_layers: int, alpha: float, increasing: bool) -> list[Fraction]:
    """``(l + 1)^alpha`` (increasing) or ``(num_layers - l)^alpha`` (decreasing), exact for an integral alpha."""
    depths = [layer + 1 if increasing else num_layers - layer for layer in range(num_layers)]
    if float(alpha).is_integer():
        return [Fraction(depth) ** int(alpha) for depth in depths]
    # Normalised by the depth so that no power overflows a float; the scale does not change the apportionment.
    return [Fraction((depth / num_layers) ** alpha) for depth in depths]


def _check_num_layers_and_tokens(num_layers: int, tokens_in: int, tokens_out: int) -> None:
    _require_int("num_layers", num_layers, 1)
    _require_int("tokens_in", tokens_in, 1)
    if isinstance(tokens_out, bool) or not isinstance(tokens_out, int) or not 1 <= tokens_out <= tokens_in:
        raise ScheduleError(f"tokens_out must be an integer in [1, tokens_in {tokens_in}], got {tokens_out!r}")


def _resolve_preset_params(name: str, params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The preset's full parameters (defaults filled in), each checked against the encoder depth."""
    if not isinstance(name, str) or name not in _PRESET_PARAM_DEFAULTS:
        raise ScheduleError(f"unknown preset {name!r}; available: {', '.join(PRESET_NAMES)}")
    defaults = _PRESET_PARAM_DEFAULTS[name]
    for param in params:
        if param not in defaults:
            allowed = ", ".join(sorted(defaults)) or "none (it takes no params)"
            raise ScheduleError(f"unknown param {param!r} for preset {name!r}; allowed: {allowed}")
    resolved = {param: params.get(param, default) for param, default in defaults.items()}
    for param, value in resolved.items():
        if value is _REQUIRED:
            raise ScheduleError(f"preset {name!r} needs param {param!r} (the number of merging layers)")
    last_layer = num_layers - 1
    if name == "skip":
        stride = _require_int("stride", resolved["stride"], 1)
        offset = resolved["offset"]
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < stride:
            raise ScheduleError(f"offset must be an integer in [0, stride {stride}), got {offset!r}")
        start_layer = _require_int("start_layer", resolved["start_layer"], 0)
        if start_layer > last_layer:
            raise ScheduleError(
                f"start_layer {start_layer} is beyond the encoder's {num_layers} layers (0..{last_layer})"
            )
    elif name in ("first", "last"):
        n = _require_int("n", resolved["n"], 1)
        if n > num_layers:
            raise ScheduleError(f"n {n} is beyond the encoder's {num_layers} layers (n must be in 1..{num_layers})")
    elif name in ("increasing", "decreasing"):
        alpha = resolved["alpha"]
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or math.isnan(alpha)
            or not 0 <= alpha <= ALPHA_MAX
        ):
            raise ScheduleError(f"alpha must be a number in [0, {ALPHA_MAX}], got {alpha!r}")
    return resolved


def preset_plan(name: str, *, num_layers: int, tokens_in: int, tokens_out: int, **params: Any) -> list[int]:
    """The ``remove_per_layer`` list of a preset, without building a :class:`Schedule` (nor checking layer caps).

    Every preset removes ``R = tokens_in - tokens_out`` patch tokens in total.

    Args:
        name: one of :data:`PRESET_NAMES` (see :meth:`Schedule.preset` for each one's params).
        num_layers: encoder depth.
        tokens_in: patch tokens entering layer 0.
        tokens_out: patch tokens left after the last layer.
        **params: the preset's parameters; missing ones take their defaults.

    Returns:
        Patch tokens removed by each layer.

    Raises:
        ScheduleError: unknown preset or param, or a value out of range.

    Example:
        >>> preset_plan("last", num_layers=4, tokens_in=32, tokens_out=22, n=3)
        [0, 4, 3, 3]
        >>> preset_plan("increasing", num_layers=4, tokens_in=32, tokens_out=22)
        [1, 2, 3, 4]
    """
    return _preset_plan_and_params(name, num_layers, tokens_in, tokens_out, params)[0]


def _preset_plan_and_params(
    name: str, num_layers: int, tokens_in: int, tokens_out: int, params: dict[str, Any]
) -> tuple[list[int], dict[str, Any]]:
    _check_num_layers_and_tokens(num_layers, tokens_in, tokens_out)
    resolved = _resolve_preset_params(name, params, num_layers)
    total = tokens_in - tokens_out
    if name in ("increasing", "decreasing"):
        weights = _depth_weights(num_layers, resolved["alpha"], increasing=name == "increasing")
        return _apportion(total, weights), resolved
    if name == "skip":
        stride, offset, start_layer = resolved["stride"], resolved["offset"], resolved["start_layer"]
        merging = [layer for layer in range(start_layer, num_layers) if (layer - start_layer) % stride == offset]
        if not merging and total > 0:
            raise ScheduleError(
                f"preset 'skip' with start_layer {start_layer}, stride {stride}, offset {offset} selects none of the "
                f"encoder's {num_layers} layers; lower start_layer or offset"
            )
    elif name == "mean":
        merging = list(range(num_layers))
    elif name == "first":
        merging = list(range(resolved["n"]))
    else:  # last
        merging = list(range(num_layers - resolved["n"], num_layers))
    return _equal_split(total, merging, num_layers), resolved


def keep_ratio_plan(keep_ratios: Sequence[float], tokens_in: int) -> list[int]:
    """The ``remove_per_layer`` list of a per-layer keep-ratio vector (without checking layer caps).

    Layer ``l`` keeps ``round_half_up(T_l * keep_ratios[l])`` of the ``T_l`` patch tokens it receives; the product is
    taken on the ratio's decimal value as written (``0.15`` of 10 is 1.5, kept 2), not its binary approximation.

    Args:
        keep_ratios: share of its incoming patch tokens each layer keeps, each in (0, 1].
        tokens_in: patch tokens entering layer 0.

    Returns:
        Patch tokens removed by each layer.

    Raises:
        ScheduleError: an empty list, or a ratio that is not a number in (0, 1].

    Example:
        >>> keep_ratio_plan([1.0, 0.75, 1, 0.5], 64)
        [0, 16, 0, 24]
    """
    _require_int("tokens_in", tokens_in, 1)
    if isinstance(keep_ratios, (str, bytes)) or not isinstance(keep_ratios, Sequence) or not keep_ratios:
        raise ScheduleError(f"keep_ratios must be a non-empty list of numbers in (0, 1], got {keep_ratios!r}")
    plan = []
    tokens = tokens_in
    for layer, ratio in enumerate(keep_ratios):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 < ratio <= 1:
            raise ScheduleError(f"keep_ratios[{layer}] must be in (0, 1], got {ratio!r}")
        kept = int((Decimal(repr(float(ratio))) * tokens).to_integral_value(rounding=ROUND_HALF_UP))
        plan.append(tokens - kept)
        tokens = kept
    return plan


def _plan_of_preset_record(
    record: Any, num_layers: int, tokens_in: int, tokens_out: int
) -> tuple[list[int], dict[str, Any]]:
    """The plan a preset record gives, and the record with all params (defaults filled in)."""
    if not isinstance(record, dict) or set(record) != {"name", "params"} or not isinstance(record["params"], dict):
        raise ScheduleError(f"preset must be None or {{'name': str, 'params': dict}}, got {record!r}")
    name, params = record["name"], record["params"]
    if name == KEEP_RATIOS_PRESET:
        if set(params) != {"keep_ratios"}:
            raise ScheduleError(f"preset 'keep_ratios' takes exactly the param 'keep_ratios', got {sorted(params)}")
        keep_ratios = params["keep_ratios"]
        if isinstance(keep_ratios, Sequence) and len(keep_ratios) != num_layers:
            raise ScheduleError(f"keep_ratios has {len(keep_ratios)} entries but the plan has {num_layers} layers")
        plan = keep_ratio_plan(keep_ratios, tokens_in)
        resolved = {"keep_ratios": list(keep_ratios)}
    elif isinstance(name, str) and name in _PRESET_PARAM_DEFAULTS:
        plan, resolved = _preset_plan_and_params(name, num_layers, tokens_in, tokens_out, params)
    else:
        raise ScheduleError(
            f"unknown preset {name!r}; available: {', '.join(sorted((*PRESET_NAMES, KEEP_RATIOS_PRESET)))}"
        )
    return plan, {"name": name, "params": resolved}


class _PresetConstructor(Protocol):
    def __call__(
        self,
        name: str,
        *,
        num_layers: int,
        tokens_in: int,
        tokens_out: int,
        scoring: Scoring | None = None,
        family: str | None = None,
        has_cls: bool | None = None,
        **params: Any,
    ) -> Schedule: ...


if TYPE_CHECKING:

    class _PresetAttribute:
        """``Schedule.preset`` is the preset constructor; ``schedule.preset`` is the instance's preset record."""

        @overload
        def __get__(self, instance: None, owner: type[Any]) -> _PresetConstructor: ...

        @overload
        def __get__(self, instance: object, owner: type[Any]) -> dict[str, Any] | None: ...

        def __get__(self, instance: object, owner: type[Any]) -> Any: ...

        def __set__(self, instance: object, value: dict[str, Any] | None) -> None: ...


@dataclass
class Schedule:
    """A per-layer merge plan: how many patch tokens each encoder layer removes, and how it scores pairs.

    Args:
        remove_per_layer: patch tokens removed by each encoder layer (``r_l >= 0``, at most half of what it receives).
        tokens_in: patch tokens entering layer 0 (CLS not counted).
        scoring: how merging layers rank token pairs.
        family: encoder family the plan was made for (``"clip"``, ``"siglip"``, ...); None when unknown.
        has_cls: whether that encoder has a CLS token; None when unknown (FLOPs then count none).
        preset: the preset that generated the plan, ``{"name": ..., "params": {...}}`` with all params; None for a
            hand-made or searched plan. It must reproduce ``remove_per_layer``. On the class, ``Schedule.preset(...)``
            is the preset constructor (an alias of :meth:`from_preset`).
        metrics: free-form results (accuracy, latency, ...), filled by the tuner.
        provenance: free-form origin (model, device, library versions, study, trial, ...), filled by the tuner.

    Raises:
        ScheduleError: an invalid field; the one-line message names it and, where there is one, the fix.

    Example:
        >>> s = Schedule([4, 0, 2], tokens_in=16)
        >>> s.tokens_out, s.merge_layers, s.tokens_after()
        (10, [0, 2], [12, 12, 10])
        >>> Schedule([9], tokens_in=16)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tuner.evoprune.errors.ScheduleError: layer 0 removes 9 patch tokens but can remove at most 8 ...
    """

    remove_per_layer: list[int]
    tokens_in: int
    scoring: Scoring = field(default_factory=Scoring)
    family: str | None = None
    has_cls: bool | None = None
    if TYPE_CHECKING:
        preset: _PresetAttribute = _PresetAttribute()
    else:
        preset: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        remove = self.remove_per_layer
        if not isinstance(remove, (list, tuple)) or not remove:
            raise ScheduleError(
                f"remove_per_layer must be a non-empty list of integers >= 0, one per encoder layer, got {remove!r}"
            )
        for layer, count in enumerate(remove):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ScheduleError(f"remove_per_layer[{layer}] must be an integer >= 0, got {count!r}")
        self.remove_per_layer = list(remove)
        _require_int("tokens_in", self.tokens_in, 1)
        violation = layer_cap_violation(self.remove_per_layer, self.tokens_in)
        if violation is not None:
            raise ScheduleError(violation[1])
        if not isinstance(self.scoring, Scoring):
            raise ScheduleError(f"scoring must be a Scoring, got {type(self.scoring).__name__}")
        if self.family is not None and (not isinstance(self.family, str) or not self.family):
            raise ScheduleError(f"family must be a non-empty string (e.g. 'clip') or None, got {self.family!r}")
        if self.has_cls is not None and not isinstance(self.has_cls, bool):
            raise ScheduleError(f"has_cls must be True, False or None, got {self.has_cls!r}")
        if self.preset is not None:
            plan, record = _plan_of_preset_record(self.preset, self.num_layers, self.tokens_in, self.tokens_out)
            if plan != self.remove_per_layer:
                params = ", ".join(f"{key}={value!r}" for key, value in record["params"].items())
                layer = next(index for index, count in enumerate(plan) if count != self.remove_per_layer[index])
                raise ScheduleError(
                    f"preset {record['name']}({params}) does not give this plan: it removes {plan[layer]} at layer "
                    f"{layer}, the plan {self.remove_per_layer[layer]}; record no preset (None) for a hand-made plan"
                )
            self.preset = record
        for name in ("metrics", "provenance"):
            if not isinstance(getattr(self, name), dict):
                raise ScheduleError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")

    # ----------------------------------------------------------------------------------------------- constructors

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        num_layers: int,
        tokens_in: int,
        tokens_out: int,
        scoring: Scoring | None = None,
        family: str | None = None,
        has_cls: bool | None = None,
        **params: Any,
    ) -> Schedule:
        """A schedule of one of the paper's families, removing ``R = tokens_in - tokens_out`` patch tokens in all.

        Also reachable as ``Schedule.preset(...)``. Presets and their params:

        - ``"skip"`` (``stride=2, offset=0, start_layer=0``): layers ``l >= start_layer`` with
          ``(l - start_layer) % stride == offset`` merge, equal r each.
        - ``"mean"``: every layer merges, equal r each.
        - ``"first"`` / ``"last"`` (``n``, required): only the first / last n layers merge, equal r each.
        - ``"increasing"`` / ``"decreasing"`` (``alpha=1.0``, in [0, 100]): layer l removes a share proportional to
          ``(l + 1)^alpha`` / ``(num_layers - l)^alpha``, apportioned by largest remainder (ties to the earlier layer).

        "Equal r" is ``R // M`` on each of the M merging layers, one more on the earliest ``R % M`` of them.

        Args:
            name: preset name.
            num_layers: encoder depth.
            tokens_in: patch tokens entering layer 0.
            tokens_out: patch tokens to keep after the last layer, in [1, tokens_in].
            scoring: scoring settings; None for the defaults.
            family: encoder family, or None.
            has_cls: whether the encoder has a CLS token, or None.
            **params: the preset's parameters (defaults above).

        Returns:
            The schedule, with ``preset`` recording the name and all params.

        Raises:
            ScheduleError: unknown preset or param, a value out of range, or a layer over its maximum.

        Example:
            >>> Schedule.preset("skip", num_layers=6, tokens_in=64, tokens_out=16).remove_per_layer
            [16, 0, 16, 0, 16, 0]
            >>> Schedule.preset("mean", num_layers=4, tokens_in=32, tokens_out=18).remove_per_layer
            [4, 4, 3, 3]
            >>> Schedule.preset("first", num_layers=4, tokens_in=32, tokens_out=16, n=2).preset
            {'name': 'first', 'params': {'n': 2}}
        """
        plan, resolved = _preset_plan_and_params(name, num_layers, tokens_in, tokens_out, params)
        return cls(
            plan,
            tokens_in,
            scoring=Scoring() if scoring is None else scoring,
            family=family,
            has_cls=has_cls,
            preset={"name": name, "params": resolved},
        )

    @classmethod
    def from_keep_ratios(
        cls,
        keep_ratios: Sequence[float],
        *,
        tokens_in: int,
        scoring: Scoring | None = None,
        family: str | None = None,
        has_cls: bool | None = None,
    ) -> Schedule:
        """A schedule from a per-layer keep-ratio vector (one entry per layer; it generalises every family).

        Layer ``l`` keeps ``round_half_up(T_l * keep_ratios[l])`` of the ``T_l`` patch tokens it receives.

        Args:
            keep_ratios: share of its incoming patch tokens each layer keeps, each in (0, 1]; 1 = no merging.
            tokens_in: patch tokens entering layer 0.
            scoring: scoring settings; None for the defaults.
            family: encoder family, or None.
            has_cls: whether the encoder has a CLS token, or None.

        Returns:
            The schedule, with ``preset = {"name": "keep_ratios", "params": {"keep_ratios": [...]}}``.

        Raises:
            ScheduleError: a ratio outside (0, 1], or one that keeps fewer than half of a layer's tokens.

        Example:
            >>> Schedule.from_keep_ratios([1.0, 0.5, 1.0, 0.75], tokens_in=576).tokens_after()
            [576, 288, 288, 216]
        """
        plan = keep_ratio_plan(keep_ratios, tokens_in)
        return cls(
            plan,
            tokens_in,
            scoring=Scoring() if scoring is None else scoring,
            family=family,
            has_cls=has_cls,
            preset={"name": KEEP_RATIOS_PRESET, "params": {"keep_ratios": list(keep_ratios)}},
        )

    @classmethod
    def none(
        cls,
        num_layers: int,
        tokens_in: int,
        *,
        scoring: Scoring | None = None,
        family: str | None = None,
        has_cls: bool | None = None,
    ) -> Schedule:
        """The empty schedule: no layer merges (the native encoder).

        Args:
            num_layers: encoder depth.
            tokens_in: patch tokens entering layer 0.
            scoring: scoring settings (unused while nothing merges); None for the defaults.
            family: encoder family, or None.
            has_cls: whether the encoder has a CLS token, or None.

        Returns:
            A schedule with ``r_l = 0`` on every layer.

        Example:
            >>> Schedule.none(3, 16).is_empty
            True
        """
        _require_int("num_layers", num_layers, 1)
        return cls(
            [0] * num_layers,
            tokens_in,
            scoring=Scoring() if scoring is None else scoring,
            family=family,
            has_cls=has_cls,
        )

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def num_layers(self) -> int:
        """Number of encoder layers the plan covers."""
        return len(self.remove_per_layer)

    @property
    def merge_layers(self) -> list[int]:
        """Indices of the layers that merge (``r_l > 0``), in order."""
        return [layer for layer, remove in enumerate(self.remove_per_layer) if remove > 0]

    @property
    def tokens_removed(self) -> int:
        """Patch tokens removed in all, ``R = sum(r_l)``."""
        return sum(self.remove_per_layer)

    @property
    def tokens_out(self) -> int:
        """Patch tokens leaving the last layer."""
        return self.tokens_in - self.tokens_removed

    @property
    def is_empty(self) -> bool:
        """Whether no layer merges (the encoder runs natively)."""
        return self.tokens_removed == 0

    # -------------------------------------------------------------------------------------------------- queries

    def tokens_after(self, tokens_in: int | None = None) -> list[int]:
        """Patch tokens leaving each layer (what the MLP of that layer and the next layer see).

        Args:
            tokens_in: patch tokens entering layer 0; None for the schedule's own ``tokens_in``. Another count applies
                the same ``r_l`` to another input size, which must still respect every layer's maximum.

        Returns:
            One count per layer.

        Raises:
            ScheduleError: with ``tokens_in`` given, a layer would remove more than half of what it receives.

        Example:
            >>> Schedule([4, 0, 2], tokens_in=16).tokens_after()
            [12, 12, 10]
            >>> Schedule([4, 0, 2], tokens_in=16).tokens_after(20)
            [16, 16, 14]
        """
        start = self.tokens_in if tokens_in is None else _require_int("tokens_in", tokens_in, 1)
        violation = layer_cap_violation(self.remove_per_layer, start)
        if violation is not None:
            raise ScheduleError(f"with tokens_in {start}: {violation[1]}")
        counts = []
        tokens = start
        for remove in self.remove_per_layer:
            tokens -= remove
            counts.append(tokens)
        return counts

    def tokens_before(self, tokens_in: int | None = None) -> list[int]:
        """Patch tokens entering each layer (what its attention sees).

        Args:
            tokens_in: patch tokens entering layer 0; None for the schedule's own ``tokens_in``.

        Returns:
            One count per layer.

        Example:
            >>> Schedule([4, 0, 2], tokens_in=16).tokens_before()
            [16, 12, 12]
        """
        after = self.tokens_after(tokens_in)
        return [self.tokens_in if tokens_in is None else tokens_in, *after[:-1]]

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the plan and scoring: equal for identical plans, whatever their metadata.

        Only ``remove_per_layer``, ``tokens_in`` and ``scoring`` count (numbers compared by value, so ``1`` and
        ``1.0`` hash alike); family, has_cls, preset, metrics and provenance do not.

        Returns:
            64 hex digits.

        Example:
            >>> a = Schedule.preset("mean", num_layers=2, tokens_in=8, tokens_out=4)
            >>> a.fingerprint() == Schedule([2, 2], 8, metrics={"acc": 0.5}).fingerprint()
            True
        """
        scoring = self.scoring.to_dict()
        # temporal_weight is in the dict only when on (Scoring.to_dict), so fingerprints made before it existed hold.
        for name in ("w_sim", "w_div", "w_attn", "ctr", "tau", "temporal_weight"):
            if name in scoring and isinstance(scoring[name], (int, float)) and not isinstance(scoring[name], bool):
                scoring[name] = float(scoring[name])
        canonical = {"remove_per_layer": self.remove_per_layer, "tokens_in": self.tokens_in, "scoring": scoring}
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def describe(self) -> str:
        """A short one-line summary: preset, tokens in -> out, merging layers, scoring.

        Returns:
            E.g. ``skip s2o0 576->128 @L0,2,..,22 div=0.5 attn=0 ctr=0.25``.

        Example:
            >>> Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128).describe()
            'skip s2o0 576->128 @L0,2,..,22 div=0.5 attn=0 ctr=0.25'
            >>> Schedule([3, 0, 1], tokens_in=16, scoring=Scoring(features="hidden")).describe()
            'custom 16->12 @L0,2 div=0.5 attn=0 ctr=0.25 feat=hidden'
        """
        parts = [_preset_label(self.preset) if not self.is_empty else "none", f"{self.tokens_in}->{self.tokens_out}"]
        if not self.is_empty:
            parts.append("@L" + _layer_list(self.merge_layers))
        scoring = self.scoring
        if scoring.w_sim != 1:
            parts.append(f"sim={scoring.w_sim:g}")
        parts += [f"div={scoring.w_div:g}", f"attn={scoring.w_attn:g}", f"ctr={scoring.ctr:g}"]
        if scoring.features != "keys":
            parts.append(f"feat={scoring.features}")
        if scoring.knn_k != 8:
            parts.append(f"k={scoring.knn_k}")
        if scoring.tau != "auto":
            parts.append(f"tau={scoring.tau:g}")
        if scoring.proportional_attention:
            parts.append("prop")
        if scoring.temporal:
            parts.append(f"temporal={scoring.temporal_weight:g}")
        return " ".join(parts)

    def flops(self, hidden_size: int, intermediate_size: int) -> int:
        """Analytic FLOPs of the encoder layers under this plan (see :mod:`tuner.evoprune.flops`).

        A CLS token is added to every layer's count when ``has_cls`` is True (None counts as no CLS).

        Args:
            hidden_size: the model width C.
            intermediate_size: the MLP width I.

        Returns:
            FLOPs of all layers (merge overhead not counted).

        Example:
            >>> Schedule([2, 0], tokens_in=4).flops(hidden_size=8, intermediate_size=16)
            5760
        """
        extra_tokens = 1 if self.has_cls else 0
        return encoder_flops(self.tokens_before(), self.tokens_after(), hidden_size, intermediate_size, extra_tokens)

    def predicted_speedup(self, hidden_size: int, intermediate_size: int) -> float:
        """FLOPs of the native encoder divided by FLOPs under this plan (1.0 for the empty schedule).

        An upper bound on the measured encoder speedup: the merge steps' own cost is not counted.

        Args:
            hidden_size: the model width C.
            intermediate_size: the MLP width I.

        Returns:
            The FLOPs ratio, >= 1.

        Example:
            >>> s = Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128, has_cls=True)
            >>> round(s.predicted_speedup(hidden_size=1024, intermediate_size=4096), 3)
            1.743
        """
        native = Schedule.none(self.num_layers, self.tokens_in, has_cls=self.has_cls)
        return native.flops(hidden_size, intermediate_size) / self.flops(hidden_size, intermediate_size)

    # ------------------------------------------------------------------------------------------------- JSON I/O

    def to_dict(self) -> dict[str, Any]:
        """The schedule as a JSON document (a fresh dict; see :func:`tuner.evoprune.format.schedule_to_dict`).

        Example:
            >>> Schedule([2, 0], tokens_in=8).to_dict()["plan"]
            {'remove_per_layer': [2, 0], 'tokens_out': 6, 'preset': None}
        """
        from tuner.evoprune.format import schedule_to_dict

        return schedule_to_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The schedule as JSON text (see :func:`tuner.evoprune.format.schedule_to_json`).

        Example:
            >>> Schedule.from_json(Schedule([2, 0], tokens_in=8).to_json()) == Schedule([2, 0], tokens_in=8)
            True
        """
        from tuner.evoprune.format import schedule_to_json

        return schedule_to_json(self, indent=indent)

    @classmethod
    def from_dict(cls, document: Any) -> Schedule:
        """A schedule from a parsed JSON document, checked strictly (see :func:`.format.schedule_from_dict`).

        Example:
            >>> Schedule.from_dict(Schedule([2, 0], tokens_in=8).to_dict()).remove_per_layer
            [2, 0]
        """
        from tuner.evoprune.format import schedule_from_dict

        return schedule_from_dict(document)

    @classmethod
    def from_json(cls, text: str | bytes) -> Schedule:
        """A schedule from JSON text, strictly checked (see :func:`tuner.evoprune.format.schedule_from_json`).

        Example:
            >>> Schedule.from_json("[]")
            Traceback (most recent call last):
            ...
            tuner.evoprune.errors.ScheduleError: $: a schedule must be a JSON object, got array
        """
        from tuner.evoprune.format import schedule_from_json

        return schedule_from_json(text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Schedule:
        """A schedule from a JSON file (see :func:`tuner.evoprune.format.load_schedule`)."""
        from tuner.evoprune.format import load_schedule

        return load_schedule(path)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the schedule to a JSON file (see :func:`tuner.evoprune.format.save_schedule`)."""
        from tuner.evoprune.format import save_schedule

        save_schedule(self, path)


# ``Schedule.preset(...)`` on the class is the preset constructor; on an instance ``preset`` is the recorded dict (an
# instance attribute shadows the class's classmethod, a non-data descriptor). The dataclass needs the plain field
# while it is built, so the constructor takes the name afterwards.
setattr(Schedule, "preset", Schedule.__dict__["from_preset"])  # noqa: B010


def _preset_label(record: dict[str, Any] | None) -> str:
    if record is None:
        return "custom"
    name, params = record["name"], record["params"]
    if name == "skip":
        label = f"skip s{params['stride']}o{params['offset']}"
        return label + (f" start{params['start_layer']}" if params["start_layer"] else "")
    if name in ("first", "last"):
        return f"{name}{params['n']}"
    if name in ("increasing", "decreasing"):
        return f"{name[:3]} a{params['alpha']:g}"
    if name == KEEP_RATIOS_PRESET:
        return "keep"
    return str(name)


def _layer_list(layers: list[int]) -> str:
    """``0,2,..,22`` for an arithmetic run of 4 or more layers, else every index."""
    steps = {b - a for a, b in zip(layers, layers[1:], strict=False)}
    if len(layers) >= 4 and len(steps) == 1:
        return f"{layers[0]},{layers[1]},..,{layers[-1]}"
    return ",".join(str(layer) for layer in layers)


__all__ = [
    "ALPHA_MAX",
    "KEEP_RATIOS_PRESET",
    "PRESET_NAMES",
    "Schedule",
    "keep_ratio_plan",
    "layer_cap_violation",
    "preset_plan",
]
