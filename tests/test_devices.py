"""GPU-path choices that must hold on a cluster, checked here with CUDA mocked where needed."""

import pytest
import torch

from distlm.config import load_config
from distlm.metrics.mfu import device_peak_flops
from distlm.parallel.distributed import pick_device
from distlm.train.engine import build_optimizer, deepspeed_config
from distlm.config import batch_layout


def test_auto_picks_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="train.device=cuda"):
        pick_device("cuda", 0)


def test_each_local_rank_gets_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("auto", 3) == torch.device("cuda", 3)
    assert pick_device("cpu", 0) == torch.device("cpu")


def test_a_process_that_sees_one_gpu_uses_it_whatever_its_local_rank(monkeypatch):
    # srun --gpus-per-task=1: every task sees its own GPU as device 0.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto", 5) == torch.device("cuda", 0)


def test_more_ranks_than_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match="local rank 2 has no GPU of its own.*CUDA_VISIBLE_DEVICES=0,1.*at most 2"):
        pick_device("auto", 2)


def test_known_gpus_have_a_bf16_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert device_peak_flops(cuda, "bf16") == 989e12
    assert device_peak_flops(cuda, "fp32") is None
    assert device_peak_flops(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert device_peak_flops(cuda, "bf16") == 362e12  # not the L4's peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert device_peak_flops(cuda, "bf16") is None


def test_adamw_is_fused_on_cuda_and_foreach_on_cpu():
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    cfg = load_config(None, [])
    assert build_optimizer([{"params": params}], cfg, torch.device("cuda", 0)).defaults.get("fused") is True
    on_cpu = build_optimizer([{"params": params}], cfg, torch.device("cpu")).defaults
    assert not on_cpu.get("fused") and on_cpu.get("foreach") is True


def test_deepspeed_config_follows_distlm_config_and_passthrough():
    cfg = load_config(None, ["data.path=x", "train.batch_size=32", "train.micro_batch_size=4",
                             "parallel.zero_stage=2", "train.precision=bf16", "optim.grad_clip=0.5",
                             "deepspeed.zero_optimization.reduce_bucket_size=1000000"])
    ds = deepspeed_config(cfg, batch_layout(cfg, 2))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 4)
    # reduce each gradient slice to its owner, not all-reduce everything (1.5x the bytes)
    # (and overlap that with the backward pass); the user's deepspeed: section merged on top
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "use_multi_rank_bucket_allreduce": False,
                                       "reduce_bucket_size": 1000000}
    no_overlap = load_config(None, ["data.path=x", "parallel.zero_stage=1",
                                    "deepspeed.zero_optimization.overlap_comm=false"])
    assert deepspeed_config(no_overlap, batch_layout(no_overlap, 2))["zero_optimization"]["overlap_comm"] is False
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}  # bf16 gradients summed in fp32
    # plain fp32: DeepSpeed clips at the step, through distlm's clip_fp32_gradients (engine.py)
    plain = load_config(None, ["data.path=x", "optim.grad_clip=0.5"])
    assert deepspeed_config(plain, batch_layout(plain, 1))["gradient_clipping"] == 0.5
    assert "pipeline" not in deepspeed_config(plain, batch_layout(plain, 1))
    piped = load_config(None, ["data.path=x", "parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"])
    assert deepspeed_config(piped, batch_layout(piped, 8))["pipeline"] == {"pipe_partitioned": False,
                                                                          "grad_partitioned": False}
