"""Where does label-free confidence weighting send each domain's rows? A check of `loss.combine.mode: confidence`.

Routing needs a domain column; confidence weighting needs none (issue 7, part 2). This replays the trainer's own
code (`StepContext.log_confidence` and `combine.weight_matrix`) on random batches of the cached features and
averages each teacher's weight over the rows of each domain: routing is the identity table (all of a domain's
weight on its own teacher), so the diagonal says how much of routing the confidence weights recover.
"""

from __future__ import annotations

import numpy as np
import torch

# The cache's and the loss's modules are imported in `confidence_by_domain`: the harness imports this module
# at its start, before its flags are checked.


def confidence_by_domain(
    features: str, corpus_csv: str, temperatures=(1.0, 0.1), batch_size: int = 64, batches: int = 200, seed: int = 0
) -> dict[float, dict[str, dict[str, float]]]:
    """{temperature: {domain: {teacher: mean weight}}} over `batches` random batches of the student corpus."""
    from cache.sources.corpus import open_corpus  # noqa: PLC0415 (lazy: the harness imports this module before its flag check)
    from cache.store.reader import FeatureReader  # noqa: PLC0415 (lazy: the harness imports this module before its flag check)
    from distill.data.loader import teacher_feats  # noqa: PLC0415 (lazy: the harness imports this module before its flag check)
    from distill.losses import CombineCfg, StudentOutput, TeacherBatch  # noqa: PLC0415 (lazy: the harness imports this module before its flag check)
    from distill.losses.combine import TeacherDraw, weight_matrix  # noqa: PLC0415 (lazy: the harness imports this module before its flag check)
    from distill.losses.distributed import StepGather  # noqa: PLC0415 (lazy: the harness imports this module before its flag check)
    from distill.losses.terms import StepContext  # noqa: PLC0415 (lazy: the harness imports this module before its flag check)

    corpus = open_corpus(corpus_csv)
    domains = np.asarray(corpus.column("domain"))
    with FeatureReader(features) as reader:
        names = list(reader.teacher_names)
        index = {k: i for i, k in enumerate(reader.keys)}
        rows = np.array([index[k] for k in corpus.keys])
        scales = {t: float(reader.teacher_attrs(t)["logit_scale"]) for t in names}
        rng = np.random.default_rng(seed)
        sums: dict[float, dict[str, np.ndarray]] = {T: {} for T in temperatures}
        counts: dict[str, int] = {}
        for _ in range(batches):
            pick = np.sort(rng.choice(len(rows), size=min(batch_size, len(rows)), replace=False))
            got = reader.read(rows[pick], names)
            feats = teacher_feats(got)
            b = len(pick)
            dummy = torch.zeros(b, 1)
            ctx = StepContext(
                StudentOutput(dummy, dummy, torch.tensor(1.0)),
                TeacherBatch(feats, scales),
                StepGather(lambda x, with_grad: (x, 0)),
            )
            logc = torch.stack([ctx.log_confidence(t) for t in names], 1)
            draw = TeacherDraw(kept={t: True for t in names}, uniforms=None)
            dom = domains[pick]
            for T in temperatures:
                w = weight_matrix(
                    CombineCfg(mode="confidence", temperature=T), {t: 1.0 for t in names}, draw, b, log_confidence=logc
                ).numpy()
                for d in np.unique(dom):
                    sums[T][d] = sums[T].get(d, 0.0) + w[dom == d].sum(0)
            for d in np.unique(dom):
                counts[d] = counts.get(d, 0) + int((dom == d).sum())
    return {
        T: {d: dict(zip(names, (s / counts[d]).round(3).tolist())) for d, s in sorted(per.items())}
        for T, per in sums.items()
    }


def table(result: dict[float, dict[str, dict[str, float]]]) -> str:
    """Markdown: one block per temperature, rows = domains of the rows, columns = teachers."""
    out = []
    for T, per in result.items():
        teachers = list(next(iter(per.values())))
        out += [
            f"temperature {T}:",
            "",
            "| rows of domain | " + " | ".join(teachers) + " |",
            "|---|" + "---|" * len(teachers),
        ]
        out += [f"| {d} | " + " | ".join(f"{w[t]:.2f}" for t in teachers) + " |" for d, w in per.items()]
        out.append("")
    return "\n".join(out)
