"""A request's structured-output fields -> StructuredOutputsParams, or a 400 naming the field.

Three spellings, at most one per request:
- OpenAI's `response_format`: {"type": "text"}, {"type": "json_object"}, or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"}};
- vLLM's older body fields `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
- vLLM's newer `structured_outputs`: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}.
Whether the schema or grammar compiles is checked by the engine (engine/structured_output.py),
also a 400.
"""

from __future__ import annotations

from typing import Any

from glmserve.engine.sampling_params import StructuredOutputsParams
from glmserve.serving.errors import InvalidRequest

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(
    response_format: dict[str, Any] | None,
    guided: dict[str, Any] | None = None,
    structured_outputs: dict[str, Any] | None = None,
) -> StructuredOutputsParams | None:
    """`guided`: the request's guided_* fields by name (None when unset)."""
    given = {name: value for name, value in (guided or {}).items() if value is not None}
    if structured_outputs is not None:
        given["structured_outputs"] = structured_outputs
    from_format = _response_format(response_format)
    if from_format is not None:
        given["response_format"] = from_format
    if len(given) > 1:
        raise InvalidRequest(f"give one way to structure the output, not {', '.join(sorted(given))}", param=sorted(given)[1])
    if not given:
        return None
    (param, value), = given.items()
    try:
        if param == "response_format":
            return value
        if param == "structured_outputs":
            return StructuredOutputsParams.of(value)
        return StructuredOutputsParams(**{GUIDED_FIELDS[param]: value})
    except (ValueError, TypeError) as error:
        raise InvalidRequest(str(error), param=param) from None


def _response_format(response_format: dict[str, Any] | None) -> StructuredOutputsParams | None:
    if response_format is None:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise InvalidRequest("response_format json_schema needs json_schema.schema", param="response_format")
        try:
            return StructuredOutputsParams(json=schema)
        except ValueError as error:
            raise InvalidRequest(str(error), param="response_format") from None
    raise InvalidRequest(
        f"response_format type {kind!r} is not supported (text, json_object, json_schema)", param="response_format"
    )
