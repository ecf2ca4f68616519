"""Table-driven checks of question-time parsing (kblampp.question_time)."""
from __future__ import annotations

import pytest

from kblampp.question_time import (TIME_KINDS, TimeConstraint, find_time_expressions, normalize_question,
                                   parse_question_time, parse_time_constraint, question_time_dict)
from kblampp.timewin import window_days

CASES = [
    # the forms the issue names
    ("Who led the club in 1995?", ("1995", "1995")),
    ("Who led the club in March 2001?", ("2001-03", "2001-03")),
    ("Who led the club in Mar 2001?", ("2001-03", "2001-03")),
    ("Who led the club from 1990 to 1995?", ("1990", "1995")),
    ("Who led the club between 1990 and 1995?", ("1990", "1995")),
    ("Who led the club before 2000?", (None, "1999")),
    ("Who led the club before May 2003?", (None, "2003-04")),
    ("Who led the club before Jan 2000?", (None, "1999-12")),
    ("Who led the club before March 2, 2019?", (None, "2019-03-01")),
    ("Who led the club after May 2003?", ("2003-06", None)),
    ("Who led the club after Dec 1999?", ("2000-01", None)),
    ("Who led the club after 1999?", ("2000", None)),
    ("Who led the club after december 11, 2017?", ("2017-12-12", None)),
    ("Who led the club in the early 1990s?", ("1990", "1993")),
    ("Who led the club in the mid-1990s?", ("1994", "1996")),
    ("Who led the club in the late 1990s?", ("1997", "1999")),
    ("Who led the club in the 1990s?", ("1990", "1999")),
    ("Who led the club in the late 1800s?", ("1870", "1899")),
    ("Who led the club in the 1800s?", ("1800", "1899")),
    ("Who led the club in the 2000s?", ("2000", "2009")),
    ("Who led the club in the early 2010s?", ("2010", "2013")),
    ("Who led the club in 2019-2020?", ("2019", "2020")),
    ("Who led the club on March 2, 2019?", ("2019-03-02", "2019-03-02")),
    ("Who led the club on 2 March 2019?", ("2019-03-02", "2019-03-02")),
    ("Who led the club on 2019-03-02?", ("2019-03-02", "2019-03-02")),
    ("Who led the club since 1990?", ("1990", None)),
    ("Who led the club until 1990?", (None, "1990")),
    # shapes seen in the TimeQA questions
    ("from 1978 to 1984, which political party was Moudud Ahmed a member of?", ("1978", "1984")),
    ("Who governed the Niigata Prefecture from Jun 2018 to Jun 2019?", ("2018-06", "2019-06")),
    ("Where was the sculpture Entropa housed from 2009 to May 2009?", ("2009", "2009-05")),
    ("Lena Ashwell had what last name from Sep 1872 to 1896?", ("1872-09", "1896")),
    ("Who was the second owner of gleaston castle, 1346 to 1347?", ("1346", "1347")),
    ("Emma of Altdorf gave birth to who in 830?", ("0830", "0830")),
    ("In the stretch of years from 8 to 9, what was the capital city?", ("0008", "0009")),
    ("Regarding the dynasty, what was its capital from 25 to 190?", ("0025", "0190")),
    ("What was the host city of the dec 2010 world festival of black arts?", ("2010-12", "2010-12")),
    ("Who was the broadcaster of Big Brother in the Oct 2015 to Oct 2016 timeframe?", ("2015-10", "2016-10")),
    ("Who hosted it during the period 1975 to dec 1981?", ("1975", "1981-12")),
    ("What shows did David Hasselhoff act in between the years 1975 and 1982?", ("1975", "1982")),
    ("Between July 1929 and 1943, which entity was located at number 44?", ("1929-07", "1943")),
    ("Since 2019 to present, which league has been home for richmond kickers?", ("2019", None)),
    ("Which organization named wgaw after apr 1933 to 1954?", ("1933-04", "1954")),
    ("it was his home during 1916-1920 , while", ("1916", "1920")),
    # several expressions: describing clauses lose, closed beats open, the last one wins
    ("The German who began his naval career in April 1935 held what position from Apr 1937 to Apr 1939 ?",
     ("1937-04", "1939-04")),
    ("Who lived in the observatory that was built between 1772 and 1774 in Mannheim from 1774 to 1783?",
     ("1774", "1783")),
    ("from 2004 to 2006, who was the owner of the Czech bank founded in 1991?", ("2004", "2006")),
    ("Amalric, born in 1136 to King Fulk, held from Feb 1162 to Jul 1174 which title?", ("1162-02", "1174-07")),
    ("Who served as prime minister from 1999 to 2008, and received which award in 2010?", ("2010", "2010")),
    ("In 1993, the person who was leader of the party until april 10, 2006 was a member of what party?",
     ("1993", "1993")),
    ("What Davis Cup national team was founded in 1993 after the breakup of Yugoslavia?", ("1993", "1993")),
    # seasons are periods now ("after the season 2018/2019" used to give no time at all)
    ("After the season 2018/2019, who was hired as the head coach?", ("2020", None)),
    ("Who won the 1999/2000 season?", ("1999", "2000")),
    # nothing usable
    ("What did the planetarium become after renovation?", None),
    ("Meg Whitman became part of which organisation in 1?", None),
    ("Who won from 2 to 5 pm?", None),
    ("What happened in 100 days?", None),
    ("Who led the club from 2010 to 2005?", None),
    ("Who lives at 3017 N Street?", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_parse_question_time_table(text: str, expected: tuple | None) -> None:
    assert parse_question_time(text) == expected


@pytest.mark.parametrize("text,expected", [c for c in CASES if c[1] is not None])
def test_parsed_windows_are_valid_question_times(text: str, expected: tuple) -> None:
    lo, hi = window_days(*expected)
    assert lo <= hi
    assert question_time_dict(text) == {"start": expected[0], "end": expected[1]}


def test_question_time_dict_none_without_time() -> None:
    assert question_time_dict("Who founded the club?") is None


def test_find_time_expressions_reports_kind_span_and_describing() -> None:
    text = "The bank founded in 1991 was owned by whom from 2004 to 2006?"
    found = find_time_expressions(text)
    assert [(e.kind, e.start, e.end, e.describing) for e in found] == [
        ("point", "1991", "1991", True), ("range", "2004", "2006", False)]
    assert [text[e.span[0]:e.span[1]] for e in found] == ["in 1991", "from 2004 to 2006"]


def test_non_string_is_rejected() -> None:
    with pytest.raises(TypeError, match="question text must be a string, got int"):
        parse_question_time(1995)  # type: ignore[arg-type]


REF = "2024-12-31"
C = TimeConstraint
# (question, expected constraint) for every kind, with typos, odd formats, lower case and extra spaces
TYPED = [
    # at
    ("Who was the CEO of Turner Inc on Dec. 3rd, 1999?", C("at", "1999-12-03", "1999-12-03")),
    ("who was the ceo of turner inc on decmber 3, 1999?", C("at", "1999-12-03", "1999-12-03")),
    ("Who ran Turner Inc on 3 Dec 1999", C("at", "1999-12-03", "1999-12-03")),
    ("Who led Turner Inc in  the late 1990s ?", C("at", "1997", "1999")),
    ("who led turner inc in the '90s?", C("at", "1990", "1999")),
    ("Who won the 1999/2000 season?", C("at", "1999", "2000")),
    ("Who led the club in 1999/00?", C("at", "1999", "2000")),
    ("Who led the club in Febuary 2001?", C("at", "2001-02", "2001-02")),
    ("who was ceo of y in sept. 2001?", C("at", "2001-09", "2001-09")),
    ("Who was CEO of Y in the year 1995?", C("at", "1995", "1995")),
    ("Who was CEO of Y as of 1995?", C("at", "1995", "1995")),
    # between
    ("Who was CEO of Y betwen 1990 and 1995?", C("between", "1990", "1995")),
    ("who was ceo of y from  march 1990 to 1995?", C("between", "1990-03", "1995")),
    ("Who held the post in 2019-2020?", C("between", "2019", "2020")),
    # before / after (since/until give the same kinds with the named period included)
    ("Who was the CEO of Y befor 1990?", C("before", None, "1989")),
    ("Who was the CEO of Y prior to March 2, 2019?", C("before", None, "2019-03-01")),
    ("Who was CEO until 2001?", C("before", None, "2001")),
    ("Who was CEO aftr 1990?", C("after", "1991", None)),
    ("AFTER DEC 1999, WHO WAS CEO?", C("after", "2000-01", None)),
    ("who was ceo of y since 2001?", C("after", "2001", None)),
    # just before / right after
    ("Who was the CEO of Y just prior to 1990?", C("just_before", None, "1989")),
    ("who was ceo of y right before  1990 ?", C("just_before", None, "1989")),
    ("Who was CEO of Y shortly befor 1990?", C("just_before", None, "1989")),
    ("Who was the last CEO of Y before 2000?", C("just_before", None, "1999")),
    ("Who was CEO of Y immediately after 1993?", C("right_after", "1994", None)),
    ("Who was the CEO of Y rigth after 1993?", C("right_after", "1994", None)),
    ("Who was the first CEO of Y after 2000?", C("right_after", "2001", None)),
    # succession: the anchor names the other fact, dates come from it
    ("Who succeeded Alice Smith as CEO of Y?", C("right_after", None, None, "Alice Smith as CEO of Y")),
    ("who succeded alice smith as ceo of y?", C("right_after", None, None, "alice smith as ceo of y")),
    ("Who took over from Alice Smith as CEO of Y?", C("right_after", None, None, "Alice Smith as CEO of Y")),
    ("Who was Alice Smith's successor as CEO of Y?", C("right_after", None, None, "Alice Smith as CEO of Y")),
    ("Who preceded Alice Smith as CEO of Y?", C("just_before", None, None, "Alice Smith as CEO of Y")),
    ("Who was the CEO of Y just before Alice Smith?", C("just_before", None, None, "Alice Smith")),
    ("who was bob jones' predecessor as ceo of y?", C("just_before", None, None, "bob jones as ceo of y")),
    # first / last
    ("Who was the first CEO of Y?", C("first", None, None)),
    ("Who was the earliest chief executive of Y?", C("first", None, None)),
    ("Who was the last CEO of Y?", C("last", None, None)),
    ("who was the most recent ceo of y?", C("last", None, None)),
    # current
    ("Who is the CEO of Y as of now?", C("current", REF, REF)),
    ("Who is currently the CEO of Y?", C("current", REF, REF)),
    ("who is   the ceo of y now?", C("current", REF, REF)),
    ("Who runs Y at present?", C("current", REF, REF)),
    ("Who is the curent CEO of Y?", C("current", REF, REF)),
    # relative: the anchoring clause
    ("When Alice Smith was CEO of Y, where did Bob work?", C("relative", None, None, "Alice Smith was CEO of Y")),
    ("while alice smith was ceo of y, which club was she a member of?",
     C("relative", None, None, "alice smith was ceo of y")),
    ("In the year Y was founded, who was the CEO of Z?", C("relative", None, None, "Y was founded")),
    ("Who was the CEO of Y at the time of the Golden Fox Expo?", C("relative", None, None, "the Golden Fox Expo")),
    ("Who led Y during Bob's tenure as CEO of Z?", C("relative", None, None, "Bob's tenure as CEO of Z")),
    ("Who was the CEO of the organiser of the Golden Fox Expo when it was held?",
     C("relative", None, None, "it was held")),
    # any dated expression beats a relative clause
    ("When Alice Smith was CEO of Y, who ran Z in 1995?", C("at", "1995", "1995")),
    ("When Alice Smith joined Y in 1995, who ran Z?", C("at", "1995", "1995")),
    ("When the Rams relocated to Los Angeles, CA what was their stadium from 1946 to 1980?",
     C("between", "1946", "1980")),
]


@pytest.mark.parametrize("text,expected", TYPED)
def test_parse_time_constraint_every_kind(text: str, expected: TimeConstraint) -> None:
    got = parse_time_constraint(text, reference_date=REF)
    assert got == expected
    assert got.kind in TIME_KINDS
    assert parse_question_time(text, REF) == got.window()


@pytest.mark.parametrize("text", ["When was Alice born?", "What is the first name of Bob?",
                                  "What did he do in his 20s?", "Who founded Turner Inc?",
                                  "Which company does Alice Smith work for?"])
def test_no_constraint(text: str) -> None:
    assert parse_time_constraint(text, REF) is None


def test_current_without_reference_date_has_no_dates() -> None:
    got = parse_time_constraint("Who is the CEO of Y now?")
    assert got == C("current", None, None) and got.window() is None
    assert parse_question_time("Who is the CEO of Y now?") is None


def test_bad_reference_date_is_rejected() -> None:
    with pytest.raises(ValueError, match="unparsable date"):
        parse_time_constraint("Who is the CEO now?", reference_date="31/12/2024")


def test_constraint_round_trips_as_dict() -> None:
    got = parse_time_constraint("Who succeeded Alice Smith as CEO of Y?")
    assert got.to_dict() == {"kind": "right_after", "start": None, "end": None, "anchor": "Alice Smith as CEO of Y"}
    assert TimeConstraint(**got.to_dict()) == got


def test_typo_repair_leaves_correct_words_alone() -> None:
    text = "Who was the CEO of Turner Inc before 1990, after the match in March?"
    assert normalize_question(text) == text
    assert normalize_question("befor 1990 aftr decmber") == "before 1990 after december"
    # capitalised words inside the text are names, unless a number follows a month-like one
    assert normalize_question("Befor the Earl of Eltham met Marc Durin on Decmber 3") == \
        "before the Earl of Eltham met Marc Durin on december 3"
