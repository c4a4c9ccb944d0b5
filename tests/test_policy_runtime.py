"""The PolicyHolder: the file until something is published, then the published
policy; an invalid published document never replaces the running one."""

from __future__ import annotations

from bulwark.policy import parse
from bulwark.policy.runtime import PolicyHolder
from bulwark.settings import Settings
from schemas.events import PolicyPublished

BASE = "hostname: gw.example.com\nlocal_domains: [example.com]\n"


def published(document: dict, version: str) -> PolicyPublished:
    return PolicyPublished(policy_version=version, document=document, source="p.yaml", applied_by="tester")


def test_falls_back_to_the_file_then_follows_what_is_published(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(BASE)
    holder = PolicyHolder(settings=Settings.from_env().with_(policy_path=path))
    assert holder.current.version == parse(BASE).version
    newer = parse(BASE.replace("gw.example.com", "gw2.example.com"))
    holder._published(newer.version, published(newer.model_dump(mode="json"), newer.version))
    assert holder.current.hostname == "gw2.example.com"
    # Code written against a Policy reads the live one through the holder.
    assert holder.hostname == "gw2.example.com" and holder.version == newer.version


def test_an_invalid_published_document_is_ignored():
    start = parse(BASE)
    holder = PolicyHolder.fixed(start)
    seen = []
    holder.on_change(seen.append)
    holder._published("bad", published({"hostname": "x", "local_domains": []}, "bad"))
    assert holder.current is start and seen == []
