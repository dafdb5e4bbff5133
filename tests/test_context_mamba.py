"""The Mamba context encoder: the plain selective scan, the mixer's parameters and the block's semantics."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ORIGINAL_REFERENCES

from xt_hf.configuration_xt import XTConfig
from xt_hf.context_mamba import (
    DT_MAX,
    DT_MIN,
    SCAN_CHUNK_SIZE,
    XTMambaBlock,
    XTMambaMixer,
    selective_scan,
    selective_scan_fn,
)
from xt_hf.engine.context import update_mamba_block

HIDDEN, STATE, CONV, EXPAND = 32, 4, 4, 2
INNER, DT_RANK = EXPAND * HIDDEN, math.ceil(HIDDEN / 16)


def mamba_config(**overrides) -> XTConfig:
    arguments = dict(
        context_encoder="mamba",
        context_hidden_size=HIDDEN,
        mamba_d_state=STATE,
        mamba_d_conv=CONV,
        mamba_expand=EXPAND,
        context_layer_norm_eps=1e-3,
    )
    arguments.update(overrides)
    return XTConfig(**arguments)


def scan_inputs(length: int, batch: int = 2, inner: int = 6, state: int = 3, dtype=torch.float32) -> dict:
    """Random scan inputs; `A` is S4D-real-like (negative, up to -state) so states decay at several rates."""
    return dict(
        u=torch.randn(batch, inner, length, dtype=dtype),
        delta=torch.randn(batch, inner, length, dtype=dtype),
        A=-torch.rand(inner, state).mul(state).add(0.1),
        B=torch.randn(batch, state, length, dtype=dtype),
        C=torch.randn(batch, state, length, dtype=dtype),
        D=torch.randn(inner),
        z=torch.randn(batch, inner, length, dtype=dtype),
        delta_bias=torch.randn(inner),
    )


def scan_step_by_step(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """The selective scan written from its equations, one time step at a time, in float64:
    `Δ = softplus(delta + delta_bias)`, `h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t`, `y_t = <h_t, C_t> + D u_t`,
    `y · SiLU(z)`."""
    u, delta, A, B, C = (tensor.double() for tensor in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    delta = F.softplus(delta)
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    outputs = []
    for t in range(u.shape[-1]):
        step = delta[:, :, t, None]  # (batch, inner, 1)
        state = torch.exp(step * A) * state + step * B[:, None, :, t] * u[:, :, t, None]
        y = (state * C[:, None, :, t]).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, :, t]
        outputs.append(y)
    y = torch.stack(outputs, dim=-1)
    if z is not None:
        y = y * F.silu(z.double())
    return y


def randomise_norm(block: XTMambaBlock) -> None:
    with torch.no_grad():
        block.norm.weight.normal_(1.0, 0.5)
        block.norm.bias.normal_(0.0, 0.5)


# ---- the plain selective scan ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 5, SCAN_CHUNK_SIZE, SCAN_CHUNK_SIZE + 1, 2 * SCAN_CHUNK_SIZE + 37])
@pytest.mark.parametrize("with_z,with_D", [(True, True), (False, True), (True, False), (False, False)])
def test_chunked_scan_equals_the_step_by_step_recurrence(length, with_z, with_D):
    inputs = scan_inputs(length)
    if not with_z:
        inputs["z"] = None
    if not with_D:
        inputs["D"] = None
    expected = scan_step_by_step(**inputs)
    output = selective_scan(**inputs)
    assert output.dtype == torch.float32 and output.shape == expected.shape
    torch.testing.assert_close(output.double(), expected, rtol=1e-6, atol=1e-6)


def test_scan_without_delta_bias_uses_softplus_of_delta_alone():
    inputs = scan_inputs(20)
    inputs["delta_bias"] = None
    torch.testing.assert_close(selective_scan(**inputs).double(), scan_step_by_step(**inputs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, SCAN_CHUNK_SIZE, 1000])
def test_scan_chunk_size_does_not_change_outputs(chunk_size):
    inputs = scan_inputs(150)
    reference = selective_scan(**inputs, chunk_size=150)
    torch.testing.assert_close(selective_scan(**inputs, chunk_size=chunk_size), reference, rtol=1e-6, atol=1e-6)


def test_scan_of_bfloat16_inputs_is_computed_in_float32_and_returned_in_bfloat16():
    inputs = scan_inputs(40, dtype=torch.bfloat16)
    output = selective_scan(**inputs)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, scan_step_by_step(**inputs).to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_scan_stays_in_float32_under_autocast():
    inputs = scan_inputs(40)
    expected = selective_scan(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = selective_scan(**inputs)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


# ---- the mixer's parameters -------------------------------------------------------------------------------


def test_block_parameters_carry_the_original_names_and_shapes():
    block = XTMambaBlock(mamba_config(), layer_idx=0)
    shapes = {name: tuple(tensor.shape) for name, tensor in block.state_dict().items()}
    assert shapes == {
        "norm.weight": (HIDDEN,),
        "norm.bias": (HIDDEN,),
        "mixer.A_log": (INNER, STATE),
        "mixer.D": (INNER,),
        "mixer.in_proj.weight": (2 * INNER, HIDDEN),
        "mixer.conv1d.weight": (INNER, 1, CONV),
        "mixer.conv1d.bias": (INNER,),
        "mixer.x_proj.weight": (DT_RANK + 2 * STATE, INNER),
        "mixer.dt_proj.weight": (INNER, DT_RANK),
        "mixer.dt_proj.bias": (INNER,),
        "mixer.out_proj.weight": (HIDDEN, INNER),
    }


def test_released_mamba_layer_keys_load_unchanged():
    layout = ORIGINAL_REFERENCES / "layouts" / "swin_v2_tiny_1e-4_mamba_512_256.json.gz"  # built with the original
    prefix = "module.decoder.layers.0."
    released = {
        entry["key"].removeprefix(prefix): tuple(entry["shape"])
        for entry in json.loads(gzip.decompress(layout.read_bytes()))["keys"]
        if entry["key"].startswith(prefix)
    }
    block = XTMambaBlock(mamba_config(context_hidden_size=768, mamba_d_state=16, context_layer_norm_eps=1e-5), 0)
    assert {name: tuple(tensor.shape) for name, tensor in block.state_dict().items()} == released


def test_initialisation_follows_mamba_ssm():
    mixer = XTMambaMixer(mamba_config())
    expected_A_log = torch.log(torch.arange(1, STATE + 1, dtype=torch.float32)).expand(INNER, -1)
    torch.testing.assert_close(mixer.A_log.data, expected_A_log, rtol=0, atol=0)
    torch.testing.assert_close(mixer.D.data, torch.ones(INNER), rtol=0, atol=0)
    assert mixer.dt_proj.weight.abs().max() <= DT_RANK**-0.5
    step = F.softplus(mixer.dt_proj.bias)
    assert step.min() >= DT_MIN * (1 - 1e-5) and step.max() <= DT_MAX * (1 + 1e-5)
    conv_bound = 1 / math.sqrt(CONV)
    assert mixer.conv1d.bias.abs().max() <= conv_bound


def test_initialisation_leaves_tensors_loaded_from_a_checkpoint_alone():
    mixer = XTMambaMixer(mamba_config())
    loaded = {"A_log": torch.randn(INNER, STATE), "D": torch.randn(INNER), "dt_proj.bias": torch.randn(INNER)}
    mixer.load_state_dict(loaded, strict=False)
    for name in loaded:
        mixer.get_parameter(name)._is_hf_initialized = True  # what transformers' loading marks
    mixer.reset_parameters()
    for name, value in loaded.items():
        torch.testing.assert_close(mixer.get_parameter(name).data, value, rtol=0, atol=0)


# ---- the block --------------------------------------------------------------------------------------------


def test_block_returns_states_and_no_attention_weights():
    hidden_states = torch.randn(2, 11, HIDDEN)
    output, attentions = XTMambaBlock(mamba_config(), layer_idx=0)(hidden_states)
    assert output.shape == hidden_states.shape and attentions is None


def test_reversed_layer_flips_normalises_and_adds_the_normalised_input():
    block = XTMambaBlock(mamba_config(), layer_idx=0)
    randomise_norm(block)
    hidden_states = torch.randn(2, 11, HIDDEN)
    flipped = hidden_states.flip(1)
    normed = F.layer_norm(flipped, (HIDDEN,), block.norm.weight, block.norm.bias, eps=1e-3)
    expected = (normed + block.mixer(normed)).flip(1)
    torch.testing.assert_close(block(hidden_states)[0], expected, rtol=0, atol=0)


def test_forward_layer_normalises_and_adds_the_normalised_input():
    block = XTMambaBlock(mamba_config(), layer_idx=1)
    randomise_norm(block)
    hidden_states = torch.randn(2, 11, HIDDEN)
    normed = F.layer_norm(hidden_states, (HIDDEN,), block.norm.weight, block.norm.bias, eps=1e-3)
    torch.testing.assert_close(block(hidden_states)[0], normed + block.mixer(normed), rtol=0, atol=0)


def test_residual_from_the_block_input_when_the_quirk_is_off():
    block = XTMambaBlock(mamba_config(mamba_residual_from_normed=False), layer_idx=1)
    randomise_norm(block)
    hidden_states = torch.randn(2, 11, HIDDEN)
    expected = hidden_states + block.mixer(block.norm(hidden_states))
    torch.testing.assert_close(block(hidden_states)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "layer_idx,reverse_even_layers,scans_backwards",
    [(0, True, True), (1, True, False), (2, True, True), (0, False, False)],
)
def test_layer_scan_direction(layer_idx, reverse_even_layers, scans_backwards):
    """A token's output depends only on the tokens the scan has already seen (and the token itself)."""
    block = XTMambaBlock(mamba_config(mamba_reverse_even_layers=reverse_even_layers), layer_idx=layer_idx)
    hidden_states = torch.randn(1, 12, HIDDEN)
    changed = hidden_states.clone()
    changed[:, 6] += 1.0
    with torch.no_grad():
        difference = (block(changed)[0] - block(hidden_states)[0]).abs().amax(dim=-1)[0]
    before, after = difference[:6], difference[7:]
    unaffected, affected = (after, before) if scans_backwards else (before, after)
    assert unaffected.max() == 0
    # At initialisation the state carries little, so look where the causal conv reaches for sure.
    nearest = affected[-(CONV - 1) :] if scans_backwards else affected[: CONV - 1]
    assert nearest.min() > 0


