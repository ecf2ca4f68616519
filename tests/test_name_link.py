"""Name linking (`name_link`): the facts whose head a question names lead the first inject layer's
candidates; the index follows edits; `lookup` under the same config tries them first."""
import math

import numpy as np
import pytest
import torch

from kblampp.config import ConfigError, load_config
from kblampp.evaluation.lookup import best_fact, build_fact_table
from kblampp.evaluation.parsed_time import question_time
from kblampp.injection_wrapper import join_linked
from kblampp.kb_context import KBContext
from kblampp.name_link import NameIndex, names_head
from kblampp.retrieval import random_tensor_kb
from kblampp.schema import fact_from_dict
from kblampp.serving.model_answerer import KBModelAnswerer
from test_injection import D_CTX, D_K, D_V, make

HEADS = ["Troy Sims", "Alice Miller", "Acme Corp", "Troy Simson", "Alice Miller"]


def test_a_question_links_the_facts_whose_head_it_names():
    names = NameIndex(HEADS)
    assert names.link("Where did Troy Sims's sister live?") == [0]
    assert names.link("Who hired A. Miller in 1990?") == [1, 4]  # the initial form, both facts of the name
    assert names.link("Who founded Acme Corp and Troy Simson?") == [2, 3]  # each name once, longest first
    assert names.link("Who is Troy?") == []  # whole names only
    assert names.link("Who hired A. Miller?", limit=1) == [1]


def test_link_agrees_with_the_one_pair_check():
    names = NameIndex(HEADS)
    for q in ("Where did Troy Sims's sister live?", "Who hired A. Miller in 1990?", "Who is Troy?",
              "what did alice miller sell?", "Acme Corp's CEO in 2001?"):
        assert names.link(q) == [i for i, h in enumerate(HEADS) if names_head(q, h)]


def test_the_index_follows_adds_removals_and_deleted_facts():
    names = NameIndex(HEADS, alive=[True, False, True, True, True])
    assert names.link("Who hired Alice Miller?") == [4] and len(names) == 4
    names.remove(4)
    names.remove(99)  # unknown ids are ignored
    assert names.link("Who hired Alice Miller?") == []
    names.add(0, "Alice Miller")  # a replaced fact is re-indexed under its new head
    assert names.link("Who hired Alice Miller?") == [0] and names.link("Where is Troy Sims?") == []
    got = names.linked_ids(["Who hired Alice Miller?", "Who is Troy?", "Acme Corp or Troy Simson?"], limit=8)
    assert got.dtype == np.int64 and got.tolist() == [[0, -1], [-1, -1], [2, 3]]
    with pytest.raises(ValueError, match=r"name_link_limit: must be >= 1, got 0"):
        names.linked_ids(["x"], limit=0)


def test_join_linked_marks_searched_ones_and_skips_excluded():
    ids = torch.tensor([[[5, 7, -1]]])  # (B=1, T=1, P=3)
    linked = torch.tensor([[7, 9, 3, -1]])
    got, named = join_linked(ids, linked, excluded=torch.tensor([[3]]))
    assert got.tolist() == [[[5, 7, -1, -1, 9, -1, -1]]]
    assert named.tolist() == [[[False, True, False, False, True, False, False]]]


