"""What the prune pass would act on, as ``edgeprune inspect`` shows it (through ``EdgePass.describe``).

Formatting only: the groups come from the pass's own discovery (``prune_pass.find_groups``) and the
conv channel groups from ``dependency``, so inspect and the pass cannot disagree.
"""

from __future__ import annotations

import collections
import re
from typing import Any

from edgeprune.passes.prune.dependency import ChannelGroup
from edgeprune.passes.prune.dependency import summary as channel_summary

_KIND_NAMES = {"ffn": ("FFN", "neurons"), "heads": ("head", "heads"), "conv": ("conv", "channels")}


def inspect_report(groups: list[dict], skipped: list[dict], channel_groups: list[ChannelGroup]) -> dict[str, Any]:
    """``describe``'s answer: summary lines, inspect's JSON fields, and the text view's tables."""
    entries = [_group_entry(g) for g in channel_groups]
    tables = []
    if entries:
        rows = [(g["name"], g["channels"], len(g["producers"]), len(g["depthwise"]), len(g["consumers"]), "yes" if g["prunable"] else g["reason"].split(":")[0])
                for g in entries]  # fmt: skip
        tables.append(("conv channel groups (--json gives the full reasons)", ["group", "channels", "producers", "depthwise", "consumers", "prunable"], rows))
    rows = prune_table(groups, skipped)
    if rows:
        tables.append(("prunable groups (prune pass defaults; --json lists each group)", ["kind", "groups", "units", "skipped", "skipped because"], rows))
    return {
        "summary": (channel_summary(channel_groups)[-1:] if channel_groups else []) + [prune_summary(groups, skipped)],
        "fields": {"channel_groups": entries, "prune_groups": groups, "prune_skipped": skipped},
        "tables": tables,
    }


def _units_text(units: list[int], noun: str) -> str:
    lo, hi = min(units), max(units)
    return f"{lo} {noun} each" if lo == hi else f"{lo}-{hi} {noun}"


def prune_summary(groups: list[dict], skipped: list[dict]) -> str:
    """One line: what the prune pass would score, per kind, and how many groups it leaves out."""
    parts = []
    for kind, (name, noun) in _KIND_NAMES.items():
        mine = [g for g in groups if g["kind"] == kind]
        if mine:
            parts.append(f"{len(mine)} {name} group{'' if len(mine) == 1 else 's'} ({_units_text([g['units'] for g in mine], noun)})")
    return f"prunable: {', '.join(parts) or 'nothing'}; {len(skipped)} skipped"


def prune_table(groups: list[dict], skipped: list[dict]) -> list[tuple[str, int, str, int, str]]:
    """Rows (kind, groups, units, skipped, reasons): one per unit kind found or skipped."""
    rows = []
    for kind, (_, noun) in _KIND_NAMES.items():
        mine = [g for g in groups if g["kind"] == kind]
        left = [s for s in skipped if s["kind"] == kind]
        if not mine and not left:
            continue
        reasons = collections.Counter(_short_reason(s["reason"]) for s in left)
        text = "; ".join(f"{r} (x{n})" if n > 1 else r for r, n in reasons.most_common(3))
        if len(reasons) > 3:
            text += f"; +{len(reasons) - 3} more"
        units = _units_text([g["units"] for g in mine], noun) if mine else "-"
        rows.append((kind, len(mine), units, len(left), text or "-"))
    return rows


def _short_reason(reason: str) -> str:
    """The reason without its group prefix ("attention 3: ...", "conv group x: ...") so equal reasons count together."""
    head, sep, tail = reason.partition(": ")
    text = tail if sep and len(head.split()) <= 3 else reason
    return text if len(text) <= 90 else text[:87] + "..."


_NAMED = re.compile(r"\b(node|tensor|constant|weight|intermediate) \S+")
_DETAILS = re.compile(r" \([^)]*\)")


def reason_kind(reason: str) -> str:
    """A skip reason without the names and figures in it, so groups left out for the same cause count together."""
    if reason.startswith("residual:"):
        return "residual stream kept (conv_residual = true prunes it)"
    head, sep, tail = reason.partition(": ")
    text = tail if sep and len(head.split()) <= 3 else reason
    return _DETAILS.sub("", _NAMED.sub(r"\1", text))


def left_out_summary(reasons: list[str]) -> str:
    """Groups left out, counted by cause: ``3 x LRN node reads the channels and has no pruning rule; 1 x ...``.

    A group blocked for several causes (a dependency group's reason joins them with "; ") counts once, under
    its causes joined by "and", so the counts add up to the groups and every item has its count.
    """
    kinds = (" and ".join(sorted(dict.fromkeys(reason_kind(r).split("; ")))) for r in reasons)
    return "; ".join(f"{n} x {kind}" for kind, n in collections.Counter(kinds).most_common())


def _group_entry(group: ChannelGroup) -> dict:
    """A channel group without its member list (which can be long): what is coupled, and why it is kept."""
    return {
        "name": group.name,
        "channels": group.channels,
        "producers": group.producers,
        "depthwise": group.lockstep,
        "consumers": group.consumers,
        "tensors": len(group.members),
        "residual": group.residual,
        "prunable": group.prunable,
        "reason": group.reason,
    }
