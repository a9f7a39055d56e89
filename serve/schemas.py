"""Request and response models of the HTTP API (they make the OpenAPI document)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ScoreRequest(BaseModel):
    """Score a slide named by its path relative to the server's slide root."""

    model_config = ConfigDict(extra="forbid")

    slide: str = Field(..., min_length=1, max_length=4096, description="path relative to the slide root",
                       examples=["cohort/slides/slide-0001.tiff"])
    n_tiles: int | None = Field(None, ge=1, description="tiles to sample (N); default: the model's config")
    n_glimpses: int | None = Field(None, ge=1, description="glimpses per tile (T); default: the model's config")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the sampler's noise")


class Level0BoxOut(BaseModel):
    x0: int
    y0: int
    width: int
    height: int


class TileOut(BaseModel):
    level0_box: Level0BoxOut
    attention_weight: float = Field(description="soft attention at the tile's thumbnail centre")
    predicted_class: int
    predicted_label: str
    class_probabilities: list[float]
    glimpse_trail_level0: list[tuple[float, float]] = Field(
        description="the agent's glimpse centres (x, y) in level-0 pixels, in order")


class StageTimings(BaseModel):
    """Seconds spent in each stage, as seen by the ingress (each includes its handle round trip)."""

    validate_s: float = Field(description="path checks or upload streaming")
    soft_attention_s: float = Field(description="thumbnail, tissue mask, attention map, tile boxes")
    thumbnail_s: float = Field(description="part of soft_attention_s: thumbnail and tissue mask")
    soft_attention_compute_s: float = Field(description="part of soft_attention_s spent in the stage's work")
    tile_read_s: float = Field(description="reading the tiles through the tile plane")
    hard_attention_s: float = Field(description="the agent over the tiles (batched across requests)")
    hard_attention_compute_s: float = Field(description="wall time of the agent batch that held these tiles")
    agent_batch_tiles: int = Field(description="tiles in that batch (this request's and other requests')")
    aggregate_s: float
    overlay_s: float = Field(0.0, description="rendering and storing the overlay PNG (overlay=true only)")
    geojson_s: float = Field(0.0, description="building and storing the GeoJSON in the ingress (geojson=true only)")
    total_s: float


class ServingProfile(BaseModel):
    """Milliseconds per stage of this request, the stage names of the ``score`` command's ``profile``, and what
    serving added around them (handle round trips, serialisation, queues). Work happens in three processes,
    so a stage's time is measured where it runs."""

    stages_ms: dict[str, float] = Field(description="open, thumbnail, tissue_mask, soft_attention, sampling (soft "
                                                    "stage); tile_reads, aggregation, overlay (ingress); agent "
                                                    "(the hard stage's batch that held these tiles)")
    serving_ms: dict[str, float] = Field(description="validate (path checks or upload), soft_call and hard_call "
                                                     "(handle round trip minus the replica's work: transfer, routing, "
                                                     "queues), agent_queue (waiting in the hard stage's batch queue), "
                                                     "ingress (the rest of the ingress's time)")
    total_ms: float = Field(description="in the ingress, from the route's start to the answer's creation")


class SlideCalibration(BaseModel):
    """The slide's scale, and where it came from: tiles are cut at a magnification computed from it, so a
    slide whose file records neither says the scale was assumed."""

    mpp_x_um_per_px: float = Field(description="µm per level-0 pixel, horizontally")
    mpp_y_um_per_px: float
    mpp_source: str = Field(description="'file', 'objective-power', or 'default (assumed 40x)'")
    objective_power: float
    objective_source: str = Field(description="'file', 'mpp', or 'default' (assumed)")


class ModelInfo(BaseModel):
    name: str
    version: str | None = Field(None, description="registry version, or None for a checkpoint path")
    alias: str | None = None
    uri: str = Field(description="where the model was loaded from (an alias is pinned to its version; a "
                                 "checkpoint path is shown as checkpoint:NAME)")
    task: str
    class_names: list[str]
    config_digest: str
    preset: str


class ScoreResponse(BaseModel):
    score_id: str
    slide: str = Field(description="the slide as named in the request (or the uploaded file's name)")
    predicted_class: int
    predicted_label: str
    class_probabilities: list[float]
    confidence: float
    tiles: list[TileOut]
    shortfall_reason: str | None = Field(None, description="why fewer than n_tiles tiles were sampled")
    level0_dimensions: tuple[int, int] = Field(description="(width, height) of level 0")
    calibration: SlideCalibration
    level0_pixels_read: int
    fraction_level0_read: float
    n_tiles: int = Field(description="N requested")
    n_glimpses: int = Field(description="T used")
    seed: int
    model: ModelInfo
    timings: StageTimings
    profile: ServingProfile
    overlay_url: str | None = Field(None, description="PNG overlay of this score, when asked for with overlay=true")
    geojson_url: str | None = Field(None, description="QuPath-importable GeoJSON of this score (tissue, attention, "
                                                      "tiles, glimpses; level-0 px), when asked for with geojson=true")


class HealthResponse(BaseModel):
    status: str = Field(description="'ok', 'model not loaded', or 'unavailable' (a backend stage cannot be reached)")
    model_loaded: bool
    detail: str | None = None


class ErrorResponse(BaseModel):
    detail: str
