"""Core (no ComfyUI): scoring removal results, ``erasekit-eval``.

- ``folders``: samples paired by file stem in the layouts EraseKit reads (triplet datasets, RemovalBench, folders);
- ``metrics``: PSNR, SSIM and PSNR inside / outside the dilated mask (no weights);
- ``learned``: LPIPS, FID, CMMD and ReMOVE from local weights (the ``eval`` extra);
- ``report``: the per-image CSV, the Markdown summary and the PNG; ``score``: the job; ``cli``: the command.
"""
