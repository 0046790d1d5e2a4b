"""KServe v2 records (proto/open_inference.proto): inference statistics as Triton keeps them, and the repository
index."""
from __future__ import annotations

from dataclasses import dataclass

from proto.records import Record


@dataclass(frozen=True)
class Duration(Record):
    """How many, and their total time in nanoseconds (proto: StatisticDuration)."""
    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class InferStatistics(Record):
    """The per-request statistics of one model version."""
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration

    @property
    def cache_hit(self) -> Duration:
        return Duration()  # no response cache

    @property
    def cache_miss(self) -> Duration:
        return Duration()


@dataclass(frozen=True)
class BatchStatistics(Record):
    """The runs of one batch size (proto: InferBatchStatistics)."""
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class ModelStatistics(Record):
    """One model version's statistics since the server started."""
    name: str
    version: str
    last_inference: int  # ms since the Unix epoch when the last successful request ended; 0: none yet
    inference_count: int  # images of successful requests
    execution_count: int  # successful runs
    inference_stats: InferStatistics
    batch_stats: tuple[BatchStatistics, ...]  # by batch size, smallest first


@dataclass(frozen=True)
class ModelStatisticsList(Record):
    """ModelStatistics' answer (proto: ModelStatisticsResponse): one entry per version, oldest first."""
    model_stats: tuple[ModelStatistics, ...]


@dataclass(frozen=True)
class ModelIndex(Record):
    """One version of a model in the repository index (proto: RepositoryIndexResponse.ModelIndex)."""
    name: str
    version: str  # "" for a model none of whose versions can be listed
    state: str  # READY or UNAVAILABLE
    reason: str  # why it is not READY ("" when it is)


@dataclass(frozen=True)
class RepositoryIndex(Record):
    """RepositoryIndex's answer (proto: RepositoryIndexResponse): every model's versions, by name, oldest first."""
    models: tuple[ModelIndex, ...]
