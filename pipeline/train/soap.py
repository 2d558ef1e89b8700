"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024, "SOAP: Improving and Stabilizing
Shampoo using Adam", arXiv:2409.11321), with the settings SimpleTuner's `optimizer=soap` uses.

For a matrix parameter with gradient G the optimizer keeps Shampoo's two statistics L = EMA(G G^T) and R = EMA(G^T G)
and an orthonormal basis Q_L, Q_R of their eigenvectors. Each step runs Adam on the rotated gradient
G' = Q_L^T G Q_R: the second moment is kept in the rotated space, the first moment in the original space and rotated
when used, and the Adam direction is rotated back, N = Q_L (M' / (sqrt(V') + eps)) Q_R^T. Every
`precondition_frequency` steps the basis is refreshed by one power iteration and a QR decomposition (Q <- qr(L Q),
columns sorted by their estimated eigenvalue, the second moment permuted with them); the very first basis is an exact
eigendecomposition. Tensors of any order get one statistic per dimension; a dimension larger than `max_precond_dim`
(and, unless `precondition_1d`, every 1-D parameter) is not rotated, which leaves plain Adam along it.

As in the paper's reference code (and SimpleTuner's copy of it), the first step of each parameter only gathers the
statistics and computes the first basis: the parameter does not move, so the projection never uses the gradient it
was computed from. Weight decay is decoupled (p -= lr * weight_decay * p) and applied after the update.

DEVIATION from SimpleTuner: the statistics, bases and moments are kept in fp32 whatever the parameter's dtype
(SimpleTuner's moments follow the gradient's dtype); only the parameter update is written in the parameter's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from .optim import saved_param_states

DATA_FORMATS = ("channels_first", "channels_last")


