"""The versioned JSON format of a schedule (``evoprune-schedule``, version 1): writing, strict reading, JSON Schema.

A document looks like::

    {"format": "evoprune-schedule", "version": 1,
     "encoder": {"family": "clip", "num_layers": 24, "tokens_in": 576, "has_cls": true},
     "plan": {"remove_per_layer": [...], "tokens_out": 128, "preset": {"name": "skip", "params": {...}}},
     "scoring": {"w_sim": 1.0, "w_div": 0.5, ...},
     "metrics": {}, "provenance": {}}

The shipped JSON Schema (:func:`schedule_schema`, draft 2020-12) states the structure; a reader also checks what a
schema cannot: the plan's length against ``encoder.num_layers``, every layer's maximum, ``plan.tokens_out`` and that a
preset reproduces the plan. Every problem is reported as one line that starts with its JSON path (``$.plan...``).

Example:
    >>> from tuner.evoprune.schedule import Schedule
    >>> text = Schedule.preset("mean", num_layers=2, tokens_in=8, tokens_out=4).to_json()
    >>> schedule_from_json(text).remove_per_layer
    [2, 2]
    >>> schedule_to_json(schedule_from_json(text)) == text
    True
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from tuner.evoprune.errors import ScheduleError
from tuner.evoprune.schedule import Schedule, layer_cap_violation
from tuner.evoprune.scoring import Scoring

FORMAT_NAME = "evoprune-schedule"
"""Value of the ``format`` field."""

FORMAT_VERSION = 1
"""The format version this module writes and the only one it reads."""

SCHEMA_FILE = "schedule.schema.json"
"""Name of the JSON Schema shipped as package data of ``tuner.evoprune``."""

# Canonical key order, used to report the first problem of a document in reading order (unknown keys come last).
_KEY_RANK = {
    key: rank
    for rank, key in enumerate(
        "format version encoder family num_layers tokens_in has_cls plan remove_per_layer tokens_out preset name params"
        " stride offset start_layer n alpha keep_ratios scoring w_sim w_div w_attn ctr features knn_k tau"
        " proportional_attention temporal_weight metrics provenance".split()
    )
}
# Among problems at one path, the most basic one first.
_VALIDATOR_RANK = {"type": 0, "required": 1, "additionalProperties": 2, "const": 3, "enum": 3}
_BOUND_WORDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
# Clearer words for a few fields whose schema splits one rule over several keywords.
_RULE_BY_PATH = {("scoring", "tau"): 'must be "auto" or a number > 0'}
_JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}

Path_ = tuple[str | int, ...]


# ----------------------------------------------------------------------------------------------------------- schema


@functools.cache
def _schema_text() -> str:
    return resources.files("tuner.evoprune").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


def schedule_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a version-1 schedule document, as shipped with the package.

    Returns:
        A fresh dict on each call (callers may change it).

    Example:
        >>> schema = schedule_schema()
        >>> schema["$id"], schema["properties"]["version"]["const"]
        ('https://tuner.dev/schemas/evoprune-schedule-1.json', 1)
    """
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


def _is_integer(checker: Any, instance: Any) -> bool:
    # Stricter than JSON Schema's "integer" (which accepts 24.0): a count written as a float is an error here.
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def _validator() -> Draft202012Validator:
    strict_types = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
    validator_class = jsonschema.validators.extend(Draft202012Validator, type_checker=strict_types)
    validator: Draft202012Validator = validator_class(schedule_schema())
    return validator


# ---------------------------------------------------------------------------------------------------------- writing


def schedule_to_dict(schedule: Schedule) -> dict[str, Any]:
    """The schedule as a version-1 document (fresh containers: changing it leaves the schedule alone).

    Args:
        schedule: the schedule.

    Returns:
        The document, keys in the canonical order.

    Example:
        >>> schedule_to_dict(Schedule([2, 0], tokens_in=8, family="clip", has_cls=True))["encoder"]
        {'family': 'clip', 'num_layers': 2, 'tokens_in': 8, 'has_cls': True}
    """
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "encoder": {
            "family": schedule.family,
            "num_layers": schedule.num_layers,
            "tokens_in": schedule.tokens_in,
            "has_cls": schedule.has_cls,
        },
        "plan": {
            "remove_per_layer": list(schedule.remove_per_layer),
            "tokens_out": schedule.tokens_out,
            "preset": copy.deepcopy(schedule.preset),
        },
        "scoring": schedule.scoring.to_dict(),
        "metrics": copy.deepcopy(schedule.metrics),
        "provenance": copy.deepcopy(schedule.provenance),
    }


