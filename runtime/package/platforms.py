"""Deployment platforms a bundle is made for: which EP runs it, how the .ort is optimized, which snippet.

A platform is not a runtime target (``edgeprune.runtime.targets``): it names the device an app
ships to, and points at the target profile of the execution provider that device uses, so the
static-shape rule and the EP name come from one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeprune.errors import BadInputError
from edgeprune.runtime.targets import Target, get_target


@dataclass(frozen=True)
class Platform:
    """One deployment platform: its EP target, the converter's platform and optimization style."""

    name: str
    target: str  # edgeprune.runtime.targets name of the EP the app uses
    ort_platform: str  # convert_onnx_models_to_ort target_platform: "arm" or "amd64"
    optimization: str  # "fixed" bakes optimizations in; "runtime" leaves them to the EP at load
    language: str  # usage snippet: kotlin, swift, cpp

    @property
    def ep(self) -> Target:
        return get_target(self.target)


# ORT's guidance (convert_onnx_models_to_ort --help): 'runtime' style where a compiling EP (NNAPI,
# CoreML) takes an unknown share of the graph at load, 'fixed' for the CPU EP.
PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform("android-arm64", "nnapi", "arm", "runtime", "kotlin"),
        Platform("android-arm64-cpu", "cpu", "arm", "fixed", "kotlin"),
        Platform("ios-arm64", "coreml", "arm", "runtime", "swift"),
        Platform("ios-arm64-cpu", "cpu", "arm", "fixed", "swift"),
        Platform("linux-arm64", "cpu", "arm", "fixed", "cpp"),
        Platform("linux-arm64-xnnpack", "xnnpack", "arm", "runtime", "cpp"),
        Platform("linux-x64", "cpu", "amd64", "fixed", "cpp"),
    )
}

DEFAULT_PLATFORM = "linux-x64"


def get_platform(name: str) -> Platform:
    """Look up a platform by name; unknown names list the known ones."""
    key = str(name).strip().lower()
    if key not in PLATFORMS:
        raise BadInputError(f"unknown package target {name!r}: choose one of {', '.join(PLATFORMS)}.")
    return PLATFORMS[key]
