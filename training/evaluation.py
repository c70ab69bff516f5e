"""Evaluation on a fixed set of episodes: per-episode accuracy (or MSE), mean and 95% confidence interval,
expected calibration error of classifiers, JSON and markdown reports, several checkpoints compared in one table."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

# Two-sided 95% normal quantile; with 600-1000 episodes the t quantile differs only in the 4th digit.
Z95 = 1.959963984540054
ECE_BINS = 15


@dataclass
class EvalResult:
    """Outcome of evaluating one learner on fixed episodes."""

    name: str
    metric: str  # "accuracy" or "mse"
    mean: float
    ci95: float
    std: float
    episodes: int
    step: Optional[int] = None
    checkpoint: Optional[str] = None
    seconds: float = 0.0
    per_episode: list[float] = field(default_factory=list)
    ece: Optional[float] = None  # expected calibration error over all queries (classification only)
    episodes_digest: Optional[str] = None  # fingerprint of the episodes (see episode_digest): paired comparisons check it

    def to_dict(self, with_episodes: bool = False) -> dict:
        """Plain dict for JSON (per-episode values only when asked)."""
        d = asdict(self)
        if not with_episodes:
            d.pop("per_episode")
        return d


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, 95% half-width = 1.96 * sample std / sqrt(n), sample std) of per-episode values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0, 0.0
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, Z95 * std / math.sqrt(n), std


def predict(model: nn.Module, batch: Any) -> Tensor:
    """Query logits [T, Q, n_way_max] (or regression outputs) of a learner for an EpisodeBatch."""
    if hasattr(model, "adapt_batch"):
        # Heads enable grad inside their own inner loops; no_grad here keeps the graph back to the
        # meta-parameters from being built (same predictions, a fraction of the memory and time).
        with torch.no_grad():
            predictor = model.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)
            out = predictor(batch.query_x, batch.query_mask)
        return out.detach()
    with torch.no_grad():
        return model(batch).detach()


def calibration_bins(scores: Tensor, labels: Tensor, mask: Optional[Tensor] = None, n_bins: int = ECE_BINS,
                     from_logits: bool = True) -> Tensor:
    """Per-bin [count, sum of confidences, sum of correct] -> [n_bins, 3] (float64) over the real predictions.

    ``scores`` [..., n_classes] are logits (softmax is applied) or probabilities (``from_logits=False``);
    ``labels`` [...] int; ``mask`` [...] bool marks the real (unpadded) entries. Bin b holds the confidences in
    (b / n_bins, (b + 1) / n_bins]. Summing the tables of several batches pools them for one ECE.
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    if scores.dim() < 1 or scores.shape[:-1] != labels.shape:
        raise ValueError(f"scores [..., n_classes] and labels [...] disagree: {tuple(scores.shape)} vs {tuple(labels.shape)}")
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the labels' {tuple(labels.shape)}")
    # float64: float32 rounding would push confidences near a bin edge into the neighbouring bin
    probs = torch.softmax(scores.double(), dim=-1) if from_logits else scores.double()
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels.to(pred.device)).double()
    keep = mask.to(conf.device).reshape(-1) if mask is not None else torch.ones(conf.numel(), dtype=torch.bool, device=conf.device)
    conf, correct = conf.reshape(-1)[keep], correct.reshape(-1)[keep]
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)
    # right=False: x in (edges[b], edges[b + 1]] goes to bin b (the usual convention of Guo et al. 2017)
    index = torch.bucketize(conf, edges[1:-1], right=False)
    table = torch.zeros(n_bins, 3, dtype=torch.float64, device=conf.device)
    table[:, 0].index_add_(0, index, torch.ones_like(conf))
    table[:, 1].index_add_(0, index, conf)
    table[:, 2].index_add_(0, index, correct)
    return table.cpu()


