"""Question phrasings per question group (>= 3 each), with a fixed held-out subset.

A group is a relation (`born`), its paraphrases (`born~p`, sharing no word with the relation's name),
a relation with a time form (`ceo@in`, `member@just_before`, `ceo@succeeded`, ...), a relative-time
form (`rel:ceo>member`), or a chain (`spouse>born`, composed ones like `founder>employer>hq`).
Template ids are `group#i`; every third phrasing (i % 3 == 2) is reserved for evaluation, so training
never sees it. Placeholders: {h} subject, {x} anchor person, {y} anchor organisation, {e} event,
{year}, {y1}, {y2}, {date}. `ANCHORS` gives, per succession / relative template, the anchoring
clause exactly as the question states it (the gold `time_constraint.anchor`).
"""
from __future__ import annotations

from itertools import product

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
    # single-hop paraphrases: no word shared with the relation's name
    "born~p": ("Which city is {h} originally from?", "Where did {h} come into the world?",
               "What town did {h} start life in?"),
    "educated~p": ("Which university did {h} go to?", "Where did {h} earn a degree?",
                   "Which institution granted {h} a diploma?"),
    "employer~p": ("Who pays {h}'s salary?", "Where does {h} have a job?", "Which company is {h} on the payroll of?"),
    "spouse~p": ("Who did {h} wed?", "Who is {h}'s husband or wife?", "To whom is {h} married?"),
    "residence~p": ("Which city does {h} call home?", "Where has {h} settled?", "Which town does {h} live in?"),
    "member~p": ("Which club did {h} join?", "Which club counts {h} among its ranks?", "{h} belongs to which club?"),
    "founder~p": ("Who started {h}?", "Who set up {h}?", "Who established {h}?"),
    "hq~p": ("Which city is {h} run from?", "Which city hosts the main office of {h}?",
             "Where does {h} have its main office?"),
    "located~p": ("Which city is home to {h}?", "Where can {h} be found?", "Which city hosts {h}?"),
    "venue~p": ("Where did the {h} happen?", "Which town hosted the {h}?", "Where was the {h} staged?"),
    "organiser~p": ("Who put on the {h}?", "Which company ran the {h}?", "Who arranged the {h}?"),
    # temporal: CEOs
    "ceo@in": ("Who was the CEO of {h} in {year}?", "Who led {h} as chief executive in {year}?",
               "In {year}, who was the chief executive officer of {h}?"),
    "ceo@on": ("Who was the CEO of {h} on {date}?", "Who was running {h} as CEO on {date}?",
               "On {date}, who held the post of CEO at {h}?"),
    "ceo@between": ("Who was the CEO of {h} between {y1} and {y2}?", "From {y1} to {y2}, who led {h} as chief executive?",
                    "Who ran {h} as CEO from {y1} to {y2}?"),
    "ceo@before": ("Who was the CEO of {h} before {year}?", "Before {year}, who was the chief executive of {h}?",
                   "Who served as CEO of {h} prior to {year}?"),
    "ceo@after": ("Who was the CEO of {h} after {year}?", "After {year}, who was the chief executive of {h}?",
                  "Who held the CEO post at {h} after {year}?"),
    "ceo@just_before": ("Who led {h} as CEO just before {year}?", "Who was the last CEO of {h} before {year}?",
                        "Who was running {h} as CEO right before {year}?"),
    "ceo@right_after": ("Who led {h} as CEO right after {year}?", "Who was the first CEO of {h} after {year}?",
                        "Who took charge of {h} as CEO immediately after {year}?"),
    "ceo@first": ("Who was the first CEO of {h}?", "Who was the original chief executive of {h}?",
                  "Who was the earliest CEO of {h}?"),
    "ceo@last": ("Who was the most recent CEO of {h}?", "Who was the latest chief executive of {h}?",
                 "Who was the last person to become CEO of {h}?"),
    "ceo@current": ("Who is the CEO of {h} now?", "Who currently leads {h} as chief executive?",
                    "As of now, who is the CEO of {h}?"),
    "ceo@succeeded": ("Who succeeded {x} as CEO of {h}?", "Who took over from {x} as CEO of {h}?",
                      "Who was {x}'s successor as CEO of {h}?"),
    "ceo@preceded": ("Who preceded {x} as CEO of {h}?", "Who was {x}'s predecessor as CEO of {h}?",
                     "Who was CEO of {h} just before {x}?"),
    # temporal: club memberships
    "member@in": ("Which club was {h} a member of in {year}?", "In {year}, which club did {h} belong to?",
                  "{h} was a member of which club in {year}?"),
    "member@on": ("Which club was {h} a member of on {date}?", "On {date}, which club did {h} belong to?",
                  "{h} was a member of which club on {date}?"),
    "member@between": ("Which club was {h} a member of between {y1} and {y2}?",
                       "From {y1} to {y2}, which club did {h} belong to?", "{h} belonged to which club from {y1} to {y2}?"),
    "member@before": ("Which club was {h} a member of before {year}?", "Before {year}, which club did {h} belong to?",
                      "{h} belonged to which club prior to {year}?"),
    "member@after": ("Which club was {h} a member of after {year}?", "After {year}, which club did {h} belong to?",
                     "{h} belonged to which club after {year}?"),
    "member@just_before": ("Which club did {h} belong to just before {year}?",
                           "What was the last club {h} joined before {year}?",
                           "Right before {year}, which club was {h} a member of?"),
    "member@right_after": ("Which club did {h} belong to right after {year}?",
                           "What was the first club {h} was a member of after {year}?",
                           "Immediately after {year}, which club was {h} a member of?"),
    "member@first": ("Which club did {h} join first?", "What was the first club {h} belonged to?",
                     "Which was the earliest club {h} was a member of?"),
    "member@last": ("Which club did {h} join most recently?", "What is the latest club {h} has joined?",
                    "What was the last club {h} became a member of?"),
    "member@current": ("Which club is {h} a member of now?", "Which club does {h} currently belong to?",
                       "As of now, which club is {h} a member of?"),
    # relative time: the anchor fact's window selects the answer
    "rel:ceo>ceo": ("When {x} was CEO of {y}, who was the CEO of {h}?",
                    "Who led {h} as chief executive while {x} was CEO of {y}?",
                    "Who was running {h} as CEO during {x}'s tenure as CEO of {y}?"),
    "rel:ceo>member": ("When {x} was CEO of {y}, which club was {h} a member of?",
                       "Which club did {h} belong to while leading {y} as CEO?",
                       "While {x} was CEO of {y}, what club did {h} belong to?"),
    "rel:ceo>employer": ("When {x} was CEO of {y}, where did {h} work?",
                         "Which company employed {h} while {x} was CEO of {y}?",
                         "While {x} was running {y} as CEO, which organisation did {h} work for?"),
    "rel:founded>ceo": ("In the year {y} was founded, who was the CEO of {h}?",
                        "Who led {h} as CEO in the year {y} was founded?",
                        "Who was the chief executive of {h} in the same year that {y} was founded?"),
    "rel:event>ceo": ("Who was the CEO of {h} at the time of the {e}?", "When the {e} was held, who led {h} as CEO?",
                      "Who ran {h} as chief executive when the {e} took place?"),
    "organiser>ceo@event": ("Who was the CEO of the organiser of the {h} when it was held?",
                            "Who led the organisation that organised the {h} at the time of the event?",
                            "At the time of the {h}, who was the chief executive of its organiser?"),
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

