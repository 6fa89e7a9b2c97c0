"""Layer 2, dataset distillation built on ``srdistill.sr``: patch mining, CLIP embedding and
clustering, ViT complexity, the selectors (``selection`` with ``kcenter``, ``proxy_error``,
``stratified``), feature alignment, and SRDD's diffusion fine-tuning and synthesis."""
