"""Drop-in replacements for ``nn.MultiheadAttention`` and ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` built from
layers dpengine can capture; ``dpengine.fix(model)`` swaps them in.

The torch modules read their weights inside one fused op (``F.multi_head_attention_forward``, the cuDNN /
ATen RNN kernels), so no per-layer rule sees an input and an output gradient. The replacements compute the
same function with ``nn.Linear`` layers (and, for ``bias_k``/``bias_v``, a tiny ``_AppendBias`` layer), with
the batch as dimension 0 of every tracked layer's input whatever ``batch_first`` says:

* attention: one input projection call (self-attention: on the query; otherwise on the distinct inputs
  concatenated along the sequence), attention through ``F.scaled_dot_product_attention`` when no weights
  are returned, the explicit softmax of ``F.multi_head_attention_forward`` when they are (same ops, same
  dropout mask for the same RNG state), one output projection call.
* recurrent layers: per layer and direction, the input-to-hidden ``Linear`` runs once on all time steps
  (B, T, in); the hidden-to-hidden ``Linear`` once per step on (B, H). The controller stacks the records of
  such a repeated call into one (B, T, ...) record (``LayerHandler.stackable``), so its per-sample gradient
  sum_t g_t h_t^T and its Gram-form norm cost one batched op, not T^2 cross terms. A ``PackedSequence`` runs
  on the padded batch with a per-step mask: every layer sees the whole batch, and a finished sequence keeps
  its state (the reverse direction starts each sequence at its own last element).

``state_dict`` keys are those of the torch module (``in_proj_weight``, ``weight_ih_l0``, ``bias_hh_l1_reverse``,
``weight_hr_l0`` ...), so a privately trained model loads into plain torch for inference, and back.

Privacy: the replacements mix nothing across samples (masks are per sample; dropout is elementwise).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .grad_sample.registry import LayerHandler, Record, overrides, register

__all__ = ["DPMultiheadAttention", "DPRNN", "DPGRU", "DPLSTM", "DPRNNBase", "swap_unsupported", "swap_reason"]


# ----------------------------------------------------------------------------------- state_dict renaming
# Module-level functions (not closures or bound methods), so models stay picklable; the key mapping lives on
# the module as ``_sd_mapping`` {internal key: torch key}, in torch's order.
def _rename_on_save(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: internal keys (``ih_l0.weight``) -> torch's (``weight_ih_l0``), in torch's order."""
    moved = {}
    for inner, outer in module._sd_mapping.items():
        if prefix + inner in state_dict:
            moved[prefix + outer] = state_dict.pop(prefix + inner)
    state_dict.update(moved)


def _rename_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: torch's keys -> internal keys, before the submodules load."""
    for inner, outer in module._sd_mapping.items():
        if prefix + outer in state_dict:
            state_dict[prefix + inner] = state_dict.pop(prefix + outer)


# ----------------------------------------------------------------------------------- bias_k / bias_v
class _AppendBias(nn.Module):
    """Appends one learned vector to every sample's sequence: (B, S, E) -> (B, S + 1, E) (``bias_k``/``bias_v``
    of ``nn.MultiheadAttention``, shape (1, 1, E)). A layer of its own so the shared parameter has a
    per-sample rule: sample i's gradient is the output gradient at its appended position."""

    def __init__(self, bias: nn.Parameter) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.bias.expand(x.shape[0], 1, self.bias.shape[-1])], dim=1)


@register(_AppendBias)
class _AppendBiasHandler(LayerHandler):
    param_names = frozenset({"bias"})

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        return {"bias": rec.g[:, -1:].unsqueeze(1)}  # (B, 1, 1, E)


