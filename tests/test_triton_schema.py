"""The transcribed Triton ModelConfig subset (tests/triton_config.py) against Triton's own schema."""

from typing import Any

import pytest

from tests.triton_config import _FALLBACK, OFFICIAL, F, _fallback_model_config


def _repeated(field: Any) -> bool:
    # protobuf 7 dropped FieldDescriptor.label in favour of is_repeated
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED


@pytest.mark.skipif(
    OFFICIAL is None, reason="tritonclient not installed (pip install --no-deps tritonclient)"
)
def test_fallback_schema_matches_triton() -> None:
    """The transcribed subset agrees with Triton's own model_config.proto, field by field."""
    assert OFFICIAL is not None
    official = OFFICIAL.DESCRIPTOR
    ours = _fallback_model_config().DESCRIPTOR.file
    for message_name in _FALLBACK:
        theirs_message = official.message_types_by_name[message_name]
        for field in ours.message_types_by_name[message_name].fields:
            theirs = theirs_message.fields_by_name[field.name]
            assert (theirs.number, theirs.type, _repeated(theirs)) == (
                field.number,
                field.type,
                _repeated(field),
            ), f"{message_name}.{field.name}"
            if field.message_type is not None:
                assert theirs.message_type.full_name == field.message_type.full_name
            if field.enum_type is not None:
                assert [(v.name, v.number) for v in theirs.enum_type.values] == [
                    (v.name, v.number) for v in field.enum_type.values
                ]
