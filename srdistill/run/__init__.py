"""Layer 3, the run machinery: the run directory (``rundir``), the pipeline of stages
(``pipeline``), the one Ray layer (``runner``), the report, the quality benchmark and tiled
upscaling of image files (``upscale``)."""
