"""Errors whose remedy is an argument. The library names its parameter (``pretrained_backbone=False``) and
the command line its flag (``--no-pretrained-backbone``): the error carries the parameter and the value as
data, ``str()`` spells them as Python, and the CLI spells them as the flag of the command that was run
(:func:`wszoo.cli.main`), so neither reader is sent to the other's interface."""
import ast
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["Fix", "FixableError", "UsageError"]


@dataclass(frozen=True)
class Fix:
    """An argument that resolves an error.

    Args:
        param: the Python parameter (the command line's flag is the one whose ``dest`` is this name).
        value: its value as Python code: ``"False"``, ``"'<DIR>/model.safetensors'"``; ``None`` names the
            parameter alone (``lr``, ``--lr``: "resume it with the same lr").
        cli_value: the value as typed after the flag (``"FILE"``); default: ``value`` without quotes.
        phrase: the words around the argument, ``{}`` marking it; where a command has no such flag the whole
            phrase is left out, so a sentence never points to an option that is not there.
        call: the function the parameter belongs to, named in the Python spelling
            (``build_detector(..., pretrained_backbone=False)``).
    """

    param: str
    value: Optional[str]
    cli_value: Optional[str] = None
    phrase: str = "{}"
    call: Optional[str] = None

    def python(self) -> str:
        arg = self.param if self.value is None else f"{self.param}={self.value}"
        return f"{self.call}(..., {arg})" if self.call else arg

    def typed_value(self) -> str:
        """The value as a command line takes it."""
        if self.cli_value is not None:
            return self.cli_value
        if self.value is None:
            return ""
        try:
            literal = ast.literal_eval(self.value)
        except (ValueError, SyntaxError):
            return self.value
        return literal if isinstance(literal, str) else self.value


class FixableError(Exception):
    """An error whose message names :class:`Fix` arguments: ``{param}`` in ``template`` is replaced by the
    fix's phrase, spelled for Python by ``str()`` or for a command line by :meth:`render`."""

    def __init__(self, template: str, *fixes: Fix) -> None:
        self.template = template
        self.fixes = fixes
        super().__init__(self.render(Fix.python))

    def render(self, spell: Callable[[Fix], Optional[str]]) -> str:
        """The message with each fix spelled by ``spell``; a fix it returns ``None`` for leaves its phrase out."""
        text = self.template
        for fix in self.fixes:
            spelled = spell(fix)
            text = text.replace("{" + fix.param + "}", "" if spelled is None else fix.phrase.format(spelled))
        return text

    def extended(self, more: str, *fixes: Fix, drop: tuple = ()) -> "FixableError":
        """The same kind of error with ``more`` appended and ``fixes`` added (and the fixes named in ``drop``
        left out: a wrapper whose caller has no such parameter)."""
        kept = tuple(f for f in self.fixes if f.param not in drop)
        template = self.template
        for param in drop:
            template = template.replace("{" + param + "}", "")
        return type(self)(f"{template}{more}", *kept, *fixes)


class UsageError(FixableError, ValueError):
    """A combination of arguments that cannot work, with the argument that would."""
