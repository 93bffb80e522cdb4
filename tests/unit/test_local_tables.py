"""`gridfleet run`'s tables name configs by the leaves that differ, nested sections as dotted keys."""
from __future__ import annotations

from worker.local import _short_config, _swept_keys


def test_nested_sections_show_the_dotted_leaves_that_differ():
    a = {"training": {"gradient_computation": "wp", "epochs": 500, "perturbation": 0.001}, "fsm": True}
    b = {"training": {"gradient_computation": "bptt", "epochs": 500, "perturbation": 0.01}, "fsm": True}
    keys = _swept_keys([a, b])
    assert keys == ["training.gradient_computation", "training.perturbation"]
    assert _short_config(a, 90, keys) == "gradient_computation=wp perturbation=0.001"  # unique leaves, short
    both = {"model": {"size": 1}, "data": {"size": 2}}
    assert _short_config(both) == "model.size=1 data.size=2"  # a leaf in two sections keeps its section


def test_an_axis_into_a_list_shows_the_list_and_flat_configs_are_unchanged():
    config = {"block_types": [["R", "G"], ["G"]], "lr": 0.1}
    assert _short_config(config, 90, ["block_types.1.0"]) == "block_types=[['R', 'G'], ['G']]"
    assert _swept_keys([{"lr": 0.1, "n": 1}, {"lr": 0.2, "n": 1}]) == ["lr"]
    assert _short_config({"lr": 0.1, "n": 1}) == "lr=0.1 n=1"
