"""The cost-quality curve of a router on items whose answers from both models are scored.

Every router here ranks items by a score (higher: the small model more likely to do); a threshold sends the
lowest-scored share s of items to the large model. Its curve is quality against s, read at each distinct score
(items with equal scores move together) and linear between (a router that randomises at the threshold gets the
line). Random routing is the straight line from the small model alone (s = 0) to the large model alone (s = 1).

What RouteLLM reports of a curve: the performance gap recovered at a share s,
PGR(s) = (Q(s) - Q_small) / (Q_large - Q_small), and the least share reaching a target quality (95% of the large
model's). Costs are seconds per request: a learned or rules router pays its own cost plus the model it picks; a
cascade pays the small answer always and the large one for the share it escalates."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    shares: tuple[float, ...]
    """Fractions of items sent to the large model, increasing from 0 to 1."""
    qualities: tuple[float, ...]
    """Mean quality at each share."""

    def at(self, share: float) -> float:
        """Quality at `share`, linear between the curve's points."""
        xs, ys = self.shares, self.qualities
        for i in range(1, len(xs)):
            if share <= xs[i]:
                span = xs[i] - xs[i - 1]
                t = 0.0 if span == 0 else (share - xs[i - 1]) / span
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        return ys[-1]

    def least_share(self, quality: float) -> float | None:
        """The least share whose quality reaches `quality` (linear between points), None when none does."""
        xs, ys = self.shares, self.qualities
        if ys[0] >= quality:
            return 0.0
        for i in range(1, len(xs)):
            if ys[i] >= quality:
                t = (quality - ys[i - 1]) / (ys[i] - ys[i - 1])
                return xs[i - 1] + t * (xs[i] - xs[i - 1])
        return None


def router_curve(scores: list[float], q_small: list[float], q_large: list[float]) -> Curve:
    """Send the lowest-scored items to the large model first; one point per distinct score."""
    n = len(scores)
    if not n or not len(q_small) == len(q_large) == n:
        raise ValueError(f"need one score and two qualities per item, got {n}, {len(q_small)}, {len(q_large)}")
    order = sorted(range(n), key=lambda i: scores[i])
    total = sum(q_small)
    shares, qualities = [0.0], [total / n]
    for k, i in enumerate(order, 1):
        total += q_large[i] - q_small[i]
        if k == n or scores[order[k]] != scores[i]:  # the end of a group of equal scores
            shares.append(k / n)
            qualities.append(total / n)
    return Curve(tuple(shares), tuple(qualities))


def random_curve(q_small: list[float], q_large: list[float]) -> Curve:
    n = len(q_small)
    return Curve((0.0, 1.0), (sum(q_small) / n, sum(q_large) / n))


def pgr(curve: Curve, share: float, small: float, large: float) -> float:
    """Performance gap recovered at `share` (nan when the models are equally good)."""
    return math.nan if large == small else (curve.at(share) - small) / (large - small)


def summary(curve: Curve, q_small: list[float], q_large: list[float], cost_small: float, cost_large: float,
            own_cost: float = 0.0, cascade: bool = False, target: float = 0.95,
            grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> dict:
    """What a curve shows: PGR at 20/50/80% large-model calls, the least share and cost reaching `target` of the
    large model's quality, and the margin over random routing at each share of `grid` (min_margin > 0: better than
    random at every share)."""
    n = len(q_small)
    small, large = sum(q_small) / n, sum(q_large) / n
    rand = random_curve(q_small, q_large)

    def cost(share: float) -> float:
        return own_cost + (cost_small if cascade else (1 - share) * cost_small) + share * cost_large

    need = curve.least_share(target * large)
    margins = {s: curve.at(s) - rand.at(s) for s in grid}
    return {"quality_small": small, "quality_large": large,
            "pgr": {f"{s:.0%}": pgr(curve, s, small, large) for s in (0.2, 0.5, 0.8)},
            "share_for_target": need, "target": target,
            "cost_for_target": None if need is None else cost(need),
            "cost_for_target_vs_large": None if need is None else cost(need) / cost_large,
            "margin_over_random": {f"{s:.0%}": m for s, m in margins.items()},
            "min_margin_over_random": min(margins.values())}
