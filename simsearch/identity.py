"""What made a set of embeddings, as one record: the class store writes it into every file and checks it against
every vector that comes in, an embedding set writes it into its manifest, and ``encoders.model_identity`` makes it
from an encoder, so cosines between different models' embeddings are never computed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from simsearch.store import plain_json

MODALITIES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """The model's name (what loads it again), its id (model and weights: ``encoders.model_id``), the preprocessing
    its samples went through (timm's data config, or a sentence model's maximum length) and the modality."""

    model_name: str
    model_id: str
    transform_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    modality: str = "image"

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be 'image' or 'text', got {self.modality!r}.")
        object.__setattr__(self, "transform_config", plain_json(self.transform_config or {}))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ModelIdentity:
        """The identity a store's metadata or an embedding set's manifest holds (older stores lack a modality)."""
        return cls(model_name=str(record["model_name"]), model_id=str(record["model_id"]),
                   transform_config=record["transform_config"], modality=record.get("modality", "image"))

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def mismatch(
        self,
        *,
        model_id: str | None = None,
        transform_config: dict[str, Any] | None = None,
        modality: str | None = None,
        source: str = "the vectors given",
        where: str = "The store",
    ) -> str | None:
        """Why vectors of ``source`` (made by that model, preprocessing or modality) cannot meet those of
        ``where``, or None where nothing given differs."""
        if modality is not None and modality != self.modality:
            return (f"{where} holds {self.modality} classes, not {modality} ones ({source}): query it with "
                    f"{self.modality}s, or build a {modality} store.")
        if model_id is not None and model_id != self.model_id:
            return (f"{where} was built with model '{self.model_id}', not with '{model_id}' ({source}). Embeddings "
                    f"of different models cannot be compared: use the store's model (--model {self.model_name} with "
                    "the same --weights file) or build a new store.")
        if transform_config is not None and plain_json(transform_config) != self.transform_config:
            return (f"{where} was built with preprocessing {self.transform_config}, not with "
                    f"{plain_json(transform_config)} ({source}). Use the store's preprocessing or build a new store.")
        return None
