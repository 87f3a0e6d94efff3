"""The fused-projection arm of ``gpu_bench.py``: each Phi decoder block computes q, k, v and the MLP's
fc1 with one matrix product instead of four.

Phi's parallel block feeds one LayerNorm output into ``q_proj``, ``k_proj``, ``v_proj`` and ``mlp.fc1``
(for phi-1.5: 2048 to 2048 + 2048 + 2048 + 8192 = 14,336 columns). ``fuse_projections(model)`` rebinds
each block's forward so that the four come from one ``F.linear`` over the four weights and biases
concatenated at forward time. The concatenation is part of the autograd graph, so every original
parameter gets its own gradient, and nothing about the model changes: parameter names, shapes,
``state_dict``, checkpoints and exported models stay Hugging Face's. The rest of the block is the
installed transformers forward, step for step: partial rotary embedding, ``qk_layernorm`` when set,
the attention function ``config._attn_implementation`` names (eager, sdpa, flash) with the same
keyword arguments, ``dense``, the activation, ``fc2``, the residual sum, dropout in training mode, and
gradient checkpointing when enabled.

What it measures is the price of four GEMMs against one wider GEMM plus the copies of the weight
concatenation (forward) and the gradient split (backward). It is a bench arm, not a kolm option.

Limits: it refuses a model it does not know (any class other than transformers' own
``PhiDecoderLayer``, ``PhiAttention``, ``PhiMLP`` and plain ``nn.Linear``: for example fp8's
Float8Linear), a block whose forward was already replaced (fuse first, then compile), and ZeRO-3.
ZeRO-3 gathers a partitioned parameter in the forward hook of the module that owns it; the fused
forward reads the weights of ``q_proj`` and the others without calling those modules, so it would read
empty partitions. Attention probabilities are not recorded for ``output_attentions``.
"""

from __future__ import annotations

import types
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def fuse_projections(model: nn.Module) -> int:
    """Rebind every decoder block's forward of a built ``PhiForCausalLM`` (or subclass) to the fused
    one, in place; returns the number of blocks. Every block is checked before any is changed."""
    from transformers import PhiForCausalLM

    if not isinstance(model, PhiForCausalLM):
        raise ValueError(f"fuse_projections needs a transformers PhiForCausalLM, got {type(model).__name__}")
    layers = list(model.model.layers)
    for index, layer in enumerate(layers):
        _check(layer, index)
    for layer in layers:
        layer.forward = types.MethodType(fused_forward, layer)
    return len(layers)


def is_fused(layer: nn.Module) -> bool:
    """Whether ``layer.forward`` is the fused forward (bound by ``fuse_projections``)."""
    return getattr(layer.__dict__.get("forward"), "__func__", None) is fused_forward


def _check(layer: nn.Module, index: int) -> None:
    """Refuse a block the fused forward would not compute exactly."""
    from transformers.models.phi.modeling_phi import PhiAttention, PhiDecoderLayer, PhiMLP

    where = f"decoder block {index}"
    for part, cls in ((layer, PhiDecoderLayer), (getattr(layer, "self_attn", None), PhiAttention),
                      (getattr(layer, "mlp", None), PhiMLP)):
        if type(part) is not cls:  # a subclass may change the forward it would replace
            raise ValueError(f"{where}: expected transformers' {cls.__name__}, got {type(part).__name__}; "
                             "fuse_projections knows only the installed transformers Phi block")
    if "forward" in layer.__dict__ and not is_fused(layer):
        raise ValueError(f"{where}: its forward was already replaced (compiled blocks?); fuse the projections "
                         "first, then compile")
    linears = _projections(layer)
    for name, linear in zip(("q_proj", "k_proj", "v_proj", "fc1"), linears):
        if type(linear) is not nn.Linear or linear.bias is None:
            kind = type(linear).__name__ + ("" if linear.bias is not None else " without bias")
            raise ValueError(f"{where}: {name} is a {kind}; the fused product needs plain nn.Linear layers with "
                             "biases (fp8 blocks cannot be fused)")
    if len({(w.weight.shape[1], w.weight.dtype, w.weight.device) for w in linears}) != 1:
        raise ValueError(f"{where}: q, k, v and fc1 differ in input size, dtype or device")
    if any(hasattr(p, "ds_id") for p in layer.parameters()):
        raise ValueError(f"{where}: its parameters are partitioned by DeepSpeed ZeRO-3, which gathers them in "
                         "each submodule's forward; the fused forward skips those, so use ZeRO stage 0, 1 or 2")


def _projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    attn = layer.self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj, layer.mlp.fc1


def fused_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, cache=None, use_cache: bool | None = False,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """``PhiDecoderLayer.forward`` with q, k, v and fc1 from one matrix product (bound to a block)."""
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                  position_embeddings=position_embeddings, **kwargs)
    # As transformers' GradientCheckpointingLayer wraps the class forward (which this replaces):
    # checkpoint the block when enabled, training and recording gradients, with no cache.
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        kwargs["use_cache"] = False
        if not self._can_checkpoint_with_cache:
            kwargs["cache"] = None
        return self._gradient_checkpointing_func(partial(_block, self, **kwargs), hidden_states)
    return _block(self, hidden_states, **kwargs)


def _block(layer: nn.Module, hidden_states: torch.Tensor, attention_mask, position_ids, cache, use_cache,
           position_embeddings, **kwargs) -> torch.Tensor:
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    linears = _projections(layer)
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears])
    q, k, v, up = F.linear(hidden_states, weight, bias).split([m.out_features for m in linears], dim=-1)
    # PhiAttention receives position_ids and use_cache among its **kwargs and hands them on.
    attn_outputs = _attention(layer.self_attn, q, k, v, position_embeddings, attention_mask, cache,
                              position_ids=position_ids, use_cache=use_cache, **kwargs)
    attn_outputs = layer.resid_dropout(attn_outputs)
    mlp = layer.mlp
    feed_forward_hidden_states = layer.resid_dropout(mlp.fc2(mlp.activation_fn(up)))
    return attn_outputs + feed_forward_hidden_states + residual


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask, cache,
               **kwargs) -> torch.Tensor:
    """``PhiAttention.forward`` after its three projections."""
    # Looked up at call time, so a wrapper installed on the module (the profile's labels) applies.
    from transformers.models.phi import modeling_phi as phi

    input_shape = q.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    query_states = q.view(hidden_shape).transpose(1, 2)
    key_states = k.view(hidden_shape).transpose(1, 2)
    value_states = v.view(hidden_shape).transpose(1, 2)
    if attn.qk_layernorm:
        query_states = attn.q_layernorm(query_states)
        key_states = attn.k_layernorm(key_states)
    cos, sin = position_embeddings
    rotary = attn.rotary_ndims  # partial rotary: the first rotary_ndims of each head turn
    query_rot, key_rot = phi.apply_rotary_pos_emb(query_states[..., :rotary], key_states[..., :rotary], cos, sin)
    query_states = torch.cat((query_rot, query_states[..., rotary:]), dim=-1)
    key_states = torch.cat((key_rot, key_states[..., rotary:]), dim=-1)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, attn.layer_idx, kwargs=kwargs)
    attention_interface = phi.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                    phi.eager_attention_forward)
    attn_output, _ = attention_interface(attn, query_states, key_states, value_states, attention_mask,
                                         dropout=0.0 if not attn.training else attn.attention_dropout,
                                         scaling=attn.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return attn.dense(attn_output)
