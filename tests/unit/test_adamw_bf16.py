"""st's adamw_bf16 computes SimpleTuner's AdamWBF16 step (helpers/training/optimizers/adamw_bfloat16).

`simpletuner_step` below is SimpleTuner's `step` / `_make_step` and its stochastic helpers written out in torch:
st's optimizer must reproduce it bit for bit on fp32 weights, on bf16 weights rounded to nearest, and on bf16 weights
rounded stochastically when both draw the same random bits; and stochastic rounding must be right on average.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Config
from pipeline.train.optim import AdamWBF16, build_optimizer
from pipeline.train.state_io import load_optimizer_state, load_state, optimizer_state, save_state

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-6, 0.3  # a large lr * wd, so the deferred decay fires within the test


def st_copy_stochastic_(target, source):  # SimpleTuner's stochastic/__init__.py copy_stochastic_
    result = torch.randint_like(source, dtype=torch.int32, low=0, high=(1 << 16))
    result.add_(source.view(dtype=torch.int32))
    result.bitwise_and_(-65536)
    target.copy_(result.view(dtype=torch.float32))


def simpletuner_step(p, grad, state, stochastic):
    """SimpleTuner's AdamWBF16 step for one parameter, its state created as SimpleTuner creates it."""
    put = st_copy_stochastic_ if stochastic and p.dtype == torch.bfloat16 else torch.Tensor.copy_
    f32 = lambda t: t.to(torch.float32, copy=True)  # noqa: E731 - SimpleTuner's helpers sum in an fp32 copy
    if not state:
        state.update(step=0.0, m=torch.zeros_like(p), v=torch.zeros_like(p), shift=torch.zeros_like(p),
                     acc=float(torch.rand([]) * 5e-3))  # fmt: skip
    m, v, shift = state["m"], state["v"], state["shift"]
    state["step"] += 1
    state["acc"] += WD * LR
    decay = (state["acc"] > 5e-3) * state["acc"]
    state["acc"] -= decay
    m.mul_(BETAS[0])
    put(m, f32(grad).add_(m, alpha=1 - BETAS[0]))  # add_stochastic_(exp_avg, grad, alpha=1 - beta1)
    v.mul_(BETAS[1]).addcmul_(grad, grad.conj(), value=1 - BETAS[1])
    correction = (1 - BETAS[1] ** state["step"]) ** 0.5
    put(shift, f32(shift).addcdiv_(m, v.sqrt().add_(EPS, alpha=1), value=-LR * correction))
    buffer = p.clone()
    put(p, f32(shift).add_(p, alpha=1))
    put(shift, f32(buffer.sub_(p)).add_(shift, alpha=1))
    if decay > 0:
        shift.add_(p, alpha=-decay)
        state["decays"] = state.get("decays", 0) + 1


def gradient(step, shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + step)).to(dtype)