def ece_from_bins(table: Tensor) -> float:
    """ECE = sum over bins of |accuracy - confidence| * fraction of predictions in the bin (0 for no predictions)."""
    total = float(table[:, 0].sum())
    if total == 0:
        return 0.0
    # |acc_b - conf_b| * n_b / N = |sum correct - sum conf| / N
    return float((table[:, 2] - table[:, 1]).abs().sum()) / total


def expected_calibration_error(scores: Tensor, labels: Tensor, n_bins: int = ECE_BINS, *, mask: Optional[Tensor] = None,
                               from_logits: bool = True) -> float:
    """Expected calibration error of predictions ``scores`` [..., n_classes] (logits, or probabilities) for ``labels``."""
    return ece_from_bins(calibration_bins(scores, labels, mask, n_bins, from_logits))


def episode_scores(out: Tensor, batch: Any) -> list[float]:
    """Per-task accuracy (classification) or MSE (regression) over the real (unpadded) queries."""
    mask = batch.query_mask
    y = batch.query_y.to(out.device)
    mask = mask.to(out.device)
    if batch.is_regression:
        err = ((out.float() - y.float()) ** 2).mean(dim=-1)
        per = (err * mask).sum(1) / mask.sum(1).clamp_min(1)
    else:
        correct = (out.argmax(dim=-1) == y) & mask
        per = correct.sum(1).double() / mask.sum(1).clamp_min(1).double()
    return [float(v) for v in per.cpu()]


# On a CPU a forward pass over more input than this (Omniglot: 1024 images of 28x28) gains nothing from
# batching and allocates activations beyond the heap's reuse threshold (see training.cpu_allocator): a
# 20-way 1-shot evaluation with 16 tasks per pass spent half its time in page faults.
CPU_INPUT_ELEMENTS_PER_FORWARD = 1024 * 28 * 28


