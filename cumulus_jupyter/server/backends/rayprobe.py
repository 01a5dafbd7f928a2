"""The start-up check of the Ray backend, run as a Ray job: does every node see the job root?

``python -m cumulus_jupyter.server.backends.rayprobe ROOT TOKEN`` runs one
task on each alive node, pinned there. Each reads ``ROOT/.probe/TOKEN``
(written by the server) and writes a file of its own next to it, which the
server then reads back: a node that sees another directory at that path (a
local disk instead of the shared one) fails one way or the other. The
findings are printed as one JSON line for the server.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

#: Prefix of the line the findings are printed on (the server looks for it).
PROBE_MARK = "cumulus-probe:"


def look(root: str, token: str, node: str) -> dict[str, Any]:
    """What one node sees of the job root."""
    probe = Path(root) / ".probe"
    found: dict[str, Any] = {"node": node, "ip": socket.gethostname(), "ok": False}
    try:
        if (probe / token).read_text() != token:
            found["problem"] = f"{probe / token} holds something else"
            return found
        (probe / f"{token}-{node}").write_text(node)
    except OSError as e:
        found["problem"] = f"{e.strerror or e}: {e.filename or probe}"
        return found
    found["ok"] = True
    return found


def main(argv: list[str]) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root, token = argv
    ray.init(log_to_driver=False)  # inside a Ray job: joins that job's cluster
    remote = ray.remote(num_cpus=0, max_retries=0)(look)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(root, token, n["NodeID"])
        for n in nodes
    ]
    results = []
    for n, ref in zip(nodes, refs, strict=True):
        try:
            result = ray.get(ref)
        except Exception as e:  # the node died, or its worker could not start
            result = {"node": n["NodeID"], "ok": False, "problem": f"{type(e).__name__}: {e}"}
        result["ip"] = n.get("NodeManagerAddress", result.get("ip"))
        results.append(result)
    print(PROBE_MARK + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
