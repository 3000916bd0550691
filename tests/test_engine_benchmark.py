"""benchmarks/encoder_speed.py end to end on tiny encoders: the oracle rows, the columns, the video option."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=48, patch_size=8
)
COLUMNS = [
    "encoder",
    "schedule",
    "native ms",
    "pruned ms",
    "oracle ms",
    "speed-up",
    "predicted (FLOPs)",
    "efficiency vs oracle",
    "scoring+merging",
]


def load_benchmark() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "encoder_speed.py"
    spec = importlib.util.spec_from_file_location("encoder_speed_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = load_benchmark()
    tiny = {
        "CLIP tiny": lambda: CLIPVisionModel._from_config(CLIPVisionConfig(**TINY), attn_implementation="sdpa"),
        module.VIDEO_ENCODER: lambda: SiglipVisionModel._from_config(
            SiglipVisionConfig(**TINY), attn_implementation="sdpa"
        ),
    }
    monkeypatch.setattr(module, "ENCODERS", tiny)
    return module


def arguments(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = dict(
        device="cpu", dtype="fp32", batch=2, frames=0, only=[], repeats=1, warmup=0,
        threads=torch.get_num_threads(), full=False, control=True, verbose=False,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def table_rows(output: str) -> list[dict[str, str]]:
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def ratio_bounds(numerator: str, denominator: str) -> tuple[float, float]:
    """Smallest and largest ratio of two printed numbers given the rounding of each to its printed decimals."""

    def interval(text: str) -> tuple[float, float]:
        half = 0.5 * 10.0 ** -len(text.partition(".")[2])
        return float(text) - half, float(text) + half

    (num_low, num_high), (den_low, den_high) = interval(numerator), interval(denominator)
    return num_low / den_high, num_high / max(den_low, 1e-9)


def test_every_schedule_gets_an_oracle_and_the_control_shares_it(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    bench.run(arguments())
    rows = table_rows(capsys.readouterr().out)
    # 36 patch tokens: no Skip to 128 or 64; the aggressive plan, then the same plan under ToMe scoring.
    assert [row["schedule"] for row in rows] == ["decreasing -> 16", "decreasing -> 16, ToMe scoring (control)"]
    for row in rows:
        pruned, oracle = float(row["pruned ms"]), float(row["oracle ms"])
        assert pruned > 0 and oracle > 0
        # The efficiency comes from the unrounded times: it lies within what the printed (rounded) times allow.
        low, high = ratio_bounds(row["oracle ms"], row["pruned ms"])
        assert low - 0.005 <= float(row["efficiency vs oracle"]) <= high + 0.005, row
        assert row["speed-up"].endswith("x") and row["predicted (FLOPs)"].endswith("x")
        assert row["scoring+merging"].endswith("%")
    assert rows[0]["oracle ms"] == rows[1]["oracle ms"]  # one oracle for the plan and its control


def test_frames_runs_siglip_on_a_batch_of_frames(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    args = arguments(frames=3, only=["frames"], control=False)
    assert bench.encoder_names(args) == [f"{bench.VIDEO_ENCODER} x 3 frames"]
    bench.run(args)
    output = capsys.readouterr().out
    assert "video: 3 frames" in output
    rows = table_rows(output)
    # Per-frame budgets 64 / 32 / 16 where below the 36 patches.
    assert [row["schedule"] for row in rows] == ["skip -> 32", "skip -> 16"]
    assert all(row["encoder"] == f"{bench.VIDEO_ENCODER} x 3 frames" for row in rows)


def test_only_selects_encoders(bench: ModuleType) -> None:
    assert bench.encoder_names(arguments(only=["clip"])) == ["CLIP tiny"]
    assert bench.encoder_names(arguments(full=True)) == ["CLIP tiny", bench.VIDEO_ENCODER]
    assert bench.encoder_names(arguments(only=["nothing"])) == []


def test_real_sizes_plans(bench: ModuleType) -> None:
    # SigLIP so400m/14-384 video (27 layers, 729 patches): Skip reaches 64 per frame; 32 and 16 need more than a
    # merge step can do on every other layer (at most half its tokens), so Decreasing.
    video = bench.schedules(27, 729, "siglip", False, control=True, video=True)
    control = ", ToMe scoring (control)"
    assert [label for label, _ in video] == [
        "skip -> 64", "skip -> 64" + control, "decreasing -> 32", "decreasing -> 32" + control,
        "decreasing -> 16", "decreasing -> 16" + control,
    ]  # fmt: skip
    for (_, plan), (_, tome) in zip(video[0::2], video[1::2], strict=True):
        assert tome.remove_per_layer == plan.remove_per_layer and tome.scoring.w_div == tome.scoring.ctr == 0.0
    images = bench.schedules(24, 576, "clip", True)
    assert [label for label, _ in images] == ["skip -> 128", "skip -> 64", "decreasing -> 36"]
