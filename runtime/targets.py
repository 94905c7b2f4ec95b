"""Target profiles: which ONNX Runtime execution provider a target means and what it runs fast.

A target is a static profile, not a live device: passes read ``fast_formats`` and
``static_shapes`` to decide what to emit, and the runtime measures a target only where its
execution provider is installed.  ``cpu`` is the default and the one always measured here.

Format names used in ``fast_formats``:
``fp32``, ``fp16``, ``int8-dynamic`` (DynamicQuantizeLinear + MatMulInteger),
``int4-matmulnbits`` (com.microsoft MatMulNBits with 4-bit weights), ``qdq-int8`` and
``qdq-int16`` (static QuantizeLinear/DequantizeLinear pairs, 8- or 16-bit activations).
They are listed in order of preference for that target.  ``op_formats`` overrides them for op types
whose fast formats differ (on ``cpu``, dynamic int8 Conv is ConvInteger, which is slow).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import onnxruntime

from edgeprune.errors import BadInputError, TargetUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One deployment target: the EP that runs it and what that EP runs fast."""

    name: str
    provider: str
    description: str
    fast_formats: tuple[str, ...]
    static_shapes: bool
    custom_ops: bool
    op_formats: dict = field(default_factory=dict, hash=False)
    """Op type -> its fast formats where they differ from ``fast_formats``."""
    # Excluded from hashing so a frozen Target stays hashable despite holding a dict.
    provider_options: dict = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["fast_formats"] = list(self.fast_formats)
        data["op_formats"] = {op: list(f) for op, f in self.op_formats.items()}
        data["provider_options"] = dict(self.provider_options)
        return data

    def formats_for(self, op_type: str) -> tuple[str, ...]:
        """The formats ``op_type`` runs fast on this target."""
        return self.op_formats.get(op_type, self.fast_formats)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="cpu",
            provider="CPUExecutionProvider",
            description=(
                "ONNX Runtime's default CPU kernels (MLAS): fp32, dynamic int8 MatMulInteger and "
                "4-bit MatMulNBits are fast; static QDQ int8 is fused to QLinear ops and helps "
                "mainly on CPUs with VNNI/dot-product instructions. Conv: static QDQ int8 "
                "(QLinearConv), never dynamic int8: ConvInteger measured 10x slower than fp32 on "
                "EfficientNet-Lite0 where QDQ was 1.9x faster."
            ),
            fast_formats=("fp32", "int8-dynamic", "int4-matmulnbits", "qdq-int8"),
            static_shapes=False,
            custom_ops=True,
            op_formats={"Conv": ("fp32", "qdq-int8")},
        ),
        Target(
            name="cuda",
            provider="CUDAExecutionProvider",
            description=(
                "NVIDIA GPUs through cuDNN/cuBLAS: fp16 is the fast path, 4-bit MatMulNBits has "
                "CUDA kernels; QDQ int8 mostly runs dequantized (use TensorRT for real int8)."
            ),
            fast_formats=("fp16", "int4-matmulnbits", "fp32"),
            static_shapes=False,
            custom_ops=True,
        ),
        Target(
            name="openvino",
            provider="OpenVINOExecutionProvider",
            description=(
                "Intel CPUs, iGPUs and NPUs through OpenVINO: consumes QDQ int8 models and runs "
                "them in int8, fp16 on GPU/NPU; NPU devices want static shapes."
            ),
            fast_formats=("qdq-int8", "fp16", "fp32"),
            static_shapes=False,
            custom_ops=False,
        ),
        Target(
            name="qnn",
            provider="QNNExecutionProvider",
            description=(
                "Qualcomm Hexagon NPU (HTP backend): needs static shapes and fully QDQ-quantized "
                "models with 8- or 16-bit activations; unsupported nodes fall back to CPU."
            ),
            fast_formats=("qdq-int8", "qdq-int16"),
            static_shapes=True,
            custom_ops=False,
            provider_options={"backend_type": "htp"},
        ),
        Target(
            name="coreml",
            provider="CoreMLExecutionProvider",
            description=(
                "Apple Neural Engine / GPU through Core ML: fp16 and fp32 float models; dynamic "
                "shapes are allowed but static ones keep more nodes off the CPU."
            ),
            fast_formats=("fp16", "fp32"),
            static_shapes=False,
            custom_ops=False,
        ),
        Target(
            name="nnapi",
            provider="NnapiExecutionProvider",
            description=(
                "Android NNAPI (device NPU/DSP/GPU): needs static shapes; QDQ 8-bit models reach "
                "the accelerator, float models often stay on its CPU path."
            ),
            fast_formats=("qdq-int8", "fp32"),
            static_shapes=True,
            custom_ops=False,
        ),
        Target(
            name="xnnpack",
            provider="XnnpackExecutionProvider",
            description=(
                "XNNPACK kernels for Arm and x86 mobile CPUs: fp32 and QDQ int8 Conv/Gemm/MatMul/"
                "pooling; other ops fall back to the CPU provider."
            ),
            fast_formats=("fp32", "qdq-int8"),
            static_shapes=False,
            custom_ops=False,
        ),
    )
}

DEFAULT_TARGET = "cpu"

# How to get each EP; used in the "not measured here" message.
_INSTALL_HINTS = {
    "CPUExecutionProvider": "install the onnxruntime package",
    "CUDAExecutionProvider": "install onnxruntime-gpu on a machine with an NVIDIA GPU",
    "OpenVINOExecutionProvider": "install onnxruntime-openvino",
    "QNNExecutionProvider": "install onnxruntime-qnn on a Snapdragon device",
    "CoreMLExecutionProvider": "use the onnxruntime build for macOS or iOS",
    "NnapiExecutionProvider": "use the onnxruntime Android package on an Android device",
    "XnnpackExecutionProvider": "use an onnxruntime build with XNNPACK (the Android/iOS packages have it)",
}


def get_target(name: str) -> Target:
    """Look up a target by name (case-insensitive); unknown names list the known ones."""
    key = str(name).strip().lower()
    if key not in TARGETS:
        known = ", ".join(TARGETS)
        raise BadInputError(f"unknown target {name!r}: choose one of {known}.")
    return TARGETS[key]


def resolve_target(target: Target | str) -> Target:
    """Accept a Target or its name, so callers can pass either."""
    return target if isinstance(target, Target) else get_target(target)


def is_available(target: Target) -> bool:
    """True when this onnxruntime build has the target's execution provider."""
    return resolve_target(target).provider in onnxruntime.get_available_providers()


def require_available(target: Target) -> None:
    """Raise TargetUnavailableError when the target cannot be measured on this machine."""
    if not is_available(target):
        hint = _INSTALL_HINTS.get(target.provider, "install an onnxruntime build that has it")
        raise TargetUnavailableError(
            f"target {target.name} needs {target.provider}, which this onnxruntime build lacks: "
            f"not measured here; {hint} to measure it."
        )