ANCHORS: dict[str, str] = {
    **{f"ceo@succeeded#{i}": "{x} as CEO of {h}" for i in range(3)},
    "ceo@preceded#0": "{x} as CEO of {h}", "ceo@preceded#1": "{x} as CEO of {h}", "ceo@preceded#2": "{x}",
    "rel:ceo>ceo#0": "{x} was CEO of {y}", "rel:ceo>ceo#1": "{x} was CEO of {y}",
    "rel:ceo>ceo#2": "{x}'s tenure as CEO of {y}",
    "rel:ceo>member#0": "{x} was CEO of {y}", "rel:ceo>member#1": "leading {y} as CEO",
    "rel:ceo>member#2": "{x} was CEO of {y}",
    "rel:ceo>employer#0": "{x} was CEO of {y}", "rel:ceo>employer#1": "{x} was CEO of {y}",
    "rel:ceo>employer#2": "{x} was running {y} as CEO",
    **{f"rel:founded>ceo#{i}": "{y} was founded" for i in range(3)},
    "rel:event>ceo#0": "the {e}", "rel:event>ceo#1": "the {e} was held", "rel:event>ceo#2": "the {e} took place",
    "organiser>ceo@event#0": "it was held", "organiser>ceo@event#1": "the event", "organiser>ceo@event#2": "the {h}",
}

