"""Run as ``python -m tests.node_loss POOL WEIGHTS OUT``: score POOL on a 3-node Ray cluster and lose a node.

A process can join only one Ray cluster, so this runs apart from the test session's: a head and two
worker raylets on this machine (``ray.cluster_utils.Cluster``), 2 scorer actors. The head has no CPUs
(it runs only this driver), so both scorers and the read tasks run on the worker nodes: whichever
scorer starts first is on a node that can be lost. Once a scorer has finished a batch and started
another, its whole node is killed (raylet, object store, workers: SIGKILL). WEIGHTS holds
``{"state_dict", "grad_sum", "exclude_ids"}``; OUT (.npz) gets the query (ids, scores, num_scored), whether
a node was lost, and the scorer actors' restart counts.
"""

from __future__ import annotations

import sys

import numpy as np
import ray
import torch
from ray._private import state as ray_state
from ray.cluster_utils import Cluster

from ray_dal.config import ModelConfig, ScoringConfig
from ray_dal.pipeline.pool_scoring import score_pool
from ray_dal.pipeline.runtime import set_no_progress_timeout

from .faults import KillMidScoring, descendants, is_scorer

# Small batches (~225): scoring keeps the scorers busy 2-3 s more after the first has been busy the 0.5 s that
# KillMidScoring waits for; with batches of 32 and a 1-CPU head it was 0.2-0.8 s here (2 loaded cores), in CI once none.
SCORING = ScoringConfig(num_scorers=2, batch_size=8)
BUDGET = 50
FAST_NODE_DEATH = {  # notice a dead node in ~2 s instead of ~30 s
    "health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def main(pool: str, weights: str, out: str) -> None:
    # 2 CPUs a worker node: a 0.5-CPU scorer and a 1-CPU read task fit together, and after the loss the
    # surviving node holds both scorers and any read re-run for a block the lost node's object store held.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_NODE_DEATH})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    set_no_progress_timeout(120)
    saved = torch.load(weights, weights_only=True)

    def scorers_on_workers() -> dict:
        return {pid: node for node in workers if node in cluster.worker_nodes
                for pid in descendants(node.all_processes["raylet"][0].process.pid) if is_scorer(pid)}

    def lose_node(pid: int, node) -> None:
        cluster.remove_node(node, allow_graceful=False)

    with KillMidScoring(scorers_on_workers, lose_node) as fault:
        query = score_pool(pool, model_cfg=ModelConfig(), state_dict=saved["state_dict"], grad_sum=saved["grad_sum"],
                           scoring_cfg=SCORING, budget=BUDGET, exclude_ids=saved["exclude_ids"].numpy(), seed=0)
    restarts = [a["NumRestarts"] for a in ray_state.actors().values()
                if a["ActorClassName"] == "ScorerActor" or "PoolScorer" in a["ActorClassName"]]
    np.savez(out, ids=query.ids, scores=query.scores, num_scored=query.num_scored,
             node_lost=fault.killed is not None, restarts=np.array(restarts, np.int64))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
