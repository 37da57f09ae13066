"""Run by test_train.py in its own process: a 3-node Ray cluster on this machine
(ray.cluster_utils.Cluster: a 1-CPU head and two 1-CPU worker nodes), training with one
worker per node; with --remove-node, a worker node hosting a training worker is removed after
the first checkpoint and a replacement added, and training must still end at exactly the
configured step."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util import placement_group_table

from flows.config import load_config
from tasks.preprocess import preprocess
from tasks.train import run_training

root, remove = sys.argv[1], "--remove-node" in sys.argv
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="WARNING")
sets = [
    "model.base_channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "train.batch_size=16", "train.warmup_steps=2",
    "diffusion.T=100", "train.num_workers=2", "train.steps=60", "train.checkpoint_every=20",
    "train.log_every=20", "train.run_name=multinode", "train.max_failures=3",
    "train.placement_strategy=SPREAD",
]
cfg = load_config(sets=sets, root=root)
preprocess(cfg.data, cfg.runtime, echo=lambda s: None)
run_dir = Path(root) / "runs" / "multinode"


def chaos():
    """Remove a worker node that hosts a training worker (the head also has a CPU, so SPREAD
    may have put one of the two workers there) once the first checkpoint is committed."""
    while not list(run_dir.glob("checkpoint_*/state.json")):
        time.sleep(0.2)
    # the worker group's placement group (2 bundles, one per worker) says where they run
    hosting = {node for pg in placement_group_table().values() if pg["state"] == "CREATED"
               and len(pg["bundles"]) == 2 for node in pg["bundles_to_node_id"].values()}
    victim = next(n for n in nodes if n.node_id in hosting)
    print(f"CHAOS removing node {victim.node_id[:8]} (training workers on "
          f"{sorted(h[:8] for h in hosting)})", flush=True)
    cluster.remove_node(victim)
    cluster.add_node(num_cpus=1)


if remove:
    threading.Thread(target=chaos, daemon=True).start()
res = run_training(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime, echo=print)
alive = [n for n in ray.nodes() if n["Alive"]]
print("RESULT " + json.dumps({"metrics": res.metrics, "alive_nodes": len(alive)}))
ray.shutdown()
with contextlib.suppress(AttributeError):  # Ray 2.60 trips over the node it removed
    cluster.shutdown()