def test_gradients_reach_every_parameter():
    block = XTMambaBlock(mamba_config(), layer_idx=0)
    hidden_states = torch.randn(2, 9, HIDDEN, requires_grad=True)
    (block(hidden_states)[0] * torch.randn(2, 9, HIDDEN)).sum().backward()
    assert hidden_states.grad is not None and hidden_states.grad.abs().sum() > 0
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_bfloat16_block_returns_bfloat16_close_to_float32():
    block = XTMambaBlock(mamba_config(), layer_idx=0)
    hidden_states = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        expected, _ = block(hidden_states)
        output, _ = block.to(torch.bfloat16)(hidden_states.to(torch.bfloat16))
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(
    selective_scan_fn is None or not torch.cuda.is_available(), reason="needs mamba_ssm and a CUDA device"
)
def test_cuda_kernels_match_the_plain_path():
    mixer = XTMambaMixer(mamba_config()).cuda()
    hidden_states = torch.randn(2, 300, HIDDEN, device="cuda")
    with torch.no_grad():
        fast = mixer(hidden_states)
        mixer.use_fast_path = False
        plain = mixer(hidden_states)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


# ---- inference in place, chunk by chunk -------------------------------------------------------------------


@pytest.mark.parametrize("layer_idx,residual_from_normed", [(0, True), (1, True), (1, False), (2, False)])
@pytest.mark.parametrize("chunk", [1, 2, 5, 23])
def test_in_place_chunks_equal_the_whole_sequence_forward(layer_idx, residual_from_normed, chunk):
    """Gigapixel inference updates the tokens a chunk at a time in scan order (backwards on even layers),
    carrying the convolution's inputs and the scan's state: the result is the whole-sequence forward's."""
    block = XTMambaBlock(mamba_config(mamba_residual_from_normed=residual_from_normed), layer_idx=layer_idx)
    randomise_norm(block)
    hidden_states = torch.randn(2, 23, HIDDEN)
    expected, _ = block(hidden_states)
    updated = hidden_states.clone()
    with torch.inference_mode():
        assert update_mamba_block(block, updated, chunk) is updated
    torch.testing.assert_close(updated, expected, rtol=1e-5, atol=1e-6)


def test_the_scan_continues_from_a_given_state():
    inputs = scan_inputs(length=40)
    whole = selective_scan(**inputs)
    first = {name: value[..., :17] if value.dim() == 3 else value for name, value in inputs.items()}
    rest = {name: value[..., 17:] if value.dim() == 3 else value for name, value in inputs.items()}
    head, state = selective_scan(**first, return_final_state=True)
    tail, _ = selective_scan(**rest, initial_state=state, return_final_state=True)
    torch.testing.assert_close(torch.cat((head, tail), dim=-1), whole, rtol=1e-6, atol=1e-6)


def test_the_engine_runs_a_long_mamba_sequence_in_place_with_the_model_numbers():
    from xt_hf.context_encoder import XTContextEncoder
    from xt_hf.engine import encode_grid

    encoder = XTContextEncoder(mamba_config(context_num_layers=2, context_token_chunk_size=7), in_channels=8).eval()
    grid = torch.randn(1, 8, 6, 5)
    expected = encoder(grid).tokens
    torch.testing.assert_close(encode_grid(encoder, grid).tokens, expected, rtol=1e-5, atol=1e-5)
