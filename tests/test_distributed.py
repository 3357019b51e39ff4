"""PPOMetrics.all_reduce across two CPU processes (gloo over loopback) equals the metrics of the whole batch."""

import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import compare_metrics

import esper_kernels as ek
from esper_kernels.synthetic import make_batch

pytestmark = [pytest.mark.reference, pytest.mark.slow]  # two processes start: about 10 s

LAYOUT = ek.HeadLayout(ek.ESPER_HEADS)
CONFIG = ek.PPOLossConfig(surrogate="per_head", normalize_entropy=True, entropy_coef=0.05, value_clip=0.2)
# (rows of rank 0, rows of rank 1): unequal shards; in the second case rank 0's steps are all absent (w = 0)
SPLITS = ((15, 22), (3, 34))


def _batch(case: int) -> dict:
    b = make_batch((37,), LAYOUT, seed=11 + case, absent_fraction=0.0)
    g = torch.Generator().manual_seed(case)
    w = torch.rand(37, generator=g) * 2.0  # float weights
    w[torch.rand(37, generator=g) < 0.15] = 0.0
    if case == 1:
        w[: SPLITS[case][0]] = 0.0
    b["weights"] = w
    b["old_values"] = b["values"] + 0.3 * torch.randn(37, generator=g)
    b["value_weights"] = torch.rand(37, generator=g)
    return b


def _rows(b: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in b.items()}


def _metrics(b: dict) -> dict:
    return ek.ppo_loss(**b, layout=LAYOUT, config=CONFIG, backend="reference", validate=False).metrics


def _worker(rank: int, port: int, out_dir: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = []
        for case, (n0, _n1) in enumerate(SPLITS):
            b = _batch(case)
            lo, hi = (0, n0) if rank == 0 else (n0, 37)
            m = _metrics(_rows(b, lo, hi))
            local = m.to_dict()
            assert m.all_reduce() is m
            results.append((local, m.to_dict()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_all_reduce_two_ranks_equals_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case, (n0, _n1) in enumerate(SPLITS):
        b = _batch(case)
        whole = _metrics(b).to_dict()
        local0, reduced0 = ranks[0][case]
        local1, reduced1 = ranks[1][case]
        assert local0["steps"] + local1["steps"] == whole["steps"]
        compare_metrics(reduced0, whole)
        compare_metrics(reduced1, whole)
        assert reduced0 == reduced1  # every rank holds the same statistics afterwards
        # the shards alone differ from the whole (the test would be vacuous otherwise)
        assert local1["loss"] != pytest.approx(whole["loss"])
        # and the merge is what PPOMetrics.merge gives in one process
        merged = ek.PPOMetrics.merge([_metrics(_rows(b, 0, n0)), _metrics(_rows(b, n0, 37))]).to_dict()
        compare_metrics(merged, whole)
