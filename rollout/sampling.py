"""Per-row token sampling with behaviour log-probs, each row drawing from its own random stream.

Each token's log-prob is ``log_softmax(logits / temperature)[token]``, the distribution it was
sampled from (raw logits when greedy, temperature 0). With ``top_p < 1`` the token is drawn from the
nucleus-truncated distribution but the log-prob recorded is under the *un-truncated* tempered
distribution, which is what a trainer recomputes from the same logits.

Randomness: a sampled row draws V uniforms from its request's own ``torch.Generator`` per token and
takes the Gumbel-max (``argmax(log p + Gumbel noise)``, an exact sample of p). So a request's
tokens depend on its seed, its prefix and the weights only, never on which other requests shared
its batch or when it joined: continuous batching stays reproducible.

Shape legend: B = rows, S = sampled (non-greedy) rows, V = vocabulary.
"""

from __future__ import annotations

import torch


def sample_tokens(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits [B, V] with per-row temperatures [B] (0 = greedy), top_p [B] and
    random streams (one generator per row); returns the tokens [B] and their behaviour log-probs [B]."""
    greedy = temperatures == 0.0
    logprobs_all = torch.log_softmax(logits / torch.where(greedy, 1.0, temperatures)[:, None], dim=-1)
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        sampled = (~greedy).nonzero().squeeze(1)  # [S]
        scores = logprobs_all[sampled]  # [S, V]
        rows_top_p = top_p[sampled]
        if bool((rows_top_p < 1.0).any()):
            outside = _outside_top_p(scores.exp(), rows_top_p[:, None])
            scores = scores.masked_fill(outside, float("-inf"))
        vocab = logits.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=generators[i]) for i in sampled.tolist()]
        )  # [S, V]
        gumbel = -torch.log(-torch.log(uniform))  # a uniform of exactly 0 gives -inf: never picked
        tokens[sampled] = (scores + gumbel).argmax(dim=-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(1)


def _outside_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True for every token outside each row's nucleus (probs [S, V], top_p [S, 1]): the nucleus is
    the most likely tokens whose mass first reaches top_p."""
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    # A token is dropped when the tokens ranked above it already hold top_p; the first always stays.
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    return torch.zeros_like(drop_sorted).scatter_(-1, sorted_ids, drop_sorted)
