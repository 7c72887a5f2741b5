"""round_adapter: the merge that closes one round of a distributed training run.

The slices that came in (the training-chain sensor dropped the late ones) are checked against
the round (run, round, base model), screened against a reference update the server trains itself
on a small trusted root set (``core.merging.screening``: finite, well-shaped, norm-bounded, cosine to the
reference, dev-loss sanity), weighted by samples x node reputation x direction, and merged in ΔW
space on top of the round's start adapter. The result is recorded as the run's training job
``round``: the next round starts from it, and the chain's candidate every ``candidate_every``
rounds merges it like any job's adapter.

Trust acts here as in chains (SPEC §5): slices of nodes below the trust bar (0.7) never enter the
round's adapter while any trusted slice came in; they are merged, with every other slice, into an
**experimental sibling** (``round-<k>/experimental``) that only an experimental candidate uses.
The store records which nodes each adapter contains, its start adapter's included
(``RoundMerge.nodes``), and whether every slice inside it came from a node at or above the bar
when it was merged (``RoundMerge.trusted``), so a candidate knows whether a round adapter may go to
stable and whose reputation its gate moves. A round in which no trusted slice came in continues
from every slice: its adapter, and every later round's, reaches experimental candidates only.

Every slice gets its verdict (accepted with its weight, experimental only, or refused and why),
every node's reputation moves by the documented rule (``core/pool/reputation.py``) once per round, in
the transaction that records the merge (a retried merge moves nobody again), and the per-node
table is the materialization's metadata.
"""

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from mloc_dagster.assets.training.adapters import adapter_checkpoint, run_rehearsal
from mloc_dagster.core.adapters.format import InvalidAdapter, read_node_result
from mloc_dagster.core.gates.scoring import score
from mloc_dagster.core.merging.candidates import Recognizer, merge_candidate
from mloc_dagster.core.merging.merge import MergeResult
from mloc_dagster.core.merging.screening import markdown_table, reputation_updates, train_reference_update
from mloc_dagster.core.pool.reputation import TRUST_BAR
from mloc_dagster.core.pool.rounds import base_model_hash
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.rounds import RoundSlice
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import SUCCEEDED
from mloc_dagster.core.training.spec import AdapterHParams
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

ROUND_MERGE_JOB = "round_merge_job"


class RoundMergeConfig(dg.Config):
    run_id: str
    round_index: int
    method: str = "weighted_mean"  # or trimmed_mean, median
    reference_samples: int = 64  # the trusted root set of the reference update (0: no direction screening)


def slice_mismatch(s: RoundSlice, run: TrainingRun, base_hash: str) -> str | None:
    """Why a slice's checkpoint is not an adapter of this round (bad input, a malformed result.json
    included: ``core/adapters/format.py``), or None."""
    try:
        result = read_node_result(s.checkpoint_path or "")
    except InvalidAdapter as exc:
        return exc.reason
    if (result.get("run_id"), result.get("job_index")) != (run.run_id, s.round_index):
        return f"adapter of run {result.get('run_id')} round {result.get('job_index')}, not {run.run_id} round {s.round_index}"
    if result.get("base_model_hash") != base_hash:
        return f"trained on base model {str(result.get('base_model_hash'))[:12]}, the run's is {base_hash[:12]}"
    return None


def hparams_of(run: TrainingRun) -> AdapterHParams:
    fields = AdapterHParams.__dataclass_fields__
    return AdapterHParams(**{k: v for k, v in run.hparams.items() if k in fields})


@dg.asset(partitions_def=dialect_partitions, deps=[adapter_checkpoint], group_name="training",
          kinds={"pytorch", "safetensors"}, pool="gpu", output_required=False,
          description="Closes one round of a distributed run: screens its slices against a trusted reference "
                      "update and merges the accepted ones (weighted by samples) into the round's adapter, "
                      "which the next round starts from.")
