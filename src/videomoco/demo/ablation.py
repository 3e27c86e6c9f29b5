"""`videomoco demo --ablation`: which of VideoMoCo's additions change what, over paired seeds.

Variants (each against MoCo, seed by seed):

    MoCo                          no decay, no generator
    + decay (authors' code)       t per step of a key's age in the queue (`decay_unit` "step")
    + decay (paper)               t per key newer than it in the queue (`decay_unit` "key")
    + authors' generator          G = per-frame CNN + BiGRU (`--generator authors`) from `adv_start_epoch`
    + motion generator            G = per-frame CNN on [x_t, |x_t - x_{t-1}|] (`--generator motion`)
    best combination              the decay and the generator with the higher mean kNN, together (chosen
                                  after the five above have run every seed: a post-hoc choice)

Every variant of a seed resumes one plain MoCo run of `adv_start_epoch` epochs (the "start") and adds its
decay and / or generator from there on. Two runs that differ from the first step diverge by up to 20
points kNN at the demo's scale (the decay's paired std was 8.9-12.3 over 5 seeds when its runs had their
own start, the generator's 3.2 with the shared one), so only a shared start lets a few seeds resolve a
few points; the price is that the decay acts on the second part of the training only. Every run is
measured by one
`measure(checkpoint, seed) -> [metric, ...]` (METRICS, in order); `train` and `measure` are passed in, so
the control flow is tested with mocks (tests/test_demo.py).
"""

from dataclasses import dataclass

import numpy as np

RATIOS = (0.25, 0.5)  # random drops on the demo's scene
METRICS = ("kNN top-1", "linear top-1",
           *(f"{m}, {r:.0%} dropped" for r in RATIOS for m in ("kNN", "cosine")),
           "window: kNN", "window: kNN, moving dropped", "window: kNN, still dropped",
           "window: cosine, moving dropped", "window: cosine, still dropped")
GROUPS = {  # the report's tables: name -> metrics
    "accuracy": METRICS[:2],
    "random drops on the demo's scene": METRICS[2:6],
    "the window scene: moving vs still frames dropped": METRICS[6:],
}


@dataclass(frozen=True)
class Variant:
    name: str
    decay: float = 1.0  # the queue's temporal decay t; 1: none
    decay_unit: str = "step"  # what a key's age counts: "step" (the authors' code) or "key" (the paper)
    generator: str = ""  # "" (none), "authors" or "motion"

    def tag(self):
        """A directory name."""
        unit = f"_{self.decay_unit}" if self.decay != 1.0 else ""
        return f"t{self.decay:g}{unit}_{self.generator or 'nogen'}"


def fixed_variants(decay):
    """The five variants run on every seed, MoCo first; `decay`: the demo's t."""
    return [Variant("MoCo"), Variant("+ decay (authors' code)", decay, "step"),
            Variant("+ decay (paper)", decay, "key"), Variant("+ authors' generator", generator="authors"),
            Variant("+ motion generator", generator="motion")]


def best_combination(variants, knn):
    """The decay variant and the generator variant with the higher mean kNN (`knn`: name -> values), together."""
    decays = [v for v in variants if v.decay != 1.0 and not v.generator]
    generators = [v for v in variants if v.generator and v.decay == 1.0]
    d = max(decays, key=lambda v: np.mean(knn[v.name]))
    g = max(generators, key=lambda v: np.mean(knn[v.name]))
    name = f"best: {d.name.strip('+ ')} + {g.name.strip('+ ')}"
    return Variant(name, d.decay, d.decay_unit, g.generator)


def run(variants, seeds, shared_steps, train, measure):
    """Every variant on every seed, then the best combination -> {"metrics", "seeds", "variants", "runs"}.

    train(variant, seed, tag, resume="", max_steps=0) -> checkpoint: a seed's start (plain MoCo, `max_steps`
    = shared_steps) or a variant resumed from it; measure(checkpoint, seed) -> [value per METRICS].
    "runs": {variant name: [[value per METRICS] per seed]}; "variants": {name: its fields}."""
    starts, runs = {}, {}

    def one(variant, seed):
        if seed not in starts:
            starts[seed] = train(Variant("start"), seed, f"start_seed{seed}", max_steps=shared_steps)
        ckpt = train(variant, seed, f"{variant.tag()}_seed{seed}", resume=starts[seed])
        runs.setdefault(variant.name, []).append(list(measure(ckpt, seed)))

    for seed in seeds:
        for variant in variants:
            one(variant, seed)
    combination = best_combination(variants, {v.name: [r[0] for r in runs[v.name]] for v in variants})
    for seed in seeds:
        one(combination, seed)
    return {"metrics": list(METRICS), "seeds": list(seeds), "runs": runs,
            "variants": {v.name: vars(v) for v in [*variants, combination]}}