def run_both(dtype, stochastic, steps=12):
    """st's optimizer and the replay over the same weights and gradients, from the same random state."""
    init = [torch.randn(33, 17).to(dtype), (torch.randn(40) * 0.01).to(dtype)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [t.clone() for t in init]
    opt = AdamWBF16(ours, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, stochastic_rounding=stochastic)
    states = [{} for _ in theirs]
    for step in range(steps):
        grads = [gradient(step * 2 + i, t.shape, dtype) for i, t in enumerate(init)]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        seed = 1000 + step
        torch.manual_seed(seed)
        opt.step()
        torch.manual_seed(seed)
        for p, g, state in zip(theirs, grads, states):
            simpletuner_step(p, g, state, stochastic)
    return init, ours, theirs, opt, states


@pytest.mark.parametrize("dtype, stochastic", [(torch.float32, True), (torch.bfloat16, False),
                                               (torch.bfloat16, True)])  # fmt: skip
def test_step_is_simpletuners_bit_for_bit(dtype, stochastic):
    init, ours, theirs, opt, states = run_both(dtype, stochastic)
    for p, q, state in zip(ours, theirs, states):
        assert p.dtype == q.dtype == dtype
        assert torch.equal(p, q)
        mine = opt.state[p]
        assert mine["exp_avg"].dtype == mine["exp_avg_sq"].dtype == mine["shift"].dtype == dtype  # SimpleTuner's
        for key, theirs_key in (("exp_avg", "m"), ("exp_avg_sq", "v"), ("shift", "shift")):
            assert torch.equal(mine[key], state[theirs_key]), key
        assert mine["accumulated_decay"] == state["acc"] and mine["step"] == state["step"] == 12
    # The deferred weight decay did fire (lr * wd = 3e-3 a step against SimpleTuner's 5e-3 threshold).
    assert all(s["decays"] >= 5 for s in states)
    assert all(not torch.equal(p.detach(), t) for p, t in zip(ours, init))  # the weights moved


def test_stochastic_rounding_is_right_on_average():
    """An update of -1e-3 on weights of 1.0, where bf16's spacing is 2^-8: round to nearest keeps it in `shift` and
    leaves every weight at 1.0; stochastic rounding moves the weights by it on average."""
    n = 200_000
    expected = None
    means = {}
    for stochastic in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = AdamWBF16([p], lr=1e-3, betas=BETAS, eps=0.0, weight_decay=0.0, stochastic_rounding=stochastic)
        p.grad = torch.ones_like(p)
        opt.step()
        # One step: m = g = 1, v = (1 - b2), update = -lr * sqrt(1 - b2) * 1 / sqrt(1 - b2) = -lr.
        expected = 1.0 - 1e-3
        true_weight = p.detach().float() + opt.state[p]["shift"].float()
        means[stochastic] = (p.detach().float().mean().item(), true_weight.mean().item())
    nearest_mean, nearest_true = means[False]
    assert nearest_mean == 1.0 and abs(nearest_true - expected) < 1e-5
    stochastic_mean, stochastic_true = means[True]
    # Standard error of the mean: 2^-8 * sqrt(0.26 * 0.74 / n) ~ 4e-6.
    assert abs(stochastic_mean - expected) < 3e-5, stochastic_mean
    assert abs(stochastic_true - expected) < 3e-5, stochastic_true


def test_resume_is_bit_exact_and_old_fp32_moments_load(tmp_path):
    """A checkpoint holds bf16 moments, shift and the decay accumulator; a state saved with fp32 moments and neither
    (st's earlier arithmetic) still loads, into SimpleTuner's dtypes."""
    torch.manual_seed(0)
    init = torch.randn(8, 6).to(torch.bfloat16)

    def make(values):
        p = torch.nn.Parameter(values.clone())
        return p, build_optimizer([p], Config(learning_rate=1e-2, optimizer_config="weight_decay=0.5"),
                                  device_type="cpu")  # fmt: skip

    def steps(p, opt, span):
        for step in span:
            p.grad = gradient(step, p.shape, torch.bfloat16)
            opt.step()

    p, opt = make(init)
    steps(p, opt, range(3))
    save_state(tmp_path / "opt", optimizer_state(opt))
    snapshot, rng = p.detach().clone(), torch.get_rng_state()
    steps(p, opt, range(3, 8))

    q, resumed = make(snapshot)
    load_optimizer_state(resumed, load_state(tmp_path / "opt"))
    torch.set_rng_state(rng)
    steps(q, resumed, range(3, 8))
    assert torch.equal(p, q)
    for key in ("exp_avg", "exp_avg_sq", "shift"):
        assert resumed.state[q][key].dtype == torch.bfloat16 and torch.equal(opt.state[p][key], resumed.state[q][key])
    assert resumed.state[q]["accumulated_decay"] == opt.state[p]["accumulated_decay"]

    old = load_state(tmp_path / "opt")
    for saved in old["state"].values():
        saved["exp_avg"], saved["exp_avg_sq"] = saved["exp_avg"].float(), saved["exp_avg_sq"].float()
        del saved["shift"], saved["accumulated_decay"]
    r, from_old = make(snapshot)
    load_optimizer_state(from_old, old)
    state = from_old.state[r]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state["shift"].dtype == torch.bfloat16
    assert not state["shift"].any() and state["accumulated_decay"] == 0.0 and state["step"] == 3
    steps(r, from_old, range(3, 5))
    assert torch.isfinite(r).all() and state["step"] == 5


def test_fp16_weights_keep_fp32_state_through_a_resume(tmp_path):
    p = torch.nn.Parameter(torch.randn(10).half())
    opt = AdamWBF16([p], lr=1e-2)
    p.grad = torch.randn(10).half()
    opt.step()
    assert p.dtype == torch.float16 and opt.state[p]["exp_avg_sq"].dtype == torch.float32
    save_state(tmp_path / "opt", optimizer_state(opt))
    q = torch.nn.Parameter(p.detach().clone())
    resumed = AdamWBF16([q], lr=1e-2)
    load_optimizer_state(resumed, load_state(tmp_path / "opt"))
    assert all(resumed.state[q][k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "shift"))
