"""A Locust scenario with the mix of a real client of the sample app.

Each simulated user is one browser-like client: it keeps its ``sid`` cookie and comes back to
``/session`` (the count must go up by exactly one per visit, whichever worker or pod answers),
reads items mostly from a small hot set (the per-worker LRU's case), sometimes writes one
(which invalidates it in every worker's cache), and now and then calls ``/slow``. Between
requests it thinks, as people do.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000
    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 60s \
        --host http://127.0.0.1:8000 --csv out/run --only-summary

Environment (all optional): LOADTEST_ITEMS (distinct item ids, default 200),
LOADTEST_THINK_MIN / LOADTEST_THINK_MAX (seconds between a user's requests, default 0.5 / 2),
LOADTEST_SLOW_MAX_MS (longest /slow, default 300).
"""

from __future__ import annotations

import json
import os
import random
import urllib.request
from typing import Any

from locust import HttpUser, between, events, task
from locust.runners import WorkerRunner

ITEMS = int(os.environ.get("LOADTEST_ITEMS", "200"))
THINK_MIN = float(os.environ.get("LOADTEST_THINK_MIN", "0.5"))
THINK_MAX = float(os.environ.get("LOADTEST_THINK_MAX", "2.0"))
SLOW_MAX_MS = int(os.environ.get("LOADTEST_SLOW_MAX_MS", "300"))
# Four reads in five go to this share of the items: a hot set, as real catalogues have.
HOT_FRACTION = 0.1


def item_id() -> str:
    """An item id, skewed: 80% of reads hit the hottest 10% of the ids."""
    hot = max(1, int(ITEMS * HOT_FRACTION))
    if random.random() < 0.8:
        return f"item-{random.randrange(hot)}"
    return f"item-{random.randrange(ITEMS)}"


@events.test_start.add_listener
def seed_items(environment: Any, **_kwargs: Any) -> None:
    """Write every item once before the users start, so a read of any id finds it (a 404
    would be a failure). Runs once, on the master or the single local runner."""
    if environment.host is None or isinstance(environment.runner, WorkerRunner):
        return
    for n in range(ITEMS):
        body = json.dumps({"id": n, "version": 0}).encode()
        request = urllib.request.Request(
            f"{environment.host.rstrip('/')}/items/item-{n}", data=body, method="PUT",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


class SampleAppClient(HttpUser):
    wait_time = between(THINK_MIN, THINK_MAX)

    def on_start(self) -> None:
        self.visits = 0
        self.visit_session()

    @task(15)
    def visit_session(self) -> None:
        with self.client.get("/session", name="/session", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            count = response.json()["count"]
            # The session lives in the shared store: any worker must continue it exactly.
            if count != self.visits + 1:
                response.failure(f"session count {count}, expected {self.visits + 1}")
            self.visits = count

    @task(70)
    def read_item(self) -> None:
        self.client.get(f"/items/{item_id()}", name="/items/[id] GET")

    @task(8)
    def write_item(self) -> None:
        ident = item_id()
        body = {"id": ident, "version": random.randrange(1 << 30)}
        self.client.put(f"/items/{ident}", json=body, name="/items/[id] PUT")

    @task(5)
    def home(self) -> None:
        self.client.get("/", name="/")

    @task(2)
    def slow(self) -> None:
        ms = random.randint(50, SLOW_MAX_MS)
        self.client.get(f"/slow?ms={ms}", name="/slow")