# ----------------------------------------------------------------------------------- attention
class DPMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with the same constructor, call signature, outputs and ``state_dict``, made of
    ``nn.Linear`` projections (``in_proj`` or ``q_proj``/``k_proj``/``v_proj``, ``out_proj``) that dpengine
    captures per sample. Build it with :meth:`from_torch` (what ``dpengine.fix`` does) or directly."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        ref = nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
                                    batch_first, device=device, dtype=dtype)  # torch's checks and initialization
        self._adopt(ref)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "DPMultiheadAttention":
        """The replacement of ``mha``, holding the same parameter objects where shapes allow (an optimizer built
        before the swap keeps working except for separate q/k/v biases, which are split from ``in_proj_bias``)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._adopt(mha)
        self.train(mha.training)
        return self

    def _adopt(self, m: nn.MultiheadAttention) -> None:
        self.embed_dim, self.kdim, self.vdim = m.embed_dim, m.kdim, m.vdim
        self.num_heads, self.head_dim, self.dropout = m.num_heads, m.head_dim, m.dropout
        self.batch_first, self.add_zero_attn = m.batch_first, m.add_zero_attn
        self._qkv_same_embed_dim = m._qkv_same_embed_dim
        has_bias = m.in_proj_bias is not None
        mapping: dict[str, str] = {}
        if m._qkv_same_embed_dim:
            self.in_proj = _linear(m.in_proj_weight, m.in_proj_bias)
            mapping["in_proj.weight"] = "in_proj_weight"
        else:
            biases = m.in_proj_bias.detach().chunk(3) if has_bias else (None, None, None)
            for name, w, b in zip(("q_proj", "k_proj", "v_proj"), (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight),
                                  biases):
                if b is not None:
                    b = nn.Parameter(b.clone(), requires_grad=m.in_proj_bias.requires_grad)
                setattr(self, name, _linear(w, b))
                mapping[f"{name}.weight"] = f"{name}_weight"
        if has_bias and m._qkv_same_embed_dim:
            mapping["in_proj.bias"] = "in_proj_bias"
        self.out_proj = m.out_proj
        if m.bias_k is not None:
            self.k_bias, self.v_bias = _AppendBias(m.bias_k), _AppendBias(m.bias_v)
            mapping.update({"k_bias.bias": "bias_k", "v_bias.bias": "bias_v"})
        else:
            self.k_bias = self.v_bias = None
        self._sd_mapping = mapping
        self.register_state_dict_post_hook(_mha_save_hook)
        self.register_load_state_dict_pre_hook(_mha_load_hook)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, E), (B, S, E), (B, S, E): the in-projections, one Linear call for a packed weight."""
        if not self._qkv_same_embed_dim:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        e = self.embed_dim
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)  # self-attention: (B, L, 3E)
        distinct: list[Tensor] = []
        for x in (query, key, value):
            if not any(x is d for d in distinct):
                distinct.append(x)
        # one call on the distinct inputs concatenated along the sequence: (B, L + S [+ S], 3E); each input
        # then takes its own block of columns (the unused blocks get zero gradient, so the per-sample
        # gradient of in_proj is exact)
        y = self.in_proj(torch.cat(distinct, dim=1)) if len(distinct) > 1 else self.in_proj(distinct[0])
        starts, s = [], 0
        for d in distinct:
            starts.append(s)
            s += d.shape[1]

        def block(x: Tensor, j: int) -> Tensor:
            i = next(i for i, d in enumerate(distinct) if d is x)
            return y[:, starts[i]:starts[i] + x.shape[1], j * e:(j + 1) * e]
        return block(query, 0), block(key, 1), block(value, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; the layers run batch-first whatever ``batch_first`` says."""
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if not batched:
            query, key, value = _same_identity((query, key, value), lambda x: x.unsqueeze(0))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # to batch-first BEFORE any tracked layer: the batch must be dimension 0
            query, key, value = _same_identity((query, key, value), lambda x: x.transpose(0, 1))
        bsz, tgt_len, e = query.shape  # (B, L, E)
        h, hd = self.num_heads, self.head_dim
        if e != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {e}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
        src_len = key.shape[1]
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA's own causal mask (the hint)
        elif key_padding_mask is not None:
            is_causal = False

        q, k, v = self._project(query, key, value)  # (B, L, E), (B, S, E), (B, S, E)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * h, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * h, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.k_bias is not None:
            k, v = self.k_bias(k), self.v_bias(v)  # (B, S + 1, E)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        # heads, flattened as torch does: row b * H + h
        q = q.reshape(bsz, tgt_len, h, hd).transpose(1, 2).reshape(bsz * h, tgt_len, hd)  # (B*H, L, hd)
        k = k.reshape(bsz, k.shape[1], h, hd).transpose(1, 2).reshape(bsz * h, k.shape[1], hd)  # (B*H, S', hd)
        v = v.reshape(bsz, v.shape[1], h, hd).transpose(1, 2).reshape(bsz * h, v.shape[1], hd)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * h, 1, hd, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, src_len, bsz)
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(bsz * h, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:  # explicit softmax, the ops of F.multi_head_attention_forward
            q_scaled = q * math.sqrt(1.0 / float(hd))
            if attn_mask is not None:
                w = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                w = torch.bmm(q_scaled, k.transpose(-2, -1))
            w = F.softmax(w, dim=-1)  # (B*H, L, S')
            if dropout_p > 0.0:
                w = F.dropout(w, p=dropout_p)
            out = torch.bmm(w, v)  # (B*H, L, hd)
            weights: Tensor | None = w.view(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, h, -1, src_len)
            out = F.scaled_dot_product_attention(q.view(bsz, h, tgt_len, hd), k.view(bsz, h, src_len, hd),
                                                 v.view(bsz, h, src_len, hd), attn_mask, dropout_p, is_causal)
            weights = None
        out = out.reshape(bsz, h, tgt_len, hd).transpose(1, 2).reshape(bsz, tgt_len, e)  # (B, L, E)
        out = self.out_proj(out)
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)
        return out, weights


def _mha_save_hook(module: nn.Module, sd: dict[str, Any], prefix: str, meta: Any) -> None:
    """state_dict post-hook of DPMultiheadAttention: torch's keys, in torch's order (in_proj_weight or
    q/k/v_proj_weight, in_proj_bias, bias_k, bias_v, out_proj.*)."""
    entries = {k: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}
    out: dict[str, Any] = {}
    if module._qkv_same_embed_dim:
        out["in_proj_weight"] = entries.pop(prefix + "in_proj.weight", None)
        out["in_proj_bias"] = entries.pop(prefix + "in_proj.bias", None)
    else:
        for n in ("q_proj", "k_proj", "v_proj"):
            out[f"{n}_weight"] = entries.pop(prefix + f"{n}.weight", None)
        bs = [entries.pop(prefix + f"{n}.bias", None) for n in ("q_proj", "k_proj", "v_proj")]
        out["in_proj_bias"] = torch.cat(bs) if all(b is not None for b in bs) else None
    out["bias_k"] = entries.pop(prefix + "k_bias.bias", None)
    out["bias_v"] = entries.pop(prefix + "v_bias.bias", None)
    sd.update({prefix + k: v for k, v in out.items() if v is not None})
    sd.update(entries)  # out_proj.*


def _mha_load_hook(module: nn.Module, sd: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook of DPMultiheadAttention: torch's keys -> internal ones (in_proj_bias split
    into the q/k/v biases when the projections are separate)."""
    _rename_on_load(module, sd, prefix)
    if not module._qkv_same_embed_dim and prefix + "in_proj_bias" in sd:
        for n, b in zip(("q_proj", "k_proj", "v_proj"), sd.pop(prefix + "in_proj_bias").chunk(3)):
            sd[prefix + f"{n}.bias"] = b


def _same_identity(xs: tuple[Tensor, ...], f: Any) -> tuple[Tensor, ...]:
    """``f`` applied to each tensor, keeping ``query is key`` / ``key is value`` relations."""
    done: list[tuple[Tensor, Tensor]] = []
    out = []
    for x in xs:
        hit = next((y for src, y in done if src is x), None)
        if hit is None:
            hit = f(x)
            done.append((x, hit))
        out.append(hit)
    return tuple(out)


def _linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An nn.Linear holding these parameter objects (no fresh allocation)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = weight
    if bias is not None:
        lin.bias = bias
    return lin


# ----------------------------------------------------------------------------------- recurrent layers
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


class DPRNNBase(nn.Module):
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` from ``nn.Linear`` layers: per layer and direction ``ih_l{k}[_reverse]``
    (input to gates, all time steps in one call), ``hh_l{k}[_reverse]`` (hidden to gates, one call per step) and,
    for an LSTM with ``proj_size``, ``hr_l{k}[_reverse]``. Same arguments, outputs and ``state_dict`` keys as the
    torch module (``weight_ih_l0`` ...). Dropout between layers draws its masks with ``F.dropout`` (same
    distribution as torch, not the same random numbers)."""

    mode = ""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 nonlinearity: str = "tanh", device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
                                  bidirectional=bidirectional, device=device, dtype=dtype)
        if self.mode == "LSTM":
            ref: nn.RNNBase = nn.LSTM(input_size, hidden_size, proj_size=proj_size, **kw)
        elif self.mode == "GRU":
            ref = nn.GRU(input_size, hidden_size, **kw)
        else:
            ref = nn.RNN(input_size, hidden_size, nonlinearity=nonlinearity, **kw)
        self._adopt(ref)

    @classmethod
    def from_torch(cls, rnn: nn.RNNBase) -> "DPRNNBase":
        """The replacement of ``rnn``, holding the very same parameter objects (no copy)."""
        kind = {"RNN_TANH": DPRNN, "RNN_RELU": DPRNN, "GRU": DPGRU, "LSTM": DPLSTM}[rnn.mode]
        self = kind.__new__(kind)
        nn.Module.__init__(self)
        self._adopt(rnn)
        self.train(rnn.training)
        return self

    def _adopt(self, m: nn.RNNBase) -> None:
        self.mode = m.mode
        self.input_size, self.hidden_size, self.num_layers = m.input_size, m.hidden_size, m.num_layers
        self.bias, self.batch_first, self.dropout = m.bias, m.batch_first, float(m.dropout)
        self.bidirectional, self.proj_size = m.bidirectional, m.proj_size
        self.nonlinearity = getattr(m, "nonlinearity", "tanh")
        mapping: dict[str, str] = {}
        for layer in range(m.num_layers):
            for sfx in ("", "_reverse") if m.bidirectional else ("",):
                tag = f"l{layer}{sfx}"
                for kind in ("ih", "hh"):
                    bias = getattr(m, f"bias_{kind}_{tag}") if m.bias else None
                    setattr(self, f"{kind}_{tag}", _linear(getattr(m, f"weight_{kind}_{tag}"), bias))
                mapping[f"ih_{tag}.weight"] = f"weight_ih_{tag}"
                mapping[f"hh_{tag}.weight"] = f"weight_hh_{tag}"
                if m.bias:
                    mapping[f"ih_{tag}.bias"] = f"bias_ih_{tag}"
                    mapping[f"hh_{tag}.bias"] = f"bias_hh_{tag}"
                if m.proj_size > 0:
                    setattr(self, f"hr_{tag}", _linear(getattr(m, f"weight_hr_{tag}"), None))
                    mapping[f"hr_{tag}.weight"] = f"weight_hr_{tag}"
        self._sd_mapping = mapping
        self.register_state_dict_post_hook(_rename_on_save)
        self.register_load_state_dict_pre_hook(_rename_on_load)

    def flatten_parameters(self) -> None:
        """No-op (torch's cuDNN weight packing has no counterpart here)."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return s

    # -------------------------------------------------------------------------------- forward
    def _cell(self, xt: Tensor, h: Tensor, c: Tensor | None, tag: str) -> tuple[Tensor, Tensor | None]:
        """One step: xt (B, G*H) = the input projection at this step, h (B, H_out), c (B, H) -> (h', c')."""
        gh = getattr(self, f"hh_{tag}")(h)  # (B, G*H)
        if self.mode == "LSTM":
            i, f, g, o = (xt + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if self.proj_size > 0:
                h = getattr(self, f"hr_{tag}")(h)  # (B, P)
            return h, c
        if self.mode == "GRU":
            xr, xz, xn = xt.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, None
        pre = xt + gh
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        """As the torch module: ``output, h_n`` (LSTM: ``output, (h_n, c_n)``)."""
        lstm = self.mode == "LSTM"
        dirs = 2 if self.bidirectional else 1
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        batched = True
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)  # (B, T, in), original order
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            # to batch-first BEFORE any tracked layer: the batch must be dimension 0
            x = input.unsqueeze(0) if not batched else (input if self.batch_first else input.transpose(0, 1))
            lengths = None
        bsz, steps, width = x.shape
        if width != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {width}")
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        if lstm and hx is not None and not isinstance(hx, tuple):
            raise RuntimeError("LSTM expects hx as a tuple (h_0, c_0)")
        h0 = self._initial(h0, bsz, h_out, batched, x, "hx" if not lstm else "h_0")
        c0 = self._initial(c0, bsz, self.hidden_size, batched, x, "c_0") if lstm else None
        mask = None
        if lengths is not None:
            mask = (torch.arange(steps, device=x.device).unsqueeze(0) < lengths.to(x.device).unsqueeze(1))  # (B, T)
            mask = mask.unsqueeze(2)
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                tag = f"l{layer}{'_reverse' if d else ''}"
                idx = layer * dirs + d
                xi = getattr(self, f"ih_{tag}")(layer_in)  # (B, T, G*H): every step in one call
                h, c = h0[idx], (c0[idx] if c0 is not None else None)
                seq: list[Tensor | None] = [None] * steps
                for t in (range(steps - 1, -1, -1) if d else range(steps)):
                    h_new, c_new = self._cell(xi[:, t], h, c, tag)
                    if mask is not None:  # a finished (or, in reverse, not yet started) sequence keeps its state
                        m = mask[:, t]
                        h = torch.where(m, h_new, h)
                        c = torch.where(m, c_new, c) if c is not None else None
                    else:
                        h, c = h_new, c_new
                    seq[t] = h
                outs.append(torch.stack(seq, dim=1) if steps else x.new_zeros(bsz, 0, h_out))  # (B, T, H_out)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_in = torch.cat(outs, dim=2) if dirs == 2 else outs[0]  # (B, T, D*H_out)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, p=self.dropout, training=True)
        out = layer_in
        hn = torch.stack(h_n, 0)  # (L*D, B, H_out)
        cn = torch.stack(c_n, 0) if lstm else None
        if packed:
            out = _repack(out, input)
        elif not batched:
            out, hn = out.squeeze(0), hn.squeeze(1)
            cn = cn.squeeze(1) if cn is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, ((hn, cn) if lstm else hn)

    def _initial(self, h: Tensor | None, bsz: int, size: int, batched: bool, x: Tensor, name: str) -> Tensor:
        """(L*D, B, size) initial state (zeros when not given), checked like torch's."""
        n = self.num_layers * (2 if self.bidirectional else 1)
        if h is None:
            return torch.zeros(n, bsz, size, dtype=x.dtype, device=x.device)
        if not batched:
            if h.dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, {name} should also be 2-D but got {h.dim()}-D tensor")
            h = h.unsqueeze(1)
        elif h.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, {name} should also be 3-D but got {h.dim()}-D tensor")
        if tuple(h.shape) != (n, bsz, size):
            raise RuntimeError(f"Expected hidden size {(n, bsz, size)}, got {list(h.shape)}")
        return h


def _repack(out: Tensor, like: PackedSequence) -> PackedSequence:
    """(B, T, F) padded output in the original batch order -> a PackedSequence with ``like``'s batch sizes and
    sorted/unsorted indices (its data in torch's order: by time step, then by sorted sequence)."""
    bs = like.batch_sizes  # (T,) on the CPU, non-increasing
    steps, bsz = bs.shape[0], out.shape[0]
    order = like.sorted_indices if like.sorted_indices is not None else torch.arange(bsz, device=out.device)
    valid = torch.arange(bsz).unsqueeze(0) < bs.unsqueeze(1)  # (T, B) over sorted positions
    b_idx = order.to(out.device).unsqueeze(0).expand(steps, bsz)[valid.to(out.device)]
    t_idx = torch.repeat_interleave(torch.arange(steps, device=out.device), bs.to(out.device))
    return PackedSequence(out[b_idx, t_idx], bs, like.sorted_indices, like.unsorted_indices)


class DPRNN(DPRNNBase):
    """``nn.RNN`` (tanh or relu) from ``nn.Linear`` layers; see :class:`DPRNNBase`."""

    mode = "RNN_TANH"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("nonlinearity", "tanh") == "relu":
            self.mode = "RNN_RELU"
        super().__init__(*args, **kwargs)


class DPGRU(DPRNNBase):
    """``nn.GRU`` from ``nn.Linear`` layers; see :class:`DPRNNBase`."""

    mode = "GRU"


class DPLSTM(DPRNNBase):
    """``nn.LSTM`` (with ``proj_size``) from ``nn.Linear`` layers; see :class:`DPRNNBase`."""

    mode = "LSTM"


# ----------------------------------------------------------------------------------- fix / validate support
_SWAPS: dict[type, tuple[type, str]] = {
    nn.MultiheadAttention: (DPMultiheadAttention, "dpengine.layers.DPMultiheadAttention"),
    nn.RNN: (DPRNN, "dpengine.layers.DPRNN"),
    nn.GRU: (DPGRU, "dpengine.layers.DPGRU"),
    nn.LSTM: (DPLSTM, "dpengine.layers.DPLSTM"),
}


#: the methods of the torch class that the dpengine equivalent reproduces (``overrides``)
_SWAP_METHODS = {nn.MultiheadAttention: ("forward", "merge_masks"), nn.RNNBase: ("forward", "permute_hidden")}


def swap_reason(layer: nn.Module) -> tuple[str | None, str | None]:
    """(replacement name, None) if ``fix`` can swap ``layer``; (None, why not) if it is an attention or
    recurrent layer it cannot swap; (None, None) for any other layer.

    A subclass is swapped as its torch base class only if it computes what that class computes (the rule of
    ``registry.overrides``, which also decides whether a per-sample handler reaches a subclass): one that
    overrides ``forward`` (or a method it relies on) is refused, whatever the override does."""
    if not isinstance(layer, (nn.MultiheadAttention, nn.RNNBase)):
        return None, None
    base = next((t for t in type(layer).__mro__ if t in _SWAPS), None)
    if base is None and isinstance(layer, nn.RNNBase) and layer.mode in _GATES:
        base = nn.RNNBase  # a bare RNNBase (or a subclass of it) with a known mode
    changed = [] if base is None else overrides(
        layer, base, _SWAP_METHODS[nn.MultiheadAttention if base is nn.MultiheadAttention else nn.RNNBase])
    if base is None or changed:
        parent = base.__name__ if base is not None else type(layer).__mro__[1].__name__
        what = f"overrides {', '.join(changed)}" if changed else "may change its forward"
        return None, (f"{type(layer).__name__} subclasses {parent} and {what}, so dpengine.fix cannot swap it for "
                      "an equivalent; build it from dpengine.layers (DPMultiheadAttention, DPRNN, DPGRU, DPLSTM) "
                      "instead, or do not override forward")
    if any(p.is_meta for p in layer.parameters()):
        return None, "its parameters are on the meta device; materialize them before dpengine.fix"
    return (_SWAPS[base][1] if base in _SWAPS else "dpengine.layers.DPRNNBase"), None


def swap_unsupported(module: nn.Module, prefix: str = "") -> list[tuple[str, str, str]]:
    """Replace, in place, every trainable ``nn.MultiheadAttention`` / ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` below
    ``module`` with its dpengine equivalent. Returns (name, old type, new type) for each swap."""
    from torch.nn.utils import parametrize

    done: list[tuple[str, str, str]] = []
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        new_name, why = swap_reason(child)
        trainable = any(p.requires_grad for p in child.parameters())
        if new_name is not None and trainable and not parametrize.is_parametrized(child):
            new = (DPMultiheadAttention.from_torch(child) if isinstance(child, nn.MultiheadAttention)
                   else DPRNNBase.from_torch(child))
            setattr(module, name, new)
            done.append((full, type(child).__name__, type(new).__name__))
        elif why is None and new_name is None:
            done += swap_unsupported(child, full + ".")
    return done


def _warn_swapped(done: list[tuple[str, str, str]]) -> None:
    if done:
        lines = ", ".join(f"{n or '<root>'}: {a} -> {b}" for n, a, b in done)
        warnings.warn(f"dpengine.fix swapped {len(done)} layer(s) for equivalents dpengine can train privately "
                      f"({lines}); same outputs and state_dict keys. Create the optimizer after fix.", stacklevel=3)
