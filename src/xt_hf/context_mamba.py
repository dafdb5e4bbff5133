"""Mamba blocks of the context encoder (the released "mamba" layers, built on mamba_ssm 1.x `Mamba`).

The selective scan runs in plain PyTorch by default. When `mamba_ssm` (and `causal_conv1d`) are installed
and the tensors are on CUDA, their fused kernels compute the same thing faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_xt import XTConfig

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None

try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None

# Steps per chunk of the plain scan: it bounds the transient (chunk, batch, inner, state) buffers, while the
# step-by-step loop inside a chunk costs the same whatever its length.
SCAN_CHUNK_SIZE = 64

# mamba_ssm's `Mamba` defaults for the step-size initialisation (the released models kept them).
DT_MIN, DT_MAX, DT_INIT_FLOOR, DT_SCALE = 0.001, 0.1, 1e-4, 1.0


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    *,
    chunk_size: int = SCAN_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan in plain PyTorch, computed in float32, returned in `u.dtype`.

    `u`, `delta`, `z`: `(batch, inner, L)`; `A`: `(inner, state)`; `B`, `C`: `(batch, state, L)`; `D`,
    `delta_bias`: `(inner,)`. With `Δ = softplus(delta + delta_bias)`:
    `h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t`, `y_t = <h_t, C_t> + D u_t`, and `y · SiLU(z)` when `z` is given.

    Time is processed `chunk_size` steps at a time so that no `(batch, inner, L, state)` tensor is ever
    built; only the `(batch, inner, state)` state is carried from one chunk to the next. (With autograd,
    backward still keeps every step's state: checkpoint the block to train on very long sequences.)
    `initial_state` (`h_{-1}`, zeros by default) and `return_final_state` (then `(y, h_{L-1})` is returned,
    float32) let a sequence be scanned piece by piece.
    """
    input_dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    delta = F.softplus(delta)
    batch, inner, length = u.shape
    state = u.new_zeros(batch, inner, A.shape[1]) if initial_state is None else initial_state.float()
    # Time first, so that every step reads and writes contiguous (batch, inner, state) slices.
    delta, drive_scale = delta.permute(2, 0, 1), (delta * u).permute(2, 0, 1)
    B, C = B.permute(2, 0, 1), C.permute(2, 0, 1)
    outputs = []
    # Autocast would run the read-out matmul in half precision.
    with torch.autocast(u.device.type, enabled=False):
        for start in range(0, length, chunk_size):
            steps = slice(start, start + chunk_size)
            decay = torch.exp(delta[steps, ..., None] * A)  # (chunk, batch, inner, state)
            drive = drive_scale[steps, ..., None] * B[steps, :, None, :]  # (chunk, batch, inner, state)
            states = []
            for step_decay, step_drive in zip(decay, drive):
                state = torch.addcmul(step_drive, step_decay, state)
                states.append(state)
            outputs.append(torch.einsum("tbdn,tbn->bdt", torch.stack(states), C[steps]))
    y = torch.cat(outputs, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return (y.to(input_dtype), state) if return_final_state else y.to(input_dtype)


@dataclass
class MambaCarry:
    """What a Mamba mixer carries from one piece of a sequence to the next: the causal convolution's last
    `d_conv - 1` inputs `(batch, inner, d_conv - 1)` and the scan's state `(batch, inner, state)`, float32."""

    conv: torch.Tensor
    scan: torch.Tensor


class XTMambaMixer(nn.Module):
    """mamba_ssm 1.x `Mamba` (parameter names included): gated causal conv + selective scan, `(batch, L, hidden)`.

    `use_fast_path = False` forces the plain PyTorch path even where the CUDA kernels are available.
    """

    def __init__(self, config: XTConfig):
        super().__init__()
        hidden = config.context_hidden_size
        self.inner_size = config.mamba_expand * hidden
        self.state_size = config.mamba_d_state
        self.dt_rank = config.mamba_dt_rank
        self.use_fast_path = True
        self.in_proj = nn.Linear(hidden, 2 * self.inner_size, bias=False)
        # Depthwise and padded on both sides; keeping the first L outputs makes it causal.
        self.conv1d = nn.Conv1d(
            self.inner_size,
            self.inner_size,
            kernel_size=config.mamba_d_conv,
            groups=self.inner_size,
            padding=config.mamba_d_conv - 1,
        )
        self.x_proj = nn.Linear(self.inner_size, self.dt_rank + 2 * self.state_size, bias=False)
        # Its bias is the scan's `delta_bias`, added inside the scan rather than by the Linear.
        self.dt_proj = nn.Linear(self.dt_rank, self.inner_size)
        self.A_log = nn.Parameter(torch.empty(self.inner_size, self.state_size))
        self.D = nn.Parameter(torch.empty(self.inner_size))
        self.out_proj = nn.Linear(self.inner_size, hidden, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """mamba_ssm's initialisation: PyTorch defaults for the projections and the conv, then a step-size
        projection whose `softplus(bias)` is log-uniform in [DT_MIN, DT_MAX], S4D-real `A = -(1..state)`
        and `D = 1`. Tensors already loaded from a checkpoint are left alone (transformers' `init`)."""
        for weight in (self.in_proj.weight, self.conv1d.weight, self.x_proj.weight, self.out_proj.weight):
            init.kaiming_uniform_(weight, a=math.sqrt(5))
        conv_bound = 1 / math.sqrt(self.conv1d.weight[0].numel())
        init.uniform_(self.conv1d.bias, -conv_bound, conv_bound)

        dt_init_std = self.dt_rank**-0.5 * DT_SCALE
        init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        log_dt_range = math.log(DT_MAX) - math.log(DT_MIN)
        uniform = torch.rand(self.inner_size, device=self.dt_proj.bias.device)
        dt = torch.exp(uniform * log_dt_range + math.log(DT_MIN)).clamp(min=DT_INIT_FLOOR)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

        A = torch.arange(1, self.state_size + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(A).expand(self.inner_size, -1))
        init.ones_(self.D)

    def uses_kernels(self, hidden_states: torch.Tensor) -> bool:
        """Whether a whole-sequence forward of `hidden_states` runs mamba_ssm's CUDA selective scan."""
        return self.use_fast_path and selective_scan_fn is not None and hidden_states.is_cuda

    def new_carry(self, batch: int, *, device: torch.device, dtype: torch.dtype) -> MambaCarry:
        """The carry of a sequence's start: zeros, as the convolution's padding and the scan's `h_{-1}`."""
        conv = torch.zeros(batch, self.inner_size, self.conv1d.kernel_size[0] - 1, device=device, dtype=dtype)
        return MambaCarry(conv, torch.zeros(batch, self.inner_size, self.state_size, device=device))

    def forward(self, hidden_states: torch.Tensor, carry: MambaCarry | None = None) -> torch.Tensor:
        """`(batch, L, hidden)` → `(batch, L, hidden)`, scanning from position 0 to L-1.

        With `carry`, the input continues a sequence whose earlier pieces went through with the same
        carry, which is updated to continue after this piece (plain PyTorch path).
        """
        length = hidden_states.shape[1]
        use_kernels = carry is None and self.uses_kernels(hidden_states)
        # (batch, channels, L) with L contiguous: the layout both CUDA kernels expect.
        x, z = self.in_proj(hidden_states).transpose(1, 2).contiguous().chunk(2, dim=1)
        if use_kernels and causal_conv1d_fn is not None:
            x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        elif carry is None:
            x = F.silu(self.conv1d(x)[..., :length])
        else:
            # The previous piece's last inputs stand where the padding stood: a valid convolution.
            x = torch.cat((carry.conv, x), dim=-1)
            carry.conv = x[..., x.shape[-1] - carry.conv.shape[-1] :].clone()
            x = F.silu(F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=self.inner_size))

        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = self.dt_proj.weight @ dt.transpose(1, 2)  # (batch, inner, L); the bias goes in as delta_bias
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        A = -torch.exp(self.A_log.float())
        scan_inputs = (x, dt, A, B, C, self.D.float())
        delta_bias = self.dt_proj.bias.float()
        if use_kernels:
            y = selective_scan_fn(*scan_inputs, z=z, delta_bias=delta_bias, delta_softplus=True)
        elif carry is None:
            y = selective_scan(*scan_inputs, z=z, delta_bias=delta_bias)
        else:
            y, carry.scan = selective_scan(*scan_inputs, z=z, delta_bias=delta_bias, initial_state=carry.scan,
                                           return_final_state=True)
        return self.out_proj(y.transpose(1, 2))


class XTMambaBlock(GradientCheckpointingLayer):
    """`n = LayerNorm(x); x = n + Mamba(n)` on `(batch, L, hidden)`, scanning backwards on even layers.

    The residual is the normalised tensor, as in the released models (`mamba_residual_from_normed`);
    without that quirk the block is the usual `x + Mamba(LayerNorm(x))`.
    """

    def __init__(self, config: XTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.reverse = config.mamba_reverse_even_layers and layer_idx % 2 == 0
        self.residual_from_normed = config.mamba_residual_from_normed
        self.norm = nn.LayerNorm(config.context_hidden_size, eps=config.context_layer_norm_eps)
        self.mixer = XTMambaMixer(config)

    def forward(
        self, hidden_states: torch.Tensor, carry: MambaCarry | None = None
    ) -> tuple[torch.Tensor, None]:
        """`(batch, L, hidden)` → `(batch, L, hidden)` and `None`, the (states, attention weights) pair that
        every context-encoder block returns; a scan has no attention weights.

        With `carry` (`new_carry`), `hidden_states` is one piece of a longer sequence, and the pieces go through
        in scan order (last piece first on a reversed layer): the scan is causal in its direction, so this
        equals the whole-sequence forward piece by piece.
        """
        # A reversed layer scans from the last token (the trailing CLS token) to the first.
        if self.reverse:
            hidden_states = hidden_states.flip(1)
        normed = self.norm(hidden_states)
        hidden_states = (normed if self.residual_from_normed else hidden_states) + self.mixer(normed, carry)
        if self.reverse:
            hidden_states = hidden_states.flip(1)
        return hidden_states, None

    def new_carry(self, batch: int, *, device: torch.device, dtype: torch.dtype) -> MambaCarry:
        """The carry of a sequence's start, for `forward(piece, carry)`."""
        return self.mixer.new_carry(batch, device=device, dtype=dtype)
