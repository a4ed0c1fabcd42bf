"""Many nodes: two nodes simulated on one machine (Lightning's `num_nodes`, `MASTER_ADDR`,
`NODE_RANK`, gloo), writing into one shared output folder, give what one process gives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import torch
from conftest import ROOT
from test_progress import assert_log_progress

from nti_lightning import Inversion


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_equal_one_process(tmp_path, one_process_fit):
    command = [sys.executable, "-m", "nti_lightning.cli", "fit", "--config", str(ROOT / "tests/configs/tiny.yaml"),
               "--trainer.logger", "false", "--data.manifest", str(one_process_fit.manifest), "--data.batch_size", "2"]

    # What a cluster's launcher gives each node: the same rendezvous, its own NODE_RANK.
    port = free_port()
    nodes = []
    started = time.monotonic()
    for node_rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NODE_RANK": str(node_rank)}
        nodes.append(subprocess.Popen(
            [*command, "--model.output_dir", "shared", "--trainer.num_nodes", "2", "--trainer.devices", "1",
             "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "true"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    # meanwhile the one process: this command (continuous scheduling, the default) in this process on one
    # thread (made once for the session; tests/test_dataset.py compares its DDP run with it too)
    one = one_process_fit("continuous")
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    (first_out, first_err), (second_out, second_err) = outputs
    assert "5 inverted, 0 skipped (already done), 0 failed" in first_out
    assert "inverted" not in second_out  # node 1 reports nothing: the summary is global rank 0's
    assert_log_progress(first_err, 5, time.monotonic() - started)

    for i in range(5):
        a = Inversion.load(one / f"img{i}.safetensors")
        b = Inversion.load(tmp_path / "shared" / f"img{i}.safetensors")
        # Equal here, but the nodes batch other images together than the single process does, and
        # batched kernels may round differently elsewhere: the DDP tests' tolerance.
        assert torch.allclose(a.z_T, b.z_T, atol=1e-5, rtol=0)
        assert torch.allclose(a.null_embeddings, b.null_embeddings, atol=1e-5, rtol=0)
        assert a.metadata["inner_iterations"] == b.metadata["inner_iterations"]
    assert (tmp_path / "shared" / "config.yaml").exists() and (tmp_path / "shared" / "report.json").exists()
