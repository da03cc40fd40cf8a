"""Create bodies an adversarial probe sent (issue 13), as explicit cases and as a hypothesis
strategy: for the validation unit tests and the fuzz of a live edge alike."""

from __future__ import annotations

from hypothesis import strategies as st

MESSAGES = '[{"role": "user", "content": "x"}]'


def body_with(field: str, value: str) -> bytes:
    """A valid create body but for ``field``, whose JSON text is ``value`` as given."""
    return f'{{"messages": {MESSAGES}, "{field}": {value}}}'.encode()


DEEP = 100_000
# What ``json.loads`` accepts (or chokes on) but no JSON request to an LLM may carry.
HOSTILE_VALUES = {
    "nested 100k deep": "[" * DEEP + "]" * DEEP,
    "nested 65 deep": "[" * 64 + "]" * 64,  # the body itself is the 65th level
    "a 4301-digit integer": "7" * 4301,
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "1e999": "1e999",
    "a 400-digit float": "1" + "0" * 400 + ".5",
}
HOSTILE_BODIES = {label: body_with("temperature", value) for label, value in
                  HOSTILE_VALUES.items()}

# Fields of the openai SDK's call that are not fields of the request body.
SDK_CALL_OPTIONS = ["extra_headers", "extra_body", "extra_query", "timeout"]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


hostile_values = st.one_of(
    st.integers(1, 3000).map(_nested),
    st.integers(4200, 4400).map(lambda digits: "9" * digits),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1E+309"]),
    st.integers(300, 400).map(lambda digits: "-" + "9" * digits + ".0"),
    st.sampled_from(["{}", '{"X-Upstream": "x"}', "0.001", '"soon"']),
)
hostile_bodies = st.builds(
    body_with,
    st.sampled_from(["temperature", "metadata", "seed", "tools", "x-vendor", *SDK_CALL_OPTIONS]),
    hostile_values,
)
