"""``wsikit view``: a job's slides in the browser (deep zoom) with its masks, tile grids and scores on top.

``data`` (what a job holds per slide, as JSON payloads), ``scores`` (runs and heatmap CSVs as score
layers), ``dzi`` (DeepZoom tiles from the slide, cached), ``app`` (the Starlette app and its security
rules; needs the ``view`` extra), ``export`` (a static folder that opens from disk). The page itself is
``static/`` with OpenSeadragon vendored (see ``static/openseadragon/VERSION.md``). Usage: ``docs/view.md``.
"""

OPENSEADRAGON_VERSION = "6.1.1"
