"""Weight-syntax stripping before the LLM."""

import pytest

from ella_core.prompt_text import strip_weight_syntax


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a (red hat:1.3) on a cat", "a red hat on a cat"),
        ("((masterpiece:1.2), best quality:1.1), cat", "masterpiece, best quality, cat"),
        ("(faded:0.5) colours, (sharp: .8)", "faded colours, sharp"),
        ("a cat (sleeping) on a mat", "a cat (sleeping) on a mat"),  # plain prose parentheses stay
        ("time 3:30 (approx)", "time 3:30 (approx)"),
        (r"a \(cat\) shaped sign", "a (cat) shaped sign"),  # escaped parentheses become literal ones
        ("<lora:styleA:0.8> a dog, <LyCO:x:1>in snow", "a dog, in snow"),
        ("", ""),
    ],
)
def test_strip_weight_syntax(prompt, expected):
    assert strip_weight_syntax(prompt) == expected