def tasks_per_forward(batch_tasks: int, probe: Any, device: torch.device) -> int:
    """Tasks per evaluation pass: `batch_tasks`, capped on a CPU by the input size of one task (`probe`)."""
    if device.type != "cpu" or not torch.is_tensor(probe.support_x) or not torch.is_tensor(probe.query_x):
        return batch_tasks
    per_task = probe.support_x[0].numel() + probe.query_x[0].numel()
    return max(1, min(batch_tasks, CPU_INPUT_ELEMENTS_PER_FORWARD // max(per_task, 1)))


def episode_digest(batch: Any, num_episodes: int) -> str:
    """A short fingerprint of a fixed episode set: the first episode's support and query data and the episode count.

    Episodes are drawn by index from a seeded source, so two evaluations with equal fingerprints ran on the same
    episodes (up to a coincidence on the first one); the batch size and padding do not enter it.
    """
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    h.update(str(num_episodes).encode())
    for x, y, m in ((batch.support_x, batch.support_y, batch.support_mask), (batch.query_x, batch.query_y, batch.query_mask)):
        keep = m[0].cpu()
        if isinstance(x, Tensor):
            h.update(x[0].detach().cpu()[keep].contiguous().float().numpy().tobytes())
        else:  # text episodes: lists of strings per task
            h.update(repr([t for t, k in zip(x[0], keep.tolist()) if k]).encode())
        h.update(y[0].detach().cpu()[keep].contiguous().float().numpy().tobytes())
    return h.hexdigest()


def evaluate(
    model: nn.Module,
    episodes: Any,
    num_episodes: int,
    batch_tasks: int = 16,
    device: Optional[torch.device] = None,
    name: str = "model",
    progress: bool = False,
) -> EvalResult:
    """Evaluate on episodes 0..num_episodes-1 of a fixed episode source; the model is left in eval mode."""
    device = device or next(model.parameters()).device
    model.eval()
    t0 = time.perf_counter()
    scores: list[float] = []
    regression = None
    bins = torch.zeros(ECE_BINS, 3, dtype=torch.float64)
    # episodes are drawn by index, so the split into passes changes no episode
    batch_tasks = tasks_per_forward(batch_tasks, episodes.batch(0, 1), device)
    starts = range(0, num_episodes, batch_tasks)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"eval {name}", unit="batch", leave=False)
    digest = None
    for start in starts:
        batch = episodes.batch(start, min(batch_tasks, num_episodes - start)).to(device)
        if digest is None:
            digest = episode_digest(batch, num_episodes)
        regression = batch.is_regression
        out = predict(model, batch)
        scores.extend(episode_scores(out, batch))
        if not regression:
            bins += calibration_bins(out, batch.query_y.to(out.device), batch.query_mask)
    mean, ci, std = mean_ci95(scores)
    return EvalResult(name=name, metric="mse" if regression else "accuracy", mean=mean, ci95=ci, std=std,
                      episodes=len(scores), seconds=time.perf_counter() - t0, per_episode=scores,
                      ece=None if regression else ece_from_bins(bins), episodes_digest=digest)


def markdown_table(results: Sequence[EvalResult]) -> str:
    """One comparison table: method, metric (% for accuracy), 95% CI, episodes, step, checkpoint (+ ECE if any)."""
    # the ECE column only appears when some result has one, so regression-only tables keep their layout
    with_ece = any(getattr(r, "ece", None) is not None for r in results)
    head = "| method | metric | mean | 95% CI | episodes | step | checkpoint |"
    lines = [head + (" ECE (%) |" if with_ece else ""), "|---|---|---|---|---|---|---|" + ("---|" if with_ece else "")]
    for r in results:
        scale = 100.0 if r.metric == "accuracy" else 1.0
        unit = " (%)" if r.metric == "accuracy" else ""
        ece = (f" {100.0 * r.ece:.2f} |" if r.ece is not None else " |") if with_ece else ""
        lines.append(
            f"| {r.name} | {r.metric}{unit} | {r.mean * scale:.2f} | ± {r.ci95 * scale:.2f} | {r.episodes} | "
            f"{'' if r.step is None else r.step} | {r.checkpoint or ''} |{ece}"
        )
    return "\n".join(lines) + "\n"


@dataclass
class PairedDifference:
    """Per-episode difference ``other - reference`` of two results on the same episodes."""

    name: str
    reference: str
    metric: str
    mean: float
    ci95: float
    episodes: int
    wins: int  # episodes where ``other`` scored better (lower MSE for regression)
    losses: int

    @property
    def significant(self) -> bool:
        """Whether the 95% interval of the mean difference excludes zero."""
        return abs(self.mean) > self.ci95


def same_episodes(a: EvalResult, b: EvalResult) -> bool:
    """Whether two results can be paired: per-episode scores of equal count and no differing episode fingerprints."""
    if not a.per_episode or len(a.per_episode) != len(b.per_episode) or a.metric != b.metric:
        return False
    return not (a.episodes_digest and b.episodes_digest and a.episodes_digest != b.episodes_digest)


def paired_difference(reference: EvalResult, other: EvalResult) -> PairedDifference:
    """Mean and 95% CI of ``other - reference`` over their common episodes (both must hold the same episodes).

    The same fixed episodes make the two scores correlated; the interval of the per-episode differences is
    the honest one for "is B better than A", and much narrower than the two separate intervals suggest.
    """
    a, b = reference.per_episode, other.per_episode
    if not a or not b:
        raise ValueError(f"paired_difference needs per-episode scores; {reference.name if not a else other.name!r} has "
                         "none (evaluate with training.evaluation.evaluate, or load an eval.json written by it)")
    if len(a) != len(b):
        raise ValueError(f"{reference.name!r} has {len(a)} episode scores and {other.name!r} {len(b)}: a paired "
                         "comparison needs the same episodes (same split, seed, count and N-way K-shot)")
    if reference.episodes_digest and other.episodes_digest and reference.episodes_digest != other.episodes_digest:
        raise ValueError(f"{reference.name!r} and {other.name!r} were evaluated on different episodes (fingerprints "
                         f"{reference.episodes_digest} and {other.episodes_digest}): evaluate both with the same data.* "
                         "settings, eval.split, eval.seed and --episodes")
    if reference.metric != other.metric:
        raise ValueError(f"cannot pair {reference.metric} ({reference.name!r}) with {other.metric} ({other.name!r})")
    diffs = [y - x for x, y in zip(a, b)]
    mean, ci, _ = mean_ci95(diffs)
    sign = -1.0 if reference.metric == "mse" else 1.0
    return PairedDifference(name=other.name, reference=reference.name, metric=reference.metric, mean=mean, ci95=ci,
                            episodes=len(diffs), wins=sum(sign * d > 0 for d in diffs),
                            losses=sum(sign * d < 0 for d in diffs))


def pairable(results: Sequence[EvalResult]) -> bool:
    """Whether there are at least two results and every later one can be paired with the first."""
    return len(results) > 1 and all(same_episodes(results[0], r) for r in results[1:])


def paired_vs_first(results: Sequence[EvalResult]) -> list[dict]:
    """Each later result's paired difference from the first, JSON-ready ([] when they cannot be paired)."""
    if not pairable(results):
        return []
    diffs = [paired_difference(results[0], r) for r in results[1:]]
    return [{**asdict(d), "significant": d.significant} for d in diffs]


def paired_table(results: Sequence[EvalResult]) -> str:
    """Markdown table of every result's paired difference from the first ("" when fewer than two can be paired)."""
    if not pairable(results):
        return ""
    ref = results[0]
    scale, unit = (100.0, " (points)") if ref.metric == "accuracy" else (1.0, "")
    lines = [f"Paired differences from {ref.name} on the same {len(ref.per_episode)} episodes (95% CI of the "
             "per-episode differences):", "",
             f"| method | minus {ref.name}{unit} | 95% CI | better / worse episodes | interval excludes 0 |",
             "|---|---|---|---|---|"]
    for r in results[1:]:
        d = paired_difference(ref, r)
        digits = 2 if ref.metric == "accuracy" else 4  # MSE differences are small numbers
        lines.append(f"| {r.name} | {d.mean * scale:+.{digits}f} | ± {d.ci95 * scale:.{digits}f} | {d.wins} / {d.losses} | "
                     f"{'yes' if d.significant else 'no'} |")
    return "\n".join(lines) + "\n"


def report_markdown(results: Sequence[EvalResult]) -> str:
    """The comparison table, then the paired differences from the first result when there are several."""
    paired = paired_table(results)
    return markdown_table(results) + (("\n" + paired) if paired else "")


def write_report(results: Sequence[EvalResult], out_dir: Path, stem: str = "eval", header: dict | None = None) -> tuple[Path, Path]:
    """Write <stem>.json (with per-episode values and paired differences) and <stem>.md (the tables); returns both paths."""
    from training.atomic import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**(header or {}), "results": [r.to_dict(with_episodes=True) for r in results]}
    paired = paired_vs_first(results)
    if paired:
        payload["paired_vs_first"] = paired
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(jpath, json.dumps(payload, indent=2))
    atomic_write_text(mpath, report_markdown(results))
    return jpath, mpath


