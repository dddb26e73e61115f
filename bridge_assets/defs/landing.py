"""Landing: the simulator as an asset, so a batch can be landed from the Dagster UI."""

from dataclasses import replace
from typing import Literal

import dagster as dg
from pydantic import Field

from bridge_assets.core.simulator import Drift
from bridge_assets.defs.resources import LakeStorage
from bridge_assets.lake.landing import Simulation, land_simulated


class SimulationConfig(dg.Config):
    """A simulated batch: size, seed, drift and corruption (see `bridge_assets.core.simulator`)."""

    rows: int = Field(default=10_000, ge=1, description="rows in the batch")
    seed: int | None = Field(default=None, description="default: a new random seed; same seed and knobs, same rows")
    batch_id: str | None = Field(default=None, description="default: sim-<UTC time>-s<seed>")
    format: Literal["parquet", "csv"] = "parquet"
    corrupt_fraction: float = Field(default=0.0, ge=0, le=1, description="rows given one contract violation")
    case_noise: float = Field(default=0.0, ge=0, le=1, description="rows with valid categories in odd case")
    withhold_labels: bool = Field(default=False, description="land without prices; release them later")
    area_factor: float = Field(default=1.0, gt=0, description="multiply areas")
    price_factor: float = Field(default=1.0, gt=0, description="label shift: multiply prices")
    shift: dict[str, float] = Field(default_factory=dict, description="latent shift per feature, in SDs")
    scale: dict[str, float] = Field(default_factory=dict, description="latent spread factor per feature")
    concept: dict[str, float] = Field(default_factory=dict, description="multiply a feature's price effect")

    def drift(self) -> Drift:
        return Drift(
            shift=self.shift,
            scale=self.scale,
            area_factor=self.area_factor,
            price_factor=self.price_factor,
            concept=self.concept,
        )


@dg.asset(group_name="ingestion", kinds={"python", "parquet"}, owners=["team:data-engineering"])
def simulated_batch(
    context: dg.AssetExecutionContext, config: SimulationConfig, storage: LakeStorage
) -> dg.MaterializeResult:
    """Lands one batch of simulated housing rows (step 22); the landing sensor picks it up."""
    store = storage.open()
    simulation = Simulation(
        config.rows,
        drift=config.drift(),
        corrupt_fraction=config.corrupt_fraction,
        case_noise=config.case_noise,
        withhold_labels=config.withhold_labels,
    )
    if config.seed is not None:  # else the dataclass's fresh seed
        simulation = replace(simulation, seed=config.seed)
    landed = land_simulated(store, simulation, config.batch_id, fmt=config.format)
    context.log.info(f"landed {landed.rows} rows as {store.uri(landed.batch.key)} (seed {simulation.seed})")
    if landed.warning():
        context.log.warning(landed.warning())
    return dg.MaterializeResult(
        metadata={
            "batch_id": landed.batch.batch_id,
            "rows": landed.rows,
            "seed": simulation.seed,
            "repeats_batches": dg.MetadataValue.json(landed.repeats),
            "uri": dg.MetadataValue.path(store.uri(landed.batch.key)),
            "labels_withheld": config.withhold_labels,
            "config": dg.MetadataValue.json(config.model_dump()),
        }
    )
