"""Layer 1, the SR protocol and networks: image I/O and MATLAB bicubic (``imaging``), PSNR/SSIM
(``metrics``), blur kernels and degradations (``degradation``), pixel statistics
(``image_stats``), the networks (``models``), devices and tensors (``device``), SR training with
its curriculum (``training``, ``curriculum``) and the evaluation protocol (``evaluation``).
Imports only the ground modules (``config``, ``storage``, ``datasets``, ``weights``)."""
