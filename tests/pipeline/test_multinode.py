"""Multi-node: a head and two worker nodes with (logical) GPUs, via ray.cluster_utils.Cluster.

The model actors must land on the GPU nodes, decode tasks may run anywhere, and the output
must be the rows a single-node run writes. The GPUs are logical (this machine has none):
actors hold the reservation and, with --device auto, score on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_data import SAMPLE, TEST_MODEL, read_output

from iqray.jobs.score import ScoreConfig, run_score

COMPARED = ["key", "source_row", "prompt", "image_sha256", "quality", "alignment",
            "prompt_truncated", "status"]


def run(output, **kwargs):
    return run_score(ScoreConfig(input=str(SAMPLE), output=str(output), model=TEST_MODEL,
                                 progress=False, batch_size=8, decode_batch_size=4,
                                 folder_chunk_size=4,  # 8 shards: work to spread
                                 **kwargs), log=lambda *a: None)


@pytest.fixture()
def fresh_ray():
    """This test needs Ray to itself: stop the session's local Ray; later tests start
    their own again through ensure_ray."""
    import ray

    ray.shutdown()
    yield ray
    ray.shutdown()


def test_actors_run_on_gpu_nodes_and_output_matches_one_node(tmp_path, fresh_ray):
    from ray.cluster_utils import Cluster

    ray = fresh_ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    single = run(tmp_path / "single")
    ray.shutdown()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    gpu_nodes = {cluster.add_node(num_cpus=1, num_gpus=1).node_id for _ in range(2)}
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        assert ray.cluster_resources()["GPU"] == 2
        multi = run(tmp_path / "multi", ray_address=cluster.address, actor_num_cpus=0.25,
                    device="auto")
        model_nodes = multi.rows_per_node["model"]
        decode_nodes = multi.rows_per_node["decode"]
        # Model actors on the GPU nodes only; decode tasks spread over several nodes.
        assert set(model_nodes) <= gpu_nodes and sum(model_nodes.values()) == 32
        assert sum(decode_nodes.values()) == 32 and len(decode_nodes) >= 2
    finally:
        ray.shutdown()
        cluster.shutdown()

    one = read_output(None, single.outputs).select(COMPARED)
    many = read_output(None, multi.outputs).select(COMPARED)
    assert one.num_rows == many.num_rows == 32
    exact = [c for c in COMPARED if c not in ("quality", "alignment")]
    assert one.select(exact).equals(many.select(exact))
    # Scores: the same up to float summation order (other batches, other thread counts).
    for column in ("quality", "alignment"):
        np.testing.assert_allclose(many[column].to_numpy(), one[column].to_numpy(),
                                   rtol=0, atol=1e-6)
