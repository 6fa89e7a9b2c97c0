"""Layer 2, zero-shot SR built on ``srdistill.sr``: MZSR (meta-transfer learning, test-time
adaptation) and ZSSR (``mzsr``), and the TensorFlow checkpoint reader for MZSR's released
models (``tfbundle``)."""
