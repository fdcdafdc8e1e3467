"""Where the output pass puts its pieces: a merged model's sharded weight files, or a compressed artifact
(τ_MTL or each task's kept values, and the bit-packed masks). The method's result kind chooses the sink.

Each piece has a fixed place in the output, so processes write their shares into the same files and any
number of processes writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hubmerge.artifacts import ArtifactWriter
from hubmerge.planning import first_entry
from hubmerge.writer import ShardedFiles, Slot

if TYPE_CHECKING:
    from hubmerge.engine import Engine


class MergedSink:
    """The merged model: θ0 + α·τ_MTL for the merged tensors, the base's other tensors copied."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def write(self, directory: Path, max_shard_size: int | str) -> list[str]:
        engine, job, stream = self.engine, self.engine.job, self.engine.stream
        slots = [Slot(k, job.out_dtype(k), job.base.infos[k].shape) for k in sorted(job.base.infos)]
        files = ShardedFiles(
            directory, slots, job.base.output_shard_size(max_shard_size), stem=job.base.weights_stem
        )
        if engine.group.is_main:
            files.create()
        engine.group.barrier()

        def output_pass(description: str) -> None:
            with stream.writer() as submit:
                for key, rows, base, thetas in stream.inputs(description):
                    merged = engine._merged_piece(key, rows, base, thetas)
                    submit(files.write, key, merged, first_entry(job.base.infos[key], rows))

        try:
            for key, _ in stream.blocks(job.copy_keys, whole=True):
                copied = job.base.read(key)
                engine.nonfinite.check(key, None, [copied], job.base.infos[key].shape)
                files.write(key, copied)
            output_pass("merge and write")
            written = files.written  # a second output pass puts its bytes in the same places again
            if engine.guessed_wrong():
                output_pass("merge and write (majority sign corrected)")
        finally:
            files.close()
        stream.check_complete(written, files.data_bytes, "merged weights")
        engine.sum_statistics()
        engine.digests = files.digests()
        return files.files


class ArtifactSink:
    """The compressed artifact: τ_MTL (or each task's kept values) and one bit-packed mask per task."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def write(self, directory: Path, max_shard_size: int | str) -> ArtifactWriter:
        engine, job, stream = self.engine, self.engine.job, self.engine.stream
        writer = ArtifactWriter(
            directory,
            {k: job.base.infos[k].shape for k in job.merge_keys},
            job.task_names,
            shared_vector=not job.spec.own_values,
            own_values=job.spec.own_values,
            max_shard_size=max_shard_size,
            vector_dtype=job.vector_dtype,
            rank=engine.group.rank,
        )
        if engine.group.is_main:
            writer.create()
        engine.group.barrier()
        try:
            with stream.writer() as submit:
                for key, rows, base, thetas in stream.inputs("compress and write"):
                    start = first_entry(job.base.infos[key], rows)
                    submit(writer.write, key, start, *engine._compressed_piece(key, rows, base, thetas))
        finally:
            writer.close()
        stream.check_complete(writer.written, writer.data_bytes, "compressed artifact")
        writer.assemble_values(engine.group)
        engine.sum_statistics()
        engine.digests = writer.digests()
        return writer
