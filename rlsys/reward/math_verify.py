"""The built-in ``math_verify`` reward (``reward.function=math_verify``): 1.0 when the completion's
final answer is mathematically equivalent to the reference, else 0.0.

Both sides go through the ``math-verify`` package (Hugging Face): the completion's answer is
extracted as LaTeX (a ``\\boxed{...}`` answer first, then ``$...$`` / "the answer is ...") or as a
plain expression, and compared with the reference numerically (``0.5`` equals ``\\frac{1}{2}``)
and symbolically (``x^2+2x+1`` equals ``(x+1)^2``). A reference may be written bare (``7``,
``\\frac{1}{2}``, ``x^2+1``), in ``$...$`` or boxed. A completion with no answer that parses
scores 0.0; a reference that does not parse raises (the failure is counted and logged by the
reward worker, so a bad dataset column shows).

math-verify's own timeouts use ``signal.alarm``, which only works on a process's main thread, and
rlsys calls a reward function on a worker thread: they are turned off here
(``parsing_timeout=None``, ``timeout_seconds=None``) and ``reward.timeout_s`` bounds a call that
hangs instead. The package (and sympy) are imported on the first call, never by ``import rlsys``.
"""

from __future__ import annotations

import functools

_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def math_verify(completion: str, reference: str) -> float:
    """1.0 if the completion's answer is equivalent to ``reference`` (math-verify), else 0.0."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = _parse_reference(reference)
    answer = parse(
        completion,
        [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=None,  # no signal.alarm: rlsys calls this off the main thread
    )
    if not answer:
        return 0.0
    return 1.0 if verify(list(gold), answer, timeout_seconds=None) else 0.0


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> tuple:
    """The reference's parsed forms (a group's completions share one reference: parsed once).

    A bare reference is read as LaTeX first (``$...$`` around it), which reads ``x^2+1``,
    ``\\sqrt{2}`` and ``(1, 2)`` as written, then as a plain expression."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    _quiet_timeout_warning()
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    text = reference.strip()
    gold = []
    if text and not any(d in text for d in _LATEX_DELIMITERS):
        gold = parse(f"${text}$", configs, parsing_timeout=None)
    if not gold:
        gold = parse(text, configs, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math_verify cannot parse the reference answer {reference[:80]!r}")
    return tuple(gold)


@functools.cache
def _quiet_timeout_warning() -> None:
    """math-verify warns once per process that its timeout is off; here it is off on purpose
    (``reward.timeout_s`` bounds the call), so the warning would only mislead."""
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
