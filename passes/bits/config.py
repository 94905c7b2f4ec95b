"""The bit-allocation pass's options and their checks, kept apart so the recipe loader, the CLI and
the pass refuse a bad setting with the same ``BadInputError`` before any work is done."""

from __future__ import annotations

import dataclasses

from edgeprune.errors import BadInputError


# The accuracy levels a budget on the CPU EP offers unless told: level 4 (int8 activations per block), each option
# with its own error, plus level 0 when 2 bits are offered (no int8-compute kernel for 2 bits).  One 576x1536 MatMul
# as ORT's quantizers write it, timed interleaved against fp32 on the 2-core Xeon (AMX, 2 threads, 2026-11-30), at
# 1 token / 128 tokens: 8-bit level 0 0.15x / 0.03x, level 4 1.7x / 0.97x; 4-bit level 0 2.3x / 0.95x, level 4
# 3.1-3.6x / 0.6-0.95x; dynamic int8 2.1x / 3.8x.  SmolLM2 at 137 MB with levels (0, 4) (and the no_slower bound,
# which sees prefill only) took level-0 8-bit for 121 MatMuls and decoded at 0.38x of fp32; with level 4 alone it
# decoded at 2.06x.  Level 0 alone (the default before) decoded 8-bit at 0.14x.  The speed tie-break with a
# slack (speed_slack 0.05) took dynamic int8 for most of SmolLM2 and lost 9-12 % perplexity: its default slack is 0.
CPU_BUDGET_LEVELS: tuple[int, ...] = (4,)


