"""Which token mode, token length and hidden layer encode the prompts of a given connector.

A connector only works on features made the way it was trained. The rule (docs/nodes.md):
- a value the connector file records (`ella_token_mode`, `ella_token_length`, `ella_llm_hidden_layer`)
  wins over the text encoder's setting, with a warning naming both values when they differ;
- a value the file does not record (or that was only guessed from its shapes, such as the released
  connector's 128 tokens) leaves the text encoder's setting in charge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .checkpoint import EllaMetadata


@dataclass(frozen=True)
class EncodingSettings:
    mode: str = "fixed"  # "fixed" | "flexible" (ella_core.tokenization.MODES)
    max_length: int = 128  # tokens in fixed mode
    hidden_layer: int | None = None  # index into the LLM's hidden states; None: the last one


_FROM_METADATA = (("token_mode", "mode"), ("token_length", "max_length"), ("llm_hidden_layer", "hidden_layer"))


def _shown(field: str, value: object) -> str:
    return "last" if field == "hidden_layer" and value is None else str(value)


def settings_for_connector(
    metadata: EllaMetadata, encoder: EncodingSettings, connector: str = "the connector", text_encoder: str = "the text encoder"
) -> tuple[EncodingSettings, list[str]]:
    """(settings to encode with, warnings naming each value the connector's metadata changed)."""
    settings, notes = encoder, []
    for meta_field, field in _FROM_METADATA:
        recorded = getattr(metadata, meta_field)
        if recorded is None or meta_field in metadata.inferred:
            continue
        if field == "max_length" and settings.mode == "flexible":
            continue  # flexible mode neither pads nor truncates: the length does not matter
        current = getattr(settings, field)
        if recorded != current:
            notes.append(f"{connector} was trained with {field}={_shown(field, recorded)} (its metadata "
                         f"'ella_{meta_field}'); {text_encoder} is set to {field}={_shown(field, current)}: "
                         f"using {_shown(field, recorded)}")
            settings = replace(settings, **{field: recorded})
    return settings, notes
