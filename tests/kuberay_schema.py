"""Validation of KubeRay manifests (cluster/kuberay/*.yaml) against the vendored ray.io/v1 schema.

The ray.io part (cluster/kuberay/schema/{raycluster,rayjob,rayservice}.yaml, cut down from the KubeRay CRDs as
schema/SOURCE.yaml says) goes through jsonschema with every object that lists properties closed
(`additionalProperties: false`): the API server prunes unknown fields of a structural schema and kubectl's strict
field validation refuses them, so here a misspelled field name is an error. Formats int32/int64 are range-checked;
CEL rules (x-kubernetes-validations) are not evaluated.

Each Kubernetes core subtree is marked `{x-veason-k8s-type: MODEL}` and goes through the kubernetes Python client's
model of that name (`openapi_types`, `attribute_map`, and `model_fields` for the required ones): unknown field names,
missing required fields and wrong scalar types are errors, lists and maps of models are walked, and quantities
(resources, sizeLimit, divisor, overhead) may be numbers or quantity strings, as the API server takes them.

    manifest_errors(doc) -> list[str]     one "path: message" per problem; [] for a valid manifest
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections import deque
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "cluster" / "kuberay" / "schema"
API_VERSION = "ray.io/v1"
SCHEMA_FILES = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
MARKER = yaml.safe_load((SCHEMA_DIR / "SOURCE.yaml").read_text())["marker"]

# The API server's resource.Quantity syntax (the pattern the CRDs give every int-or-string quantity).
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Fields that the Python client types as str (or maps of str) but the API takes as resource.Quantity.
QUANTITY_FIELDS = {
    ("V1ResourceRequirements", "limits"),
    ("V1ResourceRequirements", "requests"),
    ("V1VolumeResourceRequirements", "limits"),
    ("V1VolumeResourceRequirements", "requests"),
    ("V1PodSpec", "overhead"),
    ("V1EmptyDirVolumeSource", "size_limit"),
    ("V1ResourceFieldSelector", "divisor"),
}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def manifest_errors(doc: Any) -> list[str]:
    """Every problem of one manifest (a RayCluster, RayJob or RayService), as "path: message"."""
    if not isinstance(doc, dict):
        return [f"<root>: expected a mapping, got {type(doc).__name__}"]
    kind = doc.get("kind")
    if doc.get("apiVersion") != API_VERSION or kind not in SCHEMA_FILES:
        return [
            f"<root>: expected apiVersion {API_VERSION} and kind in {sorted(SCHEMA_FILES)}, got "
            f"{doc.get('apiVersion')!r} {kind!r}"
        ]
    metadata = doc.get("metadata")
    errors = [
        f"{_path_text(('metadata', *path))}: {message}"
        for message, path in k8s_errors(metadata, "V1ObjectMeta")
    ]
    if not isinstance(metadata, dict) or not metadata.get("name"):
        errors.append("metadata: a manifest needs metadata.name")
    validator = _validator(kind)
    for error in sorted(
        validator.iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message)
    ):
        errors.append(f"{_path_text(error.absolute_path) or '<root>'}: {error.message}")
    return errors


def k8s_errors(
    value: Any, type_expr: str, path: tuple = (), quantity: bool = False
) -> Iterator[tuple[str, tuple]]:
    """(message, path) for each problem of `value` read as the kubernetes client type `type_expr` ("V1PodSpec",
    "List[V1Container]", "Dict[str, str]", "int", ...). `quantity`: a str field that takes a resource.Quantity."""
    if value is None:
        yield f"null where {type_expr} is expected", path
    elif type_expr.startswith("List[") and type_expr.endswith("]"):
        if not isinstance(value, list):
            yield f"expected a list ({type_expr}), got {type(value).__name__}", path
            return
        for index, item in enumerate(value):
            yield from k8s_errors(item, type_expr[5:-1], (*path, index), quantity)
    elif type_expr.startswith("Dict[") and type_expr.endswith("]"):
        if not isinstance(value, dict):
            yield f"expected a mapping ({type_expr}), got {type(value).__name__}", path
            return
        item_type = type_expr[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            if not isinstance(key, str):
                yield f"map key {key!r} is not a string", path
            yield from k8s_errors(item, item_type, (*path, key), quantity)
    elif type_expr in _SCALARS:
        expected = "a number or a quantity string" if quantity else _SCALARS[type_expr][0]
        if not (_is_quantity(value) if quantity else _SCALARS[type_expr][1](value)):
            yield f"expected {expected}, got {value!r}", path
    else:
        yield from _model_errors(value, type_expr, path)


def _model_errors(value: Any, name: str, path: tuple) -> Iterator[tuple[str, tuple]]:
    model = _model(name)
    if not isinstance(value, dict):
        yield f"expected a mapping ({name}), got {type(value).__name__}", path
        return
    by_json_name = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key in value:
        if key not in by_json_name:
            close = difflib.get_close_matches(str(key), by_json_name, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            yield f"unknown field {key!r} of {name}{hint}", path
    for attr, json_name in model.attribute_map.items():
        if json_name in value:
            quantity = (name, attr) in QUANTITY_FIELDS
            yield from k8s_errors(value[json_name], model.openapi_types[attr], (*path, json_name), quantity)
        elif model.model_fields[attr].is_required():
            yield f"missing required field {json_name!r} of {name}", path


_SCALARS = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "datetime": ("an RFC 3339 date-time string", lambda v: isinstance(v, str)),
    "bytes": ("a base64 string", lambda v: isinstance(v, str)),
    "object": ("any value", lambda v: True),  # IntOrString and free-form fields
}


def _is_quantity(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, str) and QUANTITY.match(value) is not None


def _model(name: str) -> type:
    """The kubernetes client model class `name` (the package imports each model on first use)."""
    return getattr(importlib.import_module("kubernetes.client.models"), name)


def load_schema(file_name: str) -> dict:
    """A vendored schema with every object that lists properties closed (see the module docstring)."""
    schema = yaml.safe_load((SCHEMA_DIR / file_name).read_text())
    _close_objects(schema)
    schema["$id"] = file_name
    return schema


def _close_objects(node: Any) -> None:
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            if not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        for child in node.values():
            _close_objects(child)
    elif isinstance(node, list):
        for child in node:
            _close_objects(child)


def _k8s_keyword(validator: Any, type_name: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    for message, path in k8s_errors(instance, type_name):
        yield ValidationError(message, path=deque(path))


def _int_format(low: int, high: int) -> Any:
    def fits(instance: Any) -> bool:  # non-integers are the `type` keyword's business
        return not isinstance(instance, int) or isinstance(instance, bool) or low <= instance <= high

    return fits


_FORMATS = FormatChecker()
for _format, (_low, _high) in INT_RANGES.items():
    _FORMATS.checks(_format)(_int_format(_low, _high))

_CRDValidator = validators.extend(Draft202012Validator, {MARKER: _k8s_keyword})


@cache
def _validator(kind: str) -> Any:
    schemas = {name: load_schema(name) for name in SCHEMA_FILES.values()}
    registry = Registry().with_resources(
        (name, Resource.from_contents(schema, default_specification=DRAFT202012))
        for name, schema in schemas.items()
    )
    return _CRDValidator(schemas[SCHEMA_FILES[kind]], registry=registry, format_checker=_FORMATS)


def _path_text(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")