@dataclasses.dataclass
class BitAllocationConfig:
    mode: str = "auto"
    """``auto``: solve for a budget; ``uniform``: every unit at ``bits``; ``fast`` (the default recipe, no
    budget): each weight in the target's fastest format that is smaller than float (cpu: dynamic int8
    MatMul/Gemm where the microbenchmarks time it faster, static QDQ Conv, 4-bit embedding tables)."""
    bits: int | None = None
    """Uniform mode: 8 (8-bit weight-only MatMulNBits, uint8 embeddings) or 4 / 2 (block-quantized)."""
    size_budget_bytes: int | None = None
    """Auto mode: total weight bytes of the output model (all initializers)."""
    avg_bits: float | None = None
    """Auto mode: average bits per weight over the quantizable units, scales and zero points included."""
    latency_budget_ms: float | None = None
    """Auto mode: prefill latency (batch 1, ``latency_tokens`` tokens) of the output model on the target."""
    latency_budget_ratio: float | None = None
    """Auto mode: prefill latency as a fraction of the float model's, both measured in this pass
    (robust where the machine's speed drifts, e.g. shared CPUs); excludes ``latency_budget_ms``."""
    decode_budget_ms: float | None = None
    """Auto mode, a model with a KV cache: milliseconds of one decode step (one new token after ``decode_context``
    cached positions, batch 1) on the target: what tokens/s a user sees.  Formats rank differently there than at
    prefill (one token reads every weight once: bytes and dispatches count, not arithmetic), so each option is
    also microbenchmarked at one token, and the emitted model's step is measured against the float model's."""
    decode_budget_ratio: float | None = None
    """Auto mode: ``decode_budget_ms`` as a fraction of the float model's decode step; excludes it."""
    bit_options: tuple[int, ...] = (4, 8)
    """Bit widths to offer besides keeping float (2 also works: ORT's 2-bit RTN costs 0.3-0.6 relative error
    per SmolLM2 layer, so it is opt-in); 16 asks for fp16, emitted only where the target runs it."""
    block_size: int | tuple[int, ...] = (32, 64, 128)
    """Block size(s) of block-quantized formats (powers of two >= 16); each bit width is offered with each."""
    symmetric: bool = False
    """Symmetric blocks (no zero points) for MatMulNBits/GatherBlockQuantized."""
    accuracy_level: int | None = None
    """MatMulNBits accuracy_level (None: ORT's default; 4 = int8 compute on CPU, faster, less exact)."""
    accuracy_levels: tuple[int, ...] | None = None
    """MatMulNBits accuracy levels to offer per node, each 4/8-bit option once per level with its own
    error and microbenchmarked latency: 0 (``accuracy_level``'s setting) and/or 4 (activations
    quantized to int8 per weight block at run time: on ORT 1.32's CPU kernel 8-bit runs faster than
    an fp32 MatMul, level 0 slower).  Levels 1-3 are refused: that kernel computes them exactly as
    level 0 (fp32) on x86.  Offering more than one level also makes a size budget break near-ties
    for speed (``speed_slack``), so it times the formats.  None (the default): ``CPU_BUDGET_LEVELS`` (plus 0 when 2 bits are
    offered) for a budget (mode ``auto``) on the CPU execution provider without an ``accuracy_level``, else (0,)."""
    speed_slack: float = 0.0
    """With several ``accuracy_levels``: after the least-error choice within the budgets, take the
    fastest choice (by the microbenchmarks, any offered format) whose objective exceeds it by at most
    ``speed_slack^2 * sum(importance)``: as if each node's relative output error grew by up to
    ``speed_slack`` in quadrature (level 4's int8 activations model at 0.5-2 % per node).  0 (the default):
    only exact ties.  MiniLM at ORT int8's size: 0.02 ran 0.95x of fp32, 0.05 1.65x (all dynamic int8), STS-B
    0.8677 / 0.8662 (fp32 0.8672, ORT int8 0.8658); on SmolLM2 0.05 cost 9-12 % perplexity."""
    no_slower: bool = True
    """A size budget alone (mode ``auto``, CPU execution provider): also bound the prefill latency to the
    float model's (``latency_budget_ratio`` 1.0, predicted by the microbenchmarks and checked by measurement
    like an explicit budget), so the size budget does not buy accuracy with formats slower than float.
    Where nothing within the size budget is predicted that fast, the least-error choice is kept with a note."""
    latency_implicit: bool = False
    """Set by :meth:`for_target` when ``latency_budget_ratio`` comes from ``no_slower``, not from the user."""
    gptq: bool = False
    """Offer GPTQ rounding (``edgeprune.passes.bits.gptq``: same grid and bytes, less output error on data like the
    calibration rows) for 2/4-bit MatMul weights.  Opt-in: it fits the calibration domain; SmolLM2
    calibrated on Tiny Shakespeare and scored on WikiText-2 does worse with it (uniform 4-bit b64:
    perplexity 28.8 vs 27.5 round-to-nearest), though its layer errors drop 50 % on held-back
    Shakespeare.  Use it when the calibration data is the deployment data."""
    mse_rounding: bool | str | tuple[str, ...] = False
    """Also offer 2/4-bit MatMulNBits on a searched grid (``edgeprune.passes.bits.rounding``: each block's scale
    and integer zero point chosen for the least squared weight error; same format, bytes and kernel as ORT's
    round-to-nearest, never more weight error), each with its own measured error: ``"mse"`` (or True) weighs
    every weight alike (data-free), ``"wmse"`` by its input feature's energy on the calibration rows (the
    Gram's diagonal), or both.  SmolLM2, every linear at 4-bit b32 asym, WikiText-2 perplexity (float 19.50):
    ORT's rounding 25.84, mse 23.86, wmse calibrated on Tiny Shakespeare 21.93; b32 sym 25.00 / 26.85 /
    22.09 (the data-free search lowers every layer's weight error, not always its output error)."""
    fp16_scales: bool = True
    """Store MatMulNBits / GatherBlockQuantized block scales as float16 behind a Cast that ORT folds at load:
    the same kernel and codes, 0.5 bit per weight less at block 32 (4-bit b32: 4.625 instead of 5.125 bits
    per weight), the scales rounded by at most 2^-11.  A node whose scales float16 cannot hold (overflow, or
    below its smallest normal) keeps float32 ones (``sensitivity.fp16_scales``)."""
    block_offsets: bool = False
    """Also offer 2/4-bit MatMulNBits with a float offset per block (``edgeprune.passes.bits.offsets``: llama.cpp's
    Q4_1 form, centred codes + float16 scale and offset per block, 5 bits per weight at 4-bit b32), each with its
    measured error and latency: an affine grid fits each block's range better than an integer zero point, and is
    exact on weights distributed on such a grid.  It costs one small MatMul and an Add per node beside the kernel
    (and one block-sum MatMul per input), which shows at decode.  With ``mse_rounding`` the offsets grid is
    searched with the same weighting; without it, min/max (Q4_1's rule)."""
    joint_siblings: bool = False
    """Auto mode: MatMuls reading one input with weights of one K (attention's q/k/v, a gated FFN's gate/up) take
    one format, so the emitter packs them into one MatMulNBits (one activation read and int8 quantization, one
    dispatch; ``edgeprune.passes.bits.pack``).  Siblings that choose one format on their own are packed either way."""
    dynamic_int8: bool = True
    """Offer dynamic int8 (quantize_dynamic: activations quantized too) where the target runs it."""
    solver: str = "auto"
    """``auto`` (milp, greedy for huge models), ``milp`` or ``greedy``."""
    output_checks: int = 4
    """Measure the model-output error with only that unit quantized, for this many most-sensitive units."""
    latency_tokens: int = 128
    """Sequence length of the latency microbenchmarks."""
    decode_context: int = 128
    """Cached positions before the decode step a decode budget bounds (the benchmarks' 128-token prompt)."""
    latency_checks: int = 3
    """Latency budgets: measure the emitted model (side by side with the float one) up to this many
    times, re-solving with a tighter budget after each miss."""
    latency_runs: int = 10
    """Timed runs per model in each latency check, at least (small models get up to 50)."""
    importance: str = "measured"
    """Weight of each node's squared relative error: ``measured`` (model-output error when only that node
    is quantized, over its local error, measured for every node in one session), ``uniform`` (1 each) or
    ``residual`` (its block's ||output||^2 / ||residual stream||^2)."""
    max_output_error: float | None = None
    """Fast mode: keep float any weight whose estimated model-output error exceeds this (its relative
    output error times sqrt(importance): with ``importance="measured"``, what quantizing it alone does
    to the model's output on a held-back row); None: no bound.  The accuracy back-off halves it from
    the worst one chosen."""
    relax_step: float = 0.15
    """Accuracy back-off: each step grows the budget by this fraction (uniform: 2 -> 4 -> 8 bits)."""

    def __post_init__(self):
        self.bit_options = tuple(int(b) for b in self.bit_options)
        r = self.mse_rounding
        if r is not False and r is not None:
            r = ("mse",) if r is True else (r,) if isinstance(r, str) else tuple(dict.fromkeys(r))
            if any(x not in ("mse", "wmse") for x in r):
                raise BadInputError(f"mse_rounding must be true, 'mse', 'wmse' or both, not {self.mse_rounding!r}")
            self.mse_rounding = r or False
        blocks = (self.block_size,) if isinstance(self.block_size, int) else tuple(self.block_size)
        if not blocks or any(b < 16 or b & (b - 1) for b in blocks):
            raise BadInputError(f"block sizes must be powers of two >= 16, not {self.block_size!r}")
        self.block_size = blocks[0] if len(blocks) == 1 else blocks
        if self.accuracy_levels is not None:
            self.accuracy_levels = tuple(sorted({int(a) for a in self.accuracy_levels}))
            if not self.accuracy_levels or any(a not in (0, 4) for a in self.accuracy_levels):
                raise BadInputError(f"accuracy_levels must be 0 and/or 4, not {self.accuracy_levels!r}: ORT's CPU "
                                    "MatMulNBits computes levels 1-3 as level 0")
        if self.accuracy_levels not in (None, (0,)) and self.accuracy_level not in (None, 0):
            raise BadInputError("pass either accuracy_level (one level for every MatMulNBits) or accuracy_levels "
                                "(levels offered per node), not both")
        if self.speed_slack < 0:
            raise BadInputError(f"speed_slack must be >= 0, not {self.speed_slack!r}")
        if self.mode not in ("auto", "uniform", "fast"):
            raise BadInputError(f"mode must be 'auto', 'uniform' or 'fast', not {self.mode!r}")
        if self.importance not in ("uniform", "residual", "measured"):
            raise BadInputError(f"importance must be 'uniform', 'residual' or 'measured', not {self.importance!r}")
        _check_budgets(self)  # here, so a recipe is refused when it is read, before any model is loaded

    @property
    def blocks(self) -> tuple[int, ...]:
        """The block sizes as a tuple, however they were given."""
        return (self.block_size,) if isinstance(self.block_size, int) else tuple(self.block_size)

    def for_target(self, target) -> BitAllocationConfig:
        """This config settled for ``target``: ``accuracy_levels`` (None: the default, see the field) and
        ``no_slower``'s latency bound."""
        cpu = target is None or target.provider == "CPUExecutionProvider"
        settled = self
        if self.accuracy_levels is None:
            budget = cpu and self.mode == "auto" and self.accuracy_level is None
            levels = tuple(sorted(set(CPU_BUDGET_LEVELS) | ({0} if 2 in self.bit_options else set())))
            settled = dataclasses.replace(self, accuracy_levels=levels if budget else (0,))
        if cpu and self.mode == "auto" and self.no_slower and self.size_bounded and not self.latency_bounded:
            settled = dataclasses.replace(settled, latency_budget_ratio=1.0, latency_implicit=True)
        return settled

    @property
    def levels(self) -> tuple[int, ...]:
        """The accuracy levels offered ((0,) while not yet settled by :meth:`for_target`)."""
        return self.accuracy_levels or (0,)

    @property
    def speed_ties(self) -> bool:
        """Whether the solver breaks near-ties for speed (several accuracy levels offered, auto mode, a slack): with
        no slack only the solver's tolerance separates "ties", and timings would make the choice vary run to run."""
        return self.mode == "auto" and len(self.levels) > 1 and self.speed_slack > 0

    @property
    def latency_bounded(self) -> bool:
        return self.latency_budget_ms is not None or self.latency_budget_ratio is not None

    @property
    def decode_bounded(self) -> bool:
        return self.decode_budget_ms is not None or self.decode_budget_ratio is not None

    @property
    def size_bounded(self) -> bool:
        return self.size_budget_bytes is not None or self.avg_bits is not None


