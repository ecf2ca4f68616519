"""offline/sanity_check_5tuple.py (kblampp.sanity): exact messages and exit codes per kind of bad line."""
from __future__ import annotations

import json
import subprocess
import sys

from kblampp import sanity
from kblampp.schema import Problem


def _good_fact(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "good_5tuple.jsonl").read_text(encoding="utf-8").splitlines()[0])


def _variant(base: dict, path: str, value) -> str:
    obj = json.loads(json.dumps(base))
    *parents, leaf = path.split(".")
    node = obj
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return json.dumps(obj)


def run(capsys, argv):
    code = sanity.main([str(a) for a in argv])
    captured = capsys.readouterr()  # problems on stdout, an error line on stderr
    return code, (captured.out + captured.err).splitlines()


def test_clean_files_exit_0_with_one_line(capsys, fixtures_dir):
    code, out = run(capsys, [fixtures_dir / "good_5tuple.jsonl"])
    assert (code, out) == (0, [f"{fixtures_dir / 'good_5tuple.jsonl'}: OK, 3 facts (2 with a time window)"])
    facts = fixtures_dir / "good_5tuple.jsonl"
    code, out = run(capsys, [fixtures_dir / "good_qa.jsonl", "--facts", facts])
    assert code == 0
    assert out == [f"{fixtures_dir / 'good_qa.jsonl'}: OK, 3 questions (1 single-hop, 1 multi-hop, 1 temporal), "
                   f"indices checked against {facts} (3 facts)"]


def test_every_kind_of_bad_5tuple_line(capsys, fixtures_dir, write_lines):
    good = _good_fact(fixtures_dir)
    path = write_lines("bad.jsonl", [
        json.dumps(good),
        _variant(good, "relation", KeyError),                    # missing field
        _variant(good, "head", "BrightSky Robotics"),            # wrong type
        _variant(good, "tail.name", "   "),                      # blank name
        _variant(good, "time_window.start", "March 2019"),       # unparsable date
        _variant(good, "time_window.end", "2018-12"),            # inverted window
        '{"head": {"id": "E001", "name": "Bright',               # truncated line
        b'{"head": {"id": "E001", "name": "Bright\xffSky"}}',     # not UTF-8
        _variant(good, "head.name", ""),                         # empty name
    ])
    code, out = run(capsys, [path, "--kind", "5tuple"])
    assert code == 1
    assert out == [
        f"{path}:2: relation: missing field",
        f"{path}:3: head: expected an object, got str",
        f"{path}:4: tail.name: empty name",
        f"{path}:5: time_window.start: unparsable date 'March 2019' (expected YYYY, YYYY-MM or YYYY-MM-DD)",
        f"{path}:6: time_window.end: window ends (2018-12) before it starts (2019-03-02)",
        f"{path}:7: <line>: truncated JSON (Unterminated string starting at column 33)",
        f"{path}:8: <line>: not valid UTF-8 (byte 39)",
        f"{path}:9: head.name: empty name",
        f"8 problem(s) in {path}",
    ]


def test_bad_qa_lines(capsys, fixtures_dir, write_lines):
    lines = (fixtures_dir / "good_qa.jsonl").read_text(encoding="utf-8").splitlines()
    q0 = json.loads(lines[0])
    path = write_lines("qa.jsonl", [
        lines[0],
        lines[0],                                                              # duplicate qid
        json.dumps({**q0, "qid": "Q9", "supporting_facts": [1, 7]}),          # index out of range
        json.dumps({k: v for k, v in q0.items() if k != "answer"} | {"qid": "Q10"}),  # missing field
        json.dumps({**q0, "qid": "Q11", "question_time": {"start": "2015", "end": "2014"}}),
        json.dumps({**q0, "qid": "Q12", "answer_fact": 0}),                   # answer_fact not last
    ])
    code, out = run(capsys, [path, "--facts", fixtures_dir / "good_5tuple.jsonl"])
    assert code == 1
    assert out == [
        f"{path}:2: qid: duplicate qid 'Q0001' (first on line 1)",
        f"{path}:3: supporting_facts: index 7 out of range (0..2)",
        f"{path}:4: answer: missing field",
        f"{path}:5: question_time.end: window ends (2014) before it starts (2015)",
        f"{path}:6: answer_fact: 0 is not the last of supporting_facts",
        f"5 problem(s) in {path}",
    ]
    # without --facts the range cannot be checked: only the other problems remain
    code, out = run(capsys, [path, "--kind", "qa"])
    assert code == 1 and len(out) == 5 and not any("out of range" in line for line in out)


def test_kind_detection_and_errors(capsys, fixtures_dir, write_lines, tmp_path, monkeypatch):
    assert sanity.detect_kind(fixtures_dir / "good_5tuple.jsonl") == "5tuple"
    assert sanity.detect_kind(fixtures_dir / "good_qa.jsonl") == "qa"
    assert sanity.detect_kind(tmp_path) == "store"
    odd = write_lines("odd.jsonl", ['{"x": 1}'])
    code, out = run(capsys, [odd])
    assert (code, out) == (2, [f"error: {odd}: cannot tell the kind (no line looks like a 5-tuple or a QA record); "
                               "pass --kind"])
    code, out = run(capsys, [tmp_path / "missing.jsonl"])
    assert (code, out) == (2, [f"error: {tmp_path / 'missing.jsonl'}: no such file or folder"])
    monkeypatch.delitem(sanity.CHECKERS, "store", raising=False)
    code, out = run(capsys, [tmp_path])  # a folder is a store; without a store checker that is an error
    assert (code, out) == (2, ["error: unknown kind 'store' (known: 5tuple, qa)"])


def test_registered_checker_is_dispatched(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sanity.CHECKERS, "store", lambda path, options: sanity.CheckResult(
        "store", str(path), [Problem(0, "manifest.json", "missing file")], "unused"))
    code, out = run(capsys, [tmp_path, "--kind", "store"])
    assert (code, out) == (1, [f"{tmp_path}:0: manifest.json: missing file", f"1 problem(s) in {tmp_path}"])


def test_script_exit_codes(repo_root, fixtures_dir, write_lines):
    script = repo_root / "offline" / "sanity_check_5tuple.py"
    ok = subprocess.run([sys.executable, script, fixtures_dir / "good_5tuple.jsonl"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK, 3 facts (2 with a time window)")
    bad = write_lines("b.jsonl", ['{"head": 1}'])
    res = subprocess.run([sys.executable, script, bad], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stdout.splitlines()[0] == f"{bad}:1: head: expected an object, got int"
    help_run = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "--facts" in help_run.stdout
