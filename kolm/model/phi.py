"""The Phi model kolm trains: Hugging Face's `PhiForCausalLM` with the same weights and names
(checkpoints convert to a plain Hugging Face model), whose forward can also return the summed
next-token loss straight from the hidden states, through kolm.model.loss, without ever holding
the ``[batch, seq, vocab]`` logits.

``model(input_ids, targets=targets)`` is the training call; ``model(input_ids)`` returns the usual
`CausalLMOutputWithPast` (generation, conversion checks). Calling the LM head as a module keeps
DeepSpeed ZeRO-3's parameter gathering working: its hooks run around every module call.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PhiForCausalLM

from kolm.errors import KolmError
from kolm.model.loss import linear_cross_entropy


class LossHead(nn.Linear):
    """The LM head: logits as usual, or with ``targets`` the summed cross-entropy (and, with
    ``accuracy``, the number of correct next-token predictions) computed chunk by chunk."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, accuracy: bool = False):
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, self.bias,
                                    targets.reshape(-1), accuracy=accuracy)


class PhiForTraining(PhiForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        old = self.lm_head
        # Built on the meta device (no initialisation, no random numbers drawn), then given the
        # initialised parameters: the same weights as PhiForCausalLM(config) under the same seed.
        head = LossHead(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        head.weight, head.bias = old.weight, old.bias
        self.lm_head = head

    def forward(self, input_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                accuracy: bool = False, **kwargs):
        if targets is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
        return self.lm_head(hidden, targets, accuracy=accuracy)


def phi_from_state_dict(config, state: dict[str, torch.Tensor], cls: type[PhiForCausalLM] = PhiForCausalLM):
    """A model of class ``cls`` whose parameters are the given tensors (no copy, no random
    initialisation): built on the meta device, then given the weights by their Hugging Face names."""
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise KolmError(f"the weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # The rotary frequencies are a computed buffer, not a weight: build them for real.
    model.model.rotary_emb = PhiRotaryEmbedding(config=config)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise KolmError("the weights do not cover every model tensor")
    return model