def check(c: BitAllocationConfig, context) -> None:
    """Refuse a run without calibration context (the config itself was checked when it was made)."""
    if context is None:
        raise BadInputError("bit allocation measures errors on calibration data: run it inside a compile (with --calib).")


def _check_budgets(c: BitAllocationConfig) -> None:
    """Refuse a config the pass cannot run: no budget, two budgets on one resource, a budget <= 0."""
    budgets = [b for b in (c.size_budget_bytes, c.avg_bits, c.latency_budget_ms, c.latency_budget_ratio,
                           c.decode_budget_ms, c.decode_budget_ratio) if b is not None]
    if c.mode == "fast":
        if budgets:
            raise BadInputError("mode 'fast' takes no budget: use mode 'auto' with --size-budget, --avg-bits, --latency-budget "
                                "or --decode-budget.")
        return
    if c.mode == "uniform":
        if c.bits not in (2, 4, 8):
            raise BadInputError(f"uniform bits must be 2, 4 or 8, not {c.bits!r}: pass --bits 8 or --bits 4.")
        return
    if not budgets:
        raise BadInputError("--bits auto needs a budget: pass --size-budget, --avg-bits, --latency-budget or --decode-budget.")
    if c.size_budget_bytes is not None and c.avg_bits is not None:
        raise BadInputError("--size-budget and --avg-bits both bound the size: pass only one of them.")
    if c.latency_budget_ms is not None and c.latency_budget_ratio is not None:
        raise BadInputError("latency_budget_ms and latency_budget_ratio both bound the latency: pass only one of them.")
    if c.decode_budget_ms is not None and c.decode_budget_ratio is not None:
        raise BadInputError("decode_budget_ms and decode_budget_ratio both bound the decode step: pass only one of them.")
    if c.decode_context < 1:
        raise BadInputError(f"decode_context must be >= 1 cached positions, not {c.decode_context!r}")
    if any(b <= 0 for b in budgets):
        raise BadInputError("budgets must be positive: pass a size in bytes/MB, bits per weight or milliseconds.")
