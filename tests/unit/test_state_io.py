"""Checkpoint state in safetensors + JSON: exact round trips, resumable optimizers and RNGs, and no pickle."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.train.optim import build_optimizer, optimizer_train_mode
from pipeline.train.state_io import (
    generator_state,
    load_optimizer_state,
    load_state,
    optimizer_state,
    rng_state,
    save_state,
    set_generator_state,
    set_rng_state,
)


def assert_same(a, b, path="/"):
    """Equal values of exactly the same Python types; tensors equal with the same dtype and shape."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), (path, k)
            assert_same(a[k], b[k], f"{path}{k}/")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}{i}/")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def test_nested_state_round_trips_exactly(tmp_path):
    state = {
        "ints": {0: torch.arange(5, dtype=torch.int64), 7: "seven", -1: None},
        "mixed": {1: 1.5, "1": 2, (1, "a"): [True, False], 2.5: "float key"},
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "fp16": torch.randn(2).half(),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.25),
        "scalar_int": torch.tensor(7, dtype=torch.int32),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "tuple": (0.9, 0.999, (1, 2), []),
        "list": [1, 2.0, "x", None, {"nested": (torch.ones(2),)}],
        "floats": [float("inf"), -float("inf"), -0.0, 1e-300, 0.1],
        "big": 2**70,
        "__st_tensor__": "a key that looks like a marker",
        "": {},
    }
    save_state(tmp_path / "state", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    loaded = load_state(tmp_path / "state")
    assert_same(state, loaded)
    nan = load_state_of(tmp_path, [float("nan")])
    assert nan[0] != nan[0]


def load_state_of(tmp_path, value):
    save_state(tmp_path / "v", value)
    return load_state(tmp_path / "v")


def test_shared_and_views_and_repeated_tensors(tmp_path):
    base = torch.arange(10.0)
    state = {"a": base, "b": base[2:5], "c": base, "d": base.view(2, 5)}
    loaded = load_state_of(tmp_path, state)
    for key in state:
        assert torch.equal(state[key], loaded[key])
    assert loaded["a"] is loaded["c"]  # one tensor referenced twice stays one tensor


def test_top_level_values_and_unsupported_types(tmp_path):
    assert load_state_of(tmp_path, (1, 2)) == (1, 2)
    assert torch.equal(load_state_of(tmp_path, torch.tensor([1, 2])), torch.tensor([1, 2]))
    assert load_state_of(tmp_path, {"n": np.float32(0.5), "i": np.int64(3)}) == {"n": 0.5, "i": 3}
    with pytest.raises(TypeError, match="set"):
        save_state(tmp_path / "bad", {"x": {1, 2}})
    with pytest.raises(TypeError, match="object"):
        save_state(tmp_path / "bad", [object()])


def test_mismatched_or_missing_files_are_input_errors(tmp_path):
    save_state(tmp_path / "a", {"x": torch.ones(1)})
    save_state(tmp_path / "b", {"x": torch.ones(1)})
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(InputError, match="different saves"):
        load_state(tmp_path / "a")
    (tmp_path / "b.json").unlink()
    with pytest.raises(InputError, match="b.json missing"):
        load_state(tmp_path / "b")


def test_files_are_only_json_and_safetensors(tmp_path):
    opt_params = [torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(opt_params)
    opt_params[0].grad = torch.ones(3)
    opt.step()
    save_state(tmp_path / "ckpt" / "optimizer", {"optimizer": optimizer_state(opt), "rng": rng_state()})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["optimizer.json", "optimizer.safetensors"]
    document = json.loads((tmp_path / "ckpt" / "optimizer.json").read_text())
    assert document["format"] == "st-state"
    header_len = int.from_bytes((tmp_path / "ckpt" / "optimizer.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "ckpt" / "optimizer.safetensors").read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["id"] == document["id"]


def loss_of(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    total = 0
    for p in params:
        target = torch.randn(p.shape, generator=gen)
        total = total + ((p.float() - target) ** 2 * torch.linspace(0.5, 2.0, p.numel()).reshape(p.shape)).sum()
    return total


def run_steps(opt, params, steps):
    for step in steps:
        optimizer_train_mode(opt)
        opt.zero_grad()
        loss_of(params, step).backward()
        opt.step()


@pytest.mark.parametrize("name,dtype", [("torch-adamw", torch.float32), ("adamw_bf16", torch.float32),
                                        ("adamw_bf16", torch.bfloat16), ("optimi-adamw", torch.float32),
                                        ("optimi-adamw", torch.bfloat16), ("optimi-lion", torch.float32),
                                        ("prodigy", torch.float32), ("prodigy", torch.bfloat16),
                                        ("adamw_schedulefree", torch.float32)])  # fmt: skip
def test_optimizer_resumes_bitwise(name, dtype, tmp_path):
    torch.manual_seed(0)
    inits = [torch.randn(4, 3).to(dtype), torch.randn(5).to(dtype)]

    def make(values):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        if name == "torch-adamw":
            return params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        config = Config(optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-2,
                        optimizer_config=None if name == "prodigy" else "weight_decay=0.1")  # fmt: skip
        return params, build_optimizer(params, config, device_type="cpu")

    params, opt = make(inits)
    run_steps(opt, params, range(3))
    save_state(tmp_path / "opt", {"optimizer": optimizer_state(opt), "rng": rng_state()})
    snapshot = [p.detach().clone() for p in params]
    run_steps(opt, params, range(3, 6))

    resumed_params, resumed = make(snapshot)
    state = load_state(tmp_path / "opt")
    load_optimizer_state(resumed, state["optimizer"])
    set_rng_state(state["rng"])  # adamw_bf16 rounds stochastically with the global torch generator
    run_steps(resumed, resumed_params, range(3, 6))
    for a, b in zip(params, resumed_params):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), resumed.state.values()):
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prodigy_resumes_bitwise_from_an_averaged_checkpoint(dtype, tmp_path):
    """SimpleTuner's prodigy (Prodigy-Plus-Schedule-Free) as the trainer checkpoints it: the averaged weights (eval
    mode) with z, p0, s, the factored second moments (fp32 with bf16 weights, p0 and s bf16 with fp32 weights) and the
    per-group d values; the resumed run equals the uninterrupted one bit for bit, state dtypes included."""
    from pipeline.train.optim import averaged_weights

    torch.manual_seed(0)
    inits = [torch.randn(40, 36).to(dtype), torch.randn(6).to(dtype)]

    def make(values):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        groups = [{"params": params[:1]}, {"params": params[1:]}]  # split_groups: d per group
        return params, build_optimizer(groups, Config(optimizer="prodigy", optimizer_config="d0=1e-4"),
                                       device_type="cpu")  # fmt: skip

    params, opt = make(inits)
    run_steps(opt, params, range(4))
    with averaged_weights(opt):
        save_state(tmp_path / "opt", {"optimizer": optimizer_state(opt), "rng": rng_state()})
        snapshot = [p.detach().clone() for p in params]
    run_steps(opt, params, range(4, 8))

    resumed_params, resumed = make(snapshot)
    state = load_state(tmp_path / "opt")
    load_optimizer_state(resumed, state["optimizer"])
    set_rng_state(state["rng"])  # bf16 weights round stochastically with the global torch generator
    assert resumed.param_groups[0]["train_mode"] is False
    run_steps(resumed, resumed_params, range(4, 8))  # run_steps puts it back in train mode first, as the trainer
    assert opt.param_groups[0]["d"] > 1e-4 and opt.param_groups[0]["k"] == 9
    for key in ("d", "d_numerator", "k", "weight_sum"):
        assert [g[key] for g in opt.param_groups] == [g[key] for g in resumed.param_groups], key
    for a, b in zip(params, resumed_params):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b)
    big = opt.state[params[0]]
    assert big["p0"].dtype == torch.bfloat16 and big["exp_avg_sq_row"].dtype == torch.float32
    for a, b in zip(opt.state.values(), resumed.state.values()):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_loading_into_a_different_optimizer_is_an_input_error(tmp_path):
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW(params)
    save_state(tmp_path / "o", optimizer_state(opt))
    other = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(InputError, match="does not fit"):
        load_optimizer_state(other, load_state(tmp_path / "o"))


def draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(4).tolist(), torch.randn(2).tolist())  # fmt: skip


def test_rng_state_round_trip_reproduces_numbers(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw()
    np.random.randn(1)  # leave a cached gaussian in numpy's state
    save_state(tmp_path / "rng", rng_state())
    expected = draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_state(tmp_path / "rng"))
    assert draw() == expected


def test_generator_state_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    torch.rand(3, generator=g)
    save_state(tmp_path / "g", {"sampler": generator_state(g)})
    expected = torch.rand(8, generator=g)
    g2 = torch.Generator().manual_seed(0)
    set_generator_state(g2, load_state(tmp_path / "g")["sampler"])
    assert torch.equal(torch.rand(8, generator=g2), expected)


def test_module_never_unpickles():
    import inspect

    import pipeline.train.state_io as state_io

    source = inspect.getsource(state_io)
    assert "torch.load(" not in source and "import pickle" not in source and "pickle.load" not in source