# header keys that fix the episodes of an eval.json: two reports can be paired only when all of them agree
EPISODE_KEYS = ("source", "split", "seed", "episodes", "n_way", "k_shot", "q_query")


def _is_number(v: Any) -> bool:
    """Whether a JSON value is a number (JSON true / false are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _result_problem(r: Any) -> Optional[str]:
    """What is wrong with one entry of an eval.json's "results" (None when it is usable)."""
    if not isinstance(r, dict):
        return f"is a {type(r).__name__}, not an object"
    if not isinstance(r.get("name"), str):
        return f"name must be a string, got {r.get('name')!r}"
    if r.get("metric") not in ("accuracy", "mse"):
        return f"metric must be 'accuracy' or 'mse', got {r.get('metric')!r}"
    for key in ("mean", "ci95", "std"):
        if not _is_number(r.get(key)):
            return f"{key} must be a number, got {r.get(key)!r}"
    n = r.get("episodes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"episodes must be an integer >= 1, got {n!r}"
    per = r.get("per_episode")
    # The paired differences need every episode's score: a short or missing list would drop them without a word.
    want = f"per_episode must be a list of {n} numbers (one score per episode)"
    if not isinstance(per, list):
        return f"{want}, got {per!r:.40}"
    if len(per) != n:
        return f"{want}, got {len(per)} entries"
    bad = next((v for v in per if not _is_number(v)), None)
    if bad is not None or None in per:
        return f"{want}, got {bad!r:.40} among them"
    for key in ("ece", "seconds"):
        if r.get(key) is not None and not _is_number(r[key]):
            return f"{key} must be a number, got {r[key]!r}"
    if r.get("step") is not None and (not isinstance(r["step"], int) or isinstance(r["step"], bool)):
        return f"step must be an integer, got {r['step']!r}"
    for key in ("checkpoint", "episodes_digest"):
        if r.get(key) is not None and not isinstance(r[key], str):
            return f"{key} must be a string, got {r[key]!r}"
    return None


def read_report(path: str | Path) -> tuple[dict, list[EvalResult]]:
    """The header (split, seed, episodes, N, K, Q, source) and results of an eval.json written by write_report."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass an eval.json (or its folder) written by `metaformer eval`")
    fix = "re-run `metaformer eval` to write it again"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not an eval.json written by `metaformer eval` (not JSON: {exc}); {fix}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise ValueError(f"{path} is not an eval.json written by `metaformer eval` (no \"results\" list); {fix}")
    if not payload["results"]:
        raise ValueError(f"{path} holds no results (an empty \"results\" list); {fix}")
    for i, r in enumerate(payload["results"]):
        problem = _result_problem(r)
        if problem:
            raise ValueError(f"{path}: results[{i}]: {problem}; {fix}")
    header = {k: v for k, v in payload.items() if k not in ("results", "paired_vs_first")}
    for i, r in enumerate(payload["results"]):
        if header.get("episodes") is not None and r["episodes"] != header["episodes"]:
            raise ValueError(f"{path}: results[{i}] has {r['episodes']} episodes but the file's header says "
                             f"{header['episodes']}; {fix}")
    fields = set(EvalResult.__dataclass_fields__)
    results = [EvalResult(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
    for r in results:
        r.mean, r.ci95, r.std = float(r.mean), float(r.ci95), float(r.std)
        r.per_episode = [float(v) for v in r.per_episode]
    return header, results


def combine_reports(paths: Sequence[str | Path]) -> tuple[dict, list[EvalResult]]:
    """The results of several eval.json files on the same episodes, in order (an error names a differing key)."""
    if not paths:
        raise ValueError("pass at least one eval.json")
    header, results = read_report(paths[0])
    for p in paths[1:]:
        h, rs = read_report(p)
        diff = [k for k in EPISODE_KEYS if h.get(k) != header.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {header.get(k)!r} vs {h.get(k)!r}" for k in diff)
            raise ValueError(f"{paths[0]} and {p} were not evaluated on the same episodes ({shown}); evaluate both "
                             "with the same data.* settings, eval.split, eval.seed and --episodes")
        for r in rs:
            if r.episodes_digest and results[0].episodes_digest and r.episodes_digest != results[0].episodes_digest:
                raise ValueError(f"{paths[0]} and {p} hold the same settings but different episodes (fingerprints "
                                 f"{results[0].episodes_digest} and {r.episodes_digest}): the data (split scheme, "
                                 "image size, data files) differed; evaluate both on the same data")
        results += rs
    names = [r.name for r in results]
    for i, r in enumerate(results):
        if names.count(r.name) > 1 and r.checkpoint:
            r.name = f"{r.name} ({Path(r.checkpoint).parent.name})"  # same config name: tell the runs apart
    return header, results
