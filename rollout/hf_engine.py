"""HFEngine: a transformers causal LM decoded by our own batched loop, with interruptible weight updates.

Dataflow (two threads share one engine; in a threaded Ray actor they are two concurrent calls):
- generate thread: ``generate`` splits the prompts into chunks of ``max_batch_size`` and decodes each
  chunk in one loop: prefill the left-padded prompts into a ``DynamicCache``, then one token per step
  for every unfinished row (finished rows are dropped from the batch and the cache). After each step
  (a token boundary) it takes ``_cond`` briefly and applies a pending weight update, if one was posted.
- update thread (the trainer's weight sync): ``update_weights`` validates the state_dict in the
  caller's thread, posts it as the pending update and waits on ``_cond`` until the decode loop has
  applied it, or ``timeout_s`` (TimeoutError). When no decode loop runs, it applies the update itself.
- After a swap the decode loop drops the KV cache and prefills prompt + tokens generated so far with
  the new weights (AReaL: "discard KV, recompute"), so every later token comes from the new weights
  alone. Each token records the version it was sampled under.
Who blocks whom: one decode loop at a time (``_generate_lock``; a second ``generate`` waits for the
first); an updater waits for the next token boundary (one decode step) or the end of generation.
Shutdown: nothing runs in the background; an update still pending when generation ends is applied
by the exiting generate call, so no updater is left waiting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from areal_like.types import GenerationOutput
from rollout.engine import EngineLoad, SamplingParams

logger = logging.getLogger(__name__)

# Shape legend: B = rows (requests) in the batch being decoded, L = sequence columns (left padding
# included), V = vocabulary, N = max_new_tokens.


@dataclass
class _PendingUpdate:
    """New weights posted by ``update_weights`` for the decode loop to load at a token boundary."""

    state_dict: dict[str, torch.Tensor]
    version: int
    applied: bool = False


class HFEngine:
    """Generation engine on a transformers model, float32 on CPU (see the module docstring).

    Behaviour log-probs: each token's log-prob is ``log_softmax(logits / temperature)[token]``, the
    distribution it was sampled from (raw logits when greedy). With ``top_p < 1`` the token is drawn
    from the nucleus-truncated distribution but the log-prob recorded is under the *un-truncated*
    tempered distribution, which is what a trainer recomputes from the same logits.
    """

    def __init__(
        self,
        model: PreTrainedModel | str | os.PathLike,
        engine_id: int = 0,
        version: int = 0,
        max_batch_size: int = 512,
        seed: int = 0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"HFEngine max_batch_size={max_batch_size}: must be >= 1.")
        if not isinstance(model, PreTrainedModel):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, local_files_only=True)
        self.model = model.to(device="cpu", dtype=torch.float32).eval()
        self.engine_id = engine_id
        self.max_batch_size = max_batch_size
        self._version = version
        self._generator = torch.Generator().manual_seed(seed)
        config = self.model.config.get_text_config(decoder=True)
        self._vocab_size: int = config.vocab_size
        # Pad positions are masked out, so any valid id works; prefer the model's own.
        pad_token_id = getattr(config, "pad_token_id", None)
        self._pad_token_id: int = pad_token_id if pad_token_id is not None else 0
        self._param_shapes = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}

        self._cond = threading.Condition()
        self._generate_lock = threading.Lock()
        self._decoding = False  # a generate call holds _generate_lock (guarded by _cond)
        self._pending: _PendingUpdate | None = None  # guarded by _cond
        self._num_queued_rows = 0  # accepted by generate, not yet in a decoding chunk (guarded by _cond)
        self._num_active_rows = 0  # unfinished rows of the chunk being decoded (decode thread writes)
        self._tokens_in_flight = 0  # decode thread writes
        self._on_step: Callable[[int], None] | None = None
        """Test hook, called at each token boundary with the number of tokens generated so far."""

    @property
    def version(self) -> int:
        return self._version

    def load(self) -> EngineLoad:
        with self._cond:
            return EngineLoad(
                running_requests=self._num_queued_rows + self._num_active_rows,
                tokens_in_flight=self._tokens_in_flight,
            )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        """Generate one response per prompt, in prompt order; blocks while another generate runs."""
        self._check_prompts(prompts)
        with self._cond:
            self._num_queued_rows += len(prompts)
        num_started = 0
        with self._generate_lock:
            with self._cond:
                self._decoding = True
            try:
                outputs: list[GenerationOutput] = []
                for start in range(0, len(prompts), self.max_batch_size):
                    chunk = prompts[start : start + self.max_batch_size]
                    with self._cond:
                        self._num_queued_rows -= len(chunk)
                    num_started += len(chunk)
                    outputs.extend(self._generate_chunk(chunk, params))
                return outputs
            finally:
                with self._cond:
                    self._num_queued_rows -= len(prompts) - num_started
                    self._num_active_rows = 0
                    self._tokens_in_flight = 0
                    self._decoding = False
                    # An update posted after the last token boundary: no decode loop will take it.
                    self._apply_pending_locked(step=None)

    def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int, timeout_s: float = 60.0
    ) -> None:
        """Load ``state_dict`` as policy ``version``; running generation switches at its next token.

        Blocks until the weights are loaded. Raises ValueError (weights and version unchanged) when
        the state_dict does not match the model or the version goes backwards, and TimeoutError
        when the decode loop does not reach a token boundary within ``timeout_s``.
        """
        self._check_update(state_dict, version)
        update = _PendingUpdate(state_dict=state_dict, version=version)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            # One update at a time: a second updater waits for the first to be applied.
            if not self._cond.wait_for(lambda: self._pending is None, timeout=timeout_s):
                raise TimeoutError(
                    f"engine {self.engine_id}: update to version {version} waited {timeout_s}s behind the "
                    f"update to version {self._pending.version}, which is still not applied; "
                    "check that the engine's decode loop is making progress."
                )
            if not self._decoding:
                self._pending = update
                self._apply_pending_locked(step=None)
                return
            self._pending = update
            self._cond.notify_all()
            remaining_s = max(deadline - time.monotonic(), 0.0)
            if not self._cond.wait_for(lambda: update.applied, timeout=remaining_s):
                self._pending = None
                raise TimeoutError(
                    f"engine {self.engine_id}: update to version {version} not applied within {timeout_s}s "
                    f"(engine still at version {self._version}); a decode step took longer than the "
                    "timeout: raise timeout_s or lower max_batch_size."
                )

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(
                    f"engine {self.engine_id}: prompt {index} is empty; every prompt needs a token."
                )
            low, high = min(prompt), max(prompt)
            if low < 0 or high >= self._vocab_size:
                raise ValueError(
                    f"engine {self.engine_id}: prompt {index} has token ids in [{low}, {high}], outside the "
                    f"model's vocabulary [0, {self._vocab_size}); tokenize with the model's tokenizer."
                )

    def _check_update(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Validate before loading: ``load_state_dict`` copies matching tensors before it raises."""
        if version < self._version:
            raise ValueError(
                f"engine {self.engine_id}: update_weights version={version} is older than the loaded version "
                f"{self._version}; versions must not go backwards."
            )
        missing = [name for name in self._param_shapes if name not in state_dict]
        unexpected = [name for name in state_dict if name not in self._param_shapes]
        mismatched = [
            f"{name}: got {tuple(tensor.shape)}, model has {self._param_shapes[name]}"
            for name, tensor in state_dict.items()
            if name in self._param_shapes
            and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != self._param_shapes[name])
        ]
        if missing or unexpected or mismatched:
            problems = [
                f"{label} ({len(items)}): {items[:3]}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
                if items
            ]
            raise ValueError(
                f"engine {self.engine_id}: state_dict for version {version} does not match the model; "
                f"{'; '.join(problems)}. Send the full model state_dict under the model's own "
                f"parameter names. Weights and version ({self._version}) are unchanged."
            )

    def _apply_pending_locked(self, step: int | None) -> bool:
        """Load the pending update, if any; caller holds ``_cond``. Returns whether weights changed."""
        update = self._pending
        if update is None:
            return False
        self.model.load_state_dict(update.state_dict, strict=True)
        logger.info(
            "engine %d: weights v%d -> v%d %s",
            self.engine_id,
            self._version,
            update.version,
            "between generations" if step is None else f"at token {step}, re-encoding the batch",
        )
        self._version = update.version
        update.applied = True
        self._pending = None
        self._cond.notify_all()
        return True

    def _token_boundary(self, num_generated: int) -> bool:
        """Where the decode loop may be interrupted; returns whether the weights changed."""
        if self._on_step is not None:
            self._on_step(num_generated)
        with self._cond:
            return self._apply_pending_locked(step=num_generated)

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        num_rows, max_new = len(prompts), params.max_new_tokens
        prompt_lens = [len(prompt) for prompt in prompts]
        max_prompt_len = max(prompt_lens)
        # Left-padded sequences with room for every new token; columns [0, num_cols) are in use.
        seq_ids = torch.full(
            (num_rows, max_prompt_len + max_new), self._pad_token_id, dtype=torch.long
        )  # [B, L]
        seq_mask = torch.zeros_like(seq_ids)  # [B, L]
        for row, prompt in enumerate(prompts):
            seq_ids[row, max_prompt_len - len(prompt) : max_prompt_len] = torch.tensor(
                prompt, dtype=torch.long
            )
            seq_mask[row, max_prompt_len - len(prompt) : max_prompt_len] = 1
        num_cols = max_prompt_len
        seq_lens = torch.tensor(prompt_lens, dtype=torch.long)  # [B] real tokens per row
        rows = torch.arange(num_rows)  # [B] index into the outputs of each row still decoding
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long) if params.stop_token_ids else None

        out_tokens = torch.zeros((num_rows, max_new), dtype=torch.long)  # [B, N]
        out_logprobs = torch.zeros((num_rows, max_new), dtype=torch.float32)  # [B, N]
        out_lens = torch.zeros(num_rows, dtype=torch.long)
        stopped_by_token = torch.zeros(num_rows, dtype=torch.bool)
        step_versions: list[int] = []  # version of the weights that produced the token at each step
        self._num_active_rows = num_rows
        self._tokens_in_flight = int(seq_lens.sum())

        self._token_boundary(0)
        logits, cache = self._prefill(seq_ids[:, :num_cols], seq_mask[:, :num_cols])
        num_generated = 0
        while True:
            tokens, logprobs = self._sample(logits, params)
            out_tokens[rows, num_generated] = tokens
            out_logprobs[rows, num_generated] = logprobs
            step_versions.append(self._version)
            num_generated += 1
            stopped = torch.isin(tokens, stop_ids) if stop_ids is not None else None
            if stopped is not None:
                stopped_by_token[rows[stopped]] = True
            if num_generated == max_new:
                break
            if stopped is not None and bool(stopped.any()):
                out_lens[rows[stopped]] = num_generated
                keep = (~stopped).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                rows, tokens, seq_lens = rows[keep], tokens[keep], seq_lens[keep]
                seq_ids, seq_mask = seq_ids[keep], seq_mask[keep]
                cache.batch_select_indices(keep)
                self._num_active_rows = len(rows)
            seq_ids[:, num_cols] = tokens
            seq_mask[:, num_cols] = 1
            num_cols += 1
            seq_lens += 1
            self._tokens_in_flight = int(seq_lens.sum())

            if self._token_boundary(num_generated):
                # New weights: the cached keys/values are stale, recompute them over the whole prefix.
                logits, cache = self._prefill(seq_ids[:, :num_cols], seq_mask[:, :num_cols])
            else:
                logits = self._decode_step(tokens, seq_mask[:, :num_cols], seq_lens - 1, cache)
        out_lens[rows] = num_generated
        self._num_active_rows = 0

        token_lists, logprob_lists = out_tokens.tolist(), out_logprobs.tolist()
        return [
            GenerationOutput(
                response_ids=token_lists[row][:length],
                logprobs=logprob_lists[row][:length],
                versions=step_versions[:length],
                finish_reason="stop" if stopped else "length",
            )
            for row, (length, stopped) in enumerate(
                zip(out_lens.tolist(), stopped_by_token.tolist(), strict=True)
            )
        ]

    def _prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Encode left-padded sequences [B, L] into a fresh cache; returns next-token logits [B, V]."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :].float(), cache

    def _decode_step(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Feed one token per row [B] at ``positions`` [B]; ``attention_mask`` [B, L] covers cache + token."""
        output = self.model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        return output.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one token per row from logits [B, V]; returns tokens [B] and their behaviour log-probs [B]."""
        if params.temperature == 0.0:
            logprobs_all = torch.log_softmax(logits, dim=-1)
            tokens = logits.argmax(dim=-1)
        else:
            logprobs_all = torch.log_softmax(logits / params.temperature, dim=-1)
            probs = logprobs_all.exp()
            if params.top_p < 1.0:
                probs = _truncate_to_top_p(probs, params.top_p)
            tokens = torch.multinomial(probs, num_samples=1, generator=self._generator).squeeze(1)
        return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(1)


def _truncate_to_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus: the most likely tokens whose mass first reaches top_p."""
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    # A token is dropped when the tokens ranked above it already hold top_p; the first always stays.
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)
