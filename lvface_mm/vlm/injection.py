"""Identity tokens written into a Hugging Face model's input embeddings.

The mechanism is transformers' own image merge, moved one step earlier: the prompt holds K copies
of a `<face>` placeholder per face, and wherever the ids equal the placeholder id the embedding
output is replaced (`masked_scatter`) by the projected identity tokens, in order, after a strict
count check. It runs as a forward hook on `model.get_input_embeddings()`, so:

- it works inside the model's own `forward` and `generate` for plain LLMs and every VLM family,
  and composes with `pixel_values` (image tokens are merged later, by the model);
- `input_ids` reach the model unchanged, so Qwen2-VL's M-RoPE and every image mask still work;
- it fires only when placeholders are in the step's ids: during generation that is the prefill,
  since decode steps carry only new tokens (and `IdentityVLM.generate` suppresses the placeholder);
- when generation expands rows (beam search, `num_return_sequences`), transformers repeats each
  prompt row r times in place (`repeat_interleave`), so expanded row i reads prompt row i // r.

Identity tokens are handed over with `IdentityInjector.provide(...)`, a context manager: the
forward hook reads them from there instead of from a new model kwarg, because transformers forwards
unknown kwargs to every decode step and into sub-modules that reject them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class FaceCountError(ValueError):
    """The number of placeholder tokens does not match the identity tokens given."""


@dataclass(frozen=True)
class IdentityTokens:
    """Identity tokens for one batch of prompts.

    Attributes:
        rows: one (n_i, D) tensor per prompt row, the tokens for that row's placeholders in the order
            they appear (n_i = K x the number of face references in the row; (0, D) for none).
        num_id_tokens: K, used only to phrase errors in faces rather than tokens.
    """

    rows: tuple[torch.Tensor, ...]
    num_id_tokens: int = 1

    def __post_init__(self) -> None:
        rows = tuple(self.rows)
        if not rows:
            raise ValueError("IdentityTokens needs at least one row")
        widths = {r.shape[-1] for r in rows}
        if any(r.ndim != 2 for r in rows) or len(widths) != 1:
            raise ValueError(f"IdentityTokens rows must be (n_i, D) with one D, got {[tuple(r.shape) for r in rows]}")
        object.__setattr__(self, "rows", rows)

    @classmethod
    def from_faces(cls, face_tokens: Sequence[torch.Tensor], order: Sequence[Sequence[int]]) -> IdentityTokens:
        """Arrange per-face tokens by placeholder order.

        Args:
            face_tokens: per prompt row, a (F_i, K, D) tensor: the K tokens of each of its F_i faces.
            order: per prompt row, the face index each placeholder group refers to, in text order
                (what `IdentityProcessor` returns; a face may be referenced twice or not at all).
        """
        if len(face_tokens) != len(order):
            raise ValueError(f"got identity tokens for {len(face_tokens)} prompts but face order for {len(order)}")
        rows, K = [], 1
        for i, (tokens, refs) in enumerate(zip(face_tokens, order)):
            if tokens.ndim != 3:
                raise ValueError(f"prompt {i}: face tokens must be (faces, K, D), got {tuple(tokens.shape)}")
            K = tokens.shape[1]
            bad = [j for j in refs if not 0 <= j < tokens.shape[0]]
            if bad:
                raise FaceCountError(
                    f"prompt {i} refers to face(s) {bad} but only {tokens.shape[0]} face(s) were given"
                )
            index = torch.as_tensor(list(refs), dtype=torch.long, device=tokens.device)
            rows.append(tokens.index_select(0, index).reshape(-1, tokens.shape[-1]))  # (len(refs)*K, D)
        return cls(tuple(rows), num_id_tokens=K)

    @property
    def counts(self) -> list[int]:
        return [int(r.shape[0]) for r in self.rows]

    @property
    def total(self) -> int:
        return sum(self.counts)


def inject_identity_tokens(
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    tokens: IdentityTokens,
    placeholder_id: int,
    placeholder_token: str = "<face>",
) -> torch.Tensor:
    """Return `inputs_embeds` with identity tokens at the placeholder positions.

    Args:
        input_ids: (B, T) ids; B may be a multiple r of the number of prompt rows (generation expansion).
        inputs_embeds: (B, T, D) embeddings of `input_ids`.
        tokens: the identity tokens per prompt row.
        placeholder_id: id of the placeholder token.
        placeholder_token: its text, for error messages.

    Raises:
        FaceCountError: a row's placeholder count differs from its identity tokens, or the batch
            size is not a multiple of the number of prompt rows.
    """
    B = input_ids.shape[0]
    R = len(tokens.rows)
    if B % R:
        raise FaceCountError(
            f"identity tokens were given for {R} prompt row(s), but the model sees a batch of {B} rows "
            f"(not a multiple of {R}); pass one entry per prompt"
        )
    repeat = B // R
    mask = input_ids == placeholder_id  # (B, T)
    found = mask.sum(dim=1).tolist()
    K = tokens.num_id_tokens
    for row in range(B):
        expected = tokens.counts[row // repeat]
        if found[row] != expected:
            where = f"row {row}" + (f" (prompt {row // repeat})" if repeat > 1 else "")
            raise FaceCountError(
                f"{where} has {found[row]} {placeholder_token} token(s) but {expected} identity token(s) were given "
                f"({expected // K} face reference(s) x K={K}); each face reference must be {K} consecutive "
                f"{placeholder_token} tokens (use IdentityProcessor to expand them)"
            )
    rows = [tokens.rows[row // repeat] for row in range(B)]
    source = torch.cat(rows, dim=0).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)  # (sum n_i, D)
    if source.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(
            f"identity tokens have width {source.shape[-1]} "
            f"but the model's embeddings have width {inputs_embeds.shape[-1]}"
        )
    if source.shape[0] == 0:
        return inputs_embeds
    # masked_scatter fills the True positions row-major, which is text order within each row.
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), source)


class IdentityInjector:
    """Owns the forward hook on a model's input-embedding module.

    Args:
        model: any `PreTrainedModel` (or a PEFT wrapper of one) with `get_input_embeddings()`.
        placeholder_id: id of the placeholder token.
        placeholder_token: its text, for error messages.

    The hook follows whatever `get_input_embeddings()` returns: PEFT replaces the embedding with a
    wrapper (trainable tokens, modules_to_save) whose forward does not call the original module, so
    `provide` re-attaches when the module changed, and `reattach()` does it on demand.
    """

    def __init__(self, model: nn.Module, placeholder_id: int, placeholder_token: str = "<face>") -> None:
        self.model = model
        self.placeholder_id = int(placeholder_id)
        self.placeholder_token = placeholder_token
        self._handle: RemovableHandle | None = None
        self._module: nn.Module | None = None
        self._pending: IdentityTokens | None = None
        self._injected = False
        # One set of pending tokens at a time: concurrent generate calls (e.g. a web demo) queue here.
        self._lock = threading.RLock()
        self.attach()

    @property
    def hooked_module(self) -> nn.Module | None:
        return self._module

    def attach(self) -> None:
        module = self.model.get_input_embeddings()
        if module is None:
            raise ValueError(f"{type(self.model).__name__}.get_input_embeddings() returned None; cannot inject")
        if module is self._module and self._handle is not None:
            return
        self.detach()
        self._handle = module.register_forward_hook(self._hook)
        self._module = module

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._module = None, None

    def reattach(self, model: nn.Module | None = None) -> None:
        """Hook the current input-embedding module again (after PEFT wrapping, or of a new wrapper model)."""
        if model is not None:
            self.model = model
        self.detach()
        self.attach()

    @contextmanager
    def provide(self, tokens: IdentityTokens | None) -> Iterator[None]:
        """Make `tokens` available to the hook for the duration of one forward or generate call.

        Raises:
            FaceCountError: on exit, if tokens were given but no placeholder reached the model.
        """
        with self._lock:
            self.attach()  # no-op unless PEFT (or the user) swapped the embedding module
            self._pending, self._injected = tokens, False
            try:
                yield
            finally:
                injected, self._pending = self._injected, None
            if tokens is not None and tokens.total > 0 and not injected:
                raise FaceCountError(
                    f"identity tokens for {tokens.total // tokens.num_id_tokens} face reference(s) were given, "
                    f"but no {self.placeholder_token} token reached the model's embeddings"
                )

    def __deepcopy__(self, memo: dict) -> IdentityInjector:
        # PEFT's modules_to_save deep-copies the embedding module, hooks included. The copy keeps a
        # reference to this injector, and `_hook` ignores every module but the one it is attached to.
        return self

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if module is not self._module:
            return None
        if not args or not torch.is_tensor(args[0]) or args[0].is_floating_point():
            return None
        input_ids = args[0]
        if input_ids.ndim != 2 or not bool((input_ids == self.placeholder_id).any()):
            return None  # decode steps, text without faces, scalar lookups of other tokens
        if self._pending is None:
            n = int((input_ids == self.placeholder_id).sum())
            raise FaceCountError(
                f"{n} {self.placeholder_token} token(s) reached the model but no identity tokens were given; "
                "call through IdentityVLM, or wrap the call in `injector.provide(tokens)`"
            )
        self._injected = True
        return inject_identity_tokens(input_ids, output, self._pending, self.placeholder_id, self.placeholder_token)


__all__ = ["FaceCountError", "IdentityInjector", "IdentityTokens", "inject_identity_tokens"]
