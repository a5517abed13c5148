"""Writing text with a byte-level model: the sampling loop every model shares.

A model that returns next-byte logits from ``forward(tokens)`` (shape [batch, length, vocabulary], as
MoETransformer does) can write text with no code of its own; a model may instead define ``generate``
(see node/training/trainer.py: SwarmModel).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Logits = Callable[[torch.Tensor], torch.Tensor]  # tokens [1, length] (long) -> logits [1, length, vocabulary]
NEUTRAL_START = 10  # an empty prompt still needs one position to predict from: a newline


@torch.no_grad()
def sample_bytes(
    logits_of: Logits,
    prompt: bytes,
    max_new_bytes: int,
    *,
    context_bytes: int,
    device: torch.device,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> bytes:
    """``max_new_bytes`` bytes after ``prompt``, each drawn from the logits of the last ``context_bytes``
    (the model's sequence length); ``temperature`` <= 0 means greedy decoding. ``generator`` must live on
    the CPU (the draw is made there). Raises ValueError when the logits are not [1, length, vocabulary]."""
    context = list(prompt) or [NEUTRAL_START]
    out = []
    for _ in range(max_new_bytes):
        window = torch.tensor([context[-context_bytes:]], dtype=torch.long, device=device)
        logits = logits_of(window)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != window.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the model's forward(tokens) must return logits [1, {window.shape[1]}, vocabulary], "
                             f"got {shape}")  # fmt: skip
        last = logits[0, -1].float()
        if temperature <= 0:
            nxt = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        context.append(nxt)
        out.append(nxt)
    return bytes(out)
