"""The benchmarks' one method (benchmarks/harness.py): interleaved rounds in alternating order, ratios taken within
a round, medians with their ranges, report text from Markdown templates."""

import pytest

from benchmarks import harness


def test_rounds_alternate_the_order_and_every_contender_runs_once_per_round():
    order = []
    contenders = {name: (lambda name=name: order.append(name) or 1) for name in "abc"}
    rounds = harness.interleave(contenders, rounds=4)
    assert order == list("abccbaabccba")
    assert len(rounds.rounds) == 4 and all(list(measured) == ["a", "b", "c"] for measured in rounds.rounds)


def test_a_ratio_is_taken_within_each_round_and_reported_as_median_and_range():
    rounds = harness.Rounds(["emi", "base"])
    for emi_wall, base_wall in ((1.0, 2.0), (2.0, 2.0), (1.0, 4.0)):  # emi's rate over base's: 2, 1, 4
        rounds.rounds.append(
            {"emi": harness.Measurement(10, emi_wall, 1.0), "base": harness.Measurement(10, base_wall, 3.0)}
        )
    assert rounds.ratio("emi", "base") == harness.Spread(2.0, 1.0, 4.0)
    assert rounds.ratio("emi", "base").show() == "2.00 (1.00-4.00)"
    assert rounds.spread("base", "cpu_per_unit") == harness.Spread(0.3, 0.3, 0.3)
    assert rounds.best_baseline(["emi", "base"]) == "emi"


def test_units_count_what_the_contender_says_it_did():
    rounds = harness.interleave({"one": lambda: 7}, rounds=1)
    (measured,) = rounds.rounds
    assert measured["one"].units == 7 and measured["one"].wall_s > 0
    assert rounds.to_json()["rounds"][0]["one"]["units"] == 7


def test_a_template_is_filled_and_refuses_a_missing_name(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "TEMPLATES", tmp_path)
    (tmp_path / "t.md").write_text("Median $ratio over $rounds rounds.\n")
    assert harness.render("t", ratio="1.20 (1.10-1.30)", rounds=5) == "Median 1.20 (1.10-1.30) over 5 rounds."
    with pytest.raises(KeyError):
        harness.render("t", ratio=1)


def test_contenders_must_read_the_same_keys_and_one_that_does_not_is_named():
    keys = {"emi": [["a", "b"], ["a", "b"]], "base": [["a", "b"], ["a", "b"]]}
    assert harness.same_keys(keys, "emi") == ["a", "b"]
    keys["base"][1] = ["a"]
    with pytest.raises(RuntimeError, match="base epoch 1 read 1 keys, not the 2 of emi"):
        harness.same_keys(keys, "emi")
