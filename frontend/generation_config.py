"""The model's own sampling defaults, from its `generation_config.json`.

As vLLM with `--generation-config auto` (its default): a request that leaves one of these
fields out samples with the model author's value instead of the library's (an HTTP request
omitting `temperature`, an `LLM.generate` call without `SamplingParams`); a request that sets
it keeps its value. `do_sample` is not read, as in vLLM: `temperature` says it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from zomni.proto.diffusion import LLADA_REMASKING

logger = logging.getLogger("zomni.frontend")

# generation_config.json key -> SamplingParams field (vLLM's list, less max_new_tokens)
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
           "min_p": "min_p", "repetition_penalty": "repetition_penalty"}


def generation_defaults(*folders: str | None) -> dict[str, Any]:
    """SamplingParams field -> the model's default, from the first of `folders` that has a
    readable generation_config.json ({} if none: the frontend may not see an engine's path)."""
    for folder in folders:
        path = Path(folder) / "generation_config.json" if folder else None
        if path is None or not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            logger.warning("ignoring %s: %s", path, e)
            return {}
        found = {field: config[key] for key, field in _FIELDS.items()
                 if isinstance(config.get(key), (int, float))
                 and not isinstance(config.get(key), bool)}
        if found:
            logger.info("sampling defaults from %s: %s", path, found)
        return found
    return {}


def diffusion_lm_defaults(defaults: dict[str, Any], remasking: str) -> dict[str, Any]:
    """The defaults a masked-diffusion LM honours: `temperature`, and `top_p` / `top_k` when it
    decodes with Dream's remasking. The rest (`min_p`, `repetition_penalty`) would make every
    request that leaves them out a 400, for a value the user never sent."""
    kept = ("temperature",) if remasking in LLADA_REMASKING else ("temperature", "top_p", "top_k")
    return {k: v for k, v in defaults.items() if k in kept}
