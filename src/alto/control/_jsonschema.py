"""JSON Schema for the JSON form of a protobuf message, as ``json_format`` reads it.

The ingress parses a request body with ``google.protobuf.json_format.ParseDict`` (the
canonical proto3 JSON mapping), so the OpenAPI description of that body is derived from the
input type's descriptor with the same rules:

===================================  ==========================================================
protobuf                             JSON accepted
===================================  ==========================================================
int32, sint32, sfixed32              an integer in range (json_format also takes a numeric string)
uint32, fixed32                      an integer in 0..2**32-1
int64, sint64, sfixed64              a decimal string (as MessageToDict writes it) or an integer
uint64, fixed64                      likewise, non-negative
float, double                        a number in range, or "NaN", "Infinity", "-Infinity"
bool                                 true or false
string                               a string (no unpaired surrogates)
bytes                                base64, standard or URL-safe, padding optional
enum                                 a value's name, or its number
repeated                             an array (null elements are refused)
map<K, V>                            an object; keys are strings (numbers or "true"/"false"
                                     for integer and bool keys)
message                              an object; a field under its lowerCamelCase JSON name or its
                                     original name; no unknown fields; at most one member of a
                                     oneof
well-known types                     Struct: any object; Value: any JSON; ListValue: an array;
                                     Timestamp: RFC 3339; Duration: "1.5s"; FieldMask: "a.b,c";
                                     wrappers: the wrapped scalar; Any: an object with "@type"
===================================  ==========================================================

Messages become named schemas (``#/components/schemas/<full name>``), so nested and
recursive types are written once. ``null`` (which json_format takes as "unset" for most
fields) is left out: it is never needed to say something.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["message_schema"]

_F = FieldDescriptor
_I32 = (-(2**31), 2**31 - 1)
_U32 = (0, 2**32 - 1)
_I64 = (-(2**63), 2**63 - 1)
_U64 = (0, 2**64 - 1)
# json_format refuses numbers past float32's largest finite value (3.4028234663852886e38)
# for float fields, and writes that value as 3.4028235e+38, which it then refuses: the
# schema's bound is a little lower, so that every value it allows is written back within it.
_FLOAT_MAX = 3.4e38
_DOUBLE_MAX = 1.7976931348623157e308
# Base64 in 4-character groups, the last one possibly short (2 or 3 characters) and padded
# or not; json_format pads and decodes with the URL-safe alphabet, which takes '+' and '/'
# too. A last group of one character cannot be decoded.
_B64 = "[A-Za-z0-9+/_-]"
_BASE64 = f"^({_B64}{{4}})*({_B64}{{2}}(==)?|{_B64}{{3}}=?)?$"
_SPECIAL_FLOATS = ["NaN", "Infinity", "-Infinity"]
_RFC3339 = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"


def _up_to(bound: int) -> str:
    """A regular expression (unanchored) for the decimal integers 0..bound, written without
    leading zeros: shorter numbers, then numbers as long as ``bound`` digit by digit."""
    digits = str(bound)
    n = len(digits)
    if n == 1:
        return f"[0-{bound}]"
    alternatives = ["0", f"[1-9][0-9]{{0,{n - 2}}}"]
    for i, d in enumerate(int(c) for c in digits):
        low = 1 if i == 0 else 0
        if d > low:
            rest = f"[0-9]{{{n - i - 1}}}" if n - i - 1 else ""
            choice = str(low) if d - 1 == low else f"[{low}-{d - 1}]"
            alternatives.append(f"{digits[:i]}{choice}{rest}")
    alternatives.append(digits)
    return "(" + "|".join(alternatives) + ")"


def _int_pattern(lo: int, hi: int) -> str:
    """An anchored regular expression for the decimal integers lo..hi (lo <= 0)."""
    if lo < 0:
        return f"^(-{_up_to(-lo)}|{_up_to(hi)})$"
    return f"^{_up_to(hi)}$"


def _int64(lo: int, hi: int) -> dict[str, Any]:
    # json_format takes any in-range integer string (leading zeros too); the pattern is
    # the canonical subset, what MessageToDict writes and a client should send.
    return {
        "type": ["string", "integer"],
        "pattern": _int_pattern(lo, hi),
        "minimum": lo,
        "maximum": hi,
        "description": "a 64-bit integer: a decimal string (as results carry it) or a number",
    }


def _scalar(field: FieldDescriptor) -> dict[str, Any]:
    t = field.type
    if t in (_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32):
        return {"type": "integer", "minimum": _I32[0], "maximum": _I32[1]}
    if t in (_F.TYPE_UINT32, _F.TYPE_FIXED32):
        return {"type": "integer", "minimum": _U32[0], "maximum": _U32[1]}
    if t in (_F.TYPE_INT64, _F.TYPE_SINT64, _F.TYPE_SFIXED64):
        return _int64(*_I64)
    if t in (_F.TYPE_UINT64, _F.TYPE_FIXED64):
        return _int64(*_U64)
    if t in (_F.TYPE_FLOAT, _F.TYPE_DOUBLE):
        bound = _FLOAT_MAX if t == _F.TYPE_FLOAT else _DOUBLE_MAX
        return {
            "anyOf": [
                {"type": "number", "minimum": -bound, "maximum": bound},
                {"enum": _SPECIAL_FLOATS},
            ]
        }
    if t == _F.TYPE_BOOL:
        return {"type": "boolean"}
    if t == _F.TYPE_STRING:
        return {"type": "string"}
    if t == _F.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64", "pattern": _BASE64}
    if t == _F.TYPE_ENUM and field.enum_type is not None:
        return _enum(field.enum_type)
    raise ValueError(f"no JSON mapping for field {field.full_name} of type {t}")


def _enum(enum: EnumDescriptor) -> dict[str, Any]:
    if enum.full_name == "google.protobuf.NullValue":
        return {"type": "null"}
    names = [v.name for v in enum.values]
    numbers = sorted({v.number for v in enum.values})
    return {
        "enum": [*names, *numbers],
        "description": f"enum {enum.full_name}: a name or its number",
    }


def _map_key(field: FieldDescriptor) -> dict[str, Any]:
    t = field.type
    if t == _F.TYPE_BOOL:
        return {"enum": ["true", "false"]}
    if t == _F.TYPE_STRING:
        return {"type": "string"}
    bounds = {
        _F.TYPE_INT32: _I32, _F.TYPE_SINT32: _I32, _F.TYPE_SFIXED32: _I32,
        _F.TYPE_UINT32: _U32, _F.TYPE_FIXED32: _U32,
        _F.TYPE_INT64: _I64, _F.TYPE_SINT64: _I64, _F.TYPE_SFIXED64: _I64,
        _F.TYPE_UINT64: _U64, _F.TYPE_FIXED64: _U64,
    }[t]  # fmt: skip
    return {"type": "string", "pattern": _int_pattern(*bounds)}


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == _F.TYPE_MESSAGE
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


class _Builder:
    def __init__(self, components: dict[str, Any], prefix: str) -> None:
        self.components = components
        self.prefix = prefix

    def message(self, desc: Descriptor) -> dict[str, Any]:
        """A schema for ``desc``: inline for well-known types, a reference otherwise."""
        known = self._well_known(desc)
        if known is not None:
            return known
        name = desc.full_name
        if name not in self.components:
            self.components[name] = {}  # a placeholder first: the type may refer to itself
            self.components[name] = self._object(desc)
        return {"$ref": f"{self.prefix}{name}"}

    def _object(self, desc: Descriptor) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        exclusive: list[list[str]] = []
        for field in desc.fields:
            value = self.field(field)
            names = list(dict.fromkeys([field.json_name, field.name]))
            for key in names:
                properties[key] = value
        # json_format refuses two members of one oneof, and so one member under both its
        # names (proto3 `optional` fields are oneofs of one).
        for oneof in desc.oneofs:
            members = [list(dict.fromkeys([f.json_name, f.name])) for f in oneof.fields]
            keys = [k for names in members for k in names]
            if len(keys) > 1:
                exclusive.append(keys)
        schema: dict[str, Any] = {
            "type": "object",
            "title": desc.full_name,
            "properties": properties,
            "additionalProperties": False,
        }
        aliased = [f for f in desc.fields if f.json_name != f.name]
        notes = []
        if aliased:
            notes.append(
                "fields may be written under their JSON name or their original name ("
                + ", ".join(f"{f.json_name} / {f.name}" for f in aliased)
                + ")"
            )
        if exclusive:
            pairs = [
                {"required": [a, b]}
                for keys in exclusive
                for a, b in itertools.combinations(keys, 2)
            ]
            schema["not"] = {"anyOf": pairs}
            notes.append(
                "at most one member of each oneof: "
                + "; ".join(", ".join(keys) for keys in exclusive)
            )
        if notes:
            schema["description"] = "; ".join(notes)
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        entry = field.message_type
        if entry is not None and _is_map(field):
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            return {
                "type": "object",
                "propertyNames": _map_key(key),
                "additionalProperties": self.single(value),
            }
        if field.is_repeated:
            return {"type": "array", "items": self.single(field)}
        return self.single(field)

    def single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.type in (_F.TYPE_MESSAGE, _F.TYPE_GROUP) and field.message_type is not None:
            return self.message(field.message_type)
        return _scalar(field)

    def _well_known(self, desc: Descriptor) -> dict[str, Any] | None:
        name = desc.full_name
        if not name.startswith("google.protobuf."):
            return None
        kind = name.removeprefix("google.protobuf.")
        if kind == "Struct":
            return {"type": "object", "description": "google.protobuf.Struct: any JSON object"}
        if kind == "Value":
            return {"description": "google.protobuf.Value: any JSON value"}
        if kind == "ListValue":
            return {"type": "array", "description": "google.protobuf.ListValue: any JSON array"}
        if kind == "Timestamp":
            return {
                "type": "string",
                "format": "date-time",
                "pattern": _RFC3339,
                "description": "RFC 3339, e.g. 2024-05-01T12:00:00Z",
            }
        if kind == "Duration":
            return {
                "type": "string",
                "pattern": "^-?[0-9]{1,12}(\\.[0-9]{1,9})?s$",
                "description": 'seconds with an "s", e.g. "1.5s"',
            }
        if kind == "FieldMask":
            return {"type": "string", "description": 'comma-separated paths, e.g. "a.b,c"'}
        if kind == "Any":
            return {
                "type": "object",
                "required": ["@type"],
                "properties": {"@type": {"type": "string"}},
                "description": "google.protobuf.Any: @type names the message",
            }
        if kind.endswith("Value") and "value" in desc.fields_by_name:  # the wrappers
            return self.single(desc.fields_by_name["value"])
        return None


def message_schema(
    message: type[Message], components: dict[str, Any], prefix: str = "#/components/schemas/"
) -> dict[str, Any]:
    """The JSON Schema of the JSON form of ``message`` (a protobuf message class): a
    reference into ``components`` (filled with every message type it needs, under its full
    name), or an inline schema for a well-known type.

    Raises ValueError for a field type with no JSON mapping (none in proto3).
    """
    desc = cast(Descriptor, message.DESCRIPTOR)  # upb's descriptor type behaves alike
    return _Builder(components, prefix).message(desc)
