"""A bounded load test against a running server (loopback only): C concurrent clients for D seconds
mixing questions and fact edits, then a check that every acknowledged edit is visible.

Each client owns the facts it adds (unique head names), so the expected final state is known: the
last acknowledged version of each, or deleted. Reports p50/p99 latency per kind, throughput, the
status codes seen, and lost edits (must be 0), with 5xx and transport errors counted apart.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np

QUESTIONS = ["Who is the chief executive officer of {h}?", "Where was {h} born?", "Who employed {h} in 2015?",
             "What is {h} known for?", "Who led {h} before 2010?"]


def _fact(head: str, version: int) -> dict:
    return {"head": {"id": None, "name": head, "type": "PERSON"}, "relation": {"id": None, "name": "born in"},
            "tail": {"id": None, "name": f"Loadtown {version}"},
            "context": {"source": "load_test", "sent_span": f"{head} was born in Loadtown {version}."},
            "time_window": {"start": f"{1950 + version % 50}", "end": None, "source": "load_test"}}


@dataclass
class LoadReport:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter = field(default_factory=Counter)
    transport_errors: int = 0
    lost_edits: int = 0
    checked_facts: int = 0
    elapsed_s: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500)

    @property
    def client_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if 400 <= code < 500)

    def summary(self) -> dict:
        out: dict = {"requests": sum(len(v) for v in self.latencies.values()), "elapsed_s": round(self.elapsed_s, 2),
                     "status_codes": dict(sorted(self.statuses.items())), "5xx": self.server_errors,
                     "4xx": self.client_errors, "transport_errors": self.transport_errors,
                     "lost_edits": self.lost_edits, "checked_facts": self.checked_facts}
        out["throughput_rps"] = round(out["requests"] / max(self.elapsed_s, 1e-9), 2)
        every = [x for v in self.latencies.values() for x in v]
        for name, values in [("all", every), *sorted(self.latencies.items())]:
            if values:
                out[f"{name}_p50_ms"] = round(float(np.percentile(values, 50)), 1)
                out[f"{name}_p99_ms"] = round(float(np.percentile(values, 99)), 1)
                out[f"{name}_count"] = len(values)
        return out


def check_loopback(url: str) -> None:
    """The load test only ever talks to this machine."""
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--url: the load test talks to loopback only (127.0.0.1), got host {host!r}")


async def _client(cid: int, http: httpx.AsyncClient, token: str, deadline: float, edit_fraction: float,
                  max_new_tokens: int, heads: list[str], report: LoadReport, expected: dict[int, dict | None],
                  rng: random.Random) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    mine: list[int] = []
    version = 0
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll >= edit_fraction:
            kind, method, path = "answer", "POST", "/v1/answer"
            body = {"question": rng.choice(QUESTIONS).format(h=rng.choice(heads)), "max_new_tokens": max_new_tokens}
        else:
            live = [i for i in mine if expected[i] is not None]
            op = rng.random()
            version += 1
            if not live or op < 0.5:
                kind, method, path, body = "add", "POST", "/v1/facts", _fact(f"Load Client {cid} Person {version}", version)
            elif op < 0.8:
                target = rng.choice(live)
                kind, method, path = "replace", "PUT", f"/v1/facts/{target}"
                body = _fact(expected[target]["head"]["name"], version)
            else:
                kind, method, path, body = "delete", "DELETE", f"/v1/facts/{rng.choice(live)}", None
        t0 = time.perf_counter()
        try:
            r = await http.request(method, path, json=body, headers=auth if kind != "answer" else None)
        except httpx.TransportError:
            report.transport_errors += 1
            continue
        report.latencies[kind].append((time.perf_counter() - t0) * 1000.0)
        report.statuses[r.status_code] += 1
        if r.status_code >= 300:
            continue
        if kind == "add":
            (idx,) = r.json()["indices"]
            mine.append(idx)
            expected[idx] = body
        elif kind == "replace":
            expected[int(path.rsplit("/", 1)[1])] = body
        elif kind == "delete":
            expected[int(path.rsplit("/", 1)[1])] = None


async def _verify(http: httpx.AsyncClient, expected: dict[int, dict | None], report: LoadReport) -> None:
    for idx, want in expected.items():
        r = await http.get(f"/v1/facts/{idx}")
        report.checked_facts += 1
        ok = r.status_code == 404 if want is None else (r.status_code == 200 and r.json()["fact"] == want)
        report.lost_edits += 0 if ok else 1


async def run_load(url: str, token: str, clients: int = 16, duration_s: float = 30.0, edit_fraction: float = 0.2,
                   max_new_tokens: int = 8, seed: int = 0, timeout_s: float = 120.0) -> LoadReport:
    """Run the load (bounded by `duration_s`; requests in flight finish within `timeout_s`)."""
    check_loopback(url)
    report = LoadReport()
    expected: dict[int, dict | None] = {}
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        stats = (await http.get("/v1/stats")).json()
        heads = sorted({e["head"] for e in (await http.post("/v1/answer", json={
            "question": "Who is the chief executive officer?", "top_k_evidence": 32, "max_new_tokens": 1})).json()["evidence"]})
        heads = heads or [f"fact {i}" for i in range(min(stats.get("N", 1), 10))]
        t0 = time.monotonic()
        deadline = t0 + duration_s
        await asyncio.gather(*[_client(c, http, token, deadline, edit_fraction, max_new_tokens, heads, report,
                                       expected, random.Random(seed * 1000 + c)) for c in range(clients)])
        report.elapsed_s = time.monotonic() - t0
        await _verify(http, expected, report)
    return report
