"""The registry of named things: its rules, and plugins found through entry points (a package installed in a tmp dir).

The plugin is a real distribution as an installer leaves it: a package folder and its ``*.dist-info`` (``METADATA``,
``entry_points.txt``) on ``sys.path``, which ``importlib.metadata`` finds like any installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaluators import DemoEvaluator, EvaluatorError, get_evaluator
from evaluators.base import evaluator_class, register_evaluator
from search_spaces import SearchSpaceError, get_space
from search_spaces.base import space_instance
from tuner.errors import TunerError
from tuner.registry import EVALUATOR_GROUP, SEARCH_SPACE_GROUP, Registry

PLUGIN = '''"""A plugin of the tuner: an evaluator and a search space from an installed package."""

from evaluators.demo import DemoEvaluator
from search_spaces.family import FamilySpace

THING = "a thing"


class PluginEvaluator(DemoEvaluator):
    """The demo task, under the plugin's name."""


class PluginSpace(FamilySpace):
    """The family space, under the plugin's name."""

    name = "plugin_space"
    summary = "the family space, installed by tuner_plugin_demo"


class WrappedViT:
    """A model the built-in adapters do not know: a CLIP vision tower kept under another attribute."""


def resolve_wrapped(model):
    """The plugin's encoder adapter: the CLIP encoder inside a ``Wrapped`` module."""
    if type(model).__name__ != "Wrapped":
        return None
    from tuner.evoprune.adapters import resolve_encoder

    return resolve_encoder(model.tower)


