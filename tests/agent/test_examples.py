"""The shipped example plans stay valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nkudo.agent.plan import parse_plan

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_plan_is_valid(path: Path) -> None:
    plan_id, actions = parse_plan(json.loads(path.read_text()))
    assert plan_id and actions


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
