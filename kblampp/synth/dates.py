"""Date wording shared by evidence sentences and questions ("March 2, 2019", "May 2014")."""
from __future__ import annotations

import datetime as dt
import random

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def say_day(day: dt.date) -> str:
    """Full date wording, e.g. 'March 2, 2019'."""
    return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def say_month(year: int, month: int) -> str:
    """Month wording, e.g. 'May 2014'."""
    return f"{MONTHS[month - 1]} {year}"


def random_day(rng: random.Random, first: dt.date, last: dt.date) -> dt.date:
    """A uniformly drawn day in [first, last] (inclusive)."""
    if last < first:
        raise ValueError(f"empty date range {first}..{last}")
    return dt.date.fromordinal(rng.randint(first.toordinal(), last.toordinal()))
