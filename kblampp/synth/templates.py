"""Question phrasings per question group (>= 3 each), with a fixed held-out subset.

A group is a relation (`born`), a relation with a time form (`ceo@in`, `ceo@on`, `ceo@before`,
`ceo@after`, `member@in`, `member@on`) or a chain (`spouse>born`, ...). Template ids are `group#i`;
every third phrasing (i % 3 == 2) is reserved for evaluation, so training never sees it.
Placeholders: {h} subject name, {year}, {date}.
"""
from __future__ import annotations

TEMPLATES: dict[str, tuple[str, ...]] = {
    # single-hop
    "born": ("Where was {h} born?", "In which city was {h} born?", "What is the birthplace of {h}?",
             "{h} was born in which city?"),
    "educated": ("Where did {h} study?", "Which university did {h} attend?",
                 "At which university was {h} educated?"),
    "employer": ("Which company does {h} work for?", "Who is the employer of {h}?",
                 "Which organisation employs {h}?"),
    "spouse": ("Who is {h} married to?", "Who is the spouse of {h}?", "Whom did {h} marry?"),
    "residence": ("Where does {h} live?", "In which city does {h} reside?", "Which city is {h}'s home?"),
    "member": ("Which club has {h} been a member of?", "What club did {h} belong to?",
               "{h} was a member of which club?"),
    "founder": ("Who founded {h}?", "Who is the founder of {h}?", "{h} was founded by whom?"),
    "hq": ("Where is {h} headquartered?", "In which city is {h} based?",
           "Where are the headquarters of {h}?"),
    "located": ("Where is {h} located?", "In which city is {h}?", "Which city is home to {h}?"),
    "venue": ("Where was the {h} held?", "In which city did the {h} take place?",
              "Which city hosted the {h}?"),
    "organiser": ("Who organised the {h}?", "Which organisation organised the {h}?",
                  "The {h} was organised by which organisation?"),
    # temporal
    "ceo@in": ("Who was the CEO of {h} in {year}?", "Who led {h} as chief executive in {year}?",
               "In {year}, who was the chief executive officer of {h}?"),
    "ceo@on": ("Who was the CEO of {h} on {date}?", "Who was running {h} as CEO on {date}?",
               "On {date}, who held the post of CEO at {h}?"),
    "ceo@before": ("Who was the CEO of {h} before {year}?", "Who led {h} as CEO just before {year}?",
                   "Before {year}, who was the chief executive of {h}?"),
    "ceo@after": ("Who was the CEO of {h} after {year}?", "Who led {h} as CEO right after {year}?",
                  "After {year}, who was the chief executive of {h}?"),
    "member@in": ("Which club was {h} a member of in {year}?", "In {year}, which club did {h} belong to?",
                  "{h} was a member of which club in {year}?"),
    "member@on": ("Which club was {h} a member of on {date}?", "On {date}, which club did {h} belong to?",
                  "{h} was a member of which club on {date}?"),
    # multi-hop (2 facts)
    "spouse>born": ("In which city was the spouse of {h} born?", "Where was {h}'s spouse born?",
                    "What is the birthplace of the person {h} married?"),
    "employer>hq": ("Where is the company that employs {h} headquartered?", "In which city is {h}'s employer based?",
                    "Where are the headquarters of the organisation {h} works for?"),
    "educated>located": ("In which city is the university {h} attended?",
                         "Where is the university where {h} studied located?",
                         "{h} studied at a university in which city?"),
    "employer>founder": ("Who founded the company {h} works for?", "Who is the founder of {h}'s employer?",
                         "{h}'s employer was founded by whom?"),
    "founder>born": ("Where was the founder of {h} born?", "In which city was the person who founded {h} born?",
                     "What is the birthplace of {h}'s founder?"),
    "ceo@in>born": ("Where was the CEO of {h} in {year} born?",
                    "In which city was the person who led {h} in {year} born?",
                    "What is the birthplace of the chief executive of {h} in {year}?"),
    "organiser>ceo@event": ("Who was the CEO of the organiser of the {h} when it was held?",
                            "Who led the organisation that organised the {h} at the time of the event?",
                            "At the time of the {h}, who was the chief executive of its organiser?"),
    # multi-hop (3 facts)
    "spouse>educated>located": ("In which city is the university attended by {h}'s spouse?",
                                "Where is the university where the spouse of {h} studied located?",
                                "The person {h} married studied at a university in which city?"),
    "employer>founder>born": ("Where was the founder of {h}'s employer born?",
                              "In which city was the person who founded {h}'s employer born?",
                              "What is the birthplace of the founder of the company {h} works for?"),
    "spouse>employer>hq": ("Where is the employer of {h}'s spouse headquartered?",
                           "In which city is the company that employs {h}'s spouse based?",
                           "The spouse of {h} works for a company headquartered in which city?"),
}


def template_ids(group: str) -> list[str]:
    return [f"{group}#{i}" for i in range(len(TEMPLATES[group]))]


def is_heldout(template_id: str) -> bool:
    """True for phrasings reserved for evaluation (every third one of each group)."""
    return int(template_id.rsplit("#", 1)[1]) % 3 == 2


def render(template_id: str, **values: str) -> str:
    group, _, i = template_id.rpartition("#")
    return TEMPLATES[group][int(i)].format(**values)
