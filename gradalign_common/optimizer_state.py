"""Adam second moments for optimizer-preconditioned scoring: the state file, its writer and its reader.

With an optimizer state, the scorer divides every gradient elementwise by Adam's
denominator, sqrt(v_hat) + eps with v_hat = exp_avg_sq / (1 - beta2 ** step) (the
bias-corrected second moment), as the reference's --use_optimizer does.

The file is a safetensors file:
- one tensor per trainable parameter holding Adam's `exp_avg_sq`, keyed by the
  parameter's name as `model.named_parameters()` gives it (a tied weight once, under
  any one of its names, e.g. `model.embed_tokens.weight` or `lm_head.weight`);
- string metadata: `format` = FORMAT, `step` (optimizer steps taken, >= 1), `beta2`
  and `eps` (the optimizer's hyperparameters).

The trainer writes it with `write_optimizer_state` (or `state_from_torch_optimizer`
then `write_optimizer_state`); the scorer reads it with `read_optimizer_state` and maps
it onto a model's parameters with `AdamSecondMoment.inverse_denominators`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from gradalign_common.artifacts import atomic_path
from gradalign_common.errors import InvalidInputError, NotFoundError

FORMAT = "gradalign-adam-second-moment/1"


@dataclass(frozen=True)
class AdamSecondMoment:
    """Adam's exp_avg_sq per parameter name, with the step count and the hyperparameters that correct it."""

    exp_avg_sq: Mapping[str, torch.Tensor]
    step: int
    beta2: float
    eps: float

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise InvalidInputError(f"optimizer state: step must be an integer >= 1, got {self.step!r}")
        if not (0.0 <= self.beta2 < 1.0):
            raise InvalidInputError(f"optimizer state: beta2 must lie in [0, 1), got {self.beta2!r}")
        if not (self.eps > 0.0 and math.isfinite(self.eps)):
            raise InvalidInputError(f"optimizer state: eps must be a positive number, got {self.eps!r}")
        for name, v in self.exp_avg_sq.items():
            if not v.is_floating_point():
                raise InvalidInputError(f"optimizer state: exp_avg_sq of {name!r} is not a float tensor")

    def denominator(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sqrt(exp_avg_sq / (1 - beta2 ** step)) + eps for parameter `name`, computed in float64, cast to dtype."""
        v = self.exp_avg_sq[name].to(torch.float64)
        correction = 1.0 - self.beta2**self.step
        return (torch.sqrt(v.clamp_min(0.0) / correction) + self.eps).to(dtype)

    def inverse_denominators(
        self, parameter_names: Iterable[tuple[Iterable[str], torch.Tensor]], dtype: torch.dtype = torch.float32
    ) -> list[torch.Tensor]:
        """1 / denominator for each parameter, in the given order.

        `parameter_names` yields (the names of one parameter, the parameter): a tied weight
        has several names, any one of which may key it in the file. Every parameter must be
        in the file with its shape, and every name in the file must be one of the given
        parameters'; otherwise InvalidInputError naming the first mismatch.
        """
        out = []
        used: set[str] = set()
        for names, param in parameter_names:
            names = list(names)
            found = [n for n in names if n in self.exp_avg_sq]
            if not found:
                raise InvalidInputError(f"optimizer state has no exp_avg_sq for parameter {names[0]!r}")
            if len(found) > 1:
                raise InvalidInputError(f"optimizer state keys the tied parameter {names[0]!r} twice: {found}")
            name = found[0]
            if tuple(self.exp_avg_sq[name].shape) != tuple(param.shape):
                raise InvalidInputError(
                    f"optimizer state: exp_avg_sq of {name!r} has shape {tuple(self.exp_avg_sq[name].shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )
            used.add(name)
            out.append(torch.reciprocal(self.denominator(name, torch.float64)).to(dtype))
        unknown = sorted(set(self.exp_avg_sq) - used)
        if unknown:
            raise InvalidInputError(f"optimizer state has entries for unknown parameters: {', '.join(unknown[:5])}")
        return out


def write_optimizer_state(
    path: str | Path, exp_avg_sq: Mapping[str, torch.Tensor], *, step: int, beta2: float, eps: float
) -> Path:
    """Write an optimizer state file atomically (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    state = AdamSecondMoment(dict(exp_avg_sq), int(step), float(beta2), float(eps))  # validates
    tensors = {name: v.detach().to("cpu").contiguous() for name, v in state.exp_avg_sq.items()}
    metadata = {"format": FORMAT, "step": str(state.step), "beta2": repr(state.beta2), "eps": repr(state.eps)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_optimizer_state(path: str | Path) -> AdamSecondMoment:
    """Read an optimizer state file; NotFoundError if missing, InvalidInputError naming the defect otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"optimizer state file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise InvalidInputError(f"{path}: not a GradAlign optimizer state (metadata format is {metadata.get('format')!r})")
    try:
        step, beta2, eps = int(metadata["step"]), float(metadata["beta2"]), float(metadata["eps"])
    except (KeyError, ValueError) as exc:
        raise InvalidInputError(f"{path}: bad or missing optimizer metadata ({exc})") from None
    try:
        return AdamSecondMoment(tensors, step, beta2, eps)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None


def state_from_torch_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> AdamSecondMoment:
    """The second moments of a torch Adam or AdamW over `model`'s parameters, keyed by parameter name.

    Every trainable parameter must have taken at least one step with the same beta2, eps and step count.
    """
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight once, under its first name
    exp_avg_sq, steps, betas2, epss = {}, set(), set(), set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad or id(p) not in names:
                continue
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                raise InvalidInputError(f"optimizer has no exp_avg_sq for {names[id(p)]!r} (no step taken?)")
            exp_avg_sq[names[id(p)]] = state["exp_avg_sq"].detach().to("cpu", torch.float32).clone()
            steps.add(int(torch.as_tensor(state["step"]).item()))
            betas2.add(float(group["betas"][1]))
            epss.add(float(group["eps"]))
    if len(steps) != 1 or len(betas2) != 1 or len(epss) != 1:
        raise InvalidInputError(f"optimizer parameters disagree on step/beta2/eps: {steps}, {betas2}, {epss}")
    return AdamSecondMoment(exp_avg_sq, steps.pop(), betas2.pop(), epss.pop())


def file_fingerprint(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, mtime_ns, size) of an optimizer state file, for cache keys."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"optimizer state file not found: {p}")
    st = p.stat()
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)