resolve_wrapped.class_names = ("Wrapped",)
'''

ENTRY_POINTS = """\
[tuner.evaluators]
plugin_task = tuner_plugin_demo:PluginEvaluator

[tuner.search_spaces]
plugin_space = tuner_plugin_demo:PluginSpace

[tuner.adapters]
wrapped = tuner_plugin_demo:resolve_wrapped

[tuner_test.things]
thing = tuner_plugin_demo:THING

[tuner_test.broken]
missing = tuner_plugin_demo:MISSING
"""


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A folder holding the installed plugin ``tuner_plugin_demo`` 0.1 (not yet on ``sys.path``)."""
    package = tmp_path / "tuner_plugin_demo"
    package.mkdir()
    (package / "__init__.py").write_text(PLUGIN)
    info = tmp_path / "tuner_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tuner_plugin_demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return tmp_path


@pytest.fixture
def installed_plugin(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin on ``sys.path`` for this test only."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield plugin_dir
    sys.modules.pop("tuner_plugin_demo", None)


# ------------------------------------------------------------------------------------------------------------ rules


def test_a_name_is_registered_once() -> None:
    colours: Registry[str] = Registry("colour")
    red = "#f00"
    assert colours.register("red", red) is red
    assert colours.register("red", red) is red  # the same item again: nothing changes
    with pytest.raises(TunerError, match="colour 'red' is registered twice .*; rename one"):
        colours.register("red", "#ff0000")
    assert colours.get("red") == "#f00" and colours.names() == ["red"]


def test_an_unknown_name_lists_the_known_ones_with_the_registry_error() -> None:
    spaces: Registry[str] = Registry("search space", error=SearchSpaceError, hint="see `tuner spaces`")
    for name in ("b", "a"):
        spaces.register(name, name.upper())
    with pytest.raises(SearchSpaceError) as caught:
        spaces.get("x")
    assert str(caught.value) == "unknown search space 'x'; available: a, b (see `tuner spaces`)"
    assert spaces.names() == ["a", "b"] and list(spaces) == ["a", "b"] and "a" in spaces and "x" not in spaces


def test_the_built_in_registries_use_the_rule() -> None:
    with pytest.raises(
        EvaluatorError,
        match="^unknown evaluator 'x'; available: demo, digits-vqa, fidelity, gqa, mllm, mmbench, mme, pope, "
        "scienceqa, videomme, zeroshot$",
    ):
        get_evaluator("x")
    with pytest.raises(SearchSpaceError, match="^unknown search space 'x'; available: family, keep_ratios"):
        get_space("x")
    with pytest.raises(EvaluatorError, match="evaluator 'demo' is registered twice"):
        register_evaluator("demo")(type("Impostor", (DemoEvaluator,), {}))


# ----------------------------------------------------------------------------------------------------- entry points


def test_entry_points_are_loaded_on_the_first_lookup(installed_plugin: Path) -> None:
    things: Registry[str] = Registry("thing", "tuner_test.things", adapt=lambda name, loaded: f"{name}: {loaded}")
    assert things.names() == ["thing"]
    assert things.get("thing") == "thing: a thing"


def test_an_entry_point_that_cannot_be_loaded_names_its_package(installed_plugin: Path) -> None:
    broken: Registry[str] = Registry("thing", "tuner_test.broken", error=EvaluatorError)
    with pytest.raises(EvaluatorError) as caught:
        broken.names()
    message = str(caught.value)
    assert "cannot load thing 'missing' (tuner_plugin_demo:MISSING" in message
    assert "tuner_plugin_demo 0.1" in message and "group tuner_test.broken" in message and "\n" not in message


def test_a_plugin_evaluator_and_space_are_found(installed_plugin: Path) -> None:
    # Fresh registries of the real groups, as the built-in ones load them (the global ones stay untouched).
    evaluators: Registry[type] = Registry("evaluator", EVALUATOR_GROUP, error=EvaluatorError, adapt=evaluator_class)
    spaces: Registry[object] = Registry(
        "search space", SEARCH_SPACE_GROUP, error=SearchSpaceError, adapt=space_instance
    )
    task = evaluators.get("plugin_task")
    assert task.__name__ == "PluginEvaluator" and issubclass(task, DemoEvaluator)
    assert task.name == "plugin_task"  # named as its entry point
    space = spaces.get("plugin_space")
    assert type(space).__name__ == "PluginSpace" and space is spaces.get("plugin_space")


def test_a_duplicate_from_a_plugin_is_refused(installed_plugin: Path) -> None:
    spaces: Registry[object] = Registry(
        "search space", SEARCH_SPACE_GROUP, error=SearchSpaceError, adapt=space_instance
    )
    spaces.register("plugin_space", get_space("family"))
    with pytest.raises(SearchSpaceError, match="search space 'plugin_space' is registered twice"):
        spaces.names()


def test_the_cli_lists_an_installed_plugin_space(plugin_dir: Path, tuner_subprocess_env: dict[str, str]) -> None:
    env = dict(tuner_subprocess_env)
    env["PYTHONPATH"] = str(plugin_dir) + os.pathsep + env["PYTHONPATH"]
    spaces = subprocess.run(
        [sys.executable, "-m", "tuner", "spaces"], env=env, capture_output=True, text=True, timeout=120
    )
    assert spaces.returncode == 0, spaces.stdout + spaces.stderr
    assert "plugin_space: the family space, installed by tuner_plugin_demo" in spaces.stdout
    assert "family (default):" in spaces.stdout
    listed = subprocess.run(
        [sys.executable, "-c", "import evaluators; print(evaluators.available_evaluators())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        listed.stdout.strip()
        == "['demo', 'digits-vqa', 'fidelity', 'gqa', 'mllm', 'mmbench', 'mme', 'plugin_task', 'pope', 'scienceqa', "
        "'videomme', 'zeroshot']"
    ), listed.stderr


ADAPTER_CHECK = """
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel
from tuner.evoprune import Schedule, apply
from tuner.evoprune.adapters import supported_models

class Wrapped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
        self.tower = CLIPVisionModel._from_config(config)

    def forward(self, pixel_values):
        return self.tower(pixel_values=pixel_values)

model = Wrapped().eval()
with apply(model, Schedule([4, 2], 16)) as handle, torch.inference_mode():
    model(torch.randn(1, 3, 32, 32))
print(handle.token_counts, supported_models()[-1])
"""


def test_an_installed_encoder_adapter_plugin_is_used(plugin_dir: Path, tuner_subprocess_env: dict[str, str]) -> None:
    env = dict(tuner_subprocess_env)
    env["PYTHONPATH"] = str(plugin_dir) + os.pathsep + env["PYTHONPATH"]
    done = subprocess.run([sys.executable, "-c", ADAPTER_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[12, 10] Wrapped"
