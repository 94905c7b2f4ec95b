"""The pass protocol every edgeprune pass follows, on top of onnx-ir's pass infrastructure.

A pass is an ``ir.passes.InPlacePass`` built from its typed config and the compile context. It
returns an ``EdgePassResult``: onnx-ir's ``PassResult`` plus a JSON-able account of every
decision it made (``records``, one per layer/unit) and a short ``summary``, so the report can
show exactly what was done and a later run can replay it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

from edgeprune.errors import BadInputError

if TYPE_CHECKING:
    from edgeprune.context import CompileContext


@dataclasses.dataclass
class EdgePassResult(ir.passes.PassResult):
    """``PassResult`` with the pass's decisions: ``records`` per unit, ``summary`` for the whole model."""

    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class NoConfig:
    """Config of a pass that has no options."""


class EdgePass(ir.passes.InPlacePass):
    """Base of edgeprune passes: holds ``config`` and ``context``; subclasses implement ``call``.

    Subclasses set ``name`` (the recipe name) and ``Config`` (a dataclass of options). A pass at
    no-op settings must return a model whose outputs equal its input's.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None, context: CompileContext | None = None):
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.context = context

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, context: CompileContext | None = None) -> EdgePass:
        """Build from a recipe's option table, naming any option the pass does not have."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BadInputError(
                f"pass {cls.name!r} has no option(s) {', '.join(unknown)}: "
                f"its options are {', '.join(sorted(known)) or 'none'}."
            )
        try:
            config = cls.Config(**options)
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"bad options for pass {cls.name!r}: {exc}.") from exc
        return cls(config, context)

    @classmethod
    def describe(cls, model: ir.Model) -> dict[str, Any] | None:
        """What this pass would act on in ``model`` at its default options, for ``edgeprune inspect``; None when it has nothing to say.

        Read-only.  The answer may hold ``summary`` (lines for inspect's structure list), ``fields``
        (entries of inspect's JSON) and ``tables`` ((title, columns, rows) for its text view).
        """
        return None

    def relaxed(self, last: EdgePassResult | None = None) -> EdgePass | None:
        """A less aggressive copy of this pass for accuracy back-off, or None when there is none.

        ``last`` is what this pass returned on the run that missed the budget, so a pass can
        decide from its own result (not from state kept on the object) that it cannot go further.
        """
        return None

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)
