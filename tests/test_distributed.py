"""torchrun: two gloo ranks on the CPU, with each loader; shards, weights in sync, rank 0 alone writes; a dying rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import build_loader, decode_index, indexed_images

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 301, 101  # odd: the two shards differ by one image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(port: int, out: Path, data: str, *args: str, popen: bool = False):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "train",
        "--device",
        "cpu",
        "--data-dir",
        data,
        "--allow-small-data",
        "--batch-size",
        "64",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(out),
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TRAIN_DIST_TIMEOUT_S": "60"}
    if popen:
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def odd_cifar(tmp_path_factory) -> str:
    from conftest import smooth_images

    from pipeline.data import write_cifar10

    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    write_cifar10(
        root,
        smooth_images(N_TRAIN, seed=1),
        rng.integers(0, 10, N_TRAIN),
        smooth_images(N_TEST, seed=2),
        rng.integers(0, 10, N_TEST),
    )
    return str(root)


@pytest.mark.parametrize("loader", ["cpu", "dali"])
def test_two_rank_run(loader, odd_cifar, tmp_path):
    out = tmp_path / "run"
    result = torchrun(free_port(), out, odd_cifar, "--loader", loader, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["env"]["world_size"] == 2
    for epoch in metrics["epochs"]:
        assert epoch["images"] == N_TRAIN  # summed over ranks: every training image once
        assert epoch["test_images"] == N_TEST  # the test accuracy is over every test image exactly once
        assert epoch["ranks_in_sync"] is True  # DDP kept the weights identical on both ranks
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        "best.pt",
        "confusion.png",
        "curves.png",
        "last.pt",
        "metrics.json",
        "misclassified.png",
        "predictions.npz",
    ]  # one set of outputs: nothing per rank
    predictions = np.load(out / "predictions.npz")
    assert len(predictions["labels"]) == N_TEST  # rank 0 predicted every test image once
    assert result.stdout.count("epoch 1/2:") == 1  # rank 0 alone reports


def _rank_main(rank: int, port: int, variant: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        images, labels = indexed_images(N_TRAIN), np.arange(N_TRAIN) % 10
        seen = []
        for epoch in range(2):
            loader = build_loader(variant, images, labels, 32, rank=rank, world_size=2, train=False, seed=4)
            loader.set_epoch(epoch)
            seen.append(np.concatenate([decode_index(x) for x, _ in loader]).tolist())
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, seen)
        torch.manual_seed(rank)  # different initial weights on purpose: DDP must broadcast rank 0's
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(12, 3))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            net(torch.randn(8, 12)).square().mean().backward()  # different data per rank
            optimizer.step()
        weights = [None, None]
        torch.distributed.all_gather_object(weights, [p.detach().numpy() for p in net.parameters()])
        if rank == 0:
            queue.put((gathered, weights))
        torch.distributed.barrier()  # as train.run does: nobody disconnects while the other still talks
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("variant", ["cpu", "dali-per-image"])
def test_ranks_read_disjoint_shards_that_cover_the_data(variant):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank_main, args=(free_port(), variant, queue), nprocs=2, start_method="spawn")
    (rank0, rank1), weights = queue.get()
    for epoch in range(2):
        a, b = set(rank0[epoch]), set(rank1[epoch])
        assert len(a) == len(rank0[epoch]) and len(b) == len(rank1[epoch])  # no repeats within a shard
        assert not a & b and a | b == set(range(N_TRAIN))
    assert rank0[0] != rank0[1]  # reshuffled per epoch, the same way on both ranks
    for p0, p1 in zip(*weights, strict=True):
        np.testing.assert_array_equal(p0, p1)


def _child_pids(parent: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_dying_rank_ends_the_job_and_the_port_is_reusable(odd_cifar, tmp_path):
    port = free_port()
    proc = torchrun(port, tmp_path / "killed", odd_cifar, "--loader", "cpu", "--epochs", "200", popen=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "killed" / "metrics.json").exists():
            assert time.time() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.5)
        ranks = {}
        for pid in _child_pids(proc.pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for item in environ:
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = pid
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)  # no hang: torchrun notices and ends the job
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "exitcode" in stderr and "-9" in stderr  # torchrun names the rank that died and how
    for pid in ranks.values():  # the job is over: no rank may linger (a hung survivor would be the bug)
        deadline = time.time() + 30
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
            assert time.time() < deadline, f"rank process {pid} outlived the job"
            time.sleep(0.2)
    again = torchrun(port, tmp_path / "again", odd_cifar, "--loader", "cpu", "--epochs", "1")
    assert again.returncode == 0, again.stderr[-6000:]
