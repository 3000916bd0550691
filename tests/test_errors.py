"""One error hierarchy: a root the CLI catches, messages that name parameters, flags in the CLI's words."""

from __future__ import annotations

import pytest

from evaluators import EvaluatorError
from search_spaces import SearchSpaceError
from tuner.errors import (
    BAD_INPUT_ERRORS,
    BudgetError,
    LatencyError,
    StorageError,
    StudyError,
    TunerError,
    render,
)
from tuner.evoprune import EvoPruneError, ScheduleError, UnsupportedModelError
from tuner.latency import parse_budget
from tuner.storage import open_storage


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize(
    "error", [EvaluatorError, SearchSpaceError, BudgetError, LatencyError, StorageError, StudyError]
)
def test_every_tuner_error_has_the_one_root(error: type[Exception]) -> None:
    assert issubclass(error, TunerError) and issubclass(error, ValueError)
    assert issubclass(error, BAD_INPUT_ERRORS)


def test_the_engine_errors_are_bad_input_too() -> None:
    # The engine imports nothing above it, so its root is not a TunerError: the pair is what callers catch.
    assert EvoPruneError in BAD_INPUT_ERRORS and not issubclass(EvoPruneError, TunerError)
    for error in (ScheduleError, UnsupportedModelError):
        assert issubclass(error, BAD_INPUT_ERRORS) and issubclass(error, ValueError)


def test_messages_name_parameters_and_the_cli_writes_them_as_flags() -> None:
    error = EvaluatorError("calib 500 and holdout 300 need 800 items; lower them", param=("calib", "holdout"))
    assert error.params == ("calib", "holdout") and error.param == "calib"
    assert render(error, cli_flag) == "--calib 500 and --holdout 300 need 800 items; lower them"
    assert TunerError("plain").params == () and TunerError("plain").param is None
    assert render(TunerError("two\n  lines"), cli_flag) == "two lines"
    with pytest.raises(BudgetError) as caught:
        parse_budget("fast")
    assert render(caught.value, cli_flag).startswith("invalid --budget 'fast': give a time")


def test_only_whole_words_become_flags() -> None:
    error = StorageError(
        "sqlite:///studies/storage.db is locked (storage_url 'storage'); use another storage", param="storage"
    )
    assert render(error, cli_flag) == (
        "sqlite:///studies/storage.db is locked (storage_url 'storage'); use another --storage"
    )
    split = EvaluatorError("no dataset_split for dataset x; give dataset_split", param="dataset_split")
    assert render(split, cli_flag) == "no --dataset-split for dataset x; give --dataset-split"


def test_storage_errors_name_the_storage_parameter() -> None:
    with pytest.raises(StorageError) as caught:
        open_storage("studies/tuner.db")
    assert caught.value.params == ("storage",)
    assert render(caught.value, cli_flag).startswith("invalid --storage 'studies/tuner.db': give a database URL")
