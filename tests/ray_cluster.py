"""A two-node Ray cluster on 127.0.0.1 for the tests, run as a child process of the test.

``python tests/ray_cluster.py TEMP_DIR`` starts a head node and a second node with the
custom resource ``node2`` (``ray.cluster_utils.Cluster``: every Ray process it starts is its
own child, and only those are stopped), prints one JSON line ``{"address": ...}``, then
reads commands from stdin: ``stop-node2`` removes the second node (its raylet and workers
are killed, as when a machine goes away) and answers ``{"stopped": "node2"}``; EOF or
SIGTERM shuts the whole cluster down.

Settings, from the environment the test gives it: ``RAY_AUTH_MODE=token`` with
``RAY_AUTH_TOKEN`` (Ray 2.60 turns token authentication on by default; here it is set
explicitly, so no token file is written under ``~``), ``RAY_USAGE_STATS_ENABLED=0``, and
``RAY_TMPDIR`` = TEMP_DIR. Ray's own loopback rewriting (it replaces 127.0.0.1 by the
machine's interface address on Linux) is turned off with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which must be set before ray is imported: every
process of this cluster binds and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from ray.cluster_utils import Cluster  # (after the environment above)

CPUS_PER_NODE = 16  # scheduling slots, not cores: instances mostly wait on sockets


def main() -> None:
    temp_dir = sys.argv[1]
    # Ray writes the cluster's address under $RAY_TMPDIR/ray: here, not in the shared /tmp/ray.
    os.makedirs(os.path.join(os.environ.get("RAY_TMPDIR", temp_dir), "ray"), exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below
    common = {
        "node_ip_address": "127.0.0.1",
        "num_cpus": CPUS_PER_NODE,
        "object_store_memory": 80 * 1024 * 1024,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**common, "temp_dir": temp_dir, "include_dashboard": False},
    )
    try:
        node2 = cluster.add_node(**common, resources={"node2": CPUS_PER_NODE})
        print(json.dumps({"address": cluster.address}), flush=True)
        for line in sys.stdin:
            if line.strip() == "stop-node2":
                cluster.remove_node(node2, allow_graceful=False)
                print(json.dumps({"stopped": "node2"}), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
