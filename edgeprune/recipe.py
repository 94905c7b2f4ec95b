"""Recipes: which passes a compile runs, in order, with their options (TOML or YAML).

    # recipe.toml
    [[passes]]
    name = "cleanup"
    [passes.options]
    fold_constants = true

Every pass is built from its options when the recipe is read (``build_passes``), so a typo in a
name or an option fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib
from typing import TYPE_CHECKING, Any

from edgeprune.errors import BadInputError
from edgeprune.passes.base import EdgePass
from edgeprune.passes.registry import get_pass

if TYPE_CHECKING:
    from edgeprune.context import CompileContext


@dataclasses.dataclass
class PassSpec:
    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Recipe:
    passes: list[PassSpec]
    source: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "passes": [dataclasses.asdict(p) for p in self.passes]}


def build_passes(recipe: Recipe, context: CompileContext | None = None) -> list[EdgePass]:
    """Each pass of ``recipe`` built from its options: the one place a bad name or option is refused."""
    return [get_pass(spec.name).from_options(spec.options, context) for spec in recipe.passes]


#: Targets whose fast formats the default recipe's bit allocation (mode ``fast``) has been measured on.
FAST_BITS_TARGETS = ("cpu",)
#: Targets where ``--bits`` smooths activations first (``smooth`` pass) unless told not to: the CPU EP quantizes
#: activations at run time (dynamic int8, MatMulNBits accuracy level 4), which outlier channels ruin.
SMOOTH_TARGETS = ("cpu",)


def default_recipe(target: str = "cpu") -> Recipe:
    """What ``compile`` runs without ``--recipe`` or pass flags: cleanup, then (on a target where it has
    been measured) bit allocation in its ``fast`` mode: each weight in the target's fastest format that
    keeps it smaller (on cpu: dynamic int8 MatMul/Gemm where timed faster, static QDQ Conv, 4-bit
    embedding tables); the accuracy back-off keeps the worst nodes float when fidelity falls short."""
    passes = [PassSpec("cleanup")]
    if str(target).strip().lower() in FAST_BITS_TARGETS:
        passes.append(PassSpec("bits", {"mode": "fast"}))
    return Recipe(passes, source="default")


def recipe_from_flags(*, prune: dict[str, Any] | None = None, bits: dict[str, Any] | None = None,
                      sparse_attention: dict[str, Any] | None = None, moe: dict[str, Any] | None = None,
                      fuse_attention: bool = False, smooth: dict[str, Any] | None = None, target: str = "cpu") -> Recipe:
    """The recipe the CLI's pass flags describe: cleanup, then each requested pass.

    Pruning is followed by another cleanup, which re-infers the shapes the pruned widths changed
    and folds what pruning left constant; bit allocation follows, on the final widths.  Sparse
    attention comes last: cleanup inlines model-local functions, which would dissolve its op.  Attention
    fusion comes before bit allocation, which reads the head counts off float projections (quantized
    ones are not recognised as linears); the sparse pass then takes the fused blocks it can carry (with rotary left
    outside them).  With attention fused, the residual Add + RMSNorm pairs are fused too (``fuse_norms``), after
    smoothing and bit allocation, which scale and read the plain norm.
    Smoothing goes right before bit allocation, which measures its formats on the smoothed weights; with
    ``bits`` on a ``SMOOTH_TARGETS`` target it runs at its default strength unless ``smooth`` says otherwise
    (``{"alpha": 0}``: off).
    MoE expert removal comes first (with its own cleanup): it leaves whole experts dead, and the
    passes after it should see only the experts that remain.
    """
    if prune is None and bits is None and sparse_attention is None and moe is None and not fuse_attention:
        return default_recipe()
    passes = [PassSpec("cleanup")]
    if moe is not None:
        passes += [PassSpec("moe", dict(moe)), PassSpec("cleanup")]
    if prune is not None:
        passes += [PassSpec("prune", dict(prune)), PassSpec("cleanup")]
    if fuse_attention:  # the sparse pass reads rotary outside the fused op
        passes.append(PassSpec("fuse_attention", {"rotary": False} if sparse_attention is not None else {}))
    if smooth is None and bits is not None and str(target).strip().lower() in SMOOTH_TARGETS:
        smooth = {}
    if smooth is not None and smooth.get("alpha") != 0:
        passes.append(PassSpec("smooth", dict(smooth)))
    if bits is not None:
        passes.append(PassSpec("bits", dict(bits)))
    if fuse_attention:  # after smooth and bits, which scale and read the plain norms
        passes.append(PassSpec("fuse_norms"))
    if sparse_attention is not None:
        passes.append(PassSpec("sparse_attention", dict(sparse_attention)))
    recipe = Recipe(passes, source="command line")
    build_passes(recipe)  # bad options fail before any work
    return recipe


def parse_size(text: str) -> int:
    """Bytes from '137MB', '90 MiB', '1.5GB' or a plain number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = str(text).strip().upper().replace(" ", "")
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        size = float(number) * units[unit]
    except (KeyError, ValueError):
        raise BadInputError(f"size {text!r} is not a size: write e.g. 137MB, 90MiB or a number of bytes.") from None
    if size <= 0:
        raise BadInputError(f"size {text!r} must be positive.")
    return int(size)


def _parse(path: pathlib.Path) -> Any:
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BadInputError(f"recipe {path} is not valid TOML ({exc}): fix the file.") from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise BadInputError(f"recipe {path} is not valid YAML ({exc}): fix the file.") from exc
    raise BadInputError(f"recipe {path} must be a .toml, .yaml or .yml file.")


def load_recipe(path: str | pathlib.Path) -> Recipe:
    """Read and check a recipe file; every pass must be registered and accept its options."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise BadInputError(f"recipe file {path} does not exist: check the --recipe path.")
    data = _parse(path)
    entries = data.get("passes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BadInputError(f"recipe {path} has no 'passes' list: add at least one pass, e.g. name = \"cleanup\".")
    specs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise BadInputError(f"recipe {path}: pass #{i + 1} has no name.")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise BadInputError(f"recipe {path}: options of pass {entry['name']!r} must be a table.")
        specs.append(PassSpec(entry["name"], dict(options)))
    recipe = Recipe(specs, source=str(path))
    build_passes(recipe)
    return recipe
