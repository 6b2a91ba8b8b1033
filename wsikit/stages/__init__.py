"""The per-slide stages of a job: `tile`, `extract` and `heatmap`, and `run`'s pipeline that chains them."""
