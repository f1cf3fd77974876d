"""JSON schemas, shipped as package data so that a wheel carries them."""

import json
from importlib import resources


def load(name: str) -> dict:
    """Return the schema ``name`` (e.g. ``"policy.schema.json"``) as a dict."""
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))
