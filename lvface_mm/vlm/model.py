"""IdentityVLM: one object that captions, answers and generates with identity grounding.

    vlm = IdentityVLM.from_pretrained("llava-1.5-7b", encoder="lvface_b", adapter=None, device_map="auto")
    answer = vlm.caption("party.jpg", gallery)       # IdentityAnswer: text + which face each name is
    answer = vlm.ask("party.jpg", "Who is on the left?", gallery)

Two grounding modes share the same faces, embeddings and gallery:
- prompt grounding (always on): names, positions and boxes in the chat prompt; needs no training;
- identity tokens (when a trained adapter is loaded, or `identity_tokens=True`): each face line of
  the prompt also carries `<face_i>`, which becomes K projected LVFace tokens in the LLM's input.

The base model is never modified beyond one tokenizer entry for the placeholder (and an embedding
row when the table has no spare row); with no faces in a prompt, outputs equal the base model's.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..faces.alignment import align_face, to_model_input
from ..models import FaceViT
from .adapter import IdentityAdapter, build_encoder, saved_hidden_size
from .config import IdentityAdapterConfig
from .families import VLMFamily, family_for_model
from .grounding import GalleryLike, GroundingTemplate, Reference, family_prompt, ground_faces
from .hub import PEFT_CONFIG_NAME, ROWS_NAME, push_folder
from .injection import IdentityInjector, IdentityTokens
from .loading import load_base_model, resolve_card
from .lora_scope import FaceScopedLoRA
from .matching import bind_references
from .processing import IdentityInputs, IdentityProcessor, ensure_embedding_row
from .regions import add_region_features
from .results import GroundedFace, IdentityAnswer, find_mentions
from .set_of_mark import draw_marks

CAPTION_REQUEST = "Describe the picture in one or two sentences. Name the people you were told about."


@dataclass(frozen=True)
class ModelChanges:
    """What `IdentityVLM` changed on the model and tokenizer it was given (nothing else is touched).

    Attributes:
        placeholder_token: the token the identity tokens replace, e.g. "<face>".
        placeholder_id: its id.
        token_added: the tokenizer did not have it and it was added.
        rows_added: (first, end) embedding rows added for it (the table, and an untied LM head, were
            resized; new rows are the mean of the old ones), or None when it fit the existing table.
        pad_token_set: the tokenizer had no pad token; its eos token was made the pad token.
        padding_side: the tokenizer's padding side before (now "left", for batched generation).
    """

    placeholder_token: str
    placeholder_id: int
    token_added: bool
    rows_added: tuple[int, int] | None
    pad_token_set: bool
    padding_side: str


class FacesInPicture:
    """Faces of one picture, ready for grounding and encoding.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) float x1, y1, x2, y2.
        crops: (N, 112, 112, 3) uint8 aligned crops.
        embeddings: (N, 512) L2-normalised embeddings, or None until computed.
    """

    def __init__(self, image: np.ndarray, boxes: np.ndarray, crops: np.ndarray, embeddings: np.ndarray | None) -> None:
        self.image, self.boxes, self.crops, self.embeddings = image, boxes, crops, embeddings

    def __len__(self) -> int:
        return len(self.boxes)


class AnswerStream:
    """Text pieces as they are generated; `answer()` returns the finished `IdentityAnswer`."""

    def __init__(self, streamer: Any, thread: threading.Thread, box: dict[str, Any]) -> None:
        self._streamer, self._thread, self._box = streamer, thread, box

    def __iter__(self) -> Iterator[str]:
        yield from self._streamer

    def answer(self, timeout: float | None = None) -> IdentityAnswer:
        self._thread.join(timeout)
        if "error" in self._box:
            raise self._box["error"]
        if "answer" not in self._box:
            raise TimeoutError("generation has not finished")
        return self._box["answer"]


class IdentityVLM:
    """A VLM (or LLM) with its processor, an identity adapter and the injection hook.

    Args:
        model: a transformers model of a supported family (or a PEFT wrapper of one).
        processor: its processor (its tokenizer for text-only LLMs).
        adapter: encoder + projector built for this model's hidden size.
        family: the model's family; found from its config if None.
        detector: where faces come from when `faces` are not passed: a `lvface_mm.faces.FaceEmbedder`
            (its faces carry crops and the embeddings the gallery was enrolled with), or any detector
            with `detect(image) -> faces with .box and .landmarks` (`create_detector(...)`).
        calibrate: set the projector's output norm from the model's token embeddings (fresh adapters);
            False keeps the norm stored in loaded weights.
        identity_tokens: default for `ask`/`caption`: inject identity tokens (True), or use prompt
            grounding only (False); None = True when adapter weights were loaded.

    The model and tokenizer passed in are changed in place, and only as `model_changes` records: the
    placeholder token is added to the tokenizer (when missing), the embedding table (and an untied
    LM head) grows by one mean-initialised row when the token does not fit it, a missing pad token
    becomes the eos token, and padding goes to the left. Pass copies to keep the originals.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        adapter: IdentityAdapter,
        family: VLMFamily | None = None,
        detector: Any = None,
        calibrate: bool = True,
        identity_tokens: bool | None = None,
    ) -> None:
        self.family = family or family_for_model(model)
        found = family_for_model(model).name
        if found != self.family.name:
            raise ValueError(f"the model is a {found!r} model, but family {self.family.name!r} was given")
        if adapter.config.region_features and not self.family.supports_region_features:
            raise ValueError(
                f"adapter {adapter.config.name!r} reads region features, which the {self.family.name!r} family "
                "does not support (lvface_mm.vlm.regions); use region_features: false"
            )
        self.model = model
        self.adapter = adapter
        self.config = adapter.config
        self.detector = detector
        self.identity_tokens = identity_tokens
        had_token = self.config.placeholder_token in getattr(processor, "tokenizer", processor).get_vocab()
        self.processor = IdentityProcessor(processor, self.config, self.family)
        tokenizer = self.processor.tokenizer
        placeholder_id = self.processor.placeholder_id
        reserved = self.family.reserved_token_ids(model.config)
        if placeholder_id in reserved:
            raise ValueError(
                f"{self.config.placeholder_token!r} has id {placeholder_id}, which the model reserves for images"
            )
        if calibrate:
            # Real token rows only: spare rows past the tokenizer are untrained in many checkpoints.
            real_rows = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])
            exclude = [i for i in range(real_rows, model.get_input_embeddings().weight.shape[0])] + [placeholder_id]
            adapter.projector.calibrate(self.family.token_embedding_norm(model, exclude=exclude))
        old_rows = model.get_input_embeddings().weight.shape[0]
        resized = ensure_embedding_row(model, placeholder_id, len(tokenizer))
        pad_token_set = tokenizer.pad_token_id is None
        if pad_token_set:
            tokenizer.pad_token = tokenizer.eos_token
        padding_side = tokenizer.padding_side
        # Batched generation needs left padding so every row's last token is real.
        tokenizer.padding_side = "left"
        self.model_changes = ModelChanges(
            placeholder_token=self.config.placeholder_token,
            placeholder_id=placeholder_id,
            token_added=not had_token,
            rows_added=(old_rows, model.get_input_embeddings().weight.shape[0]) if resized else None,
            pad_token_set=pad_token_set,
            padding_side=padding_side,
        )
        embedding = model.get_input_embeddings()
        self.adapter.to(embedding.weight.device)
        self.injector = IdentityInjector(model, placeholder_id, self.config.placeholder_token)
        # The LoRA (if any, applied now or later) acts only on rows with identity tokens by default.
        self.lora_scope = FaceScopedLoRA(self.config.lora_scope)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike[str] | IdentityAdapterConfig | nn.Module,
        adapter: str | os.PathLike[str] | IdentityAdapterConfig | None = None,
        *,
        processor: Any = None,
        encoder: str | FaceViT | None = None,
        adapter_revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        device_map: str | dict[str, Any] | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool | None = None,
        encoder_checkpoint: str | os.PathLike[str] | None = None,
        encoder_pretrained: bool | None = None,
        detector: Any = None,
        identity_tokens: bool | None = None,
        **model_kwargs: Any,
    ) -> IdentityVLM:
        """A base model, its processor, an identity adapter and an encoder, put together.

            IdentityVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", adapter="user/llava-identity")
            IdentityVLM.from_pretrained(model, processor=processor, adapter="llava-1.5-7b")  # a fresh card
            IdentityVLM.from_pretrained("smolvlm-256m-instruct")                            # a card alone

        Args:
            base_model: the VLM/LLM: a Hub id or local model folder, or a loaded model (then pass
                `processor`; it is changed in place as `IdentityVLM` says). An adapter card (name,
                JSON path or `IdentityAdapterConfig`) or a saved adapter folder also works: the model
                is then loaded from the card's `vlm_id`.
            adapter: a trained adapter (a folder written by `save_pretrained`, or a Hub repo id
                "user/repo": projector, card and any PEFT LoRA beside them), or a card for a fresh
                adapter (card name, JSON path or `IdentityAdapterConfig`). None: the card found for
                `base_model`'s id, else a default card (K=1, mlp2x_gelu, lvface_b).
            processor: the model's processor (its tokenizer for text-only LLMs); loaded when None.
            encoder: LVFace encoder name (default: the card's) or a built FaceViT.
            adapter_revision, token, cache_dir: where the adapter repo comes from (a pinned commit,
                a token for private repos); `token` and `cache_dir` also reach transformers.
            device_map, dtype, local_files_only, **model_kwargs: passed to transformers'
                `from_pretrained` (e.g. `revision=` of the base model, `gguf_file=`).
            encoder_checkpoint: a local LVFace checkpoint to load instead of the official weights.
            encoder_pretrained: load the official encoder weights; None = yes when they exist.
            detector: face detector for pictures passed without `faces`.
            identity_tokens: see `IdentityVLM`.
        """
        card, adapter_dir, model_id = resolve_card(
            base_model,
            adapter,
            dict(revision=adapter_revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only),
        )
        hub_kwargs = {
            k: v
            for k, v in dict(
                device_map=device_map, dtype=dtype, local_files_only=local_files_only, token=token, cache_dir=cache_dir
            ).items()
            if v is not None
        }
        model, processor, family = load_base_model(base_model, model_id, card, processor, hub_kwargs, model_kwargs)
        if card is None:
            name = getattr(model.config, "name_or_path", "") or family.name
            card = IdentityAdapterConfig(name=name, vlm_id=name, family=family.name)
        if card.family != family.name:
            raise ValueError(
                f"card {card.name!r} is for family {card.family!r}, but the model is a {family.name!r} model"
            )
        if isinstance(encoder, str) and encoder != card.encoder:
            if adapter_dir is not None:
                raise ValueError(
                    f"the adapter at {adapter_dir} was trained with encoder {card.encoder!r}, not {encoder!r}"
                )
            card = card.replace(encoder=encoder)
        face_vit = (
            encoder
            if isinstance(encoder, FaceViT)
            else build_encoder(card.encoder, encoder_checkpoint, encoder_pretrained)
        )
        hidden = family.hidden_size(model.config)
        if adapter_dir is not None and saved_hidden_size(adapter_dir) != hidden:
            raise ValueError(
                f"the adapter at {adapter_dir} projects to width {saved_hidden_size(adapter_dir)}, "
                f"but this model's hidden size is {hidden}: it was trained for another model"
            )
        identity = IdentityAdapter(card, face_vit, hidden)
        if adapter_dir is not None:
            identity.load_adapter_weights(adapter_dir)
        vlm_obj = cls(
            model,
            processor,
            identity,
            family=family,
            detector=detector,
            calibrate=adapter_dir is None,
            identity_tokens=identity_tokens
            if identity_tokens is not None
            else (True if adapter_dir is not None else None),
        )
        if adapter_dir is not None:
            vlm_obj._load_placeholder_rows(adapter_dir)
            if (adapter_dir / PEFT_CONFIG_NAME).is_file():
                vlm_obj.load_lora(adapter_dir)
        return vlm_obj

    # -- PEFT -----------------------------------------------------------------------------------
    def apply_lora(self, config: Any = None) -> nn.Module:
        """Wrap the model with PEFT LoRA and re-hook the embedding.

        Args:
            config: a `peft.LoraConfig` or a mapping of its arguments; None = the card's (else
                PEFT's defaults). `target_modules=None` becomes the family's default targets, and
                token strings in `trainable_token_indices` become ids with this model's tokenizer.
        """
        import dataclasses

        from peft import get_peft_model

        from ..lora import lora_config, with_default_targets

        config = lora_config(config if config is not None else (self.config.lora or {}), "apply_lora")
        config = with_default_targets(config, self.family.default_lora_targets)
        indices = config.trainable_token_indices
        if isinstance(indices, (list, tuple)) and any(isinstance(t, str) for t in indices):
            ids = [self._single_token_id(t) if isinstance(t, str) else int(t) for t in indices]
            config = dataclasses.replace(config, trainable_token_indices=ids)
        # The card records the LoRA actually applied, so a saved adapter says what it holds.
        self.config = self.adapter.config = self.config.replace(lora=dataclasses.replace(config))
        self.model = get_peft_model(self.model, config)
        self.injector.reattach(self.model)
        return self.model

    def load_lora(self, directory: str | os.PathLike[str], is_trainable: bool = False) -> nn.Module:
        """Load PEFT LoRA weights saved beside the adapter (frozen unless `is_trainable`)."""
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(self.model, str(directory), is_trainable=is_trainable)
        self.injector.reattach(self.model)
        return self.model

    def _single_token_id(self, token: str) -> int:
        ids = self.processor.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"trainable token {token!r} is {len(ids)} tokens for this tokenizer; it must be exactly one"
            )
        return int(ids[0])

    # -- save -----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        training_data: Mapping[str, Any] | str | None = None,
        evaluation: str | None = None,
        repo_id: str | None = None,
    ) -> Path:
        """Write the adapter alone: card, projector, PEFT LoRA, added embedding rows and a README.

        The LoRA files are PEFT's own (`adapter_config.json`, `adapter_model.safetensors`), written
        with `save_embedding_layers=False`: when the table grew for the placeholder, only the added
        rows go into `placeholder_rows.safetensors` (a few KB), never a copy of the whole embedding
        table and LM head. `PeftModel.from_pretrained(base, directory)` loads the LoRA once the base
        has the placeholder row. `training_data` and `evaluation` go into the model card.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        if _is_peft(self.model):
            self.model.save_pretrained(str(directory), save_embedding_layers=False)
        self._save_placeholder_rows(directory)
        # The adapter goes last: its README describes the files already in the folder.
        return self.adapter.save_pretrained(
            directory, training_data=training_data, evaluation=evaluation, repo_id=repo_id
        )

    def push_to_hub(
        self, repo_id: str, *, token: str | bool | None = None, private: bool | None = None, **kwargs: Any
    ) -> Any:
        """Upload what `save_pretrained` writes to the Hub repo `repo_id` in one commit.

        `kwargs`: `training_data`, `evaluation` (model card) and `revision`, `commit_message`,
        `create_pr` (upload). Returns huggingface_hub's commit info.
        """
        card_keys = ("training_data", "evaluation")
        card = {k: kwargs.pop(k) for k in card_keys if k in kwargs}
        return push_folder(
            lambda d: self.save_pretrained(d, repo_id=repo_id, **card), repo_id, token=token, private=private, **kwargs
        )

    def _save_placeholder_rows(self, directory: Path) -> None:
        rows = self.model_changes.rows_added
        if rows is None:
            return
        from safetensors.torch import save_file

        start, end = rows
        embedding = self.model.get_input_embeddings().weight
        state = {"input_rows": embedding[start:end].detach().cpu().contiguous()}  # (added, d)
        output = self.model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != embedding.data_ptr():
            state["output_rows"] = output.weight[start:end].detach().cpu().contiguous()  # untied head
        save_file(state, str(directory / ROWS_NAME), metadata={"first_row": str(start), "end_row": str(end)})

    def _load_placeholder_rows(self, directory: Path) -> None:
        path = directory / ROWS_NAME
        rows = self.model_changes.rows_added
        if not path.is_file():
            return
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        saved = (int(meta["first_row"]), int(meta["end_row"]))
        state = load_file(str(path))
        if rows != saved:
            added = "none" if rows is None else f"{rows[0]}..{rows[1] - 1}"
            raise ValueError(
                f"{path} holds embedding rows {saved[0]}..{saved[1] - 1}, but this model added {added}: "
                "the adapter was saved for another base model"
            )
        embedding = self.model.get_input_embeddings().weight
        with torch.no_grad():
            embedding[saved[0] : saved[1]] = state["input_rows"].to(embedding.device, embedding.dtype)
            output = self.model.get_output_embeddings()
            if "output_rows" in state and output is not None:
                output.weight[saved[0] : saved[1]] = state["output_rows"].to(output.weight.device, output.weight.dtype)

    # -- faces ----------------------------------------------------------------------------------
    def find_faces(self, image: Any, faces: Sequence[Any] | None = None) -> FacesInPicture:
        """Faces of a picture: detected (needs `detector`) or given.

        Args:
            image: path, PIL image or (H, W, 3) uint8 RGB array.
            faces: objects with `.box` and either `.crop` ((112, 112, 3) uint8 aligned) or
                `.landmarks` ((5, 2)); an `.embedding` (512,) is used for the gallery when present.
        """
        array = load_image(image)
        if faces is None:
            faces = self._detect(array)
        boxes, crops, embeddings = [], [], []
        for i, face in enumerate(faces):
            box = getattr(face, "box", None)
            if box is None:
                raise ValueError(f"face {i} has no .box")
            crop = getattr(face, "crop", None)
            if crop is None:
                landmarks = getattr(face, "landmarks", None)
                if landmarks is None:
                    raise ValueError(f"face {i} has neither .crop nor .landmarks")
                crop = align_face(array, np.asarray(landmarks))
            crop = np.asarray(crop)
            if crop.shape != (112, 112, 3) or crop.dtype != np.uint8:
                raise ValueError(f"face {i}: crop must be (112, 112, 3) uint8, got {crop.shape} {crop.dtype}")
            boxes.append(np.asarray(box, dtype=np.float64).reshape(4))
            crops.append(crop)
            embeddings.append(getattr(face, "embedding", None))
        crops_arr = np.stack(crops) if crops else np.zeros((0, 112, 112, 3), dtype=np.uint8)
        boxes_arr = np.stack(boxes) if boxes else np.zeros((0, 4))
        given = None
        if embeddings and all(e is not None for e in embeddings):
            given = np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in embeddings])
        return FacesInPicture(array, boxes_arr, crops_arr, given)

    def ground(self, picture: FacesInPicture, gallery: GalleryLike | None = None) -> list[GroundedFace]:
        """Names (from the gallery) and positions of the faces in `picture`."""
        embeddings = picture.embeddings
        if gallery is not None and embeddings is None and len(picture):
            embeddings = self.adapter.embed(to_model_input(picture.crops)).float().cpu().numpy()
            picture.embeddings = embeddings
        return ground_faces(picture.boxes, picture.image.shape[1], embeddings, gallery)

    def encode_faces(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, 112, 112, 3) uint8 crops (or normalised (N, 3, 112, 112)) -> (N, K, d) identity tokens."""
        if isinstance(crops, np.ndarray):
            if len(crops) == 0:
                return torch.zeros(0, self.config.num_id_tokens, self.adapter.projector.spec.out_dim)
            crops = to_model_input(crops)
        return self.adapter.encode(crops)

    # -- generation -----------------------------------------------------------------------------
    def prepare(
        self,
        text: str | Sequence[str],
        images: Any = None,
        face_crops: Sequence[np.ndarray | torch.Tensor | None] | np.ndarray | None = None,
        extra_tokens: torch.Tensor | None = None,
    ) -> tuple[IdentityInputs, list[torch.Tensor]]:
        """Processor inputs and per-prompt identity tokens ((F_i, K, d)) for `text` with face references.

        `extra_tokens` ((R, K, d), one prompt only) follow the crops' tokens: open-set references."""
        texts = [text] if isinstance(text, str) else list(text)
        if face_crops is None:
            per_prompt: list[Any] = [None] * len(texts)
        elif isinstance(face_crops, np.ndarray) and face_crops.ndim == 4:
            per_prompt = [face_crops]  # one prompt's faces
        else:
            per_prompt = list(face_crops)
        if len(per_prompt) != len(texts):
            raise ValueError(f"face_crops has {len(per_prompt)} entries for {len(texts)} prompts")
        counts = [0 if c is None else len(c) for c in per_prompt]
        extra = 0 if extra_tokens is None else len(extra_tokens)
        if extra and len(texts) != 1:
            raise ValueError("extra_tokens are for a single prompt")
        inputs = self.processor(texts, images=images, num_faces=[counts[0] + extra] if extra else counts)
        crops = [c for c in per_prompt if c is not None and len(c)]
        if crops:
            flat = (
                np.concatenate([np.asarray(c) for c in crops]) if isinstance(crops[0], np.ndarray) else torch.cat(crops)
            )
            tokens = self.encode_faces(flat)  # (sum F_i, K, d)
        else:
            tokens = self.encode_faces(np.zeros((0, 112, 112, 3), dtype=np.uint8))
        face_tokens = list(torch.split(tokens, counts))
        if extra:
            face_tokens[0] = torch.cat([face_tokens[0], extra_tokens.to(face_tokens[0])])
        return inputs, face_tokens

    def add_regions(
        self,
        inputs: IdentityInputs,
        face_tokens: Sequence[torch.Tensor],
        regions: Sequence[torch.Tensor | None],
        embeddings: Sequence[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor]:
        """Add region features (`lvface_mm.vlm.regions`) when the adapter has a region reader.

        Args:
            inputs: the processor's inputs (their `pixel_values`, one picture per prompt with regions).
            face_tokens: per prompt, (F_i [+ R_i], K, d) tokens, picture faces first.
            regions: per prompt, (F_i, 4) person regions as fractions of the processed picture
                (`family.region_boxes`), or None for a prompt without a picture or faces.
            embeddings: per prompt, (F_i + R_i, D) embeddings for the matcher's gate, or None.
        """
        out = list(face_tokens)
        if self.adapter.projector.region_reader is None or all(r is None for r in regions):
            return out
        pixel_values = inputs.inputs.get("pixel_values")
        if pixel_values is None:
            raise ValueError("this adapter reads region features from the picture: give an image with the faces")
        weight = self.model.get_input_embeddings().weight
        with torch.no_grad():
            patches = self.family.picture_patches(self.model, pixel_values.to(weight.device, weight.dtype))
        # One picture per prompt: either every prompt has one, or just those with regions.
        with_regions = [i for i, r in enumerate(regions) if r is not None]
        if patches.shape[0] == len(regions):
            picture_of = {i: i for i in with_regions}
        elif patches.shape[0] == len(with_regions):
            picture_of = {i: j for j, i in enumerate(with_regions)}
        else:
            raise ValueError(
                f"{patches.shape[0]} picture(s) for {len(regions)} prompt(s), {len(with_regions)} with face "
                "regions; region features need one picture per prompt"
            )
        for i in with_regions:
            emb = None if embeddings is None else embeddings[i]
            boxes = regions[i]
            out[i] = add_region_features(self.adapter.projector, out[i], patches[picture_of[i]], boxes, len(boxes), emb)
        return out

    @contextlib.contextmanager
    def provide(self, tokens: IdentityTokens) -> Iterator[None]:
        """Within the block, model calls get `tokens` at their placeholders, and with `lora_scope`
        "faces" the LoRA is off for the rows that have none (`lvface_mm.vlm.lora_scope`)."""
        with self.injector.provide(tokens), self.lora_scope.rows(self.model, [n > 0 for n in tokens.counts]):
            yield

    def forward(self, inputs: IdentityInputs, face_tokens: Sequence[torch.Tensor], **model_kwargs: Any) -> Any:
        """Model forward with identity tokens injected (gradients reach the projector)."""
        tokens = IdentityTokens.from_faces(face_tokens, inputs.face_order)
        with self.provide(tokens):
            return self.model(**self._to_device(inputs.inputs), **model_kwargs)

    __call__ = forward

    def generate_ids(
        self, inputs: IdentityInputs, face_tokens: Sequence[torch.Tensor], **generate_kwargs: Any
    ) -> torch.Tensor:
        """`model.generate` with identity tokens; returns only the new tokens (B*num_return_sequences, T_new)."""
        tokens = IdentityTokens.from_faces([t.detach() for t in face_tokens], inputs.face_order)
        kwargs = {"max_new_tokens": 64, "do_sample": False, **generate_kwargs}
        # The placeholder is input-only: never let the model emit it.
        suppress = list(
            kwargs.pop("suppress_tokens", None) or getattr(self.model.generation_config, "suppress_tokens", None) or []
        )
        # The family's image/video markers are input-only too (a model emitting them would break decoding).
        reserved = self.family.input_only_token_ids(self._base_config(), self.processor.tokenizer)
        kwargs["suppress_tokens"] = sorted({*suppress, *reserved, self.processor.placeholder_id})
        kwargs.setdefault("pad_token_id", self.processor.tokenizer.pad_token_id)
        model_inputs = self._to_device(inputs.inputs)
        with torch.no_grad(), self.provide(tokens):
            sequences = self.model.generate(**model_inputs, **kwargs)
        return sequences[:, model_inputs["input_ids"].shape[1] :]

    def generate(
        self,
        text: str | Sequence[str],
        images: Any = None,
        face_crops: Sequence[np.ndarray | None] | np.ndarray | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Generate from prompts that refer to faces with `<face>` / `<face_i>`.

        Args:
            text: one prompt or a batch (already through the chat template, or raw).
            images: as for `IdentityProcessor` (None for text-only models).
            face_crops: per prompt, (F_i, 112, 112, 3) uint8 aligned crops (None for no faces).
            **generate_kwargs: passed to `model.generate` (`max_new_tokens`, `num_beams`, `streamer`, ...).

        Returns:
            One decoded string per generated sequence.
        """
        inputs, face_tokens = self.prepare(text, images, face_crops)
        with torch.no_grad():
            new_tokens = self.generate_ids(inputs, face_tokens, **generate_kwargs)
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def ask(
        self,
        image: Any,
        question: str,
        gallery: GalleryLike | None = None,
        *,
        faces: Sequence[Any] | None = None,
        identity_tokens: bool | None = None,
        template: GroundingTemplate | None = None,
        set_of_mark: bool = False,
        references: int = 0,
        gallery_names: bool | None = None,
        **generate_kwargs: Any,
    ) -> IdentityAnswer:
        """Answer `question` about `image`, grounded in who is in it.

        Args:
            image: path, PIL image or (H, W, 3) uint8 RGB array (used for detection only with text-only LLMs).
            question: the user's question.
            gallery: enrolled identities (`lvface_mm.gallery.Gallery`); None leaves every face unknown.
            faces: faces of the picture (see `find_faces`); detected when None.
            identity_tokens: inject identity tokens; None = the instance default.
            template: grounding wording.
            set_of_mark: draw a numbered box on each face and call faces by their mark (any VLM).
            references: open-set token mode: show the gallery's top `references` candidates per face
                (its own search, no threshold) as names with their enrolled templates' identity
                tokens, and no names on the faces; the adapter must be trained this way
                (`lvface_mm.vqa.binding`). 0 = names from the gallery's threshold decision.
            gallery_names: write the gallery's names on the face lines. None = only without identity
                tokens, so token mode renders exactly like training's `data.prompt_mode: token`;
                True for adapters trained with `token+prompt`.
            **generate_kwargs: passed to `model.generate` (e.g. `streamer=`).
        """
        picture = self.find_faces(image, faces)
        grounded = self.ground(picture, gallery)
        use_tokens = self._use_tokens(identity_tokens) and len(picture) > 0
        refs, ref_tokens, ref_embeddings = None, None, None
        if use_tokens and references > 0:
            refs, ref_tokens, ref_embeddings = self._references(picture, gallery, references)
        show = (not use_tokens) if gallery_names is None else gallery_names
        prompt, images = self.grounded_prompt(
            picture, grounded, question, use_tokens, template, set_of_mark, refs, show_names=show and refs is None
        )
        crops = [picture.crops] if use_tokens else None
        inputs, face_tokens = self.prepare([prompt], images, crops, extra_tokens=ref_tokens)
        embeddings = None
        if ref_embeddings is not None and self.adapter.projector.matcher is not None:
            # Open-set: bind each reference to the face it matches.
            own = torch.as_tensor(picture.embeddings, dtype=torch.float32)  # (F, D)
            embeddings = torch.cat([own, ref_embeddings.float().cpu()])  # (F + R, D)
            face_tokens[0] = bind_references(self.adapter.projector, face_tokens[0], embeddings, len(picture))
        if use_tokens and self.adapter.projector.region_reader is not None:
            height, width = picture.image.shape[:2]
            regions = self.family.region_boxes(picture.boxes, width, height, self.processor.processor)
            face_tokens = self.add_regions(inputs, face_tokens, [regions], [embeddings])
        with torch.no_grad():
            new_tokens = self.generate_ids(inputs, face_tokens, **generate_kwargs)
        text = self.processor.batch_decode(new_tokens[:1], skip_special_tokens=True)[0].strip()
        return IdentityAnswer(text=text, faces=tuple(grounded), mentions=find_mentions(text, grounded), prompt=prompt)

    def grounded_prompt(
        self,
        picture: FacesInPicture,
        grounded: Sequence[GroundedFace],
        question: str,
        identity_tokens: bool,
        template: GroundingTemplate | None = None,
        set_of_mark: bool = False,
        references: Sequence[Reference] | None = None,
        show_names: bool | None = None,
    ) -> tuple[str, list[list[np.ndarray]] | None]:
        """The prompt text and the images to send with it, in the one prompt format (`family_prompt`).

        Training samples (`lvface_mm.vqa.rendering`) go through the same function, so what the
        adapter was trained on is exactly what `ask`/`caption`/`stream` send. `show_names` (None:
        without identity tokens or references only) writes the gallery's names on the face lines.
        """
        if show_names is None:
            show_names = not identity_tokens and references is None
        height, width = picture.image.shape[:2]
        prompt = family_prompt(
            self.family,
            self.processor.processor,
            question,
            grounded,
            (width, height),
            face_refs=identity_tokens,
            placeholder_token=self.config.placeholder_token,
            template=template,
            marks=set_of_mark,
            show_names=show_names,
            references=references,
        )
        if self.family.text_only:
            return prompt, None
        shown = picture.image
        if set_of_mark and len(picture):
            shown = draw_marks(shown, [f.box for f in grounded], [f.number for f in grounded])
        return prompt, [[shown]]

    def _references(
        self, picture: FacesInPicture, gallery: Any, k: int
    ) -> tuple[list[Reference], torch.Tensor, torch.Tensor]:
        """The gallery's top-k candidates of every face (best first, each name once), the identity
        tokens ((R, K, d)) of their enrolled templates and the templates ((R, D), L2-normalised)."""
        from .projectors import FaceFeatures

        if gallery is None or not hasattr(gallery, "search") or not hasattr(gallery, "template"):
            raise ValueError("references need a gallery with search() and template() (lvface_mm.gallery.Gallery)")
        if picture.embeddings is None:
            raise ValueError("references need the faces' embeddings (ground the picture against the gallery first)")
        best: dict[str, float] = {}
        for row in gallery.search(picture.embeddings, k=k):
            for cand in row:
                if cand.name is not None:
                    best[cand.name] = max(best.get(cand.name, -2.0), float(cand.score))
        names = sorted(best, key=lambda n: -best[n])
        refs = [Reference(n, len(picture) + j) for j, n in enumerate(names)]
        projector = self.adapter.projector
        param = next(projector.parameters())
        if not names:
            empty = torch.zeros(0, self.config.num_id_tokens, projector.spec.out_dim)
            return refs, empty, torch.zeros(0, projector.spec.pooled_dim)
        templates = torch.as_tensor(np.stack([gallery.template(n) for n in names]), dtype=param.dtype)
        with torch.no_grad():
            pooled = torch.nn.functional.normalize(templates.to(param.device), dim=-1)
            tokens = projector(FaceFeatures(pooled=pooled))  # (R, K, d)
        return refs, tokens, pooled

    def caption(self, image: Any, gallery: GalleryLike | None = None, **kwargs: Any) -> IdentityAnswer:
        """Caption `image`, naming the people the gallery knows (same options as `ask`)."""
        return self.ask(image, CAPTION_REQUEST, gallery, **kwargs)

    def stream(self, image: Any, question: str, gallery: GalleryLike | None = None, **kwargs: Any) -> AnswerStream:
        """Like `ask`, but yields text pieces while generating (a `TextIteratorStreamer` in a thread)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["answer"] = self.ask(image, question, gallery, streamer=streamer, **kwargs)
            except BaseException as err:  # surfaced by AnswerStream.answer()
                box["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return AnswerStream(streamer, thread, box)

    # -- helpers --------------------------------------------------------------------------------
    def _detect(self, image: np.ndarray) -> Sequence[Any]:
        if self.detector is None:
            raise ValueError("no faces were passed and this IdentityVLM has no detector; pass faces= or detector=")
        if hasattr(self.detector, "embed_image"):  # a FaceEmbedder: boxes, crops and embeddings in one pass
            result = self.detector.embed_image(image)
            if result.error is not None:
                raise ValueError(f"face detection failed: {result.error}")
            return result.faces
        return self.detector.detect(image)

    def _base_config(self) -> Any:
        model = self.model.get_base_model() if _is_peft(self.model) else self.model
        return model.config

    def _use_tokens(self, requested: bool | None) -> bool:
        if requested is not None:
            return requested
        return bool(self.identity_tokens)

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.model.get_input_embeddings().weight.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


# -- module helpers ---------------------------------------------------------------------------------
def load_image(image: Any) -> np.ndarray:
    """Path, PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 RGB array, decoded by the one loader
    (`lvface_mm.faces.image_io`: EXIF orientation, modes, size limit), so FaceEmbedder sees the same pixels."""
    if isinstance(image, np.ndarray) and (image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8):
        raise ValueError(f"image arrays must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    from ..faces.image_io import load_image as load_picture

    return load_picture(image).array


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is part of the vlm extra
        return False
    return isinstance(model, PeftModel)


__all__ = ["CAPTION_REQUEST", "AnswerStream", "FacesInPicture", "IdentityVLM", "ModelChanges", "load_image"]
