"""The versioned schedule JSON: exact round trips, the shipped JSON Schema, and one clear message per malformed case."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tuner.evoprune.errors import ScheduleError
from tuner.evoprune.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    load_schedule,
    save_schedule,
    schedule_from_dict,
    schedule_from_json,
    schedule_schema,
    schedule_to_dict,
    schedule_to_json,
)
from tuner.evoprune.schedule import Schedule
from tuner.evoprune.scoring import Scoring


def _examples() -> list[Schedule]:
    skip = Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128, family="clip", has_cls=True)
    skip.metrics.update({"accuracy": {"vqav2": 0.7712, "mme": 1510.5}, "encoder_latency_ms": 41.25, "ok": True})
    skip.provenance.update(
        {
            "model": "llava-hf/llava-1.5-7b-hf",
            "device": "NVIDIA H100 80GB HBM3",
            "versions": {"torch": "2.13.0", "transformers": "5.1.0"},
            "study": "llava-vqa",
            "trial": 17,
            "seeds": [0, 1, 2],
            "notes": None,
            "label": 'naïve \u2192 pruned "quoted"',
        }
    )
    return [
        skip,
        Schedule.none(26, 729, family="siglip", has_cls=False),
        Schedule.preset("increasing", num_layers=26, tokens_in=729, tokens_out=64, alpha=0.5),
        Schedule.preset("last", num_layers=12, tokens_in=196, tokens_out=100, n=6, has_cls=True),
        Schedule.from_keep_ratios([1.0, 0.9, 1.0, 0.65, 0.75], tokens_in=100),
        Schedule(
            [0, 3, 0, 1],
            16,
            scoring=Scoring(
                w_sim=2,
                w_div=0.1,
                w_attn=1e-3,
                ctr=0.0,
                features="hidden",
                knn_k=3,
                tau=0.35,
                proportional_attention=True,
            ),
            metrics={"nested": [{"a": 1}, [1.5, None]], "big": 12345678901234567890, "tiny": 1e-300},
        ),
    ]


EXAMPLES = _examples()


def _base_document() -> dict[str, Any]:
    return Schedule.preset("skip", num_layers=24, tokens_in=576, tokens_out=128, family="clip", has_cls=True).to_dict()


# ------------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("schedule", EXAMPLES, ids=lambda schedule: schedule.describe())
def test_json_round_trip_is_exact(schedule: Schedule) -> None:
    text = schedule.to_json()
    loaded = Schedule.from_json(text)
    assert loaded == schedule
    assert loaded.to_json() == text
    assert loaded.fingerprint() == schedule.fingerprint()
    assert schedule_to_json(schedule_from_json(text)) == text
    single_line = schedule.to_json(indent=None)
    assert "\n" not in single_line
    assert Schedule.from_json(single_line) == schedule
    assert json.loads(single_line) == json.loads(text)


@pytest.mark.parametrize("schedule", EXAMPLES, ids=lambda schedule: schedule.describe())
def test_dict_round_trip(schedule: Schedule) -> None:
    document = schedule.to_dict()
    assert Schedule.from_dict(document) == schedule
    assert schedule_to_dict(schedule) == document
    assert document["format"] == FORMAT_NAME
    assert document["version"] == FORMAT_VERSION
    assert list(document) == ["format", "version", "encoder", "plan", "scoring", "metrics", "provenance"]


def test_floats_are_kept_as_given() -> None:
    schedule = Schedule([2, 0], 8, scoring=Scoring(w_div=1, w_attn=0.1), metrics={"x": 0.1 + 0.2, "n": 3})
    text = schedule.to_json()
    assert '"w_div": 1,' in text
    assert '"w_attn": 0.1,' in text
    assert '"x": 0.30000000000000004' in text
    loaded = Schedule.from_json(text)
    assert loaded.scoring.w_div == 1 and isinstance(loaded.scoring.w_div, int)
    assert loaded.metrics["x"] == 0.1 + 0.2


def test_to_dict_and_from_dict_copy_their_containers() -> None:
    schedule = Schedule([2, 0], 8, metrics={"per_task": {"a": 1}})
    document = schedule.to_dict()
    document["metrics"]["per_task"]["a"] = 2
    document["plan"]["remove_per_layer"][0] = 0
    assert schedule.metrics == {"per_task": {"a": 1}}
    assert schedule.remove_per_layer == [2, 0]
    loaded = schedule_from_dict(schedule.to_dict())
    source = schedule.to_dict()
    loaded = schedule_from_dict(source)
    source["metrics"]["per_task"]["a"] = 3
    assert loaded.metrics == {"per_task": {"a": 1}}


def test_lists_of_numbers_stay_on_one_line() -> None:
    text = Schedule.preset("skip", num_layers=6, tokens_in=64, tokens_out=16).to_json()
    assert '    "remove_per_layer": [16, 0, 16, 0, 16, 0],\n' in text
    assert text.startswith('{\n  "format": "evoprune-schedule",\n  "version": 1,\n  "encoder": {\n')
    assert text.endswith('  "metrics": {},\n  "provenance": {}\n}')
    assert Schedule([2, 0], 8).to_json(indent=4).startswith('{\n    "format"')


def test_save_and_load(tmp_path: Path) -> None:
    schedule = EXAMPLES[0]
    target = tmp_path / "skip.json"
    schedule.save(target)
    assert target.read_text(encoding="utf-8") == schedule.to_json() + "\n"
    assert Schedule.load(target) == schedule
    assert load_schedule(str(target)) == schedule
    save_schedule(EXAMPLES[1], target)  # overwrites in place
    assert Schedule.load(target) == EXAMPLES[1]
    assert [path.name for path in tmp_path.iterdir()] == ["skip.json"]  # no temporary file left behind
    # Readable like any file the user writes (the temporary file behind the atomic write is created 0600).
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ScheduleError, match="cannot read schedule file .*missing.json.*: No such file or directory"):
        Schedule.load(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "evoprune-schedule", "version": 7}', encoding="utf-8")
    with pytest.raises(ScheduleError) as caught:
        Schedule.load(broken)
    assert str(caught.value) == f"{broken}: $.version 7 is not supported; this tuner reads version 1 (upgrade tuner)"
    with pytest.raises(ScheduleError, match="cannot write schedule file"):
        Schedule([2, 0], 8).save(tmp_path / "no_such_folder" / "s.json")


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"accuracy": float("nan")}, "$.metrics.accuracy: nan cannot be written to JSON; use null or a string"),
        ({"runs": [1.0, float("inf")]}, "$.metrics.runs[1]: inf cannot be written to JSON"),
        ({"per_layer": {3: 0.5}}, "$.metrics.per_layer: key 3 is not a string; JSON keys must be strings"),
        ({"tags": {"a"}}, "$.metrics.tags: cannot write a set to JSON"),
    ],
)
def test_writing_unrepresentable_metrics_names_the_path(metrics: dict[str, Any], message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        Schedule([2, 0], 8, metrics=metrics).to_json()
    assert message in str(caught.value)


# ----------------------------------------------------------------------------------------------------------- schema


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = schedule_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://tuner.dev/schemas/evoprune-schedule-1.json"
    assert schema["title"]
    schema["title"] = "changed"
    assert schedule_schema()["title"] != "changed"  # every call gives a fresh copy


def _properties(schema: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    """Every property schema (and $defs entry, array items) with its location."""
    found = []
    if isinstance(schema, dict):
        for name, subschema in schema.get("properties", {}).items():
            found.append((f"{path}.{name}", subschema))
            found += _properties(subschema, f"{path}.{name}")
        for name, subschema in schema.get("$defs", {}).items():
            found.append((f"$defs.{name}", subschema))
            found += _properties(subschema, f"$defs.{name}")
        if isinstance(schema.get("items"), dict):
            found.append((f"{path}[]", schema["items"]))
            found += _properties(schema["items"], f"{path}[]")
    return found


def test_schema_describes_every_field_and_closes_every_fixed_object() -> None:
    schema = schedule_schema()
    properties = _properties(schema)
    assert len(properties) > 30
    for location, subschema in properties:
        assert subschema.get("description"), f"{location} has no description"
    closed = [schema] + [subschema for _, subschema in properties if "properties" in subschema]
    for subschema in closed:
        assert subschema["additionalProperties"] is False
        # The one optional field: temporal_weight (absent in files written before it, and whenever it is 0).
        optional = {"temporal_weight"} & set(subschema["properties"])
        assert set(subschema.get("required", [])) == set(subschema["properties"]) - optional
    assert schema["properties"]["metrics"] == {
        "description": schema["properties"]["metrics"]["description"],
        "type": "object",
    }


@pytest.mark.parametrize("schedule", EXAMPLES, ids=lambda schedule: schedule.describe())
def test_written_documents_validate_against_the_shipped_schema(schedule: Schedule) -> None:
    Draft202012Validator(schedule_schema()).validate(json.loads(schedule.to_json()))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="x"),
        lambda d: d.update(version=2),
        lambda d: d["scoring"].update(foo=1),
        lambda d: d["plan"].pop("tokens_out"),
        lambda d: d["scoring"].update(ctr=1.0),
        lambda d: d["scoring"].update(tau="fast"),
        lambda d: d["plan"]["preset"]["params"].update(stride=0),
        lambda d: d["plan"]["preset"]["params"].update(n=3),
        lambda d: d["plan"]["preset"].update(name="mean"),
        lambda d: d["plan"]["preset"].update(name="keep_ratios", params={"keep_ratios": [0.0]}),
    ],
)
def test_schema_alone_rejects_structural_errors(mutate: Callable[[dict[str, Any]], Any]) -> None:
    document = _base_document()
    mutate(document)
    assert list(Draft202012Validator(schedule_schema()).iter_errors(document))


# ----------------------------------------------------------------------------------------------- malformed documents


def _message_for_text(text: str) -> str:
    with pytest.raises(ScheduleError) as caught:
        Schedule.from_json(text)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"format": x}', "schedule is not valid JSON: line 1 column 12: Expecting value"),
        ("", "schedule is not valid JSON: line 1 column 1: Expecting value"),
        ('{"a": 1,}', "schedule is not valid JSON: line 1 column 9: "),
        ('{"a": NaN}', "schedule is not valid JSON: NaN is not a JSON number; write null or a finite number"),
        (
            '{"a": [Infinity]}',
            "schedule is not valid JSON: Infinity is not a JSON number; write null or a finite number",
        ),
        (
            '{"a": -Infinity}',
            "schedule is not valid JSON: -Infinity is not a JSON number; write null or a finite number",
        ),
        ('{"a": 1e999}', "schedule is not valid JSON: the number 1e999 is too large for a float"),
        ('{"a": 1, "a": 2}', "schedule is not valid JSON: duplicate key 'a' in one object"),
        ("[]", "$: a schedule must be a JSON object, got array"),
        ('"schedule"', "$: a schedule must be a JSON object, got string"),
        ("null", "$: a schedule must be a JSON object, got null"),
        ("12", "$: a schedule must be a JSON object, got integer"),
    ],
)
def test_text_that_is_not_a_json_object(text: str, expected: str) -> None:
    # The parser's own words after "line L column C: " vary between Python versions, hence a prefix for that case.
    message = _message_for_text(text)
    assert message == expected or (expected.endswith(": ") and message.startswith(expected))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = document
        for part in parents:
            target = target[part]
        target[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = document
        for part in parents:
            target = target[part]
        del target[last]

    return mutate


def _replace_plan(plan: list[Any], tokens_out: int) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        document["plan"].update(remove_per_layer=plan, tokens_out=tokens_out, preset=None)

    return mutate


SCORING_FIELDS = "ctr, features, knn_k, proportional_attention, tau, temporal_weight, w_attn, w_div, w_sim"

MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("wrong format", _set("format", "x"), "$.format must be 'evoprune-schedule', got 'x'"),
    ("newer version", _set("version", 2), "$.version 2 is not supported; this tuner reads version 1 (upgrade tuner)"),
    ("older version", _set("version", 0), "$.version 0 is not supported; this tuner reads version 1"),
    ("version as string", _set("version", "1"), '$.version: must be 1, got "1"'),
    ("missing format", _drop("format"), "$.format: required field is missing"),
    ("missing plan", _drop("plan"), "$.plan: required field is missing"),
    ("missing metrics", _drop("metrics"), "$.metrics: required field is missing"),
    ("missing remove_per_layer", _drop("plan.remove_per_layer"), "$.plan.remove_per_layer: required field is missing"),
    ("missing tokens_out", _drop("plan.tokens_out"), "$.plan.tokens_out: required field is missing"),
    ("missing preset", _drop("plan.preset"), "$.plan.preset: required field is missing"),
    ("missing family", _drop("encoder.family"), "$.encoder.family: required field is missing"),
    ("missing tau", _drop("scoring.tau"), "$.scoring.tau: required field is missing"),
    ("unknown scoring field", _set("scoring.foo", 1), f"$.scoring.foo: unknown field; allowed: {SCORING_FIELDS}"),
    (
        "unknown top-level field",
        _set("schedule", {}),
        "$.schedule: unknown field; allowed: encoder, format, metrics, plan, provenance, scoring, version",
    ),
    (
        "unknown encoder field",
        _set("encoder.name", "x"),
        "$.encoder.name: unknown field; allowed: family, has_cls, num_layers, tokens_in",
    ),
    ("num_layers as string", _set("encoder.num_layers", "24"), '$.encoder.num_layers: expected integer, got "24"'),
    ("num_layers as float", _set("encoder.num_layers", 24.0), "$.encoder.num_layers: expected integer, got 24.0"),
    ("num_layers zero", _set("encoder.num_layers", 0), "$.encoder.num_layers: must be >= 1, got 0"),
    ("tokens_in zero", _set("encoder.tokens_in", 0), "$.encoder.tokens_in: must be >= 1, got 0"),
    ("family number", _set("encoder.family", 3), "$.encoder.family: expected string or null, got 3"),
    ("family empty", _set("encoder.family", ""), "$.encoder.family: must not be empty"),
    ("has_cls string", _set("encoder.has_cls", "yes"), '$.encoder.has_cls: expected boolean or null, got "yes"'),
    ("encoder not object", _set("encoder", []), "$.encoder: expected object, got []"),
    ("metrics not object", _set("metrics", [1]), "$.metrics: expected object, got [1]"),
    ("negative w_div", _set("scoring.w_div", -1), "$.scoring.w_div: must be >= 0, got -1"),
    ("negative w_sim", _set("scoring.w_sim", -0.5), "$.scoring.w_sim: must be >= 0, got -0.5"),
    ("w_attn string", _set("scoring.w_attn", "0"), '$.scoring.w_attn: expected number, got "0"'),
    ("w_attn bool", _set("scoring.w_attn", False), "$.scoring.w_attn: expected number, got false"),
    ("ctr one", _set("scoring.ctr", 1), "$.scoring.ctr: must be < 1, got 1"),
    ("ctr negative", _set("scoring.ctr", -0.25), "$.scoring.ctr: must be >= 0, got -0.25"),
    (
        "bad features",
        _set("scoring.features", "values"),
        '$.scoring.features: must be one of "keys", "hidden"; got "values"',
    ),
    ("knn_k zero", _set("scoring.knn_k", 0), "$.scoring.knn_k: must be >= 1, got 0"),
    ("tau word", _set("scoring.tau", "fast"), '$.scoring.tau: must be "auto" or a number > 0, got "fast"'),
    ("tau zero", _set("scoring.tau", 0), '$.scoring.tau: must be "auto" or a number > 0, got 0'),
    ("tau null", _set("scoring.tau", None), '$.scoring.tau: must be "auto" or a number > 0, got null'),
    (
        "proportional_attention int",
        _set("scoring.proportional_attention", 0),
        "$.scoring.proportional_attention: expected boolean, got 0",
    ),
    (
        "plan too short",
        _replace_plan([0] * 23, 576),
        "$.plan.remove_per_layer has 23 entries but $.encoder.num_layers is 24",
    ),
    ("plan empty", _replace_plan([], 576), "$.plan.remove_per_layer: must not be empty"),
    (
        "plan negative",
        _replace_plan([0] * 5 + [-1] + [0] * 18, 577),
        "$.plan.remove_per_layer[5]: must be >= 0, got -1",
    ),
    (
        "plan float",
        _replace_plan([0] * 5 + [1.5] + [0] * 18, 576),
        "$.plan.remove_per_layer[5]: expected integer, got 1.5",
    ),
    (
        "layer over its maximum",
        _replace_plan([50] * 5 + [200] + [0] * 18, 126),
        "$.plan.remove_per_layer[5]: layer 5 removes 200 patch tokens but can remove at most 163 (it receives 326; "
        "one merge step can at most halve them)",
    ),
    (
        "tokens_out inconsistent",
        _set("plan.tokens_out", 100),
        "$.plan.tokens_out is 100 but the plan leaves 128 ($.encoder.tokens_in 576 minus 448 removed)",
    ),
    ("tokens_out zero", _set("plan.tokens_out", 0), "$.plan.tokens_out: must be >= 1, got 0"),
    (
        "preset not reproducing the plan",
        _set("plan.preset.params.offset", 1),
        "$.plan.preset: preset skip(stride=2, offset=1, start_layer=0) does not give this plan: it removes 0 at "
        "layer 0, the plan 38; record no preset (None) for a hand-made plan",
    ),
    (
        "preset param out of range for the encoder",
        _set("plan.preset.params.start_layer", 30),
        "$.plan.preset: start_layer 30 is beyond the encoder's 24 layers (0..23)",
    ),
    (
        "preset offset not below stride",
        _set("plan.preset.params.offset", 2),
        "$.plan.preset: offset must be an integer in [0, stride 2), got 2",
    ),
    (
        "unknown preset",
        _set("plan.preset.name", "bogus"),
        '$.plan.preset.name: must be one of "skip", "mean", "first", "last", "increasing", "decreasing", '
        '"keep_ratios"; got "bogus"',
    ),
    (
        "unknown preset param",
        _set("plan.preset.params.strides", 2),
        "$.plan.preset.params.strides: unknown field; allowed: offset, start_layer, stride",
    ),
    (
        "missing preset param",
        _drop("plan.preset.params.stride"),
        "$.plan.preset.params.stride: required field is missing",
    ),
    ("preset stride zero", _set("plan.preset.params.stride", 0), "$.plan.preset.params.stride: must be >= 1, got 0"),
    ("preset without params", _drop("plan.preset.params"), "$.plan.preset.params: required field is missing"),
    (
        "params of another preset",
        _set("plan.preset", {"name": "mean", "params": {"n": 2}}),
        "$.plan.preset.params.n: unknown field; no fields are allowed here",
    ),
    (
        "keep ratio above one",
        _set("plan.preset", {"name": "keep_ratios", "params": {"keep_ratios": [1.5] * 24}}),
        "$.plan.preset.params.keep_ratios[0]: must be <= 1, got 1.5",
    ),
    (
        "keep ratios of another depth",
        _set("plan.preset", {"name": "keep_ratios", "params": {"keep_ratios": [0.5]}}),
        "$.plan.preset: keep_ratios has 1 entries but the plan has 24 layers",
    ),
    (
        "alpha negative",
        _set("plan.preset", {"name": "increasing", "params": {"alpha": -1}}),
        "$.plan.preset.params.alpha: must be >= 0, got -1",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "expected"), MALFORMED, ids=[case for case, _, _ in MALFORMED])
def test_each_malformed_document_has_its_own_message(
    case: str, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    document = _base_document()
    mutate(document)
    assert _message_for_text(json.dumps(document)) == expected
    with pytest.raises(ScheduleError) as caught:
        Schedule.from_dict(copy.deepcopy(document))
    assert str(caught.value) == expected


def test_malformed_messages_are_all_different() -> None:
    expected = [message for _, _, message in MALFORMED]
    assert len(set(expected)) == len(expected)


def test_the_first_problem_in_reading_order_is_reported() -> None:
    document = _base_document()
    document["scoring"]["w_div"] = -1
    document["encoder"]["num_layers"] = "24"
    del document["plan"]["tokens_out"]
    assert _message_for_text(json.dumps(document)) == '$.encoder.num_layers: expected integer, got "24"'
    del document["encoder"]
    assert _message_for_text(json.dumps(document)) == "$.encoder: required field is missing"


def test_keys_that_are_not_identifiers_are_quoted_in_paths() -> None:
    document = _base_document()
    document["scoring"]["w div"] = 1
    assert _message_for_text(json.dumps(document)).startswith('$.scoring["w div"]: unknown field; allowed: ctr,')


def test_long_values_are_shortened_in_messages() -> None:
    document = _base_document()
    document["encoder"]["tokens_in"] = "x" * 500
    message = _message_for_text(json.dumps(document))
    assert message.startswith('$.encoder.tokens_in: expected integer, got "xxx')
    assert message.endswith("...")
    assert len(message) < 120


def test_a_document_written_by_hand_with_a_keep_ratios_preset_loads() -> None:
    document = {
        "format": "evoprune-schedule",
        "version": 1,
        "encoder": {"family": None, "num_layers": 3, "tokens_in": 10, "has_cls": None},
        "plan": {
            "remove_per_layer": [0, 3, 1],
            "tokens_out": 6,
            "preset": {"name": "keep_ratios", "params": {"keep_ratios": [1, 0.65, 0.85]}},
        },
        "scoring": Scoring().to_dict(),
        "metrics": {},
        "provenance": {},
    }
    schedule = schedule_from_dict(document)
    assert schedule == Schedule.from_keep_ratios([1, 0.65, 0.85], tokens_in=10)
    assert schedule.tokens_after() == [10, 7, 6]
