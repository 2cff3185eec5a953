#!/usr/bin/env python3
"""A scenario's held-out messages (never sent as traffic) as a task suite
for `flywheel suites add`: each reply must pass the item's checks.

    scripts/scenario-task-suite.py SCENARIO.json OUT.json [--structured]

With --structured every item carries the scenario's `response_format`, so
the gate scores answers the way they are served when clients send it.
"""
import json
import sys

s = json.load(open(sys.argv[1]))
structured = "--structured" in sys.argv[3:]
suite = {
    "name": "support-routing-heldout",
    "description": "The scenario's held-out messages (never sent as traffic): the reply must name the right intent and order id.",
    "source": sys.argv[1],
    "license": "Apache-2.0",
    "defaults": {"max_tokens": s["max_tokens"], "temperature": 0},
    "items": [
        {"id": f"heldout-{i}",
         "messages": [{"role": "system", "content": s["system"]},
                      {"role": "user", "content": it["user"]}],
         "checks": it["checks"],
         **({"response_format": s["response_format"]} if structured else {})}
        for i, it in enumerate(s["heldout"])
    ],
}
json.dump(suite, open(sys.argv[2], "w"), indent=1)
