"""st train refuses launches that shard the model (FSDP, DeepSpeed) instead of training them as something else."""

from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from pipeline.distributed import check_launcher
from pipeline.errors import ConfigError


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_a_sharded_launch_is_refused_with_the_way_out(kind, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ConfigError, match="without --use_fsdp / --use_deepspeed"):
        check_launcher(kind)


def test_an_fsdp_launch_on_cpus_is_refused_although_accelerate_runs_it_as_data_parallel(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="launched with FSDP"):
        check_launcher(DistributedType.MULTI_CPU)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_data_parallel_launches_run(kind, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    check_launcher(kind)
