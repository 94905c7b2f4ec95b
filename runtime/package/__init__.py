"""Deployable bundles: ORT format, reduced-operator config, static shapes, pre/post-processing, manifest.

``package_model`` builds a bundle; ``verify_bundle`` re-checks one. See ``bundle`` for the steps.
"""

from edgeprune.runtime.package.bundle import PackageOptions, PackageResult, package_model, verify_bundle
from edgeprune.runtime.package.platforms import PLATFORMS, get_platform

__all__ = ["PLATFORMS", "PackageOptions", "PackageResult", "get_platform", "package_model", "verify_bundle"]