def round_adapter(context: dg.AssetExecutionContext, config: RoundMergeConfig, artifacts: ArtifactStore,
                  state: StateStoreResource, gpu: GpuArbiter):
    store = state.store()
    run, k = store.get_run(config.run_id), config.round_index
    if run is None or not run.distributed:
        raise dg.Failure(f"{config.run_id} is not a distributed training run")
    done = store.get_job(run.run_id, k)
    if done is not None and done.status == SUCCEEDED:
        context.log.info(f"round {k} of {run.run_id} is already merged: {done.checkpoint_path}")
        return
    base_hash = base_model_hash(run.base_model_version)
    came_in = accepted_inputs(context, store, run, k, base_hash)
    start = store.get_job(run.run_id, k - 1).checkpoint_path if k > 0 else run.init_adapter
    out = artifacts.paths.adapters / run.dialect / run.run_id / f"round-{k:04d}"
    reputation = {s.node_id: store.node_reputation(s.node_id) for s in came_in}
    trusted = [s for s in came_in if reputation[s.node_id] >= TRUST_BAR]
    continued = trusted or came_in  # no trusted slice came in: the run goes on, experimental only
    with gpu.lease("MERGE", context) as lease:
        reference = None
        if config.reference_samples > 0:
            train_reference_update(run.base_model_version, run.dataset_version, out / "reference",
                                   start_adapter=start, samples=config.reference_samples, hparams=hparams_of(run),
                                   feature_cache_dir=artifacts.paths.home / "features", device=lease.torch_device,
                                   rehearsal_dataset_path=run_rehearsal(context.instance, run),
                                   run_id=run.run_id, job_index=k)
            reference = out / "reference"
        merge = SliceMerge(f"round {k} of {run.run_id}", reputation, config.method, reference, start)
        try:
            result, sha = merge(continued, out / "adapter")
        except dg.Failure as exc:  # every trusted slice refused: as if none had come in
            if continued == came_in:
                raise
            context.log.warning(f"{exc.description}; the round continues from every slice, experimental only")
            continued = came_in
            result, sha = merge(continued, out / "adapter")
        sibling = None
        if len(continued) < len(came_in):
            try:
                sibling = merge(came_in, out / "experimental")
            except dg.Failure as exc:  # the round's adapter stands; the untrusted slices are left out
                context.log.warning(f"no experimental sibling: {exc.description}")
        dev = score(Recognizer(run.base_model_version, artifacts.paths.home / "features", lease.torch_device)(
            out / "adapter", run.dataset_version, "dev"))
    below = {s.checkpoint_path for s in came_in if s not in continued}
    rows = result.screening + [r for r in (sibling[0].screening if sibling else []) if r["source"] in below]
    for s in came_in:
        store.set_slice_outcome(run.run_id, k, s.slice_index, _verdict(
            next((r for r in rows if r["source"] == s.checkpoint_path), None), s.checkpoint_path in below))
    previous = store.round_merge(run.run_id, k - 1) if k > 0 else None
    inherited = previous.nodes if previous is not None else {}
    trusted_lineage = (previous is None or previous.trusted) and all(
        reputation[s.node_id] >= TRUST_BAR for s in continued)
    recorded = store.record_round_merge(
        run.run_id, k, nodes=contained(inherited, continued, result.screening), trusted=trusted_lineage,
        updates=reputation_updates(rows),
        experimental_path=str(out / "experimental") if sibling else None,
        experimental_sha256=sibling[1] if sibling else None,
        experimental_nodes=contained(inherited, came_in, sibling[0].screening) if sibling else None)
    metrics = {"dev_cer": dev.cer, "dev_wer": dev.wer, "slices": len(came_in),
               "accepted": sum(r["decision"] == "accepted" for r in result.screening),
               "samples": sum(s.samples for s in came_in), "experimental_only": len(below)}
    store.record_job_started(run.run_id, k, dagster_run_id=context.run_id)
    store.record_job_finished(run.run_id, k, SUCCEEDED, checkpoint_path=str(out / "adapter"), sha256=sha,
                              metrics=metrics, base_model=base_hash)
    context.log.info(f"round {k} of {run.run_id}: {metrics['accepted']}/{len(came_in)} slices merged"
                     + (f", {len(below)} experimental only" if below else "") + f", dev CER {dev.cer:.3f}")
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(sha),
        metadata={**metrics, "run_id": run.run_id, "round": k, "sha256": sha, "base_model": base_hash,
                  "start_adapter": str(start or "fresh LoRA"), "path": dg.MetadataValue.path(str(out / "adapter")),
                  "nodes": dg.MetadataValue.json(recorded.nodes), "trusted": recorded.trusted,
                  "below_trust_bar": dg.MetadataValue.json(
                      {s.node_id: reputation[s.node_id] for s in came_in if reputation[s.node_id] < TRUST_BAR}),
                  "experimental_adapter": str(out / "experimental") if sibling else "",
                  "experimental_nodes": dg.MetadataValue.json(recorded.experimental_nodes or {}),
                  "screening": dg.MetadataValue.md(markdown_table(rows)),
                  "reputation_after": dg.MetadataValue.json(
                      {n: m["after"] for n, m in recorded.reputation.items()}), **lease.metadata()})