class SOAP(torch.optim.Optimizer):
    """SOAP with SimpleTuner's defaults (lr 3e-3 is only the class default: st passes `learning_rate`)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if len(tuple(betas)) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}; two values, each in [0, 1)")
        if not shampoo_beta < 1.0:
            raise ValueError(f"invalid shampoo_beta {shampoo_beta}; below 1 (negative: use betas[1])")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"invalid eps {eps} or weight_decay {weight_decay}; both must be >= 0")
        if int(precondition_frequency) < 1 or int(max_precond_dim) < 1:
            raise ValueError("precondition_frequency and max_precond_dim must be >= 1")
        if data_format not in DATA_FORMATS:
            raise ValueError(f"invalid data_format {data_format!r}; one of {', '.join(DATA_FORMATS)}")
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=int(precondition_frequency), max_precond_dim=int(max_precond_dim),
                        merge_dims=bool(merge_dims), precondition_1d=bool(precondition_1d),
                        normalize_grads=bool(normalize_grads), data_format=data_format,
                        correct_bias=bool(correct_bias))  # fmt: skip
        super().__init__(params, defaults)

    # ---------------------------------------------------------------------------------------------------- shapes

    @staticmethod
    def _merged_shape(shape: tuple[int, ...], limit: int) -> tuple[int, ...]:
        """Consecutive dimensions multiplied together while their product stays <= `limit` (merge_dims)."""
        merged, current = [], 1
        for size in shape:
            if current * size > limit:
                if current > 1:
                    merged.append(current)
                    current = size
                else:
                    merged.append(size)
                    current = 1
            else:
                current *= size
        if current > 1 or not merged:
            merged.append(current)
        return tuple(merged)

    @staticmethod
    def _channels_last(group: dict, p: torch.Tensor) -> bool:
        return group["data_format"] == "channels_last" and p.dim() == 4

    def _work_shape(self, group: dict, p: torch.Tensor) -> tuple[int, ...]:
        """The shape SOAP rotates: the parameter's, or with merge_dims its dimensions merged (NCHW order)."""
        if not group["merge_dims"] or p.dim() <= 1:
            return tuple(p.shape)
        shape = tuple(p.permute(0, 3, 1, 2).shape) if self._channels_last(group, p) else tuple(p.shape)
        return self._merged_shape(shape, group["max_precond_dim"])

    def _to_work(self, group: dict, p: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        if not group["merge_dims"] or p.dim() <= 1:
            return tensor
        if self._channels_last(group, p):
            tensor = tensor.permute(0, 3, 1, 2)
        return tensor.reshape(self._work_shape(group, p))

    def _from_work(self, group: dict, p: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        if not group["merge_dims"] or p.dim() <= 1:
            return tensor
        if self._channels_last(group, p):
            return tensor.reshape(p.permute(0, 3, 1, 2).shape).permute(0, 2, 3, 1)
        return tensor.reshape(p.shape)

    def _rotated_dims(self, group: dict, p: torch.Tensor, shape: tuple[int, ...]) -> list[bool]:
        """Which dimensions of the work shape get a statistic and a basis."""
        if p.dim() == 1:
            return [bool(group["precondition_1d"]) and shape[0] <= group["max_precond_dim"]]
        return [size <= group["max_precond_dim"] for size in shape]

    # ---------------------------------------------------------------------------------------------------- rotation

    @staticmethod
    def _rotate(tensor: torch.Tensor, bases: list, back: bool = False) -> torch.Tensor:
        """Q^T applied along every rotated dimension (Q with `back`); dimensions without a basis are left as they are.

        Each pass contracts the first axis and appends the result as the last one, so after one pass per dimension
        the axes are back in their order.
        """
        for basis in bases:
            if basis is None:
                tensor = tensor.permute(*range(1, tensor.dim()), 0)
            else:
                tensor = torch.tensordot(tensor, basis, dims=([0], [1 if back else 0]))
        return tensor

    @staticmethod
    def _eigenbasis(matrix: torch.Tensor) -> torch.Tensor:
        """Eigenvectors of a symmetric statistic, by decreasing eigenvalue."""
        eye = torch.eye(matrix.shape[0], device=matrix.device, dtype=matrix.dtype)
        try:
            _, vectors = torch.linalg.eigh(matrix + 1e-30 * eye)
        except RuntimeError:  # eigh did not converge in fp32
            _, vectors = torch.linalg.eigh(matrix.double() + 1e-30 * eye.double())
            vectors = vectors.to(matrix.dtype)
        # Row-major, as a checkpoint stores it (LAPACK returns column-major): the rotations' matmuls then run the same
        # kernels before and after a resume, which keeps a resumed run bit for bit equal.
        return torch.flip(vectors, [1]).contiguous()

    def _accumulate(self, group: dict, state: dict, grad: torch.Tensor) -> None:
        """Fold G_(k) G_(k)^T into each dimension's statistic (an EMA with shampoo_beta, else betas[1])."""
        beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]
        order = grad.dim()
        for k, statistic in enumerate(state["stats"]):
            if statistic is None:
                continue
            others = [i for i in range(order) if i != k]
            statistic.lerp_(torch.tensordot(grad, grad, dims=(others, others)), 1 - beta)

    def _refresh(self, state: dict) -> None:
        """One power iteration and a QR per basis; the second moment follows its columns' new order."""
        exp_avg_sq = state["exp_avg_sq"]
        bases = []
        for k, (statistic, basis) in enumerate(zip(state["stats"], state["bases"])):
            if statistic is None:
                bases.append(None)
                continue
            estimate = torch.diag(basis.T @ statistic @ basis)
            order = torch.argsort(estimate, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(k, order)
            q, _ = torch.linalg.qr(statistic @ basis[:, order])
            bases.append(q.contiguous())
        state["exp_avg_sq"] = exp_avg_sq
        state["bases"] = bases

    # ---------------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SOAP step over every parameter that has a gradient (the first only gathers its statistics)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SOAP does not support sparse gradients")
                grad = self._to_work(group, p, p.grad.float())
                state = self.state[p]
                if not state:
                    shape = tuple(grad.shape)
                    rotated = self._rotated_dims(group, p, shape)
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    state["stats"] = [torch.zeros(n, n, dtype=torch.float32, device=p.device) if r else None
                                      for n, r in zip(shape, rotated)]  # fmt: skip
                    self._accumulate(group, state, grad)
                    state["bases"] = [None if s is None else self._eigenbasis(s) for s in state["stats"]]
                    continue  # the first gradient only sets up the basis

                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                rotated_grad = self._rotate(grad, state["bases"])
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(rotated_grad, rotated_grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                direction = self._rotate(self._rotate(exp_avg, state["bases"]) / denom, state["bases"], back=True)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                if group["normalize_grads"]:
                    direction = direction / (1e-30 + direction.square().mean().sqrt())
                p.add_(self._from_work(group, p, direction).to(p.dtype), alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])

                self._accumulate(group, state, grad)
                if step % group["precondition_frequency"] == 0:
                    self._refresh(state)
        return loss

    # ---------------------------------------------------------------------------------------------------- state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state; its tensors keep the fp32 they were saved in (torch would cast them to a bf16 parameter's
        dtype, which would change every step after a resume)."""
        super().load_state_dict(state_dict)
        for p, saved in saved_param_states(self, state_dict):
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if isinstance(saved.get(key), torch.Tensor):
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32)
            for key in ("stats", "bases"):
                if key in saved:
                    state[key] = [None if t is None else t.to(device=p.device, dtype=torch.float32)
                                  for t in saved[key]]  # fmt: skip
            if "step" in saved:
                state["step"] = int(saved["step"])