def far_links():
    """An inject layer, its input h (2, 3, d_model), the plain search's selection, and links for row 0
    to two facts the search does not return (row 1 names none)."""
    model = make("llama", k_top=4)
    layer = model.kb_layers["1"]
    h = torch.randn(2, 3, model.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain, _ = layer.select(h, request_with())
    far = [i for i in range(64) if i not in plain.cand_ids[0].tolist()][:2]
    return layer, h, plain, far, torch.tensor([far, [-1, -1]])


def test_linked_facts_lead_the_candidates_and_unlinked_rows_are_unchanged():
    """Row 0 names facts the search does not return: they are its candidates, best sem first, and the
    search fills the rest; row 1 names none: its candidates and alpha are the plain search's exactly,
    as is every row at a layer that does not read links (a later inject layer)."""
    layer, h, plain, far, linked = far_links()
    with torch.no_grad():
        assert layer.links_names  # the first (here the only) inject layer
        got, _ = layer.select(h, request_with(linked_ids=linked))
        layer.links_names = False
        off, _ = layer.select(h, request_with(linked_ids=linked))
    for t in range(3):
        assert set(got.cand_ids[0, t, :2].tolist()) == set(far)
        assert got.cand_ids[0, t, 2:].tolist() == plain.cand_ids[0, t, :2].tolist()
    assert torch.equal(got.cand_ids[1], plain.cand_ids[1]) and torch.equal(got.alpha[1], plain.alpha[1])
    assert torch.equal(off.cand_ids, plain.cand_ids) and torch.equal(off.alpha, plain.alpha)
    assert torch.allclose(got.alpha.sum(-1), torch.ones(2, 3))


def test_rows_with_forced_candidates_ignore_the_links():
    model = make("llama", k_top=4)
    layer = model.kb_layers["1"]
    h = torch.randn(2, 3, model.d_model, generator=torch.Generator().manual_seed(6))
    forced = torch.tensor([[10, 20], [-1, -1]])
    with torch.no_grad():
        before, _ = layer.select(h, request_with(forced_ids=forced))
        after, _ = layer.select(h, request_with(forced_ids=forced, linked_ids=torch.tensor([[30], [31]])))
    assert torch.equal(before.cand_ids[0], after.cand_ids[0])
    assert (after.cand_ids[1] == 31).sum(-1).tolist() == [1, 1, 1]  # the row without forced ids: linked


def test_linked_only_keeps_the_named_facts_and_leaves_other_rows_alone():
    """With `name_link_only` row 0 (names two facts) has exactly those as candidates, the other slots
    empty (-1, alpha 0); row 1 (names none) keeps the plain search's candidates and alpha exactly;
    a row with forced candidates keeps them."""
    layer, h, plain, far, linked = far_links()
    with torch.no_grad():
        layer.links_only = True
        got, _ = layer.select(h, request_with(linked_ids=linked))
        forced = torch.tensor([[10, 20], [-1, -1]])
        pinned, _ = layer.select(h, request_with(forced_ids=forced, linked_ids=linked))
        layer.links_only = False
        unpinned, _ = layer.select(h, request_with(forced_ids=forced))
    for t in range(3):
        assert set(got.cand_ids[0, t, :2].tolist()) == set(far)
        assert got.cand_ids[0, t, 2:].tolist() == [-1, -1]
    assert torch.equal(got.alpha[0, :, 2:], torch.zeros(3, 2))
    assert torch.allclose(got.alpha.sum(-1), torch.ones(2, 3))
    assert torch.equal(got.cand_ids[1], plain.cand_ids[1]) and torch.equal(got.alpha[1], plain.alpha[1])
    assert torch.equal(pinned.cand_ids[0], unpinned.cand_ids[0])


def test_name_link_only_needs_name_link(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name_link_only: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}: name_link_only: needs name_link: true"):
        load_config(path)
    path.write_text("name_link: true\nname_link_only: true\n", encoding="utf-8")
    assert load_config(path).name_link_only


def request_with(**kw):
    gen = torch.Generator().manual_seed(2)
    return KBContext(source=random_tensor_kb(64, D_K, D_V, D_CTX), e_q=torch.randn(2, D_CTX, generator=gen),
                     tau=torch.tensor([[18000.0, 18400.0], [math.nan, math.nan]]), **kw)


def test_gate_closed_equals_base_with_links():
    from tiny_models import TINY_MODELS

    model, base = make("llama"), TINY_MODELS["llama"]()
    x = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with model.kb_request(request_with(gate_closed=True, linked_ids=torch.tensor([[1], [2]]))):
            got = model(input_ids=x).logits
        want = base(input_ids=x).logits
    assert torch.equal(got, want)


def _fact(head, relation, tail):
    return fact_from_dict({"head": {"name": head}, "relation": {"name": relation}, "tail": {"name": tail},
                           "context": {"sent_span": f"{head} {relation} {tail}."},
                           "time_window": {"start": None, "end": None}})


def test_lookup_tries_the_named_facts_first():
    """The question's words name Troy Sims; an embedding that prefers Troy Simson's text (as a million
    similar names do) makes plain `lookup` copy the wrong tail, the linked one the right one."""
    facts = [_fact("Troy Sims", "works for", "Acme"), _fact("Troy Simson", "works for", "Globex")]
    vecs = {"Troy Sims works for": [0.6, 0.8], "Troy Simson works for": [1.0, 0.0]}
    table = build_fact_table(facts, lambda texts: np.asarray([vecs[t] for t in texts], np.float32))
    q = np.asarray([1.0, 0.0], np.float32)
    qt = question_time("Who does Troy Sims work for?")
    assert best_fact(table, q, qt)[0] == 1
    linked = NameIndex([f.head_name for f in facts]).link("Who does Troy Sims work for?")
    assert best_fact(table, q, qt, linked)[0] == 0


def test_name_link_limit_below_one_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name_link: true\nname_link_limit: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}: name_link_limit: must be >= 1, got 0$"):
        load_config(path)