@dataclass(frozen=True)
class SliceMerge:
    """Screen and merge some of a round's slices on the round's start adapter, each weighted by
    its samples x its node's reputation."""

    what: str
    reputation: dict[str, float]
    method: str
    reference: Path | None
    start: str | None

    def __call__(self, slices: list[RoundSlice], out: Path) -> tuple[MergeResult, str]:
        try:
            return merge_candidate(
                [s.checkpoint_path for s in slices], [s.samples * self.reputation[s.node_id] for s in slices], out,
                method=self.method, reference=self.reference, start_adapter=self.start,
                node_of={s.checkpoint_path: s.node_id for s in slices}, samples=[s.samples for s in slices])
        except ValueError as exc:
            raise dg.Failure(f"{self.what}: {exc}") from exc


def contained(inherited: dict[str, float], slices: list[RoundSlice], screening: list[dict]) -> dict[str, float]:
    """The nodes inside a merged adapter, by samples: its start adapter's and the accepted slices'."""
    accepted = {r["source"] for r in screening if r["decision"] == "accepted"}
    nodes = dict(inherited)
    for s in slices:
        if s.checkpoint_path in accepted:
            nodes[s.node_id] = nodes.get(s.node_id, 0.0) + float(s.samples)
    return dict(sorted(nodes.items()))


def accepted_inputs(context: dg.AssetExecutionContext, store: StateStore, run: TrainingRun, k: int,
                    base_hash: str) -> list[RoundSlice]:
    """The round's slices that came in and belong to it; the others get their reason recorded."""
    came_in = []
    for s in store.round_slices(run.run_id, k):
        if s.status != SUCCEEDED:
            continue
        if (why := slice_mismatch(s, run, base_hash)) is not None:
            store.set_slice_outcome(run.run_id, k, s.slice_index, f"refused: {why}")
            context.log.warning(f"round {k} slice {s.slice_index} ({s.node_id}) refused: {why}")
            continue
        came_in.append(s)
    if not came_in:
        raise dg.Failure(f"round {k} of {run.run_id}: no slice came in that belongs to the round")
    return came_in


def _verdict(row: dict | None, experimental: bool = False) -> str:
    if row is None:
        return "refused: not screened"
    if row["decision"] == "refused":
        return f"refused: {row['reason']}"
    where = f", experimental only: node below the trust bar {TRUST_BAR}" if experimental else ""
    return f"{row['decision']} (weight {row['weight']:.3g}, cosine {row.get('cosine')}{where})"


round_merge_job = dg.define_asset_job(
    ROUND_MERGE_JOB, selection=[round_adapter], partitions_def=dialect_partitions,
    description="Closes one round of a distributed training run (config: run_id, round_index).")

defs = dg.Definitions(assets=[round_adapter], jobs=[round_merge_job])
