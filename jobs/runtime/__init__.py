"""The runtime the Ray edges share (jobs/, tune/, serve/): one rule for starting or joining Ray
(``cluster``), the tile plane of reader actors (``tile_plane``) and MLflow tracking and the model registry
(``tracking``). Nothing here imports the jobs, tune or serve; the core (``dual_attention``) imports none of it."""
