"""DoLa's settings: defaults, layer choice and validation, without torch.

The method registry (``cdlm.decoding.methods``, which must stay free of torch) and the decoding loop
(``cdlm.decoding.dola``) both import them from here, so neither imports the other's internals.
"""

from __future__ import annotations

from typing import Any

DEFAULT_DOLA_LAYERS = "high"
DEFAULT_RELATIVE_TOP = 0.1  # the paper's alpha; fixed at 0.1 in 4.55.4
# The paper and 4.55.4's documentation recommend a repetition penalty of 1.2 with DoLa; the plain function
# and the registry method use it, the ``custom_generate`` callable takes generate()'s own (default 1.0).
DEFAULT_REPETITION_PENALTY = 1.2
DOLA_FORMS = ("transformers", "paper")


def parse_dola_layers(dola_layers: Any) -> str | tuple[int, ...]:
    """``"low"``, ``"high"``, or a tuple of ints from a list/tuple or a comma-separated string (the CLI form)."""
    if isinstance(dola_layers, str):
        text = dola_layers.strip()
        if text in ("low", "high"):
            return text
        try:
            dola_layers = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"dola_layers must be 'low', 'high' or layer indices like '4,10,16', got {dola_layers!r}"
            ) from None
    if isinstance(dola_layers, (list, tuple)) and dola_layers:
        if any(isinstance(layer, bool) or not isinstance(layer, int) for layer in dola_layers):
            raise ValueError(f"dola_layers must be a list of integer layer indices, got {dola_layers!r}")
        return tuple(dict.fromkeys(dola_layers))  # order kept: ties go to the first listed layer
    raise ValueError(f"dola_layers must be 'low', 'high' or a non-empty list of layer indices, got {dola_layers!r}")


def candidate_layers(dola_layers: Any, num_layers: int, tied_embeddings: bool) -> tuple[int, ...]:
    """The premature layers DoLa chooses from, as indices into ``output_hidden_states`` (0 = embeddings).

    ``"low"``/``"high"`` follow 4.55.4: every second layer of the lower/upper half (of the first/last
    20 layers beyond 40 layers); with tied embeddings the lower half starts at layer 2, because
    layer 0 read through the tied head is nearly the identity map.
    """
    parsed = parse_dola_layers(dola_layers)
    if isinstance(parsed, tuple):
        bad = [layer for layer in parsed if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(
                f"dola_layers {list(bad)} out of range: premature layers are 0 (embeddings) .. {num_layers - 1} "
                f"for a model with {num_layers} layers (layer {num_layers} is the final layer itself)"
            )
        return parsed
    if not tied_embeddings:
        start = 0
    else:
        start = 2 if num_layers > 2 else (1 if num_layers == 2 else 0)
    half = num_layers // 2
    if parsed == "low":
        if start == half:
            return (start,)
        return tuple(range(start, half, 2) if num_layers <= 40 else range(start, 20, 2))
    return tuple(range(half, num_layers, 2) if num_layers <= 40 else range(num_layers - 20, num_layers, 2))


def validate_dola_params(relative_top: Any, dola_form: Any) -> tuple[float, str]:
    """Check and normalise the scalar hyperparameters; ``ValueError`` names the bad one."""
    try:
        top = float(relative_top)
    except (TypeError, ValueError):
        raise ValueError(f"relative_top must be a number in (0, 1], got {relative_top!r}") from None
    if not 0.0 < top <= 1.0:
        raise ValueError(f"relative_top must be in (0, 1], got {relative_top}")
    if dola_form not in DOLA_FORMS:
        raise ValueError(f"dola_form must be one of {', '.join(DOLA_FORMS)}, got {dola_form!r}")
    return top, dola_form