# Chains over every relation pair the world supports: (head type, tail type) per hop key; `ceo@now`
# is the CEO at the reference date. Cities are never heads, events never tails.
HOP_TYPES: dict[str, tuple[str, str]] = {
    "born": ("person", "city"), "educated": ("person", "university"), "employer": ("person", "org"),
    "spouse": ("person", "person"), "residence": ("person", "city"), "member": ("person", "club"),
    "founder": ("org", "person"), "hq": ("org", "city"), "ceo@now": ("org", "person"),
    "located": ("place", "city"), "organiser": ("event", "org"),
}
_PLACE = ("university", "club")
# Noun phrases of an inner hop ({x} = what it is about), one per phrasing index.
HOP_PHRASES: dict[str, tuple[str, str, str]] = {
    "educated": ("the university {x} attended", "the university where {x} studied", "the university that {x} went to"),
    "employer": ("the company {x} works for", "the employer of {x}", "the organisation that employs {x}"),
    "spouse": ("the spouse of {x}", "the person married to {x}", "the person {x} married"),
    "founder": ("the founder of {x}", "the person who founded {x}", "the person who set up {x}"),
    "member": ("the club {x} belongs to", "the club that {x} is a member of", "the club {x} joined"),
    "organiser": ("the organiser of {x}", "the organisation that organised {x}", "the company that ran {x}"),
    "ceo@now": ("the current CEO of {x}", "the person who currently leads {x}", "the person who runs {x} now"),
}
# The question asked about the last hop ({h} = the noun phrase of the hops before it).
LAST_HOP: dict[str, tuple[str, str, str]] = {
    "born": ("Where was {h} born?", "In which city was {h} born?", "What is the birthplace of {h}?"),
    "educated": ("Where did {h} study?", "Which university did {h} attend?", "At which university was {h} educated?"),
    "employer": ("Which company does {h} work for?", "Who is the employer of {h}?", "Which organisation employs {h}?"),
    "spouse": ("Who is {h} married to?", "Who is the spouse of {h}?", "Whom did {h} marry?"),
    "residence": ("Where does {h} live?", "In which city does {h} reside?", "Which city is the home of {h}?"),
    "member": ("Which club is {h} a member of?", "What club does {h} belong to?", "Which club did {h} join?"),
    "founder": ("Who founded {h}?", "Who is the founder of {h}?", "By whom was {h} founded?"),
    "hq": ("Where is {h} headquartered?", "In which city is {h} based?", "Where are the headquarters of {h}?"),
    "located": ("Where is {h} located?", "In which city is {h}?", "Which city is home to {h}?"),
    "ceo@now": ("Who is the current CEO of {h}?", "Who leads {h} as chief executive now?", "Who currently runs {h}?"),
}


def _fits(tail: str, head: str) -> bool:
    return tail == head or (head == "place" and tail in _PLACE)


def chain_groups(length: int) -> list[str]:
    """Every hop-key sequence of `length` whose types connect (`a>b>c`), except spouse>spouse."""
    out = []
    for keys in product(HOP_TYPES, repeat=length):
        if all(_fits(HOP_TYPES[a][1], HOP_TYPES[b][0]) for a, b in zip(keys, keys[1:])) \
                and HOP_TYPES[keys[-1]][1] != "event" and "spouse>spouse" not in ">".join(keys):
            out.append(">".join(keys))
    return out


def _compose(keys: list[str], i: int) -> str:
    phrase = "{h}"
    for key in keys[:-1]:
        phrase = HOP_PHRASES[key][i].replace("{x}", phrase)
    text = LAST_HOP[keys[-1]][i].replace("{h}", phrase)
    return text[0].upper() + text[1:]


for _group in chain_groups(2) + chain_groups(3):
    TEMPLATES.setdefault(_group, tuple(_compose(_group.split(">"), i) for i in range(3)))


def template_ids(group: str) -> list[str]:
    return [f"{group}#{i}" for i in range(len(TEMPLATES[group]))]


def is_heldout(template_id: str) -> bool:
    """True for phrasings reserved for evaluation (every third one of each group)."""
    return int(template_id.rsplit("#", 1)[1]) % 3 == 2


def render(template_id: str, **values: str) -> str:
    group, _, i = template_id.rpartition("#")
    return TEMPLATES[group][int(i)].format(**values)


def render_anchor(template_id: str, **values: str) -> str | None:
    """The anchoring clause of a succession / relative template, as the question states it."""
    anchor = ANCHORS.get(template_id)
    return None if anchor is None else anchor.format(**values)
