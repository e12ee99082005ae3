"""Exact gradient caching: a contrastive batch larger than memory, with the full-batch gradient.

The contrastive loss couples every image with every text of the global batch, so ordinary gradient
accumulation over micro-batches changes the objective (each micro-batch would only see its own negatives).
Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") keeps the objective exact in three passes:

1. encode every micro-batch without building a graph, keeping only the embeddings (n × D floats);
2. compute the loss of the whole batch on those embeddings (the chunked loss never holds an n × n matrix)
   and back-propagate it down to the embeddings only — this caches d loss / d embedding;
3. re-encode each micro-batch with a graph and back-propagate the cached embedding gradients into the
   parameters, one micro-batch at a time, so activation memory is that of a single micro-batch.

Pass 3 must reproduce pass 1's forward exactly — dropout masks and the patch-dropout token subset included —
so the random-number state in force before each micro-batch's first encoding is restored before its
second one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class _RandomState:
    cpu: Tensor
    cuda: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


def gradient_cached_step(
    model: nn.Module,
    loss_fn: Callable[..., object],
    images: Tensor,
    tokens: Tensor,
    micro_batch_size: int,
    *,
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    text_lengths: Sequence[int] | None = None,
    text_groups: int = 4,
):
    """Accumulate into `.grad` the exact full-batch gradient of the contrastive loss, micro-batch-wise.

    Args:
        model: a CLIP model whose `forward(images, tokens)` returns normalised `image_embeds`, `text_embeds`
            (n, D) and `logit_scale` / `logit_bias`, and whose `logit_scale_and_bias()` returns those two
            with a graph to their parameters.
        loss_fn: the contrastive loss, called as `loss_fn(image_embeds, text_embeds, logit_scale, logit_bias)`
            and returning an object with a scalar `.loss`; across ranks it gathers embeddings itself.
        images: (n, 3, H, W) this rank's images; tokens: (n, L) this rank's token ids.
        micro_batch_size: rows encoded at once in passes 1 and 3.
        backward: how to back-propagate a scalar (Lightning's `manual_backward` inside the trainer, which
            also readies DistributedDataParallel's reducer). Not usable with a dynamic fp16 loss scale, which
            would be applied twice; use bf16.
        no_sync: context that suspends data-parallel gradient averaging (`DistributedDataParallel.no_sync`
            or Lightning's `block_backward_sync`). Every backward but the last runs inside it; the last one
            covers every parameter, so the averaging happens once, over the accumulated full-batch gradient.
        text_lengths, text_groups: each caption's length, to encode every micro-batch's captions in length
            groups (see `clip_train.models.length_groups`); None pads every caption.

    Returns:
        The loss function's output for the full batch (its `.loss` detached from any graph).
    """
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"images and tokens disagree on the batch size: {images.shape[0]} vs {tokens.shape[0]}"
        )
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    device = images.device
    image_chunks = images.split(micro_batch_size)
    token_chunks = tokens.split(micro_batch_size)
    if text_lengths is None:
        texts = [{} for _ in token_chunks]
    else:
        texts = [
            {"text_lengths": text_lengths[i : i + micro_batch_size], "text_groups": text_groups}
            for i in range(0, len(text_lengths), micro_batch_size)
        ]

    # Pass 1: embeddings without a graph; remember the random state each micro-batch started from.
    states: list[_RandomState] = []
    image_parts, text_parts = [], []
    with torch.no_grad():
        for image_chunk, token_chunk, text in zip(image_chunks, token_chunks, texts):
            states.append(_RandomState.capture(device))
            out = model(image_chunk, token_chunk, **text)
            image_parts.append(out.image_embeds)
            text_parts.append(out.text_embeds)
    after_pass_1 = _RandomState.capture(device)

    # Pass 2: full-batch loss, back-propagated to the (leaf) embeddings and the temperature parameters.
    image_embeds = torch.cat(image_parts).requires_grad_(True)  # (n, D)
    text_embeds = torch.cat(text_parts).requires_grad_(True)  # (n, D)
    temperature = getattr(model, "module", model).logit_scale_and_bias  # unwrap DistributedDataParallel
    with no_sync():
        logit_scale, logit_bias = temperature()
        output = loss_fn(image_embeds, text_embeds, logit_scale, logit_bias)
        backward(output.loss)
    image_grads = image_embeds.grad.split(micro_batch_size)
    text_grads = text_embeds.grad.split(micro_batch_size)

    # Pass 3: re-encode with a graph and push the cached gradients through, one micro-batch at a time.
    # <e, g> summed has gradient g with respect to e, so its backward is exactly the cached-gradient push.
    last = len(states) - 1
    for i, (state, image_chunk, token_chunk) in enumerate(zip(states, image_chunks, token_chunks)):
        state.restore(device)
        with nullcontext() if i == last else no_sync():
            out = model(image_chunk, token_chunk, **texts[i])
            surrogate = (out.image_embeds * image_grads[i]).sum() + (out.text_embeds * text_grads[i]).sum()
            if i == last:
                # Touch the temperature (with a zero) so the synchronising backward sees every parameter.
                surrogate = surrogate + sum(0.0 * p for p in temperature() if p is not None)
            backward(surrogate)
    after_pass_1.restore(device)  # leave the generator where a single forward pass would have left it

    return output._replace(loss=output.loss.detach())
