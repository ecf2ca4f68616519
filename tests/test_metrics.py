"""SQuAD-normalised EM/F1, gold-contained and answer extraction (kblampp.metrics)."""
import importlib.util
from pathlib import Path

import pytest

from kblampp.metrics import (answer_line, bootstrap_interval, contains_gold, exact_match, extract_answer, f1_score, is_abstention, mean,
                             normalize_answer, score_answer)


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


def test_score_answer_headline_is_the_raw_first_line():
    out = score_answer("The answer is Alice Zhang. She was appointed in 2019", ["Alice Zhang"])
    assert out["pred"] == "The answer is Alice Zhang. She was appointed in 2019"
    assert out["em"] == 0.0 and out["contained"] == 1.0
    assert out["lenient_pred"] == "Alice Zhang" and out["em_lenient"] == 1.0 and out["abstained"] is False
    out = score_answer("  Alice Zhang.\nShe was appointed in 2019", "Alice Zhang")
    assert out["pred"] == "Alice Zhang." and out["em"] == 1.0 and out["f1"] == 1.0
    out = score_answer("She is called Alice Zhang", "Alice Zhang")
    assert out["em"] == 0.0 and out["contained"] == 1.0 and out["f1"] == pytest.approx(2 * (2 / 5) / (2 / 5 + 1))


@pytest.mark.parametrize("raw, gold, em", [
    ("Miller, Oconnell and Mitchell", "Miller, Oconnell and Mitchell", 1.0),  # comma names stay whole
    ("Miller", "Miller, Oconnell and Mitchell", 0.0),
    ("Prof. John Smith", "Prof. John Smith", 1.0),  # a title with a period stays whole
    ("Prof", "Prof. John Smith", 0.0),
    ("The answer is John Smith.", "John Smith", 0.0),  # a sentence
    ("John Smith was the CEO of Acme in 2004.", "John Smith", 0.0),
    ("I am not sure, maybe John Smith", "John Smith", 0.0),  # a hedge
    ("Perhaps John Smith?", "John Smith", 0.0),
    ("Not John Smith", "John Smith", 0.0),  # a negation
    ("It was not John Smith.", "John Smith", 0.0),
    ("John Smith or Mary Jones", "John Smith", 0.0),  # candidate lists
    ("John Smith, Mary Jones", "John Smith", 0.0),
    ("the John Smith!", "John Smith", 1.0),  # SQuAD drops articles and punctuation
    ("\n  John Smith  \nMary Jones", "John Smith", 1.0),  # first line after the leading whitespace
])
def test_official_em_on_the_raw_first_line(raw, gold, em):
    assert score_answer(raw, gold)["em"] == em


@pytest.mark.parametrize("raw, question, lenient, gold, em_lenient", [
    ("Miller, Oconnell and Mitchell", "Who employs Ann Lee?", "Miller, Oconnell and Mitchell",
     "Miller, Oconnell and Mitchell", 1.0),
    ("Ann Lee works for Miller, Oconnell and Mitchell.", "Who employs Ann Lee?", "Miller, Oconnell and Mitchell",
     "Miller, Oconnell and Mitchell", 1.0),
    ("Prof. John Smith", "Who founded Acme?", "Prof. John Smith", "Prof. John Smith", 1.0),
    ("Prof. John Smith founded it. He was 40.", "Who founded Acme?", "Prof. John Smith", "Prof. John Smith", 1.0),
    ("I am not sure, maybe John Smith", "Who founded Acme?", "I am not sure, maybe John Smith", "John Smith", 0.0),
    ("It was not John Smith at all", "Who founded Acme?", "It was not John Smith at all", "John Smith", 0.0),
    ("Either John Smith or Mary Jones", "Who founded Acme?", "Either John Smith or Mary Jones", "John Smith", 0.0),
])
def test_lenient_extraction_keeps_names_whole_and_never_credits_hedges(raw, question, lenient, gold, em_lenient):
    assert extract_answer(raw, question) == lenient
    assert score_answer(raw, gold, question)["em_lenient"] == em_lenient


def test_unanswerable_is_right_exactly_when_the_row_abstains():
    assert score_answer("Unknown.", "no answer", answerable=False)["em"] == 1.0
    assert score_answer("unknown\nbecause", "no answer", answerable=False)["f1"] == 1.0
    out = score_answer("no answer", "no answer", answerable=False)  # the gold marker is never matched
    assert out["em"] == 0.0 and out["abstained"] is False
    assert score_answer("John Smith", "no answer", answerable=False)["em"] == 0.0
    assert score_answer("I don't know", "no answer", answerable=False, abstain_answer="I don't know")["em"] == 1.0
    out = score_answer("unknown", "John Smith")  # abstaining on an answerable question is wrong
    assert out["em"] == 0.0 and out["abstained"] is True
    assert is_abstention("The unknown", "unknown") and not is_abstention("unknown person", "unknown")
    with pytest.raises(ValueError, match="abstain_answer"):
        is_abstention("x", "the")


def test_answer_line():
    assert answer_line("") == "" and answer_line("  \n ") == ""
    assert answer_line("\n\n Paris \n London") == "Paris"


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
    assert out["em_lenient"] == 1.0 and out["lenient_pred"] == "Hidden Thistle Tennis Club"
    assert out["em"] == 0.0  # the headline never cuts a sentence
    assert score_answer("Luke Glenn was a member of the Hidden Thistle Tennis Club.", "Hidden Thistle Tennis Club")["em_lenient"] == 0.0


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [1.0] * 60 + [0.0] * 40
    lo, hi = bootstrap_interval(values, resamples=1000, seed=0)
    assert lo < 0.6 < hi and 0.45 < lo and hi < 0.75
    assert bootstrap_interval(values, seed=0) == (lo, hi)
    assert bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_interval([]) is None
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_interval(values, resamples=0)