def schedule_to_json(schedule: Schedule, indent: int | None = 2) -> str:
    """The schedule as JSON text: deterministic, lists of numbers kept on one line.

    Args:
        schedule: the schedule.
        indent: spaces per nesting level; None for a single line.

    Returns:
        The text (no trailing newline). Reading it back gives an equal schedule, and writing that gives the same text.

    Raises:
        ScheduleError: ``metrics`` or ``provenance`` hold something JSON cannot represent (NaN, a set, a non-string
            key, ...); the message gives its path.

    Example:
        >>> print(schedule_to_json(Schedule([2, 0], tokens_in=8, metrics={"acc": 0.5}), indent=None)[:60])
        {"format": "evoprune-schedule", "version": 1, "encoder": {"f
    """
    if indent is not None and (isinstance(indent, bool) or not isinstance(indent, int) or indent < 0):
        raise ScheduleError(f"indent must be None or an integer >= 0, got {indent!r}")
    return _dump(schedule_to_dict(schedule), indent, 0, ())


def _dump(value: Any, indent: int | None, level: int, path: Path_) -> str:
    """JSON text of ``value``; containers of scalars stay on one line, other containers get one item a line."""
    if value is None or isinstance(value, (bool, str)):
        return json.dumps(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ScheduleError(f"{_format_path(path)}: {value!r} cannot be written to JSON; use null or a string")
        return float.__repr__(value)
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ScheduleError(f"{_format_path(path)}: key {key!r} is not a string; JSON keys must be strings")
        items = [(json.dumps(key) + ": ", _dump(item, indent, level + 1, (*path, key))) for key, item in value.items()]
        return _join(items, "{", "}", indent, level)
    if isinstance(value, (list, tuple)):
        items = [("", _dump(item, indent, level + 1, (*path, index))) for index, item in enumerate(value)]
        return _join(items, "[", "]", indent, level, inline=all(_is_scalar(item) for item in value))
    raise ScheduleError(
        f"{_format_path(path)}: cannot write a {type(value).__name__} to JSON; "
        "convert it to a number, string, bool, None, list or dict"
    )


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _join(
    items: list[tuple[str, str]], opening: str, closing: str, indent: int | None, level: int, inline: bool = False
) -> str:
    if not items:
        return opening + closing
    if indent is None or inline:
        return opening + ", ".join(key + text for key, text in items) + closing
    inner = "\n" + " " * (indent * (level + 1))
    outer = "\n" + " " * (indent * level)
    return opening + inner + ("," + inner).join(key + text for key, text in items) + outer + closing


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_schedule(schedule: Schedule, path: str | os.PathLike[str]) -> None:
    """Writes the schedule as JSON (indent 2, trailing newline), atomically: a reader never sees half a file.

    Args:
        schedule: the schedule.
        path: the file to write (its folder must exist).

    Raises:
        ScheduleError: the schedule cannot be written as JSON, or the file cannot be written.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "s.json"
        >>> save_schedule(Schedule([2, 0], tokens_in=8), target)
        >>> load_schedule(target) == Schedule([2, 0], tokens_in=8)
        True
    """
    text = schedule_to_json(schedule) + "\n"
    target = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            # mkstemp creates the file private (0600); give it the mode a plain open() would have.
            os.chmod(temporary, 0o666 & ~_current_umask())
            os.replace(temporary, target)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        raise ScheduleError(f"cannot write schedule file {str(target)!r}: {error.strerror or error}") from error


# ---------------------------------------------------------------------------------------------------------- reading


def load_schedule(path: str | os.PathLike[str]) -> Schedule:
    """Reads a schedule file, strictly (see :func:`schedule_from_dict`).

    Args:
        path: the JSON file.

    Returns:
        The schedule.

    Raises:
        ScheduleError: the file cannot be read, or its content is not a valid schedule; the message starts with the
            file name.

    Example:
        >>> load_schedule("/nonexistent/s.json")
        Traceback (most recent call last):
        ...
        tuner.evoprune.errors.ScheduleError: cannot read schedule file '/nonexistent/s.json': No such file or directory
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ScheduleError(f"cannot read schedule file {str(path)!r}: {reason}") from error
    try:
        return schedule_from_json(text)
    except ScheduleError as error:
        raise ScheduleError(f"{os.fspath(path)}: {error}") from error


def schedule_from_json(text: str | bytes) -> Schedule:
    """Parses JSON text into a schedule, strictly (see :func:`schedule_from_dict`).

    NaN and Infinity literals, numbers too large for a float and duplicate keys are rejected.

    Args:
        text: the document.

    Returns:
        The schedule.

    Raises:
        ScheduleError: not JSON, or not a valid version-1 schedule.

    Example:
        >>> schedule_from_json('{"format": ')
        Traceback (most recent call last):
        ...
        tuner.evoprune.errors.ScheduleError: schedule is not valid JSON: line 1 column 12: Expecting value
    """
    try:
        document = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_finite_float,
            object_pairs_hook=_object_without_duplicates,
        )
    except json.JSONDecodeError as error:
        raise ScheduleError(
            f"schedule is not valid JSON: line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise ScheduleError(f"schedule is not valid JSON: not UTF-8 text ({error.reason})") from error
    return schedule_from_dict(document)


def _reject_constant(literal: str) -> Any:
    raise ScheduleError(f"schedule is not valid JSON: {literal} is not a JSON number; write null or a finite number")


def _parse_finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ScheduleError(f"schedule is not valid JSON: the number {literal} is too large for a float")
    return value


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ScheduleError(f"schedule is not valid JSON: duplicate key {key!r} in one object")
        document[key] = value
    return document


def schedule_from_dict(document: Any) -> Schedule:
    """Builds a schedule from a parsed version-1 document, strictly.

    Checks, in order, each with its own one-line message starting with the JSON path: the top level is an object,
    ``format``, ``version``, the structure against :func:`schedule_schema` (the first problem in reading order:
    missing and unknown fields, types, ranges, enums), then the plan's length against ``encoder.num_layers``, each
    layer's maximum, ``plan.tokens_out``, and that ``plan.preset`` reproduces the plan.

    Args:
        document: the parsed JSON (not changed; the schedule gets copies of ``metrics`` and ``provenance``).

    Returns:
        The schedule.

    Raises:
        ScheduleError: the first problem found.

    Example:
        >>> document = Schedule([2, 0], tokens_in=8).to_dict()
        >>> document["version"] = 2
        >>> schedule_from_dict(document)
        Traceback (most recent call last):
        ...
        tuner.evoprune.errors.ScheduleError: $.version 2 is not supported; this tuner reads version 1 (upgrade tuner)
    """
    if not isinstance(document, dict):
        raise ScheduleError(f"$: a schedule must be a JSON object, got {_json_type(document)}")
    if "format" in document and document["format"] != FORMAT_NAME:
        raise ScheduleError(f"$.format must be {FORMAT_NAME!r}, got {document['format']!r}")
    version = document.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT_VERSION:
        hint = " (upgrade tuner)" if version > FORMAT_VERSION else ""
        raise ScheduleError(f"$.version {version} is not supported; this tuner reads version {FORMAT_VERSION}{hint}")
    problem = _first_schema_problem(_validator().iter_errors(document))
    if problem is not None:
        raise ScheduleError(problem)

    encoder, plan = document["encoder"], document["plan"]
    remove_per_layer: list[int] = plan["remove_per_layer"]
    tokens_in: int = encoder["tokens_in"]
    if len(remove_per_layer) != encoder["num_layers"]:
        raise ScheduleError(
            f"$.plan.remove_per_layer has {len(remove_per_layer)} entries but $.encoder.num_layers is "
            f"{encoder['num_layers']}"
        )
    violation = layer_cap_violation(remove_per_layer, tokens_in)
    if violation is not None:
        layer, message = violation
        raise ScheduleError(f"$.plan.remove_per_layer[{layer}]: {message}")
    tokens_left = tokens_in - sum(remove_per_layer)
    if plan["tokens_out"] != tokens_left:
        raise ScheduleError(
            f"$.plan.tokens_out is {plan['tokens_out']} but the plan leaves {tokens_left} "
            f"($.encoder.tokens_in {tokens_in} minus {sum(remove_per_layer)} removed)"
        )
    try:
        scoring = Scoring(**document["scoring"])
    except ScheduleError as error:
        raise ScheduleError(f"$.scoring: {error}") from error
    try:
        return Schedule(
            list(remove_per_layer),
            tokens_in,
            scoring=scoring,
            family=encoder["family"],
            has_cls=encoder["has_cls"],
            preset=copy.deepcopy(plan["preset"]),
            metrics=copy.deepcopy(document["metrics"]),
            provenance=copy.deepcopy(document["provenance"]),
        )
    except ScheduleError as error:
        # Everything else was checked above: what is left is the preset (its params, or a plan it does not give).
        raise ScheduleError(f"$.plan.preset: {error}") from error


# ----------------------------------------------------------------------------------------- schema error messages


def _first_schema_problem(errors: Iterable[ValidationError]) -> str | None:
    """The message of the first problem in reading order (then the most basic one), or None when there is none."""
    problems: set[tuple[Path_, int, str]] = set()
    for error in errors:
        for path, message in _describe(error):
            problems.add((path, _VALIDATOR_RANK.get(str(error.validator), 9), message))
    if not problems:
        return None
    return min(problems, key=lambda problem: (_path_sort_key(problem[0]), problem[1], problem[2]))[2]


def _describe(error: ValidationError) -> list[tuple[Path_, str]]:
    """The problems one jsonschema error stands for: ``(path, one-line message)`` each."""
    path: Path_ = tuple(error.absolute_path)
    where = _format_path(path)
    kind, rule, instance = error.validator, error.validator_value, error.instance
    if kind == "required":
        missing = [name for name in rule if isinstance(instance, dict) and name not in instance]
        return [((*path, name), f"{_format_path((*path, name))}: required field is missing") for name in missing]
    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        allowed_text = f"allowed: {', '.join(allowed)}" if allowed else "no fields are allowed here"
        return [
            ((*path, name), f"{_format_path((*path, name))}: unknown field; {allowed_text}")
            for name in instance
            if name not in allowed
        ]
    got = f"got {_show(instance)}"
    if path in _RULE_BY_PATH:
        return [(path, f"{where}: {_RULE_BY_PATH[path]}, {got}")]
    if kind == "type":
        expected = " or ".join(rule) if isinstance(rule, list) else str(rule)
        return [(path, f"{where}: expected {expected}, {got}")]
    if kind == "const":
        return [(path, f"{where}: must be {_show(rule)}, {got}")]
    if kind == "enum":
        return [(path, f"{where}: must be one of {', '.join(_show(option) for option in rule)}; {got}")]
    if kind in _BOUND_WORDS:
        return [(path, f"{where}: must be {_BOUND_WORDS[str(kind)]} {_show(rule)}, {got}")]
    if kind == "minItems":
        if rule == 1:
            return [(path, f"{where}: must not be empty")]
        return [(path, f"{where}: must have at least {rule} entries, got {len(instance)}")]
    if kind == "minLength":
        return [(path, f"{where}: must not be empty")]
    return [(path, f"{where}: {error.message}")]


def _path_sort_key(path: Path_) -> tuple[tuple[int, int, str], ...]:
    return tuple(
        (1, part, "") if isinstance(part, int) else (0, _KEY_RANK.get(part, len(_KEY_RANK)), part) for part in path
    )


def _format_path(path: Sequence[str | int]) -> str:
    text = "$"
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}"
        else:
            text += f"[{json.dumps(part)}]"
    return text


def _show(value: Any, limit: int = 60) -> str:
    """A value as JSON, shortened to ``limit`` characters."""
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SCHEMA_FILE",
    "load_schedule",
    "save_schedule",
    "schedule_from_dict",
    "schedule_from_json",
    "schedule_schema",
    "schedule_to_dict",
    "schedule_to_json",
]
