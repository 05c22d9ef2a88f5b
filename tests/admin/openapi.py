"""Validate the admin API's responses against src/veil/admin/openapi.yaml, and record which
documented operations and statuses the tests exercised."""

from __future__ import annotations

import importlib.resources
from typing import Any

import jsonschema
import yaml

from tests.admin.conftest import Reply


def load_spec() -> dict[str, Any]:
    text = importlib.resources.files("veil.admin").joinpath("openapi.yaml").read_text()
    spec = yaml.safe_load(text)
    assert isinstance(spec, dict)
    return spec


class Spec:
    def __init__(self) -> None:
        self.doc = load_spec()
        jsonschema.Draft202012Validator.check_schema(
            {"components": self.doc["components"]})
        self.seen: set[tuple[str, str, str]] = set()

    def _resolve(self, obj: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in obj:
            node: Any = self.doc
            for part in obj["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            obj = node
        return obj

    def operations(self) -> set[tuple[str, str]]:
        return {(path, method) for path, item in self.doc["paths"].items()
                for method in item if method != "parameters"}

    def check(self, path: str, method: str, reply: Reply) -> Any:
        """Assert ``reply`` is a documented response of ``method path`` (a path template),
        with a JSON body that matches its schema; returns the body."""
        operation = self.doc["paths"][path][method.lower()]
        status = str(reply.status)
        assert status in operation["responses"], (
            f"{method} {path} answered {status}, not documented: {reply.body[:300]!r}")
        response = self._resolve(operation["responses"][status])
        schema = response["content"]["application/json"]["schema"]
        body = reply.json()
        validator = jsonschema.Draft202012Validator(
            {**schema, "components": self.doc["components"]},
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        validator.validate(body)
        self.seen.add((path, method.lower(), status))
        return body