class _EditedKB:
    """The LiveKB calls the answerer reads: slots with facts, None where deleted."""

    def __init__(self, heads):
        self.facts = [{"head": {"name": h}} for h in heads]
        self.dead: set[int] = set()

    def num_slots(self):
        return len(self.facts)

    def get(self, i):
        return None if i in self.dead else self.facts[i]


def test_the_served_links_follow_live_edits():
    model = make("llama")
    kb = _EditedKB(["Troy Sims", "Acme Corp"])
    answerer = KBModelAnswerer(model, None, kb, name_link_limit=8)
    assert answerer.linked_ids(["Where is Troy Sims?"]).tolist() == [[0]]
    kb.facts.append({"head": {"name": "Troy Sims"}})  # an added fact
    kb.dead.add(0)  # a deleted one
    kb.facts[1] = {"head": {"name": "Troy Sims"}}  # a replaced one
    assert answerer.linked_ids(["Where is Troy Sims?", "Acme Corp?"]).tolist() == [[1, 2], [-1, -1]]
    assert KBModelAnswerer(model, None, kb).linked_ids(["Where is Troy Sims?"]) is None  # off by default


def test_an_initial_a_is_a_word_not_an_article():
    """SQuAD's answer normalisation drops "a": "A. Sims" would become "sims" and name every Sims."""
    assert not names_head("Which city is Troy Sims's home?", "Annette Sims")
    assert names_head("Which city is A. Sims's home?", "Annette Sims")
    assert NameIndex(["Annette Sims", "Troy Sims"]).link("Which city is Troy Sims's home?") == [1]
    assert names_head("Who founded the Acme?", "Acme") and not names_head("Who founded Acme?", "The Acme")


def test_accents_and_a_trailing_qualifier_are_optional():
    """Real questions drop a page's accents and its disambiguation ("U-66 (1940)", "..., Berlin")."""
    assert names_head("Which nation did Sokolowsko belong to?", "Sokołowsko")
    assert names_head("Which club did Alan Baró join?", "Alan Baro")  # either side may carry them
    assert names_head("Who commanded German submarine U-66 in 1942?", "German submarine U-66 (1940)")
    assert names_head("What happened to Berlin's Palace of the Republic in 2006?", "Palace of the Republic, Berlin")
    assert not names_head("Where was Love shown?", "Love (Indianapolis)")  # one word left: too common to link
    assert names_head("Where was Love (Indianapolis) shown?", "Love (Indianapolis)")
    names = NameIndex(["German submarine U-66 (1940)", "German submarine U-66 (1917)", "Sokołowsko"])
    assert names.link("Who commanded German submarine U-66 (1940)?") == [0, 1]  # its own form first
    assert names.link("Who commanded German submarine U-66?") == [0, 1]
