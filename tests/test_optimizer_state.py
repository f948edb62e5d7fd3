"""The optimizer state file (gradalign_common.optimizer_state): writer, reader, errors, and the
second moments of a real torch AdamW."""

from __future__ import annotations

import pytest
import torch

from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.optimizer_state import (
    FORMAT,
    AdamSecondMoment,
    read_optimizer_state,
    state_from_torch_optimizer,
    write_optimizer_state,
)
from scoring_fixtures import random_adam_state, tiny_qwen2
def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    model = tiny_qwen2(seed=0)
    state = random_adam_state(model, step=12, beta2=0.95, eps=1e-6)
    path = write_optimizer_state(tmp_path / "s.safetensors", state.exp_avg_sq, step=12, beta2=0.95, eps=1e-6)
    back = read_optimizer_state(path)
    assert (back.step, back.beta2, back.eps) == (12, 0.95, 1e-6)
    assert set(back.exp_avg_sq) == set(state.exp_avg_sq)
    for name, v in state.exp_avg_sq.items():
        assert torch.equal(back.exp_avg_sq[name], v)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["format"] == FORMAT


def test_denominator_is_the_bias_corrected_adam_denominator():
    v = torch.tensor([0.0, 1e-4, 4.0])
    state = AdamSecondMoment({"w": v}, step=3, beta2=0.9, eps=1e-8)
    expected = torch.sqrt(v.double() / (1 - 0.9**3)) + 1e-8
    assert torch.allclose(state.denominator("w", torch.float64), expected)
    model_like = [(["w"], torch.nn.Parameter(torch.zeros(3)))]
    assert torch.allclose(state.inverse_denominators(model_like, torch.float64)[0], 1 / expected)


def test_tied_weights_match_under_any_of_their_names():
    model = tiny_qwen2(seed=0)
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), ([], p))[0].append(name)
    for alias in (False, True):
        state = random_adam_state(model, alias_lm_head=alias)
        assert ("lm_head.weight" in state.exp_avg_sq) == alias
        inverse = state.inverse_denominators(names.values())
        assert [t.shape for t in inverse] == [p.shape for p in model.parameters()]


def test_bad_states_are_refused(tmp_path):
    with pytest.raises(NotFoundError):
        read_optimizer_state(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInputError, match="not a readable safetensors"):
        read_optimizer_state(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(InvalidInputError, match="not a GradAlign optimizer state"):
        read_optimizer_state(foreign)
    no_step = tmp_path / "no-step.safetensors"
    save_file({"w": torch.ones(2)}, str(no_step), metadata={"format": FORMAT, "beta2": "0.9", "eps": "1e-8"})
    with pytest.raises(InvalidInputError, match="metadata"):
        read_optimizer_state(no_step)
    with pytest.raises(InvalidInputError, match="step"):
        write_optimizer_state(tmp_path / "x.safetensors", {"w": torch.ones(2)}, step=0, beta2=0.9, eps=1e-8)
    with pytest.raises(InvalidInputError, match="beta2"):
        AdamSecondMoment({"w": torch.ones(2)}, step=1, beta2=1.0, eps=1e-8)
    params = [(["w"], torch.nn.Parameter(torch.zeros(2)))]
    with pytest.raises(InvalidInputError, match="unknown parameters: extra"):
        AdamSecondMoment({"w": torch.ones(2), "extra": torch.ones(1)}, 1, 0.9, 1e-8).inverse_denominators(params)


def test_state_from_a_torch_adamw(tmp_path):
    model = tiny_qwen2(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-7)
    ids = torch.tensor([[1, 2, 3, 4]])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = state_from_torch_optimizer(model, optimizer)
    assert (state.step, state.beta2, state.eps) == (2, 0.98, 1e-7)
    assert set(state.exp_avg_sq) == {n for n, _ in model.named_parameters()}
    p = dict(model.named_parameters())["model.norm.weight"]
    assert torch.equal(state.exp_avg_sq["model.norm.weight"], optimizer.state[p]["exp_avg_sq"])
    path = write_optimizer_state(tmp_path / "adamw.safetensors", state.exp_avg_sq, step=state.step,
                                 beta2=state.beta2, eps=state.eps)
    assert read_optimizer_state(path).step == 2
