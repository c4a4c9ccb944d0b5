"""JSON Schema files for consumers outside Python, generated from the events.

``bulwark schemas generate`` writes them into ``schemas/json/``; a test fails
when the committed files differ from what the code would generate.
"""

from __future__ import annotations

import json
from pathlib import Path

from .events import EVENT_TYPES
from .topics import ALL_TOPICS

JSON_DIR = Path(__file__).parent / "json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _event_schema(cls) -> dict:
    schema = cls.model_json_schema()
    schema["$schema"] = DRAFT
    schema["$id"] = f"https://bulwark.invalid/schemas/{cls.TYPE}.v{cls.VERSION}.json"
    props = schema["properties"]
    # Pin type and version: a consumer validating a record learns at once
    # that it holds another event or another version.
    props["type"] = {"const": cls.TYPE, "description": props["type"]["description"]}
    props["version"] = {"const": cls.VERSION, "description": props["version"]["description"]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"type", "version", "event_id", "occurred_at"})
    return schema


def _topics_document() -> dict:
    return {
        "topics": [
            {
                "name": spec.name,
                "key": spec.key,
                "kind": spec.kind,
                "compacted": spec.compacted,
                "partitions": spec.partitions,
                "purpose": spec.purpose,
                "events": [f"{cls.TYPE}.v{cls.VERSION}.json" for cls in spec.carries],
            }
            for spec in ALL_TOPICS
        ]
    }


def render() -> dict[str, str]:
    """File name -> file text, for every generated file."""
    files = {
        f"{cls.TYPE}.v{cls.VERSION}.json": json.dumps(_event_schema(cls), indent=2, sort_keys=True) + "\n"
        for cls in EVENT_TYPES.values()
    }
    files["topics.json"] = json.dumps(_topics_document(), indent=2) + "\n"
    return files


def write(directory: Path = JSON_DIR) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = render()
    for stale in directory.glob("*.json"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        (directory / name).write_text(text)
    return sorted(wanted)


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Names of files that are missing, different or no longer generated."""
    wanted = render()
    present = {p.name: p.read_text() for p in directory.glob("*.json")} if directory.exists() else {}
    differing = [name for name, text in wanted.items() if present.get(name) != text]
    extra = [name for name in present if name not in wanted]
    return sorted(differing + extra)
