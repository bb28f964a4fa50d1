"""``ray start`` for the tests' two-node cluster on one machine, on loopback only.

Ray 2.60 turns ``--node-ip-address 127.0.0.1`` into the machine's network address on Linux and
then listens on every interface; its loopback-only mode refuses to start a second node. The
tests' cluster keeps the given loopback address instead, so both nodes bind it (each node's
servers bind loopback when the node's address is loopback). Usage: ``python loopback_ray.py
start ...`` as ``ray start ...``.
"""

import sys

import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402

sys.argv[0] = "ray"
sys.exit(main())
