"""SQuAD-normalised EM/F1, gold-contained and answer extraction (kblampp.metrics)."""
import importlib.util
from pathlib import Path

import pytest

from kblampp.metrics import (contains_gold, exact_match, extract_answer, f1_score, mean, normalize_answer,
                             score_answer)


def test_normalize_squad_rules():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("  Alice\tZHANG. ") == "alice zhang"
    assert normalize_answer("theater") == "theater"  # articles only as whole words


def test_exact_match_max_over_aliases():
    assert exact_match("the alice zhang", "Alice Zhang") == 1.0
    assert exact_match("A. Zhang", ["Alice Zhang", "A. Zhang"]) == 1.0
    assert exact_match("Alice", ["Alice Zhang"]) == 0.0
    with pytest.raises(ValueError, match="golds: need at least one gold answer"):
        exact_match("x", [])


def test_f1_values():
    assert f1_score("Alice Zhang", "Alice Zhang") == 1.0
    assert f1_score("Alice", "Alice Zhang") == pytest.approx(2 / 3)
    assert f1_score("Bob", "Alice Zhang") == 0.0
    assert f1_score("Alice", ["Bob", "Alice"]) == 1.0
    assert f1_score("", "Alice") == 0.0
    assert f1_score("the", "a") == 1.0  # both normalise to empty


def test_contains_gold_word_boundaries():
    assert contains_gold("I think it is Alice Zhang, who joined in 2019.", "alice zhang") == 1.0
    assert contains_gold("Annabel Lee", "Ann") == 0.0
    assert contains_gold("nothing here", ["x", "here"]) == 1.0
    assert contains_gold("the", "the") == 0.0  # empty normalised gold never counts


@pytest.mark.parametrize("raw, expected", [
    ("Alice Zhang", "Alice Zhang"),
    ("Alice Zhang.\nShe became CEO in 2019.", "Alice Zhang"),
    ("\n\nThe answer is Alice Zhang.", "Alice Zhang"),
    ("Answer: The answer is: **Paris**", "Paris"),
    ("A: Berlin", "Berlin"),
    ("St. Louis", "St. Louis"),
    ("J. R. R. Tolkien", "J. R. R. Tolkien"),
    ("Paris. It is the capital of France.", "Paris"),
    ("\"Oslo\"", "Oslo"),
    ("", ""),
])
def test_extract_answer(raw, expected):
    assert extract_answer(raw) == expected


def test_score_answer_combines():
    out = score_answer("The answer is Alice Zhang. She was appointed in 2019", ["Alice Zhang"])
    assert out == {"pred": "Alice Zhang", "em": 1.0, "f1": 1.0, "contained": 1.0}
    out = score_answer("She is called Alice Zhang", "Alice Zhang")
    assert out["em"] == 0.0 and out["contained"] == 1.0 and out["f1"] == pytest.approx(2 * (2 / 5) / (2 / 5 + 1))


def test_mean_empty_is_none():
    assert mean([]) is None
    assert mean([1.0, 0.0, 0.5]) == 0.5


def test_train_metrics_reexport():
    path = Path(__file__).resolve().parents[1] / "train" / "metrics.py"
    spec = importlib.util.spec_from_file_location("train_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.exact_match is exact_match and module.extract_answer is extract_answer


@pytest.mark.parametrize("raw, question, expected", [
    ("The CEO of Rivera Systems before 2004 was Kelly Garrett.", "Who was the CEO of Rivera Systems before 2004?",
     "Kelly Garrett"),
    ("Luke Glenn was a member of the Hidden Thistle Tennis Club.", "Which club was Luke Glenn a member of in 1997?",
     "Hidden Thistle Tennis Club"),
    ("John Green studied at the University of Mendez, a prestigious institution", "Where did John Green study?",
     "University of Mendez"),
    ("Isaiah Green, the CEO of Carter-Baker, played a role", "Who led Carter-Baker as chief executive in 2019?",
     "Isaiah Green"),
    ("She joined on March 2, 2019 as CEO", "When did Alice Zhang join BrightSky?", "March 2, 2019"),
    ("Kelly Garrett", "Who led Rivera Systems?", "Kelly Garrett"),  # short lines stay as they are
    ("Rivera Holdings Group", "Who owns Rivera Systems?", "Rivera Holdings Group"),
    ("The Williams Institute of Technology is a non-profit", "Which city is home to Williams Institute of Technology?",
     "The Williams Institute of Technology is a non-profit"),  # nothing new: the line is kept
])
def test_extract_answer_with_question(raw, question, expected):
    assert extract_answer(raw, question) == expected


def test_score_answer_uses_question():
    q = "Which club was Luke Glenn a member of in 1997?"
    out = score_answer("Luke Glenn was a member of the Hidden Thistle Tennis Club.", "Hidden Thistle Tennis Club", q)
    assert out["em"] == 1.0 and out["pred"] == "Hidden Thistle Tennis Club"
    assert score_answer("Luke Glenn was a member of the Hidden Thistle Tennis Club.", "Hidden Thistle Tennis Club")["em"] == 0.0
