"""Entrypoint for ``ray job submit``: the srdistill main job on a running Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env-json '{...}' -- \
        python ray_jobs/distill.py --input /data/T91 --out /runs/demo --preset demo --config my.yaml

Takes the same options as ``srdistill run``. Under ``ray job submit`` the driver finds the
cluster through ``$RAY_ADDRESS``; run directly, it starts a local Ray (the embedded default).
The runtime env: README, "On a Ray cluster"; tested by ``tests/run/test_ray_cluster.py``.
"""

import sys

from srdistill.cli import app

if __name__ == "__main__":
    sys.exit(app(["run", *sys.argv[1:]]))
