"""The shared sampler (node/training/sampling.py) and a custom model's sample() contract, in-process."""

from __future__ import annotations

import pytest
import torch

from node.training.sampling import sample_bytes
from node.training.trainer import Trainer


def bigram_logits(tokens: torch.Tensor) -> torch.Tensor:
    """Always predicts the byte after the last one (a, b, c...)."""
    logits = torch.full((*tokens.shape, 256), -10.0)
    logits.scatter_(2, ((tokens + 1) % 256).unsqueeze(-1), 10.0)
    return logits


def test_greedy_sampling_follows_the_logits_and_sees_only_the_context() -> None:
    seen = []

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.shape[1])
        return bigram_logits(tokens)

    out = sample_bytes(logits_of, b"a", 5, context_bytes=3, device=torch.device("cpu"), temperature=0)
    assert out == b"bcdef" and max(seen) == 3


def test_sampling_is_reproducible_with_a_seed_and_an_empty_prompt_starts_at_a_newline() -> None:
    noisy = lambda tokens: torch.randn(*tokens.shape, 256, generator=torch.Generator().manual_seed(0))  # noqa: E731
    draws = [sample_bytes(noisy, b"", 20, context_bytes=8, device=torch.device("cpu"),
                          generator=torch.Generator().manual_seed(7)) for _ in range(2)]  # fmt: skip
    assert draws[0] == draws[1] and len(draws[0]) == 20
    starts = []
    sample_bytes(lambda t: starts.append(t.tolist()) or bigram_logits(t), b"", 1, context_bytes=8,
                 device=torch.device("cpu"), temperature=0)  # fmt: skip
    assert starts == [[[10]]]


def test_logits_of_the_wrong_shape_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"logits \[1, 1, vocabulary\]"):
        sample_bytes(lambda t: torch.zeros(256), b"a", 1, context_bytes=4, device=torch.device("cpu"))


class Stub:
    """Just enough of a Trainer for sample(): a model and the manifest's sequence length."""

    class manifest:  # noqa: N801
        class model:  # noqa: N801
            seq_len = 16

    device = torch.device("cpu")

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model


class ForwardOnly(torch.nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return bigram_logits(tokens)


def test_a_model_with_forward_logits_samples_without_generate_and_one_without_either_says_what_it_needs() -> None:
    assert Trainer.sample(Stub(ForwardOnly()), "a", 3, temperature=0, seed=0) == "bcd"  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forward\\(tokens\\).*generate"):
        Trainer.sample(Stub(torch.nn.Module()), "a", 3, temperature=0, seed=0)  # type: ignore[arg-type]
